"""Shadow checking: run every kernel call's float32 reference beside it and record the differences.

    from v4kernels.shadow import shadow_check
    with shadow_check() as report:
        model.prefill(...)            # any code that calls v4kernels ops
    print(report.table())

Inside the block, each op call that runs a kernel backend (Triton or CUDA) also runs the op's
reference on clones of the same inputs (in-place ops see the same pre-call state), and the report
records, per op, the worst difference of each output and each argument the call mutated:
max |kernel - reference|, that over max |reference| (``rel``), NaN/Inf mismatches, and for integer
or byte outputs the fraction of elements that differ. Because each op is checked on the inputs the
kernel path gave it, the report localizes a divergence to one op even when errors compound through
a model. Costs the reference's time and memory for every call: a debugging tool, not for serving.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

_STATE = threading.local()


def active() -> Optional["ShadowReport"]:
    return getattr(_STATE, "report", None)


@dataclass
class ShadowStat:
    calls: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    mismatch_frac: float = 0.0  # integer/byte tensors: worst fraction of differing elements
    nonfinite_mismatch: int = 0
    worst_output: str = ""
    compared: set = field(default_factory=set)  # names of the outputs / mutated arguments compared


@dataclass
class ShadowReport:
    stats: Dict[str, ShadowStat] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)

    def record(self, op: str, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        st = self.stats.setdefault(op, ShadowStat())
        st.compared.add(what)
        if got.shape != want.shape:
            self.errors.append(f"{op}.{what}: shape {tuple(got.shape)} vs reference {tuple(want.shape)}")
            return
        if got.numel() == 0:
            return
        if got.dtype.is_floating_point or want.dtype.is_floating_point:
            if got.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                got, want = got.view(torch.uint8), want.view(torch.uint8)
            else:
                g, w = got.double(), want.double()
                fin_g, fin_w = torch.isfinite(g), torch.isfinite(w)
                bad = int((fin_g != fin_w).sum())
                st.nonfinite_mismatch += bad
                both = fin_g & fin_w
                if bool(both.any()):
                    diff = (g - w).abs()[both]
                    a = float(diff.max())
                    scale = float(w.abs()[both].max())
                    r = a / scale if scale > 0 else (0.0 if a == 0 else float("inf"))
                    if r > st.max_rel:
                        st.max_rel, st.worst_output = r, what
                    st.max_abs = max(st.max_abs, a)
                return
        frac = float((got != want).float().mean())
        if frac > st.mismatch_frac:
            st.mismatch_frac = frac
            if st.max_rel == 0:
                st.worst_output = what

    def table(self) -> str:
        lines = [f"{'op':32s} {'calls':>6s} {'max_abs':>11s} {'max_rel':>11s} {'int_mismatch':>12s} "
                 f"{'nonfinite':>9s}  worst"]
        for name, s in sorted(self.stats.items(), key=lambda kv: (-kv[1].max_rel, -kv[1].mismatch_frac)):
            lines.append(f"{name:32s} {s.calls:6d} {s.max_abs:11.3e} {s.max_rel:11.3e} {s.mismatch_frac:12.3e} "
                         f"{s.nonfinite_mismatch:9d}  {s.worst_output}")
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN), for any dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        a, b = a.contiguous(), b.contiguous()
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(bits), b.view(bits)
    return torch.equal(a, b)


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _tensors(x, prefix):
    if isinstance(x, torch.Tensor):
        yield prefix, x
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{prefix}[{i}]")


def run_shadowed(report: ShadowReport, op, chosen: str, args: tuple, kwargs: dict):
    """Run ``op``'s ``chosen`` backend, then its reference on clones of the pre-call inputs."""
    ref_args, ref_kwargs = _clone(args), {k: _clone(v) for k, v in kwargs.items()}
    before = [(n, t.clone()) for n, t in _tensors(args, "arg")]
    _STATE.report = None  # ops called inside an implementation are not shadowed again
    try:
        out = getattr(op, chosen)(*args, **kwargs)
        try:
            want = op.reference(*ref_args, **ref_kwargs)
        except Exception as exc:  # the reference refused inputs the kernel accepted: worth knowing
            report.errors.append(f"{op.name}: reference raised {type(exc).__name__}: {exc}")
            return out
    finally:
        _STATE.report = report
    report.stats.setdefault(op.name, ShadowStat()).calls += 1
    for (n, g), (_, w) in zip(_tensors(out, "out"), _tensors(want, "out")):
        report.record(op.name, n, g, w)
    # arguments either side mutated (caches, states, out= buffers)
    for (n, pre), (_, now), (_, ref_now) in zip(before, _tensors(args, "arg"), _tensors(ref_args, "arg")):
        if not _same(now, pre) or not _same(ref_now, pre):
            report.record(op.name, n, now, ref_now)
    return out


@contextlib.contextmanager
def shadow_check():
    """Context manager: shadow every v4kernels kernel call in this thread (module doc)."""
    prev = active()
    report = ShadowReport()
    _STATE.report = report
    try:
        yield report
    finally:
        _STATE.report = prev
