"""Make a GPTQ or AWQ copy of a base model directory, calibrated on a JSONL file in the service's upload format.

    qlora-quantize BASE_DIR CALIBRATION.jsonl OUT_DIR [--method gptq|awq] [--bits 4] [--group-size 128]

The copy is a model directory like any other (config.json with a `quantization_config`): put it in the service's
models directory and jobs on it train LoRA on the quantized weights as they are (docs/training.md). gptqmodel does
the quantization, on a GPU when there is one, else on the CPU. Exit status: 0 done, 2 bad input (printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = ("gptq", "awq")
BITS = {"gptq": (2, 3, 4, 8), "awq": (4,)}
AWQ_WIDTH_MULTIPLE = 64  # gptqmodel's AWQ packing works on layer widths that are multiples of 64
DTYPES = ("bf16", "fp16")


class QuantizeError(ValueError):
    """Input that cannot be quantized; the message says which and why."""


def linear_widths(model_config: dict[str, Any]) -> dict[str, int]:
    """The input widths of a Llama-family decoder's linear layers, from its config.json (the layers quantized)."""
    try:
        hidden = int(model_config["hidden_size"])
        intermediate = int(model_config["intermediate_size"])
        heads = int(model_config["num_attention_heads"])
        kv_heads = int(model_config.get("num_key_value_heads") or heads)
        head_dim = int(model_config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise QuantizeError(f"config.json does not describe a Llama-family decoder (missing or bad {exc})") from None
    return {"hidden_size": hidden, "intermediate_size": intermediate, "attention width (heads x head_dim)": heads * head_dim,
            "key/value width (kv heads x head_dim)": kv_heads * head_dim}


def check_request(base_dir: Path, calibration: Path, method: str, bits: int, group_size: int, dtype: str) -> dict[str, Any]:
    """Everything that can be checked before the model is loaded; returns the base's config.json."""
    if method not in METHODS:
        raise QuantizeError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    if bits not in BITS[method]:
        raise QuantizeError(f"--bits for {method} must be one of {', '.join(map(str, BITS[method]))} (got {bits})")
    if dtype not in DTYPES:
        raise QuantizeError(f"--dtype must be a 16-bit dtype, one of {', '.join(DTYPES)} (got {dtype!r}): the quantized kernels compute in it")
    if group_size < 1 and group_size != -1:
        raise QuantizeError(f"--group-size must be positive, or -1 for one group per row (got {group_size})")
    config_file = base_dir / "config.json"
    if not config_file.is_file():
        raise QuantizeError(f"{base_dir} is not a model directory: it has no config.json")
    if not calibration.is_file():
        raise QuantizeError(f"calibration file {calibration} does not exist")
    config = json.loads(config_file.read_text())
    if config.get("quantization_config"):
        method_there = config["quantization_config"].get("quant_method", "unknown")
        raise QuantizeError(f"{base_dir} is quantized already ({method_there}); quantize its float original")
    widths = linear_widths(config)
    for name, width in widths.items():
        if group_size != -1 and width % group_size:
            raise QuantizeError(f"--group-size {group_size} does not divide the model's {name} ({width}); pick a divisor of "
                                f"every layer width ({', '.join(f'{n} {w}' for n, w in widths.items())})")
        if method == "awq" and width % AWQ_WIDTH_MULTIPLE:
            raise QuantizeError(f"AWQ needs layer widths that are multiples of {AWQ_WIDTH_MULTIPLE}; the model's {name} is {width}")
    return config


def calibration_examples(base_dir: Path, calibration: Path, max_examples: int, max_length: int) -> tuple[list[dict[str, list[int]]], Any]:
    """The calibration file's examples as token ids, formatted as in training (the base's chat template), and the
    tokenizer."""
    from contract.data_format import DataValidationError, load_examples
    from worker.training.data import load_tokenizer, tokenize_example

    try:
        examples = load_examples(calibration, min_examples=1, role="training")
    except DataValidationError as exc:
        raise QuantizeError(f"calibration file {calibration}: {exc.message}") from None
    tokenizer = load_tokenizer(base_dir)
    rows = []
    for example in examples[:max_examples]:
        ids = tokenize_example(tokenizer, example, max_seq_length=max_length, train_on_inputs=True).input_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows, tokenizer


def quantize(base_dir: Path, calibration: Path, out_dir: Path, *, method: str = "gptq", bits: int = 4, group_size: int = 128,
             dtype: str = "bf16", max_examples: int = 256, max_length: int = 2048,
             progress: Callable[[str], None] = print) -> Path:
    """Write a `method` copy of the float model at `base_dir` to `out_dir`; returns `out_dir`. Raises QuantizeError."""
    import torch

    from worker.training.prequantized import import_gptqmodel

    check_request(base_dir, calibration, method, bits, group_size, dtype)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise QuantizeError(f"output directory {out_dir} exists and is not empty")
    started = time.monotonic()
    rows, tokenizer = calibration_examples(base_dir, calibration, max_examples, max_length)
    progress(f"[1/3] calibration: {len(rows)} examples, {sum(len(r['input_ids']) for r in rows)} tokens from {calibration}")
    gptqmodel = import_gptqmodel()
    quant_config = gptqmodel.QuantizeConfig(bits=bits, group_size=group_size, method=method)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = gptqmodel.GPTQModel.load(str(base_dir), quant_config, device=device, dtype=torch_dtype)
    progress(f"[2/3] quantizing {base_dir} with {method.upper()} {bits}-bit, group size {group_size}, on the {device} "
             "(gptqmodel reports each layer)")
    # The packing kernel: gptqmodel's default AWQ one needs CUDA; on the CPU the torch kernels pack.
    backend = "auto" if device == "cuda" else {"gptq": "gptq_torch", "awq": "awq_torch"}[method]
    backend = gptqmodel.BACKEND(backend)
    with tempfile.TemporaryDirectory() as logs:
        # gptqmodel writes per-layer logs under ./logs of the working directory: here they go to a temporary one.
        from gptqmodel.looper import loop_processor

        cwd_logs, loop_processor._PROJECT_LOG_DIR = loop_processor._PROJECT_LOG_DIR, Path(logs)
        try:
            model.quantize(rows, tokenizer=tokenizer, backend=backend)
        finally:
            loop_processor._PROJECT_LOG_DIR = cwd_logs
    model.save(str(out_dir))
    progress(f"[3/3] wrote {out_dir} in {time.monotonic() - started:.0f} s")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_dir", type=Path, help="the float base model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("calibration", type=Path, help="calibration data: JSONL in the upload format (chat messages, ...)")
    parser.add_argument("out_dir", type=Path, help="where to write the quantized copy (new or empty)")
    parser.add_argument("--method", choices=METHODS, default="gptq")
    parser.add_argument("--bits", type=int, default=4, help="bits per weight (gptq: 2, 3, 4 or 8; awq: 4)")
    parser.add_argument("--group-size", type=int, default=128, help="weights per scale and zero point; must divide every layer width (-1: one group per row)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the scales and of the computation")
    parser.add_argument("--max-examples", type=int, default=256, help="use at most this many calibration examples")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per calibration example at most")
    args = parser.parse_args(argv)
    try:
        quantize(args.base_dir, args.calibration, args.out_dir, method=args.method, bits=args.bits, group_size=args.group_size,
                 dtype=args.dtype, max_examples=args.max_examples, max_length=args.max_length)
    except (QuantizeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
