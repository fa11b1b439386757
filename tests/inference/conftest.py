"""Inference fixtures: the tiny random Llama as a base model directory, LoRA adapters for it stored as the
worker stores them (a .tar.gz in object storage), and the inference server on a real port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from core.storage import LocalStorage, ObjectStorage
from tests.conftest import free_port, wait_for_port

BASE = "tiny-llama"


def store_adapter(base_dir: Path, storage: ObjectStorage, key: str, work: Path, *, seed: int) -> Path:
    """A LoRA adapter for the model in `base_dir` with random (non-zero) B matrices, so that it changes the
    model's answers; packed and stored at `key` as the worker stores results. Returns the unpacked directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.database_sink import pack_directory

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    directory = work / f"adapter-{seed}"
    peft_model.save_pretrained(directory)
    storage.put_file(key, pack_directory(directory, work / f"adapter-{seed}.tar.gz"))
    return directory


@pytest.fixture
def models_root(tmp_path, tiny_model_dir) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    (root / BASE).symlink_to(tiny_model_dir)
    return root


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


@contextmanager
def serving(app) -> Iterator[str]:  # noqa: ANN001
    """`app` under uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
