"""compute_dtype 'auto': the fast dtype for the device at hand, decided once per job; an explicit dtype is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from contract.device_choices import DeviceFacts, decide_auto
from contract.options import TrainingConfig
from worker.training import model as model_module
from worker.training.model import build_model, resolve_for_device
from worker.training.trainer import TrainingRequest, train

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_the_cpu_is_bf16_only_where_it_is_native(fast, expected):
    assert decide_auto(TrainingConfig(), DeviceFacts("cpu", fast_bf16=fast)).compute_dtype == expected


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_bf16_where_the_card_has_it_else_fp16(monkeypatch, supported, expected):
    assert decide_auto(TrainingConfig(), DeviceFacts("cuda", fast_bf16=supported)).compute_dtype == expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)  # what the engine measures
    assert model_module.device_facts(CUDA, budget=False).fast_bf16 is supported


@pytest.mark.parametrize("explicit", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("fast", [True, False])
def test_an_explicit_dtype_is_kept_on_every_device(monkeypatch, explicit, fast):
    cfg = TrainingConfig(compute_dtype=explicit)
    assert decide_auto(cfg, DeviceFacts("cpu", fast_bf16=fast)).compute_dtype == explicit
    assert decide_auto(cfg, DeviceFacts("cuda", fast_bf16=fast)).compute_dtype == explicit
    assert decide_auto(cfg, DeviceFacts("cuda")).compute_dtype == explicit  # nothing measured: nothing needed
    assert resolve_for_device(cfg, CPU).compute_dtype == explicit


def test_emulated_bf16_is_measured_as_slow():
    """oneDNN limited to AVX2 has no bf16 instructions, as on an AVX2-only CPU: the measurement must say so
    whatever this machine's CPU is."""
    code = "from worker.training.model import cpu_bf16_is_fast; print(cpu_bf16_is_fast())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("fast, expected", [(False, "fp32"), (True, "bf16")])
def test_a_job_on_auto_runs_with_the_resolved_dtype_and_says_so(monkeypatch, tiny_model_dir, tmp_path, fast, expected):
    from tests.training.test_trainer import RecordingSink, write_chat_file
    from worker.training.checkpoint import read_checkpoint_config

    monkeypatch.setattr(model_module, "cpu_bf16_is_fast", lambda: fast)
    built = build_model(tiny_model_dir, TrainingConfig(), device=CPU)
    linear = built.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert linear.compute_dtype == model_module.DTYPES[expected]

    sink = RecordingSink()
    cfg = TrainingConfig(max_steps=1, batch_size=2, micro_batch_size=2, max_seq_length=64)
    result = train(TrainingRequest(tiny_model_dir, write_chat_file(tmp_path / "train.jsonl", 10), tmp_path / "out", cfg), sink)
    loaded = next(data for _level, message, data in sink.events if message.startswith("Model loaded"))
    assert loaded["compute_dtype"] == expected
    assert f"compute_dtype={expected}" in next(m for _l, m, _d in sink.events if m.startswith("Model loaded"))
    assert read_checkpoint_config(result.checkpoints[-1])["config"]["compute_dtype"] == expected


def test_a_resumed_auto_job_keeps_the_dtype_it_began_with(monkeypatch, tiny_model_dir, tmp_path):
    """A checkpoint written where bf16 was fast resumes in bf16 on a machine where auto would pick fp32."""
    from tests.training.test_trainer import RecordingSink, write_chat_file

    data = write_chat_file(tmp_path / "train.jsonl", 10)
    cfg = TrainingConfig(max_steps=2, batch_size=2, micro_batch_size=2, max_seq_length=64, checkpoint_every=1)
    monkeypatch.setattr(model_module, "cpu_bf16_is_fast", lambda: True)
    first = train(TrainingRequest(tiny_model_dir, data, tmp_path / "a", cfg), RecordingSink())
    monkeypatch.setattr(model_module, "cpu_bf16_is_fast", lambda: False)
    sink = RecordingSink()
    resumed = train(TrainingRequest(tiny_model_dir, data, tmp_path / "b", cfg), sink, resume_from=first.checkpoints[0])
    assert resumed.status == "succeeded"
    loaded = next(data for _level, message, data in sink.events if message.startswith("Model loaded"))
    assert loaded["compute_dtype"] == "bf16"


def test_resolving_for_the_cpu_turns_lean_activations_off_and_keeps_explicit_values():
    cpu = resolve_for_device(TrainingConfig(compute_dtype="fp32"), CPU)
    assert cpu.lean_activations is False and cpu.compute_dtype == "fp32"
    assert resolve_for_device(TrainingConfig(compute_dtype="fp32", lean_activations=True), CPU).lean_activations is True
