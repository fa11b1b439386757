"""The `qlora` command line as a user runs it: a real subprocess against the running embedded service
(tests/e2e/conftest.py: embedded_service), on real jobs of a tiny random Llama."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.conftest import BROKEN_MODEL
from tests.e2e.test_openai_sdk import KEY_A, KEY_B, MODEL, chat_lines

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXIT_ERROR, EXIT_FAILED, EXIT_CANCELLED = 1, 3, 4  # docs/cli.md


def qlora(service, *args: str, key: str = KEY_A, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m cli ARGS` with the service's URL and key in QLORA_BASE_URL / QLORA_API_KEY (or `env` instead)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "OPENAI_"))}
    clean.update(env if env is not None else {"QLORA_BASE_URL": service.base_url, "QLORA_API_KEY": key})
    try:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=clean, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # a job that never ends: the service's logs say why
        pytest.fail(f"`qlora {' '.join(args)}` ran past {timeout} s; it printed {exc.stdout!r}\n{service.dump_logs()}")


def json_of(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def training_file(embedded_service, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli-data") / "train.jsonl"
    path.write_bytes(chat_lines(12))
    uploaded = json_of(qlora(embedded_service, "files", "upload", str(path), "--json"))
    assert uploaded["status"] == "processed" and uploaded["bytes"] == len(chat_lines(12))
    return uploaded["id"]


def test_upload_create_watch_download(embedded_service, training_file, tmp_path):
    service = embedded_service
    (tmp_path / "train.jsonl").write_bytes(chat_lines(12))
    # The engine CLI's job file format; its train_file is a local path, uploaded by `jobs create`. Flags win over it.
    (tmp_path / "job.yaml").write_text(f"base_model: ../models/{MODEL}\ntrain_file: train.jsonl\n"
                                       "hyperparameters: {batch_size: 4, max_steps: 50, lora_r: 8, learning_rate: 0.001, eval_every: 2}\n")
    created = qlora(service, "jobs", "create", "-f", str(tmp_path / "job.yaml"), "--max-steps", "4", "--validation-file", training_file,
                    "--suffix", "cli", "-p", "checkpoint_every=2", "--json")
    job = json_of(created)
    assert "uploaded" in created.stderr and job["model"] == MODEL and job["validation_file"] == training_file
    assert job["hyperparameters"]["max_steps"] == 4 and job["hyperparameters"]["lora_r"] == 8 and job["hyperparameters"]["checkpoint_every"] == 2

    watched = qlora(service, "jobs", "watch", job["id"], "--interval", "0.5", timeout=180)
    assert watched.returncode == 0, (watched.stdout, watched.stderr, service.dump_logs())
    lines = watched.stdout.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [re.match(r"step (\d+)/4 ", line).group(1) for line in progress] == ["1", "2", "3", "4"], watched.stdout
    assert all(re.search(r"loss \d+\.\d{4}", line) and "tok/s" in line and "ETA" in line for line in progress), watched.stdout
    assert any("[info] Fine-tuning job started" in line for line in lines)
    assert re.fullmatch(rf"job {job['id']} succeeded: ft:{MODEL}:team-a:cli:\S+, \d+ trained tokens .*", lines[-1]), lines[-1]

    # --json: one object a line, the events, progress updates and the final job; replayed from the start.
    replay = qlora(service, "jobs", "watch", job["id"], "--json")
    objects = [json.loads(line) for line in replay.stdout.splitlines()]
    assert replay.returncode == 0
    updates = [o for o in objects if o["object"] == "fine_tuning.job.progress"]
    assert [u["step"] for u in updates] == [1, 2, 3, 4] and all(u["total_steps"] == 4 and u["train_loss"] > 0 for u in updates)
    assert objects[-1]["object"] == "fine_tuning.job" and objects[-1]["status"] == "succeeded"

    table = qlora(service, "jobs", "list")
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "STATUS", "MODEL"] and job["id"] in table.stdout

    downloaded = json_of(qlora(service, "download", job["id"], "-o", str(tmp_path / "adapter"), "--json"))
    names = {Path(f).name for f in downloaded["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors", f"{job['id']}-metrics.csv"} <= names, names
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 1000


def test_watch_rides_out_a_service_that_stops_answering(embedded_service, training_file):
    """The watcher reaches the service through a proxy that is cut mid-job (as a restart or a network blip looks)
    until the watcher says so: it keeps watching, and ends with the job's outcome."""
    from tests.faults import TcpProxy

    service = embedded_service
    job = json_of(qlora(service, "jobs", "create", "-m", MODEL, "-t", training_file, "--max-steps", "30", "--json"))
    proxy = TcpProxy(service.port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "OPENAI_"))}
    env |= {"QLORA_BASE_URL": f"http://127.0.0.1:{proxy.port}/v1", "QLORA_API_KEY": KEY_A}
    watcher = subprocess.Popen([sys.executable, "-m", "cli", "--retries", "0", "jobs", "watch", job["id"], "--interval", "0.3",
                                "--patience", "60"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline(), "the watcher printed nothing"  # it has seen the job
        proxy.cut()
        noticed = []  # the watcher's stderr up to its note that the service does not answer
        while not noticed or "still watching" not in noticed[-1]:
            line = watcher.stderr.readline()
            assert line, f"the watcher ended without noticing the outage: {''.join(noticed)}"
            noticed.append(line)
        proxy.restore()
        try:
            out, err = watcher.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the watcher did not end in 180 s\n{service.dump_logs()}")
        err = "".join(noticed) + err
    finally:
        watcher.kill()
        proxy.close()
    assert watcher.returncode == 0, (out, err)
    assert "still watching" in err and "answers again" in err, err
    assert out.splitlines()[-1].startswith(f"job {job['id']} succeeded")


def test_watch_exits_with_the_cancelled_and_failed_codes(embedded_service, training_file):
    service = embedded_service
    doomed = json_of(qlora(service, "jobs", "create", "-m", BROKEN_MODEL, "-t", training_file, "--max-steps", "2", "--json"))
    long = json_of(qlora(service, "jobs", "create", "-m", MODEL, "-t", training_file, "--max-steps", "500", "--json"))
    cancelled = qlora(service, "jobs", "cancel", long["id"])
    assert cancelled.returncode == 0 and cancelled.stdout.split() == [long["id"], "cancelled"]
    watched = qlora(service, "jobs", "watch", long["id"], "--interval", "0.5")
    assert watched.returncode == EXIT_CANCELLED and watched.stdout.splitlines()[-1] == f"job {long['id']} cancelled", watched.stdout

    failed = qlora(service, "jobs", "watch", doomed["id"], "--interval", "0.5", "--json", timeout=180)
    assert failed.returncode == EXIT_FAILED, (failed.stdout, failed.stderr, service.dump_logs())
    final = json.loads(failed.stdout.splitlines()[-1])
    assert final["status"] == "failed" and final["error"]["code"] == "training_error"
    assert all(json.loads(line)["object"] == "fine_tuning.job.event" for line in failed.stdout.splitlines()[:-1])


def test_api_errors_are_one_readable_line(embedded_service, training_file, tmp_path):
    service = embedded_service
    unknown = qlora(service, "jobs", "get", "ftjob-nope")
    assert unknown.returncode == EXIT_ERROR and unknown.stdout == ""
    assert unknown.stderr.strip() == "error [404, job_not_found, param job_id]: No such fine-tuning job: ftjob-nope"

    # Another project's key does not see the file: the API's 400 names the parameter.
    foreign = qlora(service, "jobs", "create", "-m", MODEL, "-t", training_file, key=KEY_B)
    assert foreign.returncode == EXIT_ERROR and foreign.stderr.startswith("error [400, file_not_found, param training_file]: ")

    (tmp_path / "bad.jsonl").write_bytes(chat_lines(2) + b"not json\n")
    bad = qlora(service, "files", "upload", str(tmp_path / "bad.jsonl"))
    assert bad.returncode == EXIT_ERROR and "failed validation" in bad.stderr
    assert re.search(r"^  line 3: invalid_file_format: ", bad.stderr, re.M), bad.stderr

    refused = qlora(service, "--retries", "0", "models", "list", env={"QLORA_BASE_URL": f"http://127.0.0.1:{free_port()}/v1", "QLORA_API_KEY": "k"})
    assert refused.returncode == EXIT_ERROR and "cannot reach the service" in refused.stderr and "Connection refused" in refused.stderr

    # A reader that leaves (`qlora models list | head -0`): no traceback, status 0.
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "OPENAI_"))}
    left = subprocess.run([sys.executable, "-m", "cli", "models", "list"], env=env | {"QLORA_BASE_URL": service.base_url, "QLORA_API_KEY": KEY_A},
                          cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert left.returncode == 0 and left.stderr == "", left.stderr

    # OPENAI_* are the fallback for the URL and key; --json output parses.
    models = json_of(qlora(service, "models", "list", "--json", env={"OPENAI_BASE_URL": service.base_url, "OPENAI_API_KEY": KEY_A}))
    assert MODEL in [m["id"] for m in models]
