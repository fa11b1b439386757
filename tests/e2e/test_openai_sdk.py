"""The running service, driven only through the official openai SDK with strict response validation.

Two deployments, each as separate processes: (1) PostgreSQL + Redis + an S3-compatible server (moto) with
the API under uvicorn and a Celery worker; (2) the embedded mode (`python -m launch.embedded`: SQLite, local
objects, Celery's SQLAlchemy transport on a SQLite file). A tiny random Llama is the base model.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, create_postgres_database, drop_postgres_database, free_port, make_tiny_llama, wait_for_port

pytestmark = pytest.mark.slow

KEY_A, KEY_B = "sk-test-a", "sk-test-b"
MODEL = "tiny-llama"


def chat_lines(n: int, prefix: str = "q") -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"{prefix} {i}?"}, {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Service:
    def __init__(self, home: Path, env: dict[str, str], logs: list[Path], procs: list[subprocess.Popen], port: int):
        self.home, self.env, self.logs, self.procs, self.port = home, env, logs, procs, port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def dump_logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.read_text()[-20000:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        """SIGTERM to each process group, then SIGKILL to what is left after 20 s: a launcher's children (the worker,
        the inference server) must not outlive the test, even when a clean stop hangs."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group may outlive its leader
            except ProcessLookupError:
                pass


def start(cmds: list[list[str]], env: dict[str, str], home: Path, port: int) -> Service:
    procs, logs = [], []
    for i, cmd in enumerate(cmds):
        log = home / f"proc-{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
                                      start_new_session=True))
    service = Service(home, env, logs, procs, port)
    try:
        wait_for_port(port, timeout_s=90)
    except TimeoutError:
        service.stop()
        raise AssertionError("the API did not start:\n" + service.dump_logs()) from None
    return service


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update({
        "QLORA_HOME": str(home),
        "QLORA_API_KEYS": f"{KEY_A}=team-a,{KEY_B}=team-b",
        "QLORA_HEARTBEAT_INTERVAL_S": "0.5",
        "QLORA_SWEEP_INTERVAL_S": "5",
        "QLORA_TASK_QUEUE": f"e2e-{os.getpid()}-{time.time_ns()}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(params=["postgres-redis-s3", "embedded"])
def service(request, tmp_path, tokenizer):
    home = tmp_path / "home"
    make_tiny_llama(home / "models" / MODEL, tokenizer)
    env = base_env(home)
    port = free_port()
    cleanup = []
    if request.param == "postgres-redis-s3":
        db_url = create_postgres_database()
        cleanup.append(lambda: drop_postgres_database(db_url))
        s3 = request.getfixturevalue("s3_endpoint")
        env.update({
            "QLORA_DATABASE_URL": db_url, "QLORA_BROKER_URL": REDIS_URL, "QLORA_S3_ENDPOINT": s3,
            "QLORA_S3_BUCKET": f"e2e-{time.time_ns()}", "AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        })
        subprocess.run([sys.executable, "-m", "core.bootstrap"], env=env, check=True, capture_output=True)
        cmds = [
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-B", "-Q", f"{env['QLORA_TASK_QUEUE']},{env['QLORA_TASK_QUEUE']}-control", "--concurrency", "1",
             "--loglevel", "INFO", "-s", str(home / "beat-schedule")],
            [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1", "--port", str(port)],
        ]
    else:
        cmds = [[sys.executable, "-m", "launch.embedded", "--no-demo-model", "--port", str(port), "--inference-port", str(free_port())]]
    svc = start(cmds, env, home, port)
    svc.mode = request.param
    yield svc
    svc.stop()
    for fn in cleanup:
        fn()


def wait_for(predicate, timeout_s: float, what: str, service: Service):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n" + service.dump_logs())


def test_openai_sdk_end_to_end(service):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=service.base_url, api_key=KEY_A, _strict_response_validation=True, max_retries=0)
    other = OpenAI(base_url=service.base_url, api_key=KEY_B, _strict_response_validation=True, max_retries=0)

    # Upload: a training file, a validation file, and a malformed one.
    train = client.files.create(file=("train.jsonl", chat_lines(12)), purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", chat_lines(3, "v")), purpose="fine-tune")
    train = client.files.wait_for_processing(train.id, poll_interval=0.2, max_wait_seconds=30)
    assert train.status == "processed" and train.bytes == len(chat_lines(12))
    bad_bytes = chat_lines(11) + b'{"messages": [{"role": "robot", "content": "x"}]}\nnot json\n'
    bad = client.files.wait_for_processing(client.files.create(file=("bad.jsonl", bad_bytes), purpose="fine-tune").id,
                                           poll_interval=0.2, max_wait_seconds=30)
    assert bad.status == "error" and "line 12" in bad.status_details and "line 13" in bad.status_details

    # Another project sees none of it.
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(train.id)
    assert train.id not in [f.id for f in other.files.list()]

    # A job with LoRA hyperparameters as extra keys.
    hyper = {"n_epochs": 1, "batch_size": 4, "lora_r": 8, "lora_alpha": 16, "max_steps": 4, "checkpoint_every": 2, "eval_every": 2,
             "learning_rate": 1e-3}
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, validation_file=valid.id, suffix="e2e", seed=7,
                                         method={"type": "supervised", "supervised": {"hyperparameters": hyper}})
    assert job.status in ("queued", "running") and job.seed == 7
    echoed = job.method.supervised.hyperparameters
    assert echoed.batch_size == 4 and echoed.n_epochs == 1
    assert echoed.model_extra["lora_r"] == 8 and echoed.model_extra["quant_type"] == "nf4"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=MODEL, training_file=bad.id)
    assert err.value.code == "invalid_file_status"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, hyperparameters={"lora_rank": 4})
    assert "lora_rank" in err.value.param

    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
                    180, "the job to finish", service)
    assert done.status == "succeeded", (done.error, service.dump_logs())
    assert done.fine_tuned_model.startswith(f"ft:{MODEL}:team-a:e2e:") and done.trained_tokens > 0 and len(done.result_files) == 2
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)

    # Events (newest first, metrics events with data) and checkpoints (with metrics; pagination with `after`).
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))
    assert any(e.type == "metrics" and e.data and "train_loss" in e.data for e in events)
    assert all(e.level in ("info", "warn", "error") for e in events)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert len(checkpoints.data) == 1 and checkpoints.has_more
    newest = checkpoints.data[0]
    assert newest.step_number == 4 and newest.metrics.train_loss is not None and newest.metrics.valid_loss is not None
    rest = client.fine_tuning.jobs.checkpoints.list(job.id, after=newest.id)
    assert [c.step_number for c in rest.data] == [2]
    assert client.fine_tuning.jobs.checkpoints.list(job.id, after=rest.data[-1].id).data == []

    # Cancel a second job.
    job2 = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, hyperparameters={"n_epochs": 50, "batch_size": 4})
    cancelled = client.fine_tuning.jobs.cancel(job2.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job2.id)
    jobs = client.fine_tuning.jobs.list(limit=1)
    assert jobs.data[0].id == job2.id and jobs.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(after=job2.id).data] == [job.id]

    # The fine-tuned model is listed for its project only.
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    assert done.fine_tuned_model not in [m.id for m in other.models.list()]

    # Download the adapter; it loads with peft onto the base model and generates.
    files = {client.files.retrieve(fid).filename: fid for fid in done.result_files}
    csv_name = next(n for n in files if n.endswith(".csv"))
    csv = client.files.content(files[csv_name]).read().decode()
    assert csv.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy" and len(csv.splitlines()) == 5
    archive = client.files.content(files[next(n for n in files if n.endswith(".tar.gz"))]).read()
    adapter_dir = service.home / "downloaded-adapter"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(adapter_dir, filter="data")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(service.home / "models" / MODEL)
    tokenizer = AutoTokenizer.from_pretrained(service.home / "models" / MODEL)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "q 1?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = tuned.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
