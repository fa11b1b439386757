"""bench/control_plane.py: the hot queries' plans on a database with a project's long history (in `make test`), and
the whole harness at a tiny scale (make test-bench)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

def test_hot_queries_read_few_rows_with_a_long_history_and_a_backlog(postgres_url):
    """Creation and dispatch count a project's active jobs under its row lock, dispatch takes its next unsent job, the
    list shows its newest page: each must read about the rows it returns, not a project's history (p_old: 3,000 finished
    jobs, older than everything else) nor another project's backlog (p0: 5,000 queued, never sent)."""
    import control_plane

    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO projects (name, created_at) SELECT 'p' || g, 0 FROM generate_series(0, 49) g"))
        conn.execute(text("INSERT INTO projects (name, created_at) VALUES ('p_old', 0)"))
        job = ("INSERT INTO jobs (id, project, model, training_file, hyperparameters, training_config, status, result_files, "
               "created_at, attempt, enqueued_at) ")
        conn.execute(text(job + "SELECT 'ftjob-old-' || g, 'p_old', 'tiny', 'f', '{}', '{}', 'succeeded', '[]', 0, 1, NULL "
                                "FROM generate_series(1, 3000) g"))
        # The oldest job's 2,000 events come before every other event (a job that ran long ago, with a long log).
        conn.execute(text("INSERT INTO job_events (id, job_id, created_at, level, message, type) "
                          "SELECT 'ftevent-old-' || g, 'ftjob-old-1', 0, 'info', 'Step', 'message' FROM generate_series(1, 2000) g"))
        # Then p0's 5,000 unsent queued jobs among the 49 others' 20 finished, 2 queued and sent and 1 unsent each.
        conn.execute(text(job + """
            SELECT 'ftjob-' || p || '-' || g, 'p' || p, 'tiny', 'f', '{}', '{}',
                   CASE WHEN p > 0 AND g < 20 THEN 'succeeded' ELSE 'queued' END, '[]', 0, 1,
                   CASE WHEN p > 0 AND g IN (20, 21) THEN 1.0 END
            FROM generate_series(0, 49) p, generate_series(0, 4999) g
            WHERE g < CASE WHEN p = 0 THEN 5000 ELSE 23 END
            ORDER BY g, p"""))
        conn.execute(text("INSERT INTO job_events (id, job_id, created_at, level, message, type) "
                          "SELECT 'ftevent-' || j.seq || '-' || g, j.id, 0, 'info', 'Step', 'message' FROM jobs j, generate_series(1, 2) g"))
        conn.execute(text("INSERT INTO job_metrics (job_id, step, created_at, values) "
                          "SELECT j.id, g, 0, '{}' FROM jobs j, generate_series(1, 2) g"))
        conn.execute(text("ANALYZE"))
        job_id = conn.execute(text("SELECT id FROM jobs WHERE project = 'p1' ORDER BY seq DESC LIMIT 1")).scalar_one()
    plans = {project: control_plane.explain(engine, control_plane.hot_queries(project, job_id, "nobody"))
             for project in ("p0", "p1", "p_old")}
    old_events = control_plane.explain(engine, control_plane.hot_queries("p_old", "ftjob-old-1", "nobody"))["events_page"]
    engine.dispose()
    # Ordered by seq alone, p_old's list page and p0's next unsent job walked the primary key backwards past every newer
    # row (6,148 and 3,001 rows read), and the old job's events page past every newer event (18,252): a page is read
    # along its owner's (owner, seq) index (core.db.owned_by). p1's page reads its 23 jobs (a bitmap scan, a sort of 23).
    bounds = {("p_old", "create_active_counts"): 0, ("p_old", "dispatch_counts"): 0, ("p0", "list_jobs_by_project"): 21,
              ("p_old", "list_jobs_by_project"): 21, ("p0", "dispatch_unsent"): 1,
              ("p1", "list_jobs_by_project"): 23, ("p1", "create_active_counts"): 3, ("p1", "dispatch_counts"): 3,
              ("p1", "dispatch_unsent"): 1}
    read = {key: plans[key[0]][key[1]]["rows_read"] for key in bounds}
    assert read == bounds, {key: (read[key], plans[key[0]][key[1]]["scans"]) for key in bounds if read[key] != bounds[key]}
    for name in ("claim", "heartbeat", "events_page", "metrics_running_jobs"):  # by id: never a scan of the table
        assert plans["p1"][name]["rows_read"] <= 3, (name, plans["p1"][name])
    assert old_events["rows_read"] == 21, old_events
    # The sweeper's queued jobs sent before a time: the 98 sent ones (p1-p49's 2 each), not the 14,000 other rows.
    assert plans["p1"]["sweeper_sent_before"]["rows_read"] == 98, plans["p1"]["sweeper_sent_before"]
    # /metrics' jobs by status reads the jobs not yet ended (the ended ones are counted as they end), so a longer
    # history costs nothing: with 30,000 more finished jobs it reads the same 5,147 (p0's 5,000, 3 of each other).
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text(job + "SELECT 'ftjob-older-' || g, 'p_old', 'tiny', 'f', '{}', '{}', 'succeeded', '[]', 0, 1, NULL "
                                "FROM generate_series(1, 30000) g"))
        conn.execute(text("ANALYZE jobs"))
    by_status = control_plane.explain(engine, control_plane.hot_queries("p1", job_id, "nobody"))["metrics_jobs_by_status"]
    engine.dispose()
    assert by_status["rows_read"] == 5000 + 49 * 3, by_status


@pytest.mark.bench
def test_harness_runs_jobs_to_the_end_at_a_tiny_scale(tmp_path):
    import control_plane

    out = tmp_path / "cp.json"
    assert control_plane.main(["--workers", "2", "--projects", "3", "--jobs", "12", "--create", "4", "--big-events", "200",
                               "--steps", "2", "--step-seconds", "0.05", "--heartbeat-s", "0.5", "--run-seconds", "20",
                               "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["machine"]["cores"] and record["versions"]["postgresql"] and len(record["machine"]["load_average"]) == 3
    assert record["create"]["n"] == 4 and record["create"]["p99_ms"] > 0
    assert record["queued_before_run"] == 12
    assert record["run"]["claims"] >= 1 and record["run"]["jobs_succeeded"] >= 1
    integrity = record["integrity"]
    assert integrity["claimed_twice"] == 0 and integrity["succeeded_with_wrong_step_count"] == 0
    assert integrity["succeeded_events"] == integrity["succeeded_rows"] == record["run"]["jobs_succeeded"]
    assert all(record["reads_under_load"][name]["n"] >= 1 for name in ("list_jobs", "events_page", "metrics"))
    assert record["sweep_dispatch"]["seconds"] >= 0 and set(record["plans"]) >= {"claim", "list_jobs_by_project", "sweeper_lost"}
