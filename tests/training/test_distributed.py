"""One job on two processes: `torchrun --nproc_per_node 2 -m worker.training.distributed` on gloo (CPU), over the
real bitsandbytes NF4 + LoRA model, against the same job trained by one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contract.options import TrainingConfig
from tests.training.test_trainer import write_chat_file
from worker.training.checkpoint import load_adapter_weights
from worker.training.data import load_tokenizer
from worker.training.model import build_model
from worker.training.objectives import build_objective
from worker.training.parallel import DataParallel, Replicas
from worker.training.sinks import JsonlSink
from worker.training.trainer import TrainingRequest, evaluate, train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# 10 examples in steps of 3: steps of 3, 3, 3 and 1 examples. On 2 ranks a step of 3 is 2 + 1 examples,
# 2 and 1 micro-batches (uneven); the last step, of 1, leaves rank 1 with nothing to train on.
OPTIONS = {"max_steps": 4, "batch_size": 3, "micro_batch_size": 1, "learning_rate": 1e-3, "lora_dropout": 0.0,
           "compute_dtype": "fp32", "checkpoint_every": 2, "eval_every": 2}


def torchrun(job_file: Path, *extra: str) -> subprocess.Popen:
    """Start `torchrun --standalone --nproc_per_node 2 -m worker.training.distributed JOB_FILE`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "worker.training.distributed", str(job_file), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    """Wait for a torchrun launch (killed past `timeout`) and return its outcome."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def step_losses(metrics_file: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return {r["step"]: r for r in records if r.get("kind") == "metrics"}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same job trained by one process (in this one) and by two (torchrun)."""
    tmp = tmp_path_factory.mktemp("distributed")
    train_file = write_chat_file(tmp / "train.jsonl", 10)
    valid_file = write_chat_file(tmp / "valid.jsonl", 3, seed=1)
    job_file = tmp / "job.json"
    job_file.write_text(json.dumps({"base_model": str(tiny_model_dir), "train_file": str(train_file),
                                    "validation_file": str(valid_file), "output_dir": str(tmp / "two"),
                                    "hyperparameters": OPTIONS}))
    launched = torchrun(job_file)  # the two processes start while this one trains
    single = train(TrainingRequest(tiny_model_dir, train_file, tmp / "single", TrainingConfig(**OPTIONS), valid_file),
                   JsonlSink(tmp / "single" / "metrics.jsonl"))
    two = finished(launched)
    assert two.returncode == 0, two.stderr[-4000:]
    return {"tmp": tmp, "single": single, "two": two, "valid_file": valid_file, "job_file": job_file}


def test_two_processes_train_the_losses_of_one(runs):
    single = step_losses(runs["tmp"] / "single" / "metrics.jsonl")
    two = step_losses(runs["tmp"] / "two" / "metrics.jsonl")
    assert sorted(two) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        for key in ("train_loss", "grad_norm", "train_mean_token_accuracy"):
            assert two[step][key] == pytest.approx(single[step][key], abs=1e-6), (step, key)
        # tokens and targets are the whole step's, not rank 0's share
        assert two[step]["tokens"] == single[step]["tokens"] and two[step]["target_tokens"] == single[step]["target_tokens"]
    assert two[2]["valid_loss"] == pytest.approx(single[2]["valid_loss"], abs=1e-6)
    assert two[4]["valid_loss"] == pytest.approx(single[4]["valid_loss"], abs=1e-6)


def test_rank_0_writes_once_in_the_single_process_layout(runs):
    out = runs["tmp"] / "two"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(p.name for p in (runs["tmp"] / "single" / "checkpoints").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("kind") == "metrics"] == [1, 2, 3, 4]  # once each: only rank 0 reports
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "succeeded" and result["steps"] == 4
    assert json.loads(runs["two"].stdout[runs["two"].stdout.index("{"):])["world_size"] == 2


def test_rank_0_adapter_loads_back_with_the_same_eval_loss(runs, tiny_model_dir):
    from safetensors.torch import load_file

    out = runs["tmp"] / "two"
    cfg = TrainingConfig(**OPTIONS)
    tokenizer = load_tokenizer(tiny_model_dir)
    objective = build_objective(cfg)
    valid, _stats = objective.load(runs["valid_file"], tokenizer, role="validation")
    built = build_model(tiny_model_dir, cfg, device=torch.device("cpu"))  # the NF4 base with fresh LoRA
    fresh = evaluate(built.model, objective, valid, cfg, torch.device("cpu"), tokenizer.pad_token_id)["valid_loss"]
    load_adapter_weights(built.model, out / "adapter")
    reloaded = evaluate(built.model, objective, valid, cfg, torch.device("cpu"), tokenizer.pad_token_id)["valid_loss"]
    reported = json.loads((out / "result.json").read_text())["final_valid_loss"]
    assert reloaded == pytest.approx(reported, abs=1e-6) and abs(fresh - reported) > 1e-4
    # and it is the single process's adapter
    two, one = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(runs["tmp"] / "single" / "adapter" / "adapter_model.safetensors")
    assert two.keys() == one.keys() and all(torch.allclose(two[k], one[k], atol=1e-6) for k in one)


def test_a_single_process_shares_nothing():
    replicas = Replicas()
    assert replicas.share([1, 2, 3]) == [1, 2, 3] and replicas.sum({"a": 2.0}) == {"a": 2.0} and replicas.is_main


def test_a_two_process_checkpoint_resumes_on_one_process(runs, tiny_model_dir, tmp_path):
    """Rank 0's checkpoint holds the whole adapter and optimizer state: one process goes on with the losses of the
    run that never stopped."""
    tmp = runs["tmp"]
    resumed = train(TrainingRequest(tiny_model_dir, tmp / "train.jsonl", tmp_path / "resumed", TrainingConfig(**OPTIONS), runs["valid_file"]),
                    JsonlSink(tmp_path / "resumed" / "metrics.jsonl"), resume_from=tmp / "two" / "checkpoints" / "step-000002")
    assert resumed.status == "succeeded" and resumed.steps == 4
    after, single = step_losses(tmp_path / "resumed" / "metrics.jsonl"), step_losses(tmp / "single" / "metrics.jsonl")
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert after[step]["train_loss"] == pytest.approx(single[step]["train_loss"], abs=1e-6)


def test_a_stop_asked_of_one_rank_stops_both_after_the_same_step(runs, tmp_path):
    """SIGUSR1 to rank 1 alone: both ranks stop after one step (a rank that went on would wait forever in the
    next step's collective, and the launch would time out)."""
    import psutil

    spec = json.loads(runs["job_file"].read_text())
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({**spec, "output_dir": str(tmp_path / "out"),
                                    "hyperparameters": {**OPTIONS, "max_steps": 200, "checkpoint_every": None, "eval_every": None}}))
    launched = torchrun(job_file)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and step_losses(metrics)) and time.monotonic() < deadline and launched.poll() is None:
        time.sleep(0.2)
    rank_1 = [p for p in psutil.Process(launched.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(rank_1) == 1, "rank 1 is not running"
    rank_1[0].send_signal(signal.SIGUSR1)
    outcome = finished(launched, timeout=120)
    assert "stopped at step" in outcome.stdout, outcome.stderr[-3000:]
    stopped_at = int(outcome.stdout.split("stopped at step")[1].split()[0].rstrip(";"))
    assert sorted(step_losses(metrics)) == list(range(1, stopped_at + 1)) and stopped_at < 200
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize(("n", "world", "parts"), [(3, 2, [[0, 1], [2]]), (1, 2, [[0], []]), (6, 4, [[0, 1], [2, 3], [4], [5]])])
def test_a_step_is_split_in_rank_order_into_near_equal_parts(n, world, parts):
    def share(rank: int) -> list[int]:
        replicas = object.__new__(DataParallel)  # the split alone, without a process group
        replicas.rank, replicas.world_size = rank, world
        return replicas.share(list(range(n)))

    assert [share(rank) for rank in range(world)] == parts


def test_the_entrypoint_outside_torchrun_says_how_to_run_it(monkeypatch, tmp_path):
    from worker.training import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="run under torchrun"):
        distributed.main([str(tmp_path / "job.yaml")])


def test_invalid_options_exit_2_before_any_collective(monkeypatch, tmp_path, tiny_model_dir, capsys):
    """A process group of one (the entrypoint's own setup, on gloo): the fault is printed and the exit status is 2."""
    from tests.conftest import free_port
    from worker.training import distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"base_model": str(tiny_model_dir), "train_file": str(write_chat_file(tmp_path / "t.jsonl", 10)),
                                    "output_dir": str(tmp_path / "out"), "hyperparameters": {"batch_size": 3, "micro_batch_size": 2}}))
    assert distributed.main([str(job_file)]) == 2
    assert "micro_batch_size" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


# make test-bench: two torchrun launches take half a minute of make test's 15 (same entrypoint as the 2-process tests).
@pytest.mark.bench
def test_two_nodes_on_localhost_train_one_job_with_the_losses_of_one_process(runs, tmp_path):
    """Two torchrun launches of one process each ("nodes"), joined by c10d rendezvous on 127.0.0.1: the entrypoint of
    several machines, with the single process's losses."""
    from tests.conftest import free_port

    spec = json.loads(runs["job_file"].read_text())
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({**spec, "output_dir": str(tmp_path / "nodes")}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{free_port()}"
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                  "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "one-job",
                                  "-m", "worker.training.distributed", str(job_file)],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [finished(launch) for launch in launches]
    assert [o.returncode for o in outcomes] == [0, 0], "\n".join(o.stderr[-3000:] for o in outcomes)
    nodes, single = step_losses(tmp_path / "nodes" / "metrics.jsonl"), step_losses(runs["tmp"] / "single" / "metrics.jsonl")
    assert sorted(nodes) == [1, 2, 3, 4]  # reported once, by the one global rank 0
    for step in single:
        assert nodes[step]["train_loss"] == pytest.approx(single[step]["train_loss"], abs=1e-6), step
    assert sum('"world_size": 2' in o.stdout for o in outcomes) == 1
