"""Op registration and backend dispatch: the one mechanism every v4kernels op uses.

An op family module (``v4kernels/ops/<family>.py``) declares each op once::

    act_quant_fp8 = define_op(
        "act_quant_fp8(Tensor x, int block=128, *, str? backend=None) -> (Tensor, Tensor)",
        check=_check_inputs,           # raises typed errors before anything launches
        reference=ref.act_quant_fp8,   # float32 PyTorch reference: the CPU implementation
        fake=_fake,                    # shapes/dtypes for torch.compile and opcheck
        triton=tri.act_quant_fp8,      # optional Triton implementation
        cuda=_cuda_impl,               # optional v4kernels._C (sm_90a) implementation
        cuda_supported=lambda *a, **k: True,   # optional: inputs the CUDA kernel handles
        cuda_preferred=lambda *a, **k: True,   # optional: inputs where "auto" picks it (default: all supported)
    )

This defines ``torch.ops.v4kernels.act_quant_fp8`` with that schema (``torch.library.Library``,
not ``custom_op``: a directly registered op costs ~15 us per call, ``custom_op`` ~39 us), registers
the same Python dispatcher for the CPU and CUDA keys and ``fake`` for Meta/FakeTensor, and returns
the op overload packet. Every schema ends with the keyword-only ``str? backend=None``.

Backend choice, first match wins:
  1. the ``backend=`` argument ("reference", "triton", "cuda" or "auto");
  2. the environment variable ``V4K_BACKEND`` (same values; read at each call);
  3. "auto": on CUDA tensors the CUDA kernel if built, on sm_90, ``cuda_supported`` and ``cuda_preferred``
     (where it is the faster kernel), else Triton
     if the op has it, else the reference; on CPU tensors the reference.
A forced backend that cannot run raises ``NotImplementedError`` (never a silent fallback), except
that a forced "cuda" on an op without a CUDA kernel uses Triton (so the whole suite can be run with
``V4K_BACKEND=cuda``). "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (the CPU test mode).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from . import shadow as _shadow
from ._ext import cuda_backend_available

BACKENDS = ("reference", "triton", "cuda")
_LIB = torch.library.Library("v4kernels", "DEF")  # noqa: TOR901 (kept alive for the process)
OPS: Dict[str, "OpDef"] = {}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class OpDef:
    name: str
    schema: str
    reference: Callable
    fake: Callable
    check: Optional[Callable] = None
    triton: Optional[Callable] = None
    cuda: Optional[Callable] = None
    cuda_supported: Optional[Callable] = None
    cuda_preferred: Optional[Callable] = None
    last_backend: Optional[str] = field(default=None, repr=False)  # for tests: what ran last

    def backends(self) -> tuple:
        """Backends this op implements (whether or not they can run here)."""
        return tuple(b for b in BACKENDS if getattr(self, b) is not None)

    def select(self, backend: Optional[str], device: torch.device, args, kwargs) -> str:
        want = backend or os.environ.get("V4K_BACKEND") or "auto"
        if want not in BACKENDS + ("auto",):
            raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)}, got {want!r}")
        on_cuda = device is not None and device.type == "cuda"
        if want == "auto":
            if not on_cuda:
                return "reference"
            if self._cuda_ok(device, args, kwargs) and (
                    self.cuda_preferred is None or bool(self.cuda_preferred(*args, **kwargs))):
                return "cuda"
            return "triton" if self.triton is not None else "reference"
        if want == "cuda":
            if self.cuda is None:
                want = "triton" if self.triton is not None else "reference"
            elif not on_cuda:
                raise NotImplementedError(f"v4kernels.{self.name}: backend 'cuda' needs CUDA tensors, got {device}")
            elif not self._cuda_ok(device, args, kwargs):
                raise NotImplementedError(
                    f"v4kernels.{self.name}: backend 'cuda' cannot run these inputs here (needs v4kernels._C "
                    f"built, an sm_90 GPU and supported shapes)"
                )
            else:
                return "cuda"
        if want == "triton":
            if self.triton is None:
                raise NotImplementedError(f"v4kernels.{self.name}: no Triton implementation")
            if not on_cuda and not triton_interpret():
                raise NotImplementedError(
                    f"v4kernels.{self.name}: backend 'triton' on {device} tensors needs TRITON_INTERPRET=1"
                )
        return want

    def _cuda_ok(self, device, args, kwargs) -> bool:
        if self.cuda is None or not cuda_backend_available(device):
            return False
        return self.cuda_supported is None or bool(self.cuda_supported(*args, **kwargs))


def _first_device(args, kwargs) -> Optional[torch.device]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b.device
    return None


def _make_impl(op: OpDef):
    def impl(*args, backend=None, **kwargs):
        if op.check is not None:
            op.check(*args, **kwargs)
        chosen = op.select(backend, _first_device(args, kwargs), args, kwargs)
        op.last_backend = chosen
        report = _shadow.active()
        if report is not None and chosen != "reference":
            return _shadow.run_shadowed(report, op, chosen, args, kwargs)
        return getattr(op, chosen)(*args, **kwargs)

    impl.__name__ = f"{op.name}_impl"
    return impl


def _make_fake(op: OpDef):
    def fake(*args, backend=None, **kwargs):
        if op.check is not None:
            op.check(*args, **kwargs)
        return op.fake(*args, **kwargs)

    return fake


def define_op(
    schema: str,
    *,
    reference: Callable,
    fake: Callable,
    check: Optional[Callable] = None,
    triton: Optional[Callable] = None,
    cuda: Optional[Callable] = None,
    cuda_supported: Optional[Callable] = None,
    cuda_preferred: Optional[Callable] = None,
):
    """Define ``torch.ops.v4kernels.<name>`` from ``schema`` and its implementations (module doc)."""
    name = schema.split("(", 1)[0].strip()
    if "str? backend=None" not in schema:
        raise ValueError(f"define_op({name}): schema must end with '*, str? backend=None'")
    if name in OPS:
        raise RuntimeError(f"define_op: v4kernels::{name} is defined twice")
    op = OpDef(name, schema, reference, fake, check, triton, cuda, cuda_supported, cuda_preferred)
    _LIB.define(schema)
    impl = _make_impl(op)
    _LIB.impl(name, impl, "CPU")
    _LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"v4kernels::{name}", lib=_LIB)(_make_fake(op))
    OPS[name] = op
    return getattr(torch.ops.v4kernels, name)
