"""Training methods: one objective per `TrainingConfig.method` (the protocol is `base.Objective`).

A new method adds `<method>.py` beside `sft.py`, one entry in `OBJECTIVES`, its name in `contract.options.Method`
and, if its data has a new shape, a loader in `worker/training/data.py`.
"""

from __future__ import annotations

from collections.abc import Callable

from contract.options import TrainingConfig
from worker.training.objectives.base import Batch, LossOutput, Objective, Unit, model_inputs
from worker.training.objectives.dpo import DpoObjective
from worker.training.objectives.sft import SupervisedObjective

OBJECTIVES: dict[str, Callable[[TrainingConfig], Objective]] = {
    "supervised": SupervisedObjective,
    "dpo": DpoObjective,
}


def build_objective(cfg: TrainingConfig) -> Objective:
    """The objective of the job's method."""
    return OBJECTIVES[cfg.method](cfg)


__all__ = ["Batch", "LossOutput", "OBJECTIVES", "Objective", "Unit", "build_objective", "model_inputs"]
