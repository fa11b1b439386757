"""/v1/fine_tuning/jobs: create, enqueue (Redis), list, retrieve, cancel, events."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from contract.options import DPO_OPTIONS, TrainingConfig
from core.jobs import claim_job
from core.queue import TRAIN_TASK
from core.tables import File, Job, JobEvent
from tests.api.conftest import make_settings
from tests.api.helpers import (
    KEY_A,
    KEY_B,
    assert_error,
    chat_jsonl,
    create_job,
    create_job_ok,
    db,
    queued_tasks,
    upload_ok,
)
from tests.conftest import free_port

JOB_FIELDS = {
    "id",
    "object",
    "created_at",
    "model",
    "organization_id",
    "status",
    "training_file",
    "validation_file",
    "hyperparameters",
    "method",
    "result_files",
    "seed",
    "error",
    "fine_tuned_model",
    "finished_at",
    "trained_tokens",
    "estimated_finish",
    "total_steps",  # extension: set once a worker loaded the model
    "memory_estimate",  # extension: the estimate made at creation
    "base_model",  # extension: the base the adapter trains on (the source's base for a job from an ft: model)
    "parent_model",  # extension: the ft: or checkpoint model a job continues from, else null
    "integrations",
    "metadata",
    "user_provided_suffix",
}


@pytest.fixture
def training_file(client) -> str:
    return upload_ok(client)["id"]


def test_create_job_with_lora_hyperparameters(client, training_file, settings, redis_url):
    validation_file = upload_ok(client)["id"]
    hyperparameters = {
        "n_epochs": "auto",
        "batch_size": 16,
        "learning_rate_multiplier": 2,
        "lora_r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "quant_type": "fp4",
        "max_steps": 5,
    }
    job = create_job_ok(
        client,
        training_file,
        validation_file=validation_file,
        suffix="my-run",
        seed=1234,
        metadata={"team": "nlp"},
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )

    assert set(job) == JOB_FIELDS
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert (job["status"], job["model"], job["organization_id"]) == ("queued", "tiny-llama", "proj-a")
    assert (job["training_file"], job["validation_file"], job["seed"]) == (training_file, validation_file, 1234)
    assert job["result_files"] == [] and job["metadata"] == {"team": "nlp"} and job["user_provided_suffix"] == "my-run"
    for name in ("error", "fine_tuned_model", "finished_at", "trained_tokens", "estimated_finish", "total_steps", "integrations"):
        assert job[name] is None, name
    hp = job["hyperparameters"]
    # "auto" resolved to numbers, OpenAI's keys echoed, and every engine option present.
    assert (hp["n_epochs"], hp["batch_size"], hp["learning_rate_multiplier"]) == (3, 16, 2.0)
    # The method is method.type; the options of another method (dpo's beta, ...) are not a supervised job's.
    assert set(TrainingConfig.model_fields) - {"method"} - set(DPO_OPTIONS) <= set(hp) and "method" not in hp
    assert not set(DPO_OPTIONS) & set(hp)
    assert hp["learning_rate"] == pytest.approx(4e-4)
    assert (hp["lora_r"], hp["lora_alpha"], hp["quant_type"], hp["max_steps"], hp["seed"]) == (8, 16, "fp4", 5, 1234)
    assert hp["target_modules"] == ["q_proj", "v_proj"] and hp["micro_batch_size"] == 4 and hp["lora_dropout"] == 0.05
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": hp}}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=KEY_A).json() == job

    # Exactly one task message, by name, carrying the job id.
    assert queued_tasks(redis_url, settings.task_queue) == [(TRAIN_TASK, [job["id"]])]
    with db(client) as session:
        row = session.scalar(select(Job).where(Job.id == job["id"]))
        assert row.enqueued_at is not None and row.project == "proj-a"
        assert TrainingConfig.from_dict(row.training_config).method == row.training_config["method"] == "supervised"

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=KEY_A).json()["data"]
    assert [e["level"] for e in events] == ["info", "info"]
    assert events[1]["message"] == f"Created fine-tuning job: {job['id']}"
    assert events[0]["message"].startswith("Estimated peak GPU memory: ") and " GiB" in events[0]["message"]
    assert events[0]["data"]["total"] > 0
    assert job["memory_estimate"] == events[0]["data"]  # the job carries the numbers; a reader need not search its events


def test_deprecated_top_level_hyperparameters(client, training_file):
    job = create_job_ok(client, training_file, hyperparameters={"n_epochs": 2, "batch_size": 6, "learning_rate_multiplier": 0.5})
    hp = job["hyperparameters"]
    assert (hp["n_epochs"], hp["batch_size"], hp["learning_rate_multiplier"]) == (2, 6, 0.5)
    assert hp["learning_rate"] == pytest.approx(1e-4)
    assert hp["micro_batch_size"] == 3  # 6 is no multiple of the default 4: the largest divisor <= 4
    assert job["method"]["supervised"]["hyperparameters"] == hp
    assert 0 <= job["seed"] <= 2147483647 and hp["seed"] == job["seed"]

    defaults = create_job_ok(client, training_file)["hyperparameters"]
    assert (defaults["n_epochs"], defaults["batch_size"], defaults["learning_rate_multiplier"]) == (3, 8, 1.0)
    assert defaults["learning_rate"] == 2e-4 and defaults["lora_r"] == 16


def test_the_method_is_echoed_from_the_job_row(client, training_file):
    """`method` on the wire is the stored config's method with the echoed hyperparameters under its name (OpenAI's
    shape); nothing is hard-wired to one method."""
    job = create_job_ok(client, training_file)
    with db(client) as session:
        row = session.scalar(select(Job).where(Job.id == job["id"]))
        row.training_config = {**row.training_config, "method": "dpo"}
        session.commit()
    shown = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=KEY_A).json()
    assert shown["method"] == {"type": "dpo", "dpo": {"hyperparameters": shown["hyperparameters"]}}
    # The same options echoed, and a dpo job's own options (beta, ...) beside them.
    assert job["hyperparameters"].items() <= shown["hyperparameters"].items() and "beta" in shown["hyperparameters"]


def test_a_method_in_the_hyperparameters_is_refused(client, training_file):
    method = {"type": "supervised", "supervised": {"hyperparameters": {"method": "supervised"}}}
    assert_error(create_job(client, training_file, method=method), 400, code="invalid_hyperparameter",
                 param="method.supervised.hyperparameters.method")


HYPERPARAMETER_ERRORS = [
    ({"lora_rank": 8}, "lora_rank", "unknown_hyperparameter"),
    ({"lora_r": 0}, "lora_r", "invalid_hyperparameter"),
    ({"n_epochs": 0}, "n_epochs", "invalid_hyperparameter"),
    ({"n_epochs": 51}, "n_epochs", "invalid_hyperparameter"),
    ({"batch_size": 257}, "batch_size", "invalid_hyperparameter"),
    ({"learning_rate_multiplier": -1}, "learning_rate_multiplier", "invalid_hyperparameter"),
    ({"learning_rate_multiplier": 1e6}, "learning_rate_multiplier", "invalid_hyperparameter"),
    ({"learning_rate_multiplier": 2, "learning_rate": 1e-4}, "learning_rate", "invalid_hyperparameter"),
    ({"quant_type": "int3"}, "quant_type", "invalid_hyperparameter"),
    ({"batch_size": 8, "micro_batch_size": 3}, "micro_batch_size", "invalid_hyperparameter"),
    ({"seed": 3}, "seed", "invalid_hyperparameter"),
    # a length the memory budget cannot hold even with offloaded checkpoints and tiling (contract.device_choices.check_fits)
    ({"max_seq_length": 1048576, "batch_size": 1, "micro_batch_size": 1, "memory_budget_gb": 0.5}, "max_seq_length", "context_too_long"),
]


def test_hyperparameter_errors_name_the_key(client, training_file, redis_url, settings):
    for given, key, code in HYPERPARAMETER_ERRORS:
        method = {"type": "supervised", "supervised": {"hyperparameters": given}}
        assert_error(create_job(client, training_file, method=method), 400, code=code, param=f"method.supervised.hyperparameters.{key}")
        assert_error(create_job(client, training_file, hyperparameters=given), 400, code=code, param=f"hyperparameters.{key}")
    both = create_job(
        client,
        training_file,
        hyperparameters={"n_epochs": 1},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert_error(both, 400, code="invalid_value", param="hyperparameters")
    for method_type in ("reinforcement",):  # dpo: tests/api/test_preference_jobs.py
        assert_error(
            create_job(client, training_file, method={"type": method_type, method_type: {}}),
            400,
            code="unsupported_value",
            param="method.type",
        )
    # Nothing was created or sent.
    assert client.get("/v1/fine_tuning/jobs", headers=KEY_A).json()["data"] == []
    assert queued_tasks(redis_url, settings.task_queue) == []


def test_a_length_that_cannot_fit_names_the_length_that_would(client, training_file):
    given = {"max_seq_length": 1048576, "batch_size": 1, "micro_batch_size": 1, "memory_budget_gb": 0.5}
    refused = create_job(client, training_file, hyperparameters=given)
    assert_error(refused, 400, code="context_too_long", param="hyperparameters.max_seq_length")
    longest = int(refused.json()["error"]["message"].rsplit("the longest that fits is ", 1)[1].replace(",", ""))
    assert 16 <= longest < 1048576
    job = create_job_ok(client, training_file, hyperparameters={**given, "max_seq_length": longest})
    assert job["hyperparameters"]["max_seq_length"] == longest


def test_model_and_file_checks(client, training_file):
    assert_error(create_job(client, training_file, model="no-such-model"), 400, code="model_not_found", param="model")
    assert_error(create_job(client, training_file, model="../models/tiny-llama"), 400, code="model_not_found", param="model")
    assert_error(create_job(client, "file-missing"), 400, code="file_not_found", param="training_file")
    assert_error(create_job(client, training_file, validation_file="file-missing"), 400, code="file_not_found", param="validation_file")
    # Another project's file is as good as missing.
    other = upload_ok(client, headers=KEY_B)["id"]
    assert_error(create_job(client, other), 400, code="file_not_found", param="training_file")
    # A file that failed validation.
    bad = upload_ok(client, b'{"messages": []}\n')
    error = assert_error(create_job(client, bad["id"]), 400, code="invalid_file_status", param="training_file")
    assert bad["status_details"] in error["message"]
    # A worker's result file is no training file.
    with db(client) as session:
        session.add(
            File(
                id="file-res",
                project="proj-a",
                filename="r.csv",
                purpose="fine-tune-results",
                bytes=1,
                sha256=hashlib.sha256(b"x").hexdigest(),
                status="processed",
                storage_key="results/r.csv",
            )
        )
        session.add(
            File(
                id="file-pending",
                project="proj-a",
                filename="p.jsonl",
                purpose="fine-tune",
                bytes=1,
                sha256=hashlib.sha256(b"x").hexdigest(),
                status="uploaded",
                storage_key="files/p",
            )
        )
    assert_error(create_job(client, "file-res"), 400, code="invalid_file_purpose", param="training_file")
    assert_error(create_job(client, "file-pending"), 400, code="invalid_file_status", param="training_file")


def test_request_validation_errors(client, training_file):
    post = "/v1/fine_tuning/jobs"
    assert_error(
        client.post(post, headers=KEY_A, json={"training_file": training_file}), 400, code="missing_required_parameter", param="model"
    )
    assert_error(create_job(client, training_file, suffix="x" * 65), 400, code="invalid_value", param="suffix")
    assert_error(create_job(client, training_file, suffix=""), 400, code="invalid_value", param="suffix")
    assert_error(create_job(client, training_file, suffix="a:b"), 400, code="invalid_value", param="suffix")
    assert_error(create_job(client, training_file, metadata={f"k{i}": "v" for i in range(17)}), 400, code="invalid_value", param="metadata")
    assert_error(create_job(client, training_file, metadata={"k": "v" * 513}), 400, code="invalid_value", param="metadata")
    assert_error(create_job(client, training_file, metadata={"k" * 65: "v"}), 400, code="invalid_value", param="metadata")
    assert_error(create_job(client, training_file, metadata={"k": 5}), 400, code="invalid_type", param="metadata.k")
    assert_error(create_job(client, training_file, seed=-1), 400, code="invalid_value", param="seed")
    assert_error(create_job(client, training_file, seed=2**31), 400, code="invalid_value", param="seed")
    assert_error(create_job(client, training_file, model=5), 400, code="invalid_type", param="model")
    assert_error(create_job(client, training_file, lora_r=8), 400, code="unknown_parameter", param="lora_r")
    assert_error(create_job(client, training_file, hyperparameters=[1]), 400, code="invalid_type", param="hyperparameters")
    assert_error(
        create_job(client, training_file, integrations=[{"type": "wandb", "wandb": {"project": "p"}}]),
        400,
        code="unsupported_parameter",
        param="integrations",
    )
    assert_error(
        client.post(post, headers={**KEY_A, "content-type": "application/json"}, content=b"{not json"), 400, code="invalid_json", param=None
    )
    assert_error(client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"limit": 0}), 400, code="invalid_value", param="limit")
    assert_error(client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"limit": 101}), 400, code="invalid_value", param="limit")
    assert create_job_ok(client, training_file, integrations=[])["integrations"] == []


def test_list_jobs_newest_first_with_pagination_and_metadata_filter(client, training_file):
    ids = [create_job_ok(client, training_file, metadata={"n": str(i), "parity": "even" if i % 2 == 0 else "odd"})["id"] for i in range(5)]
    create_job_ok(client, upload_ok(client, headers=KEY_B)["id"], headers=KEY_B)  # another project's job

    listed = client.get("/v1/fine_tuning/jobs", headers=KEY_A).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [j["id"] for j in listed["data"]] == ids[::-1]
    page = client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [ids[4], ids[3]] and page["has_more"] is True
    page = client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"limit": 2, "after": ids[3]}).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    page = client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"limit": 2, "after": ids[1]}).json()
    assert [j["id"] for j in page["data"]] == [ids[0]] and page["has_more"] is False
    assert client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"after": ids[0]}).json()["data"] == []

    even = client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"metadata[parity]": "even"}).json()["data"]
    assert [j["id"] for j in even] == [ids[4], ids[2], ids[0]]
    both = client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"metadata[parity]": "even", "metadata[n]": "2"}).json()
    assert [j["id"] for j in both["data"]] == [ids[2]]
    assert client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"metadata[parity]": "none"}).json()["data"] == []
    filtered_page = client.get("/v1/fine_tuning/jobs", headers=KEY_A, params={"metadata[parity]": "odd", "limit": 1}).json()
    assert [j["id"] for j in filtered_page["data"]] == [ids[3]] and filtered_page["has_more"] is True

    assert len(client.get("/v1/fine_tuning/jobs", headers=KEY_B).json()["data"]) == 1
    assert_error(client.get(f"/v1/fine_tuning/jobs/{ids[0]}", headers=KEY_B), 404, code="job_not_found", param="job_id")


def test_cancel(client, training_file):
    job = create_job_ok(client, training_file)
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=KEY_B), 404, code="job_not_found", param="job_id")
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=KEY_A)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"] is not None
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=KEY_A).json()["status"] == "cancelled"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=KEY_A).json()["data"]
    assert events[0]["message"] == "Job cancelled" and events[0]["level"] == "info"

    again = assert_error(
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=KEY_A), 400, code="invalid_job_status", param="job_id"
    )
    assert "cancelled" in again["message"]
    assert_error(client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel", headers=KEY_A), 404, code="job_not_found", param="job_id")

    running = create_job_ok(client, training_file)
    with db(client) as session:
        assert claim_job(session, running["id"], "worker-1")
    assert client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel", headers=KEY_A).json()["status"] == "cancelled"


def test_events_newest_first_with_pagination(client, training_file):
    job = create_job_ok(client, training_file)
    with db(client) as session:
        for step in range(1, 6):
            session.add(
                JobEvent(
                    id=f"ftevent-m{step}",
                    job_id=job["id"],
                    level="info",
                    message=f"Step {step}/5",
                    type="metrics",
                    data={"step": step, "train_loss": 2.0 / step},
                )
            )
    url = f"/v1/fine_tuning/jobs/{job['id']}/events"
    everything = client.get(url, headers=KEY_A).json()
    assert everything["object"] == "list" and everything["has_more"] is False
    messages = [e["message"] for e in everything["data"]]
    assert messages[:5] == [f"Step {s}/5" for s in range(5, 0, -1)] and messages[-1].startswith("Created fine-tuning job")
    event = everything["data"][0]
    assert set(event) == {"id", "object", "created_at", "level", "message", "type", "data"}
    assert (event["object"], event["type"], event["data"]) == ("fine_tuning.job.event", "metrics", {"step": 5, "train_loss": 0.4})

    page = client.get(url, headers=KEY_A, params={"limit": 2}).json()
    assert [e["id"] for e in page["data"]] == ["ftevent-m5", "ftevent-m4"] and page["has_more"] is True
    page = client.get(url, headers=KEY_A, params={"limit": 2, "after": "ftevent-m4"}).json()
    assert [e["id"] for e in page["data"]] == ["ftevent-m3", "ftevent-m2"]
    last = everything["data"][-1]["id"]
    assert client.get(url, headers=KEY_A, params={"after": last}).json() == {"object": "list", "data": [], "has_more": False}
    assert_error(client.get(url, headers=KEY_B), 404, code="job_not_found", param="job_id")


def test_broker_down_keeps_the_job_queued(tmp_path, sqlite_url, queue_name, models_dir):
    settings = make_settings(tmp_path, sqlite_url, f"redis://127.0.0.1:{free_port()}/0", queue_name, models_dir)
    with TestClient(create_app(settings)) as client:
        job = create_job_ok(client, upload_ok(client)["id"])
        assert job["status"] == "queued"
        with db(client) as session:
            assert session.scalar(select(Job.enqueued_at).where(Job.id == job["id"])) is None
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=KEY_A).json()["data"]
        assert events[0]["level"] == "warn" and "queue" in events[0]["message"]
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=KEY_A).json()["status"] == "queued"


def test_a_model_config_without_an_estimate_still_makes_a_job(client, training_file, models_dir):
    broken = models_dir / "not-a-llama"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    job = create_job_ok(client, training_file, model="not-a-llama")
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=KEY_A).json()["data"]
    assert [e["message"] for e in events] == [f"Created fine-tuning job: {job['id']}"]
    assert job["memory_estimate"] is None


def test_upload_then_job_on_an_empty_file_is_refused(client):
    empty = upload_ok(client, b"")
    assert empty["status"] == "error" and "empty" in empty["status_details"]
    assert_error(create_job(client, empty["id"]), 400, code="invalid_file_status", param="training_file")


def test_a_training_file_with_too_few_examples_is_refused_but_serves_as_validation(client, training_file):
    small = upload_ok(client, chat_jsonl(3))
    assert small["status"] == "processed"  # three examples make a fine validation file
    error = assert_error(create_job(client, small["id"]), 400, code="invalid_n_examples", param="training_file")
    assert error["message"] == "Training file has 3 example(s), but must have at least 10 examples"
    create_job_ok(client, training_file, validation_file=small["id"])
