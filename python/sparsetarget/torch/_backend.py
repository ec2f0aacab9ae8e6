"""The one place where torch tensors meet the compiled core: device dispatch and zero-copy views.

CPU tensors reach ``_core`` as NumPy views of the same memory (no copy); the core updates the state in place.
Tensors on any other device are refused here with a message that says what is missing.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import build_info

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_device(device: torch.device, what: str) -> None:
    """Raise unless the compiled core can work on tensors on ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda" and not build_info()["cuda"]:
        raise RuntimeError(f"sparsetarget was not compiled with CUDA, so {what} cannot live on {device}: keep the "
                           "head on the CPU, or reinstall sparsetarget from source on a machine with nvcc and cuBLAS")
    raise RuntimeError(f"{what} is on {device}; sparsetarget supports CPU tensors")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor: the same memory, no copy."""
    if not t.is_contiguous():
        raise ValueError("internal error: a state tensor handed to the core must be contiguous")
    return t.detach().numpy()


def from_numpy(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A tensor on ``device`` holding ``a`` (for CPU, the same memory)."""
    t = torch.from_numpy(a)
    return t if torch.device(device).type == "cpu" else t.to(device)
