"""Pre-quantized bases (GPTQ, AWQ) through the engine: a tiny model quantized in the session with qlora-quantize's
function (fixtures `gptq_model_dir`, `awq_model_dir`) trains, its adapter round-trips, and the LoRA gradient check
passes with the engine's kernels and fails with gptqmodel's default CPU kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contract.options import ConfigError, TrainingConfig
from tests.training.gradient_check import check_lora_gradients, float_reference, randomize_adapters
from tests.training.test_trainer import RecordingSink, write_chat_file
from worker.training import prequantized
from worker.training.model import build_model, compute_dtype, resolve_for_device
from worker.training.trainer import TrainingRequest, train

# gptqmodel's default CPU kernels, which fix themselves in a forward-only mode on their first no-grad forward.
BROKEN_BACKENDS = {"gptq": "gptq_torch_aten", "awq": "awq_torch_aten"}
# bf16 compute against a float32 reference: the gradients agree to about 1%; the broken kernel is off by ~100%.
TOLERANCE = 0.05


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _build(base: Path, cfg: TrainingConfig, monkeypatch: pytest.MonkeyPatch, backend: str | None = None):
    """The engine's model for `base` with randomised adapters; `backend` swaps the kernel the engine would choose."""
    if backend is not None:
        monkeypatch.setitem(prequantized.TRAINING_BACKENDS, (cfg.quantization, "cpu"), backend)
        monkeypatch.setattr(prequantized, "TRAINABLE_KERNELS", prequantized.TRAINABLE_KERNELS | {"TorchAtenLinear", "TorchAtenAwqLinear"})
    built = build_model(base, cfg, device=torch.device("cpu"))
    randomize_adapters(built.model)
    return built.model


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_prequantized_base_trains_round_trips_its_adapter_and_passes_the_gradient_check(method, request, tmp_path, monkeypatch):
    base = request.getfixturevalue(f"{method}_model_dir")
    cpu = torch.device("cpu")

    # trained through the engine, with an evaluation between the steps (the pass that breaks the default kernels)
    cfg = TrainingConfig(quantization=method, max_steps=2, batch_size=2, micro_batch_size=2, eval_every=1, eval_batch_size=10,
                         learning_rate=1e-2)
    sink = RecordingSink()
    result = train(TrainingRequest(base, write_chat_file(tmp_path / "train.jsonl", 10), tmp_path / "out", cfg,
                               write_chat_file(tmp_path / "valid.jsonl", 10, seed=1)), sink)
    assert result.status == "succeeded" and result.steps == 2
    assert all(torch.isfinite(torch.tensor(s["train_loss"])) for s in sink.steps)
    [loaded] = [message for _level, message, _data in sink.events if message.startswith("Model loaded")]
    assert f"quantization={method}" in loaded and "compute_dtype=bf16" in loaded

    # the gradient check with the engine's kernel
    check_cfg = resolve_for_device(TrainingConfig(quantization=method, lora_dropout=0.0, packing=False, attn_implementation="sdpa"), cpu)
    model = _build(base, check_cfg, monkeypatch)
    assert prequantized.quantization_kernels(model) <= prequantized.TRAINABLE_KERNELS
    reference = float_reference(base, model)
    passed = check_lora_gradients(model, reference, _batch(), autocast_dtype=compute_dtype(check_cfg, cpu))
    assert passed.passed(TOLERANCE), passed

    # the adapter saved and loaded again gives the same outputs; the trained job's adapter loads onto the base too
    model.save_pretrained(tmp_path / "adapter")
    model.load_adapter(tmp_path / "adapter", adapter_name="reloaded")
    model.load_adapter(result.adapter_dir, adapter_name="trained")
    model.eval()

    def logits(adapter: str) -> torch.Tensor:
        model.set_adapter(adapter)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**_batch(1)).logits

    assert torch.equal(logits("default"), logits("reloaded"))
    assert not torch.equal(logits("default"), logits("trained"))

    # the same check bites when the kernel is gptqmodel's default one: right before an evaluation pass, wrong after
    broken = _build(base, check_cfg, monkeypatch, backend=BROKEN_BACKENDS[method])
    assert prequantized.quantization_kernels(broken) == {"gptq": {"TorchAtenLinear"}, "awq": {"TorchAtenAwqLinear"}}[method]
    failed = check_lora_gradients(broken, float_reference(base, broken), _batch(), autocast_dtype=torch.bfloat16)
    assert failed.before_eval <= TOLERANCE and failed.after_eval > 0.5, failed


def test_the_engine_refuses_a_wrong_quantization_for_the_base(gptq_model_dir, tiny_model_dir):
    with pytest.raises(ConfigError, match="pre-quantized with GPTQ") as err:
        build_model(gptq_model_dir, TrainingConfig(), device=torch.device("cpu"))
    assert err.value.param == "quantization"
    with pytest.raises(ConfigError, match="qlora-quantize") as err:
        build_model(tiny_model_dir, TrainingConfig(quantization="awq"), device=torch.device("cpu"))
    assert err.value.param == "quantization"


def test_auto_compute_dtype_is_16_bit_on_a_prequantized_base(monkeypatch):
    """gptqmodel's kernels compute in 16 bits only: 'auto' is bf16 on any CPU for these routes (the service's worker
    decides the dtype with the same function before the engine runs), fp16 for AWQ on a GPU."""
    from contract.device_choices import DeviceFacts, decide_auto
    from worker.training import model as model_module

    monkeypatch.setattr(model_module, "cpu_bf16_is_fast", lambda: False)
    cpu = torch.device("cpu")
    assert model_module.resolve_compute_dtype("auto", cpu) == "fp32"
    for method in ("gptq", "awq"):
        assert model_module.resolve_compute_dtype("auto", cpu, quantization=method) == "bf16"
        assert resolve_for_device(TrainingConfig(quantization=method), cpu).compute_dtype == "bf16"
    assert decide_auto(TrainingConfig(quantization="awq"), DeviceFacts("cuda", fast_bf16=True)).compute_dtype == "fp16"


def test_the_engine_refuses_an_inference_only_kernel(gptq_model_dir, monkeypatch):
    monkeypatch.setitem(prequantized.TRAINING_BACKENDS, ("gptq", "cpu"), BROKEN_BACKENDS["gptq"])
    with pytest.raises(RuntimeError, match="TorchAtenLinear"):
        build_model(gptq_model_dir, TrainingConfig(quantization="gptq"), device=torch.device("cpu"))


# --- the command lines: the engine's (qlora-train) decides the quantization as the API does; qlora-quantize refuses
# what it cannot quantize before loading anything -----------------------------------------------------------------

def _config_only_model(path: Path, **config) -> Path:
    import json

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                  "num_attention_heads": 4, "num_key_value_heads": 2, **config}))
    return path


def test_the_engine_cli_refuses_on_the_fly_options_on_a_gptq_base(tmp_path, capsys):
    from tests.training.test_cli import chat, write_job
    from worker.training.cli import main

    base = _config_only_model(tmp_path / "gptq", quantization_config={"quant_method": "gptq"})
    assert main([str(write_job(tmp_path, base, [chat(i) for i in range(12)], quant_type="fp4"))]) == 2
    assert "'quant_type' configures quantizing a float base on load" in capsys.readouterr().err


@pytest.mark.parametrize(("config", "args", "words"), [
    ({}, ["--group-size", "48"], "--group-size 48 does not divide the model's hidden_size (64)"),
    ({}, ["--method", "awq", "--group-size", "32"], "AWQ needs layer widths that are multiples of 64; the model's intermediate_size is 96"),
    ({}, ["--method", "awq", "--bits", "8"], "--bits for awq must be one of 4"),
    ({"quantization_config": {"quant_method": "gptq"}}, [], "is quantized already (gptq)"),
])
def test_qlora_quantize_refuses_what_it_cannot_quantize(tmp_path, capsys, config, args, words):
    from worker.training.quantize import main

    base = _config_only_model(tmp_path / "base", **{"intermediate_size": 96, **config})
    calibration = write_chat_file(tmp_path / "calibration.jsonl", 2)
    assert main([str(base), str(calibration), str(tmp_path / "out"), *args]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_qlora_quantize_refuses_a_missing_calibration_file_and_a_32_bit_dtype(tmp_path, capsys):
    from worker.training.quantize import main

    base = _config_only_model(tmp_path / "base")
    assert main([str(base), str(tmp_path / "missing.jsonl"), str(tmp_path / "out")]) == 2
    assert "calibration file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the 16-bit choices
        main([str(base), str(write_chat_file(tmp_path / "c.jsonl", 2)), str(tmp_path / "out"), "--dtype", "fp32"])
