"""The control plane under load: the real API, PostgreSQL, Redis, dispatch, claims, heartbeats, the sweeper and
the read endpoints, with N simulated GPU workers (issue 27).

    python bench/control_plane.py --workers 50 --projects 100 --jobs 2000 --run-seconds 60

What runs: a fresh PostgreSQL database (migrated), the API as a uvicorn process (`--api-workers` processes), and
one Celery worker process on Redis (a queue of its own) with `--workers` threads. Each thread is a GPU worker that
takes the real task message and runs `worker.runner.run_job`: the claim, the heartbeat thread, the database sink's
events and metrics, the result upload and the final commit are the service's own code; only the engine
(`worker.runner.train`) is replaced by a stand-in that sleeps `--step-seconds` per step and reports each step
through the sink. Everything talks to 127.0.0.1, stops by itself after `--run-seconds`, and drops its database.

Measured, in order: job creation through the API (`--create` requests sent at a steady `--create-rate`, throughput
and latency); the rest of the
backlog inserted directly, as queued unsent rows; one sweeper pass (which dispatches every project's first job);
the query plans of the hot queries (any sequential scan on jobs, job_events or job_metrics is flagged); then,
while the workers run, claim latency (a worker freed or started -> its next claim) and the p50/p99 of the jobs
list, an events page of a job with `--big-events` events (its newest and one deep in, by `after=`) and GET /metrics,
the fairness probe (a new project's first job, a third of the way in, behind `--heavy` queued jobs of another) and
PostgreSQL's write load (its statistics' counters before and after); one more sweeper pass under load; the
database size per 1,000 jobs; and the integrity of the run (every job ended at most once, every step stored once).
The record goes to bench/results/control-plane-<date>.json with the machine, versions and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_ADMIN_URL = os.environ.get("QLORA_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("QLORA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BIG_TABLES = ("jobs", "job_events", "job_metrics")
# A Llama config.json small enough that the API's memory estimate is instant; no weights are ever read.
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
               "max_position_embeddings": 2048, "torch_dtype": "bfloat16", "tie_word_embeddings": True}


# --- the simulated GPU worker (runs in the worker process) -----------------------------------------------------


def run_worker_process(threads: int, step_seconds: float, steps: int, log_path: Path, connections: int) -> None:
    """A Celery worker (threads pool, `threads` at once) whose engine sleeps: everything else is the service's."""
    import worker.runner as runner
    import worker.tasks as tasks
    from contract.metrics import StepMetrics
    from core.db import make_engine, make_session_factory
    from worker.training.trainer import TrainingResult

    log_lock = threading.Lock()
    log_file = log_path.open("a")

    def record(**row: Any) -> None:
        with log_lock:
            log_file.write(json.dumps({**row, "t": time.time(), "thread": threading.get_ident()}) + "\n")
            log_file.flush()

    def fake_train(request, sink, should_stop, resume_from=None, should_pause=None):  # noqa: ANN001, ANN202
        sink.start(steps)
        done = 0
        for step in range(1, steps + 1):
            if should_stop():
                break
            time.sleep(step_seconds)
            sink.metrics(step, StepMetrics(step=step, train_loss=1.0 / step, tokens=512, step_seconds=step_seconds))
            done = step
        adapter = request.output_dir / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter_config.json").write_text("{}")
        status = "succeeded" if done == steps and not should_stop() else "stopped"
        return TrainingResult(status=status, steps=done, total_steps=steps, trained_tokens=512 * done, final_train_loss=None,
                           final_valid_loss=None, adapter_dir=adapter, checkpoints=[], train_stats={}, validation_stats=None,
                           seconds=done * step_seconds)

    real_claim, real_run = runner.claim_job, runner.run_job

    def claim_job(session, job_id, worker_id):  # noqa: ANN001, ANN202
        claimed = real_claim(session, job_id, worker_id)
        if claimed:  # the runner commits it with the started event, at once
            record(kind="claimed", job=job_id)
        return claimed

    def run_job(job_id, *args, **kwargs):  # noqa: ANN001, ANN202
        outcome = real_run(job_id, *args, **kwargs)
        record(kind="free", job=job_id, outcome=outcome)
        return outcome

    runner.train, runner.claim_job, runner.run_job = fake_train, claim_job, run_job
    # One pool for all the threads. Deployed, each GPU worker process holds its own connections (its task, its
    # heartbeat thread); here the pool is capped (--worker-connections) so that the run stays within a shared server's
    # max_connections, and a thread may wait for a connection that a process of its own would have had.
    factory = make_session_factory(make_engine(tasks.settings().database_url, pool_size=min(threads + 5, connections), max_overflow=0))
    tasks.session_factory = lambda: factory
    record(kind="ready")
    tasks.app.worker_main(["worker", "--pool=threads", f"--concurrency={threads}", "-Q", tasks.settings().task_queue,
                           "--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel=" + os.environ.get("QLORA_BENCH_WORKER_LOGLEVEL", "WARNING")])


# --- helpers -----------------------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"n": len(values), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2),
            "mean_ms": round(statistics.fmean(values) * 1000, 2)}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "note": os.environ.get("QLORA_BENCH_MACHINE_NOTE", ""),
            "platform": platform.platform()}


def versions(engine: Any) -> dict[str, str]:
    import celery
    import fastapi
    import redis
    import sqlalchemy
    from sqlalchemy import text

    with engine.connect() as conn:
        pg = conn.execute(text("SHOW server_version")).scalar()
    info = redis.Redis.from_url(REDIS_URL).info("server")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()
    return {"python": platform.python_version(), "postgresql": str(pg), "redis": str(info.get("redis_version")),
            "sqlalchemy": sqlalchemy.__version__, "celery": celery.__version__, "fastapi": fastapi.__version__, "commit": git}


def create_database() -> str:
    from sqlalchemy import create_engine, text

    from core.bootstrap import migrate

    name = f"qlora_bench_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    migrate(url)
    return url


def drop_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_counters(engine: Any) -> dict[str, Any]:
    """PostgreSQL's cumulative counters of this database (transactions, rows written) and of the big tables (rows
    inserted, updated), at this moment: two snapshots give the write load in between. Each backend reports its counts
    when idle, at most once a second, so a snapshot lags by about a second."""
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
        db = conn.execute(text("SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, blks_hit + blks_read "
                               "FROM pg_stat_database WHERE datname = current_database()")).one()
        tables = {name: {"inserted": ins, "updated": upd, "hot_updated": hot} for name, ins, upd, hot in conn.execute(text(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = ANY(:names)"),
            {"names": ["jobs", "job_events", "job_metrics", "job_outbox"]})}
    return {"t": time.time(), "commits": db[0], "rollbacks": db[1], "rows_inserted": db[2], "rows_updated": db[3],
            "rows_deleted": db[4], "blocks_touched": db[5], "tables": tables}


def write_load(before: dict[str, Any], after: dict[str, Any], steps: int, jobs_done: int) -> dict[str, Any]:
    """Per second between two write_counters snapshots, and per job run (`steps` steps each)."""
    seconds = max(1e-9, after["t"] - before["t"])
    per_s = {k: round((after[k] - before[k]) / seconds, 1) for k in ("commits", "rollbacks", "rows_inserted", "rows_updated", "rows_deleted")}
    tables = {name: {k: round((after["tables"][name][k] - before["tables"].get(name, {}).get(k, 0)) / seconds, 1)
                     for k in ("inserted", "updated", "hot_updated")} for name in after["tables"]}
    per_job = {k: round((after[k] - before[k]) / jobs_done, 1) for k in ("commits", "rows_inserted", "rows_updated")} if jobs_done else {}
    return {"seconds": round(seconds, 1), "per_second": per_s, "tables_per_second": tables, "per_job_run": per_job,
            "steps_per_job": steps}


# --- the query plans ------------------------------------------------------------------------------------------------

def hot_queries(project: str, job_id: str, worker_id: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The statements the service runs most, as it runs them (SQL with its parameters), by name."""
    from sqlalchemy import func, select, update

    from api.metrics import jobs_by_status, running_jobs_newest_step
    from api.pagination import page_query
    from core.dispatch import next_unsent_jobs, projects_with_room_query
    from core.leases import lapsed
    from core.settings import Settings
    from core.tables import Job, JobEvent

    queries = {
        "claim": update(Job).where(Job.id == job_id, Job.status.in_(["queued"])).values(status="running", worker_id=worker_id),
        "heartbeat": update(Job).where(Job.id == job_id, Job.status == "running", Job.worker_id == worker_id).values(heartbeat_at=1.0),
        "dispatch_counts": select(Job.status, func.count()).where(
            Job.project == project, Job.status.in_(["running", "queued"]),
            (Job.status == "running") | Job.enqueued_at.is_not(None)).group_by(Job.status),
        "dispatch_unsent": next_unsent_jobs(project, 1),
        "create_active_counts": select(Job.status, func.count()).where(
            Job.project == project, Job.status.in_(["queued", "running", "paused"])).group_by(Job.status),
        "list_jobs_by_project": page_query(select(Job), Job.seq, after_seq=None, limit=20, newest_first=True,
                                           owner=(Job.project, project)),
        "events_page": page_query(select(JobEvent), JobEvent.seq, after_seq=None, limit=20, newest_first=True,
                                  owner=(JobEvent.job_id, job_id)),
        "sweeper_lost": select(Job.id, Job.attempt, Job.worker_id, Job.pause_requested_at).where(lapsed(Job, heartbeat_timeout_s=120)),
        "sweeper_sent_before": select(Job.id).where(Job.status == "queued", Job.enqueued_at.is_not(None), Job.enqueued_at < time.time()),
        "sweeper_projects_with_room": projects_with_room_query(Settings(database_url="sqlite://")),
        "metrics_jobs_by_status": jobs_by_status(),
        "metrics_running_jobs": running_jobs_newest_step(),
    }
    return queries


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A plan's nodes, depth first."""
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def explain(engine: Any, queries: dict[str, Any]) -> dict[str, Any]:
    """EXPLAIN ANALYZE each statement in a transaction that is rolled back (a claim changes nothing): the plan's scans,
    its node types, and `rows_read`, the rows its scans of the big tables fetched (kept and filtered out alike)."""
    from sqlalchemy.dialects import postgresql

    plans: dict[str, Any] = {}
    with engine.connect() as conn:
        for name, stmt in queries.items():
            compiled = stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"render_postcompile": True})
            raw = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + str(compiled), compiled.params).scalar()
            conn.rollback()
            plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
            nodes = list(plan_nodes(plan))
            scans = [f"{n['Node Type']} on {n['Relation Name']}" + (f" using {n['Index Name']}" if "Index Name" in n else "")
                     for n in nodes if "Relation Name" in n]
            rows_read = sum(n.get("Actual Loops", 1) * (n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)
                                                        + n.get("Rows Removed by Index Recheck", 0))
                            for n in nodes if n.get("Relation Name") in BIG_TABLES and n["Node Type"] != "ModifyTable")
            seq = [s for s in scans if s.startswith("Seq Scan") and s.split(" on ")[1] in BIG_TABLES]
            plans[name] = {"scans": scans, "nodes": [n["Node Type"] for n in nodes], "rows_read": rows_read, "seq_scans_on_big_tables": seq,
                           "ms": plan.get("Actual Total Time")}
    return plans


# --- the run ------------------------------------------------------------------------------------------------------


def seed(session_factory: Any, storage: Any, projects: list[str], tmp: Path) -> dict[str, str]:
    """The projects' rows and one processed training file each (a real object in storage): project -> file id."""
    from core import ids
    from core.tables import File, Project, now

    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
                            + "\n" for i in range(12)))
    files: dict[str, str] = {}
    with session_factory() as session:
        session.add_all([Project(name=project, created_at=now()) for project in projects])
        session.flush()
        for project in projects:
            file_id = ids.file_id()
            stored = storage.put_file(f"files/{file_id}", data)
            session.add(File(id=file_id, project=project, filename="train.jsonl", purpose="fine-tune", bytes=stored.size,
                             sha256=stored.sha256, status="processed", storage_key=stored.key, created_at=now(), n_examples=12))
            files[project] = file_id
        session.commit()
    return files


def bulk_queue(engine: Any, template_job: str, projects: list[str], count: int, heavy_project: str | None, heavy: int) -> None:
    """`count` more queued, unsent jobs spread over `projects` (and `heavy` in `heavy_project`), copied in SQL from a
    job the API created (same options), with the created event the API writes."""
    from sqlalchemy import text

    plan = [projects[i % len(projects)] for i in range(count)] + [heavy_project] * (heavy if heavy_project else 0)
    with engine.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE bench_plan (n int, project text) ON COMMIT DROP"))
        conn.execute(text("INSERT INTO bench_plan VALUES (:n, :p)"), [{"n": n, "p": p} for n, p in enumerate(plan)])
        conn.execute(text("""
            INSERT INTO jobs (id, project, model, training_file, hyperparameters, training_config, status, result_files,
                              memory_estimate, created_at, attempt)
            SELECT 'ftjob-bench' || md5(random()::text || p.n), p.project, j.model, f.id, j.hyperparameters, j.training_config,
                   'queued', '[]', j.memory_estimate, j.created_at, 0
            FROM bench_plan p JOIN jobs j ON j.id = :template
            JOIN LATERAL (SELECT id FROM files WHERE files.project = p.project LIMIT 1) f ON true
            ORDER BY p.n"""), {"template": template_job})
        conn.execute(text("""
            INSERT INTO job_events (id, job_id, created_at, level, message, type)
            SELECT 'ftevent-' || md5(random()::text || j.seq), j.id, j.created_at, 'info', 'Created fine-tuning job: ' || j.id, 'message'
            FROM jobs j WHERE j.id LIKE 'ftjob-bench%'"""))
        conn.execute(text("ANALYZE"))


def many_events(engine: Any, job_id: str, count: int) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO job_events (id, job_id, created_at, level, message, type)
            SELECT 'ftevent-many' || g, :job, 0, 'info', 'Step ' || g, 'message' FROM generate_series(1, :n) g"""),
                     {"job": job_id, "n": count})
        conn.execute(text("ANALYZE job_events"))


def timed_sweep(settings: Any, session_factory: Any, celery_app: Any, storage: Any) -> dict[str, Any]:
    from worker.sweeper import sweep

    started = time.perf_counter()
    result = sweep(settings, session_factory, celery_app, storage)
    return {"seconds": round(time.perf_counter() - started, 3), **{k: len(v) for k, v in result.items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import redis
    from sqlalchemy import func, select, text

    from core.db import make_engine, make_session_factory
    from core.queue import make_celery
    from core.settings import Settings
    from core.storage import make_storage
    from core.tables import Job, JobEvent, JobMetric

    record: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                              "params": {k: v for k, v in vars(args).items() if k != "out"}}
    tmp = Path(tempfile.mkdtemp(prefix="qlora-bench-cp-"))
    database_url = create_database()
    queue = f"bench-cp-{secrets.token_hex(4)}"
    projects = [f"p{i:04d}" for i in range(args.projects)]
    small = "small"  # the fairness probe: a project with no jobs until its first one, mid-run
    keys = {project: f"sk-bench-{project}-{secrets.token_hex(8)}" for project in [*projects, small]}
    env_settings = {
        "HOME": str(tmp / "home"), "DATABASE_URL": database_url, "BROKER_URL": REDIS_URL, "TASK_QUEUE": queue,
        "STORAGE": "local", "STORAGE_DIR": str(tmp / "objects"), "MODELS_DIR": str(tmp / "models"),
        "API_KEYS": ",".join(f"{key}={project}" for project, key in keys.items()),
        "MAX_ACTIVE_JOBS_PER_PROJECT": "100000", "MAX_QUEUED_JOBS_PER_PROJECT": "100000",
        "HEARTBEAT_INTERVAL_S": str(args.heartbeat_s), "DB_POOL_SIZE": "10", "LOG_FORMAT": "text",
        "METRICS_PORT": str(free_port()), "METRICS_HOST": "127.0.0.1",  # GET /metrics has a listener of its own
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update({f"QLORA_{k}": v for k, v in env_settings.items()})
    env["PYTHONPATH"] = str(REPO)
    (tmp / "models" / "tiny").mkdir(parents=True)
    (tmp / "models" / "tiny" / "config.json").write_text(json.dumps(TINY_CONFIG))
    settings = Settings(**{k.lower(): v for k, v in env_settings.items()})
    engine = make_engine(database_url, pool_size=5, max_overflow=5)
    session_factory = make_session_factory(engine)
    storage = make_storage(settings)
    celery_app = make_celery(settings)
    api = worker = metrics_server = None
    deadline = time.monotonic() + args.max_seconds
    try:
        record["versions"] = versions(engine)
        files = seed(session_factory, storage, [*projects, small], tmp)
        port = free_port()
        api_log = (tmp / "api.log").open("w")
        api_env = env
        if args.api_workers > 1:  # several API processes: prometheus_client's multiprocess mode, one metrics server
            (tmp / "prometheus").mkdir()
            api_env = {k: v for k, v in env.items() if k != "QLORA_METRICS_PORT"} | {"PROMETHEUS_MULTIPROC_DIR": str(tmp / "prometheus")}
            metrics_server = subprocess.Popen([sys.executable, "-m", "api.metrics_server"], env={**api_env, "QLORA_METRICS_PORT": env["QLORA_METRICS_PORT"]},
                                              cwd=REPO, stdout=api_log, stderr=subprocess.STDOUT)
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                                "--port", str(port), "--workers", str(args.api_workers), "--log-level", "warning"],
                               env=api_env, cwd=REPO, stdout=api_log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        wait_for_http(base + "/healthz", 90)

        # 1. creation through the API, at a steady --create-rate (requests leave on schedule, whatever the answers' pace)
        def create(i: int, project: str | None = None) -> tuple[float, int, str, float]:
            project = project or projects[i % len(projects)]
            body = {"model": "tiny", "training_file": files[project], "hyperparameters": {"n_epochs": 1}}
            if args.create_rate:
                time.sleep(max(0.0, create_started + i / args.create_rate - time.perf_counter()))
            started = time.perf_counter()
            answer = client.post(f"{base}/v1/fine_tuning/jobs", json=body, headers={"Authorization": f"Bearer {keys[project]}"})
            lag = started - (create_started + i / args.create_rate) if args.create_rate else 0.0
            return time.perf_counter() - started, answer.status_code, answer.json().get("id", answer.text[:200]), lag

        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.create_concurrency)) as client, \
                ThreadPoolExecutor(args.create_concurrency) as pool:
            create_started = time.perf_counter()
            created = list(pool.map(create, range(args.create)))
            wall = time.perf_counter() - create_started
        bad = [c for c in created if c[1] != 200]
        if bad:
            raise RuntimeError(f"{len(bad)} creations failed, first: {bad[0]}")
        record["create"] = {"requests": args.create, "rate_asked": args.create_rate, "max_in_flight": args.create_concurrency,
                            "per_second": round(args.create / wall, 1), **percentiles([c[0] for c in created]),
                            "send_lag": percentiles([c[3] for c in created]),
                            # the same without the first second's requests (each API process's first requests import and connect)
                            "after_first_second": percentiles([c[0] for c in created[int(args.create_rate or 50):]])}

        # 2. the backlog, a job with many events, one sweeper pass that dispatches it
        backlog = max(0, args.jobs - args.create)
        bulk_queue(engine, created[0][2], projects, backlog, projects[0] if args.heavy else None, args.heavy)
        big_job = created[-1][2]
        many_events(engine, big_job, args.big_events)
        with session_factory() as session:
            record["queued_before_run"] = session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued"))
        record["sweep_dispatch"] = timed_sweep(settings, session_factory, celery_app, storage)
        record["plans"] = explain(engine, hot_queries(projects[1 % len(projects)], big_job, "nobody"))

        # 3. the workers
        worker_log = tmp / "worker.jsonl"
        worker_out = (tmp / "worker.log").open("w")
        worker = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker-process", "--workers", str(args.workers),
                                   "--step-seconds", str(args.step_seconds), "--steps", str(args.steps), "--worker-log", str(worker_log),
                                   "--worker-connections", str(args.worker_connections)],
                                  env=env, cwd=REPO, stdout=worker_out, stderr=subprocess.STDOUT)
        # The run starts once the worker process has imported the runner (torch included: many seconds on a busy machine).
        while not (worker_log.exists() and worker_log.read_text().strip()):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker process did not start:\n" + (tmp / "worker.log").read_text()[-3000:])
            time.sleep(0.2)
        run_started = time.time()
        counters_before = write_counters(engine)
        reads: dict[str, list[float]] = {"list_jobs": [], "events_page": [], "events_page_deep": [], "metrics": []}
        run_until = time.monotonic() + args.run_seconds
        probe_at = time.monotonic() + args.run_seconds / 3
        probe: dict[str, Any] = {}
        big_owner = {"Authorization": f"Bearer {keys[projects[(args.create - 1) % len(projects)]]}"}
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < min(run_until, deadline) and worker.poll() is None:
                if not probe and time.monotonic() >= probe_at:  # the small project's first job, every worker busy
                    probe["created_at"] = time.time()
                    _, status, probe["job"], _ = create(0, small)
                    if status != 200:
                        raise RuntimeError(f"the fairness probe's creation failed: {status} {probe['job']}")
                project = random.choice(projects)
                for name, url, headers in (
                    ("list_jobs", f"{base}/v1/fine_tuning/jobs?limit=20", {"Authorization": f"Bearer {keys[project]}"}),
                    ("events_page", f"{base}/v1/fine_tuning/jobs/{big_job}/events?limit=20", big_owner),
                    ("events_page_deep", f"{base}/v1/fine_tuning/jobs/{big_job}/events?limit=20&after=ftevent-many{random.randint(21, args.big_events)}",
                     big_owner),
                    ("metrics", f"http://127.0.0.1:{env_settings['METRICS_PORT']}/metrics", {}),
                ):
                    started = time.perf_counter()
                    answer = client.get(url, headers=headers)
                    reads[name].append(time.perf_counter() - started)
                    if answer.status_code != 200:
                        raise RuntimeError(f"GET {url}: {answer.status_code} {answer.text[:200]}")
                time.sleep(args.read_pause_s)
        counters_after = write_counters(engine)
        record["sweep_under_load"] = timed_sweep(settings, session_factory, celery_app, storage)
        record["reads_under_load"] = {name: percentiles(values) for name, values in reads.items()}
        stop_process(worker, signal.SIGKILL)  # a GPU fleet does not stop politely; nothing below needs it alive
        worker_out.close()
        record["worker_log_tail"] = (tmp / "worker.log").read_text()[-int(os.environ.get("QLORA_BENCH_LOG_TAIL", "3000")):]
        run_seconds = time.time() - run_started

        # 4. claims, integrity, sizes
        rows = [json.loads(line) for line in worker_log.read_text().splitlines() if line.strip()]
        ready = next((r["t"] for r in rows if r["kind"] == "ready"), run_started)
        free_since: dict[int, float] = {}
        claim_latency: list[float] = []
        for row in sorted(rows, key=lambda r: r["t"]):
            if row["kind"] == "claimed":
                claim_latency.append(row["t"] - free_since.get(row["thread"], ready))
            elif row["kind"] == "free":
                free_since[row["thread"]] = row["t"]
        claimed = [r["job"] for r in rows if r["kind"] == "claimed"]
        claimed_at = {r["job"]: r["t"] for r in rows if r["kind"] == "claimed"}
        # A job's wall time in the worker, its claim to the thread's return: the steps' sleep plus the runner's own work.
        job_wall = [r["t"] - claimed_at[r["job"]] for r in rows if r["kind"] == "free" and r["job"] in claimed_at]
        with session_factory() as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            succeeded = session.scalar(select(func.count()).select_from(Job).where(Job.status == "succeeded"))
            steps_stored = session.execute(text(
                "SELECT count(*) FILTER (WHERE n <> :steps), count(*) FROM (SELECT j.id, count(m.seq) n FROM jobs j "
                "LEFT JOIN job_metrics m ON m.job_id = j.id WHERE j.status = 'succeeded' GROUP BY j.id) t"), {"steps": args.steps}).one()
            done_events = session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.message == "The job has successfully completed"))
            metric_rows = session.scalar(select(func.count()).select_from(JobMetric))
            # The tables and their indexes (the empty database's catalogs left out).
            db_bytes = int(session.scalar(text("SELECT sum(pg_total_relation_size(relid)) FROM pg_catalog.pg_statio_user_tables")) or 0)
            tables = dict(session.execute(text(
                "SELECT relname, pg_total_relation_size(relid) FROM pg_catalog.pg_statio_user_tables ORDER BY 2 DESC LIMIT 8")).all())
            jobs_total = sum(by_status.values())
        record["run"] = {
            "workers": args.workers, "seconds": round(run_seconds, 1), "claims": len(claimed), "jobs_succeeded": succeeded,
            "jobs_per_second": round(succeeded / run_seconds, 2), "claim_latency": percentiles(claim_latency),
            "job_wall": percentiles(job_wall),
            "status_counts": by_status,
        }
        done_in_window = sum(1 for r in rows if r["kind"] == "free" and r["t"] <= counters_after["t"])
        record["write_load"] = write_load(counters_before, counters_after, args.steps, done_in_window)
        if probe:
            claimed_at = next((r["t"] for r in rows if r["kind"] == "claimed" and r["job"] == probe["job"]), None)
            freed_after = [r["t"] for r in rows if r["kind"] == "free" and r["t"] >= probe["created_at"]]
            record["fairness"] = {
                "heavy_project_queued": args.heavy, "job_seconds": args.steps * args.step_seconds,
                "created_to_claimed_s": round(claimed_at - probe["created_at"], 3) if claimed_at else None,
                # from the first worker to free up after the creation to the probe's claim: the goal is under one job's duration
                "first_free_to_claimed_s": round(claimed_at - freed_after[0], 3) if claimed_at and freed_after else None,
                "claims_between": sum(1 for r in rows if r["kind"] == "claimed" and claimed_at and probe["created_at"] <= r["t"] < claimed_at),
            }
        record["integrity"] = {
            "claimed_twice": len(claimed) - len(set(claimed)),
            "succeeded_with_wrong_step_count": steps_stored[0],
            "succeeded_events": done_events, "succeeded_rows": succeeded, "metric_rows": metric_rows,
        }
        record["database"] = {"bytes": db_bytes, "jobs": jobs_total, "events": args.big_events,
                              "bytes_per_1000_jobs_excluding_big_events_job": None, "largest_tables": tables}
        with session_factory() as session:  # size without the synthetic events of the one big job
            big = session.scalar(text("SELECT coalesce(sum(pg_column_size(e.*)), 0) FROM job_events e WHERE job_id = :j"), {"j": big_job})
        record["database"]["bytes_per_1000_jobs_excluding_big_events_job"] = int((db_bytes - big) * 1000 / max(1, jobs_total))
        record["machine"]["load_average_after"] = list(os.getloadavg())
        return record
    finally:
        for proc in (worker, api, metrics_server):
            if proc is not None:
                stop_process(proc)
        engine.dispose()
        drop_database(database_url)
        client_redis = redis.Redis.from_url(REDIS_URL)
        for name in [*client_redis.scan_iter(f"{queue}*"), *client_redis.scan_iter(f"_kombu.binding.{queue}*")]:
            client_redis.delete(name)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=10, help="simulated GPU workers (threads of one Celery worker)")
    parser.add_argument("--projects", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2000, help="queued jobs in all (the API creates --create of them)")
    parser.add_argument("--create", type=int, default=300, help="jobs created through the API (timed)")
    parser.add_argument("--create-rate", type=float, default=50.0, help="creations per second, sent on schedule (0: back to back)")
    parser.add_argument("--create-concurrency", type=int, default=32, help="most creations in flight at once")
    parser.add_argument("--heavy", type=int, default=0, help="extra queued jobs of the first project (fairness backlog)")
    parser.add_argument("--big-events", type=int, default=100_000, help="events of the job whose events page is timed")
    parser.add_argument("--api-workers", type=int, default=1,
                        help="uvicorn processes; more than 1 runs them in prometheus_client's multiprocess mode with api.metrics_server on the metrics port")
    parser.add_argument("--steps", type=int, default=3, help="steps of each simulated job")
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    parser.add_argument("--run-seconds", type=float, default=60.0, help="how long the workers run")
    parser.add_argument("--read-pause-s", type=float, default=0.2)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard bound of the whole run")
    parser.add_argument("--out", type=Path, default=None, help="the JSON record (default bench/results/control-plane-DATE-Nw.json)")
    parser.add_argument("--worker-connections", type=int, default=40,
                        help="database connections the simulated workers share (keep under the server's max_connections)")
    parser.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_process:
        run_worker_process(args.workers, args.step_seconds, args.steps, args.worker_log, args.worker_connections)
        return 0
    record = run(args)
    out = args.out or REPO / "bench" / "results" / f"control-plane-{time.strftime('%Y%m%d-%H%M')}-{args.workers}w.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    flagged = {name: plan["seq_scans_on_big_tables"] for name, plan in record["plans"].items() if plan["seq_scans_on_big_tables"]}
    print(json.dumps({"out": str(out), "create": record["create"], "claim_latency": record["run"]["claim_latency"],
                      "fairness": record.get("fairness"), "write_load": record["write_load"]["per_second"],
                      "reads": record["reads_under_load"], "sweeps": [record["sweep_dispatch"], record["sweep_under_load"]],
                      "seq_scans": flagged, "integrity": record["integrity"], "load": record["machine"]["load_average"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
