"""Loading of the optional CUDA extension ``v4kernels._C`` and GPU capability queries."""
from __future__ import annotations

import functools
from typing import Optional

import torch

_LOAD_ERROR: Optional[str] = None


@functools.lru_cache(maxsize=None)
def cuda_extension_loaded() -> bool:
    """True when v4kernels._C imported (it registers the ``torch.ops.v4kernels_C`` ops)."""
    global _LOAD_ERROR
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:  # not built (no nvcc at install time) or wrong torch
        _LOAD_ERROR = str(exc)
        return False
    return True


def cuda_extension_error() -> Optional[str]:
    cuda_extension_loaded()
    return _LOAD_ERROR


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def is_sm90(device: torch.device) -> bool:
    """The sm_90a kernels of v4kernels._C run on Hopper (compute capability 9.0) only."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return device_capability(index) == (9, 0)


def cuda_backend_available(device: torch.device) -> bool:
    return device.type == "cuda" and is_sm90(device) and cuda_extension_loaded()
