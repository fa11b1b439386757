"""Inference bench: the embedded inference server answering chat completions for SmolLM2-135M-Instruct with a LoRA
adapter, against plain transformers + peft `generate` on the same prompt, in one run on this machine.

    python bench/inference.py --out bench/results/DATE-inference-NAME.json     # about a minute on 2 cores

Rows (each `--repeats` times, the median kept):
  server_cold_adapter   the first request for an adapter: fetch its archive from object storage, unpack, attach, answer
  server_adapter        a request for the adapter once it is attached (streamed: time to first token, tokens/s)
  server_base           the same for the base model alone, with the adapter attached beside it
  plain_peft            `PeftModel.generate` in this process, no server (the baseline: what a user's script does)
The adapter has random non-zero LoRA B matrices (r=16 on all linear layers), so it costs what a trained one costs.
Every request asks greedily for `--tokens` tokens on a prompt that asks for a long answer (the record keeps the
count generated). Requests go over HTTP to the server on a loopback port, as the API sends them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.cpu import cpu_name  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea, with many details."}]


def make_adapter(base_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(out)
    return out


def stream_request(url: str, model: str, tokens: int) -> dict[str, float]:
    """One streamed chat completion: seconds to the first content chunk, total seconds, tokens generated."""
    started = time.perf_counter()
    first = None
    usage = None
    body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                usage = chunk["usage"]
    total = time.perf_counter() - started
    assert usage is not None and first is not None
    return {"ttft_s": first, "total_s": total, "completion_tokens": usage["completion_tokens"],
            "tokens_per_s": (usage["completion_tokens"] - 1) / max(total - first, 1e-9)}


class PlainPeft:
    """The baseline: the same base and adapter with transformers + peft in this process, loaded once."""

    def __init__(self, base_dir: Path, adapter_dir: Path, dtype: torch.dtype):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter_dir).eval()
        self.ids = self.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def run(self, tokens: int) -> dict[str, float]:
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            started = time.perf_counter()
            self.model.generate(**self.ids, max_new_tokens=1, do_sample=False, pad_token_id=pad)
            ttft = time.perf_counter() - started
            started = time.perf_counter()
            out = self.model.generate(**self.ids, max_new_tokens=tokens, do_sample=False, pad_token_id=pad)
            total = time.perf_counter() - started
        n = out.shape[1] - self.ids["input_ids"].shape[1]
        return {"ttft_s": ttft, "total_s": total, "completion_tokens": n, "tokens_per_s": n / total}


def median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from core.settings import Settings
    from inference.server import create_app
    from tests.conftest import free_port, wait_for_port
    from worker.database_sink import pack_directory
    from worker.training.demo_model import import_demo_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-weights", choices=("16bit", "nf4"), default="16bit")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    base_dir = import_demo_model(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    (work / "models").mkdir()
    (work / "models" / base_dir.name).symlink_to(base_dir)
    settings = Settings(home=work, storage="local", inference_base_weights=args.base_weights, inference_max_adapters=16)
    adapter_dir = make_adapter(base_dir, work / "adapter")
    app = create_app(settings)
    storage = app.state.engine.storage
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_for_port(port)
    url = f"http://127.0.0.1:{port}"

    stream_request(url, base_dir.name, 2)  # the base loads once, outside every row
    plain = PlainPeft(base_dir, adapter_dir, app.state.engine.dtype)
    plain.run(2)
    rows: dict[str, list[dict[str, float]]] = {"server_cold_adapter": [], "server_adapter": [], "server_base": [], "plain_peft": []}
    for i in range(args.repeats):
        key = f"files/bench-{i}"
        storage.put_file(key, pack_directory(adapter_dir, work / f"adapter-{i}.tar.gz"))
        started = time.perf_counter()
        httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": f"ft-{i}", "lora_path": key, "base_model_name": base_dir.name},
                   timeout=600).raise_for_status()
        load_s = time.perf_counter() - started
        cold = stream_request(url, f"ft-{i}", args.tokens)
        rows["server_cold_adapter"].append({**cold, "ttft_s": cold["ttft_s"] + load_s, "adapter_load_s": load_s})
        rows["server_adapter"].append(stream_request(url, f"ft-{i}", args.tokens))
        rows["server_base"].append(stream_request(url, base_dir.name, args.tokens))
        rows["plain_peft"].append(plain.run(args.tokens))  # in the same repeat: the same machine load
    engine = app.state.engine
    rows_out = {name: median_row(runs) for name, runs in rows.items()}
    server.should_exit = True

    import peft
    import transformers

    record = {
        "bench": "inference", "date": dt.date.today().isoformat(), "cpu": cpu_name(), "cores": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "model": base_dir.name, "dtype": str(engine.dtype),
        "base_weights": args.base_weights, "tokens": args.tokens, "repeats": args.repeats, "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "load_average_at_end": list(__import__("os").getloadavg()),
        "rows": rows_out,
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
