"""The longest max_seq_length the memory estimate admits per card size, for 1B, 8B and 70B Llama bases (batch 1,
packing, the default options: NF4 + double quantization, LoRA r=16 on all linears, paged 8-bit AdamW, lean
activations, the fused loss, varlen attention). Estimates, not measurements: bench/long_context.py measures the 8B
case on a GPU. Prints the table of docs/training.md ("Long context"):

    python bench/context_lengths.py

Each cell is contract.device_choices.longest_fitting_tokens against the budget gradient_checkpointing='auto' plans
for on an empty card of that size (85% of its memory, worker/training/tunables.FREE_MEMORY_BUDGET_SHARE), with every
layer checkpointed and offloaded and the MLPs tiled, next to the longest with checkpointing alone (the engine before
long-context support), and the host memory the offloaded inputs take at that length.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.device_choices import longest_fitting_tokens  # noqa: E402
from contract.memory import GIB, estimate_memory  # noqa: E402
from contract.options import MAX_SEQ_LENGTH, TrainingConfig  # noqa: E402
from worker.training.tunables import FREE_MEMORY_BUDGET_SHARE, LOSS_CHUNK_TOKENS  # noqa: E402

LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8)
BASES = {
    "1B (Llama-3.2-1B)": dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                              head_dim=64, tie_word_embeddings=True),
    "8B (Llama-3.1-8B)": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70B (Llama-3.1-70B)": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}
CARDS_GB = (24, 48, 80)


def config(max_seq_length: int = 2048, **options) -> TrainingConfig:
    return TrainingConfig(micro_batch_size=1, batch_size=1, max_seq_length=max_seq_length, **options)


def longest(base: dict, card_gb: int, **options) -> int:
    budget = int(card_gb * 1e9 * FREE_MEMORY_BUDGET_SHARE)
    return longest_fitting_tokens(base, config(**options), budget_bytes=budget, loss_chunk_tokens=LOSS_CHUNK_TOKENS)


def shown(tokens: int) -> str:
    if tokens < 16:
        return "does not fit"
    if tokens >= MAX_SEQ_LENGTH:
        return f"{MAX_SEQ_LENGTH // 1024:,}K (the option's cap)"
    return f"{tokens / 1024:,.0f}K" if tokens >= 10240 else f"{tokens:,}"


def table() -> str:
    rows = ["| base | card (budget: 85%) | longest, offloaded + tiled | host memory then | longest, checkpointing only |", "|---|---|---|---|---|"]
    for name, base in BASES.items():
        for card_gb in CARDS_GB:
            best = min(longest(base, card_gb), MAX_SEQ_LENGTH)
            plain = longest(base, card_gb, gradient_checkpointing="on", sequence_tiling=False)
            host = (estimate_memory(base, config(), tokens_per_micro_batch=best, layer_modes=["offload"] * base["num_hidden_layers"],
                                    sequence_tiling=True, loss_chunk_tokens=LOSS_CHUNK_TOKENS).host_activations if best >= 16 else 0)
            rows.append(f"| {name} | {card_gb} GB | {shown(best)} | {f'{host / GIB:,.0f} GiB' if host else '-'} | {shown(plain)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(), end="")
