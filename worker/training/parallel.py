"""How one training step is shared between processes: the seam between the recipe and torch.distributed.

The recipe (`trainer.train_step`) asks its `Replicas` for three things: this process's share of the step's units,
the sum over all processes of a few numbers (the step's weight, tokens, loss sum and metric sums), and the sum of
the gradients once the step's micro-batches have run. A single process (`Replicas`, the default) answers with what
it has. `DataParallel` answers for a `torchrun` process group: every process holds the whole model (same seed,
same LoRA init), trains on its share of each step's global batch, and the LoRA gradients are all-reduced once per
step, so the loss and the gradients are those of one process training the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


class Replicas:
    """One process trains the whole step; every answer is the process's own."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, the adapter and the result and reports to the sink."""
        return self.rank == 0

    def share(self, units: Sequence[T]) -> list[T]:
        """This process's part of a step's units."""
        return list(units)

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """The sums over all processes of `values` (a key missing in one process counts as 0 there)."""
        return dict(values)

    def reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Make each trainable parameter's gradient the sum of all processes' gradients."""

    def agreed_stop(self, requested: Callable[[], bool]) -> Callable[[], bool]:
        """A `should_stop` for the recipe that is true on every process at once: here, `requested` itself."""
        return requested


class DataParallel(Replicas):
    """Data parallelism over the default process group (`torch.distributed.init_process_group` already called).

    A step's units are split into contiguous near-equal parts in rank order (5 units on 2 ranks: 3 and 2; a rank
    may get none at the end of an epoch). Gradients are summed with one all-reduce over a flat buffer after the
    step's micro-batches, not by the DistributedDataParallel wrapper: its reducer needs every forward to pass
    through the wrapper, which the fused loss (it runs the base model's body, not its head) does not, and a rank
    with fewer or no micro-batches would need dummy passes. LoRA gradients are small, so overlapping their
    all-reduce with the backward pass, DDP's gain, is worth little here (docs/training.md, "Several GPUs")."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialized process group (run under torchrun)")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._in_step = False
        # NCCL reduces CUDA tensors only: the stop flag lives on this rank's GPU there.
        self._flag_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def share(self, units: Sequence[T]) -> list[T]:
        self._in_step = True  # until reduce_gradients: the step's micro-batches, a different count per process
        base, extra = divmod(len(units), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(units[start : start + base + (1 if self.rank < extra else 0)])

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        gathered: list[dict[str, float] | None] = [None] * self.world_size
        self._dist.all_gather_object(gathered, {k: float(v) for k, v in values.items()})
        totals: dict[str, float] = {}
        for part in gathered:  # rank order, so every rank adds in the same order and gets the same floats
            for key, value in (part or {}).items():
                totals[key] = totals.get(key, 0.0) + value
        return totals

    def agreed_stop(self, requested: Callable[[], bool]) -> Callable[[], bool]:
        """A `should_stop` that stops every process after the same step: between steps (the recipe asks once per
        step on every process) it is true if `requested()` is on any process (an all-reduce MAX); within a step,
        where processes ask once per micro-batch, as many times as they have micro-batches, it is false."""

        def should_stop() -> bool:
            if self._in_step:
                return False
            flag = torch.tensor([1 if requested() else 0], device=self._flag_device)
            self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX)
            return bool(flag.item())

        return should_stop

    def reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self._in_step = False
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        for p in params:  # a rank without micro-batches this step has no gradients: it adds zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():  # one all-reduce per gradient dtype (LoRA: fp32 only)
            flat = torch._utils._flatten_dense_tensors(grads)
            self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM)
            for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(reduced)

