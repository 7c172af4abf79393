"""Input checking helpers shared by every op.

Each helper raises a typed error that names the argument, what was expected and what was given:
``TypeError`` for a wrong dtype or a non-tensor, ``ValueError`` for a wrong shape, stride, device or
value, ``NotImplementedError`` for an unsupported GPU or backend. Ops call them before any kernel
launches, so a bad call never reaches device code.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

DTypeSpec = Union[torch.dtype, Sequence[torch.dtype], None]


def _dtype_names(dtype: DTypeSpec) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype)
    return " or ".join(str(d) for d in dtype)


def check_tensor(
    name: str,
    t,
    *,
    dtype: DTypeSpec = None,
    dim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = False,
    last_dim_contiguous: bool = False,
) -> None:
    """Check one tensor argument. ``shape`` entries of ``None`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype {_dtype_names(dtype)}, got {t.dtype}")
    if shape is not None:
        dim = len(shape)
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d tensor, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                want_s = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(
                    f"{name}: expected shape {want_s}, got {tuple(t.shape)} (dim {i}: {want} != {got})"
                )
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")
    if last_dim_contiguous and t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected stride 1 in the last dim, got strides {tuple(t.stride())}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors (None skipped) must live on one device; returns it."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of {first}), got {t.device}")
    return device


def check_multiple(name: str, value: int, multiple: int, what: str = "") -> None:
    if value % multiple != 0:
        where = f" {what}" if what else ""
        raise ValueError(f"{name}{where}: expected a multiple of {multiple}, got {value}")


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_range(name: str, value, lo=None, hi=None) -> None:
    """lo <= value <= hi (either bound may be None)."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}: expected a value in [{lo}, {hi}], got {value}")
