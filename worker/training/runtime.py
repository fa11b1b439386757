"""What a run needs from the process around it, whatever the method: seeding, the compute dtype's autocast
region, the peak memory of a step, and the versions recorded in each checkpoint."""

from __future__ import annotations

import random
import resource
import sys
from contextlib import AbstractContextManager

import numpy as np
import torch

from contract.options import TrainingConfig
from worker.training.model import compute_dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(cfg: TrainingConfig) -> torch.dtype | None:
    """bf16/fp16 compute runs under autocast, so that the fp32 adapters' matmuls run in the compute dtype
    too (peft keeps adapter weights in fp32; without autocast their inputs are upcast and saved in fp32)."""
    dtype = compute_dtype(cfg)
    return None if dtype == torch.float32 else dtype


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager[None]:
    """The autocast region of a forward pass: `amp_dtype` (from `autocast_dtype`), or none for fp32."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the process's peak resident memory, the nearest CPU equivalent.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
