"""The inference engine serves a pre-quantized base as it is stored, and an adapter trained on it (the engine's model
with random adapter values, saved as a job saves it): transformers loads the GPTQ/AWQ checkpoint through gptqmodel and
optimum (the `gptq` extra) with gptqmodel's inference kernels, which are fine where no gradient is taken."""

from __future__ import annotations

import pytest
import torch

from contract.options import TrainingConfig
from core.storage import LocalStorage
from inference.engine import ChatEngine, ChatRequest
from tests.training.gradient_check import randomize_adapters
from worker.training.model import build_model

QUESTION = [{"role": "user", "content": "What's the Zephyr project's launch code?"}]


@pytest.mark.parametrize("method", ["gptq"])  # AWQ loads the same way; one route keeps the test cheap
def test_a_prequantized_base_and_its_adapter_are_served(method, request, tmp_path):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    base_dir = request.getfixturevalue(f"{method}_model_dir")
    built = build_model(base_dir, TrainingConfig(quantization=method), device=torch.device("cpu"))
    randomize_adapters(built.model)
    with torch.no_grad():
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.mul_(100)  # large enough to change a greedy answer of the random model
    built.model.save_pretrained(tmp_path / "adapter")

    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-quantized").symlink_to(base_dir)
    engine = ChatEngine(models, LocalStorage(tmp_path / "objects"), tmp_path / "cache", dtype="fp32", max_new_tokens=6,
                        local_adapter_root=tmp_path)  # the adapter named by its directory, as vLLM takes it
    base = engine.complete(ChatRequest("tiny-quantized", QUESTION, temperature=0))
    engine.load_adapter("ft:quantized", str(tmp_path / "adapter"), "tiny-quantized")
    tuned = engine.complete(ChatRequest("ft:quantized", QUESTION, temperature=0))
    assert base.completion_tokens == tuned.completion_tokens == 6
    assert any(isinstance(m, BaseQuantLinear) for m in engine.bases["tiny-quantized"].model.modules())
    assert tuned.text != base.text
    assert engine.unload_adapter("ft:quantized")
    assert engine.complete(ChatRequest("tiny-quantized", QUESTION, temperature=0)).text == base.text
    # QLORA_INFERENCE_BASE_WEIGHTS=nf4 quantizes float bases on load; a pre-quantized one is served as stored
    nf4 = ChatEngine(models, LocalStorage(tmp_path / "objects"), tmp_path / "cache", base_weights="nf4", dtype="fp32", max_new_tokens=6)
    assert nf4.complete(ChatRequest("tiny-quantized", QUESTION, temperature=0)).text == base.text
