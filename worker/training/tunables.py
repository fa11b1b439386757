"""The engine's own settings that no job option changes, torch-free so that the memory estimate's callers (the API,
the engine's checkpointing plan) can pass them to `contract.memory.estimate_memory`, which models them."""

# The fused loss (losses.py) works on this many tokens at a time. Small enough to leave room for kept activations,
# large enough to keep the GPU busy (docs/performance.md).
LOSS_CHUNK_TOKENS = 512

# gradient_checkpointing='auto' without memory_budget_gb plans for this share of the GPU memory free when a run
# starts: a margin for what the estimate does not model (allocator fragmentation, kernels' workspaces).
FREE_MEMORY_BUDGET_SHARE = 0.85
