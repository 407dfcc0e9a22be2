"""Mixed precision: what `precision: fp32 | bf16 | fp16` means on a given device.

Weights, gradients and optimizer state stay fp32 (the master copy); only the forward and backward
compute runs in bf16/fp16 under `torch.autocast`. fp16's narrow exponent needs loss scaling, so it
gets a `GradScaler` whose state is checkpointed; bf16 has fp32's exponent range and needs none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cluster.spec import SpecError
from jobs.spec import Precision

_AUTOCAST_DTYPE = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def check_supported(precision: Precision, device: torch.device, source: str = "training job") -> None:
    """Raise SpecError naming the field and the fix if `precision` cannot run on `device`."""
    if precision == Precision.FP16 and device.type != "cuda":
        raise SpecError(
            source,
            [
                f"precision: fp16 needs a CUDA GPU (loss-scaled autocast) but this worker runs on "
                f"{device.type}; use precision: bf16 (or fp32) on CPU, or give the job gpus"
            ],
        )


@contextlib.contextmanager
def autocast(precision: Precision, device: torch.device) -> Iterator[None]:
    """The forward pass (and the backward it records) in the job's compute precision."""
    if precision == Precision.FP32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPE[precision]):
        yield


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler that is active for fp16 only; for fp32 and bf16 it passes values through."""
    return torch.amp.GradScaler(device.type, enabled=precision == Precision.FP16)
