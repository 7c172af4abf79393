"""Testing kit shared by the tests and the benchmarks.

- ``calc_diff(out, ref)``: 1 - cosine similarity (DeepGEMM style), in float64.
- ``rel_err(out, ref)``: ||out - ref|| / ||ref||.
- ``TOLERANCES`` / ``assert_close``: per-dtype atol/rtol; on failure prints the worst mismatches.
- ``poisoned(shape, dtype, device)``: an output buffer filled with NaN (0xFF bytes for int/fp8
  types) so unwritten elements are caught; ``assert_all_written``.
- ``make_generator(seed_or_nodeid)`` / ``randn``: seeded inputs, never zeros.
- hypothesis strategies: ``lengths()`` that covers every residue mod 4 and mod 128.
- ``test_device()``, ``triton_backends()``: where and what the backend tests run on; the CPU
  runs Triton kernels under ``TRITON_INTERPRET=1`` (set by tests/conftest.py before import).
- ``run_opcheck(op, args, kwargs)``: ``torch.library.opcheck`` with the checks that apply.
- ``sm90a_ptxas_spills(src)``: compile a CUDA source for sm_90a with nvcc (CPU only), fail on ptxas wgmma
  serialisation / injected waits, return the spill bytes of each kernel.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import torch

try:  # hypothesis is a test extra; the rest of this module works without it
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

# (atol, rtol) per output dtype, for kernel-vs-reference comparisons where the math is the same
# up to accumulation order. Quantized paths compare against a quantization-simulating reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def calc_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """1 - cos_sim over all elements, in float64 (0 for identical, ~1e-5 for bf16 rounding)."""
    x, y = out.double().flatten(), ref.double().flatten()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.double()
    n = ref64.norm()
    return float((out.double() - ref64).norm() / (n if n > 0 else 1))


def _worst(out, ref, atol, rtol, k=8):
    o, r = out.double().flatten(), ref.double().flatten()
    err = (o - r).abs() - (atol + rtol * r.abs())
    err = torch.where(torch.isnan(o) != torch.isnan(r), torch.full_like(err, float("inf")), err)
    vals, idx = torch.topk(torch.nan_to_num(err, nan=0.0), min(k, err.numel()))
    lines = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        if v <= 0:
            break
        pos = tuple(int(p) for p in torch.unravel_index(torch.tensor(i), out.shape))
        lines.append(f"  at {pos}: out={o[i].item():.6g} ref={r[i].item():.6g}")
    return lines


def assert_close(out, ref, *, atol=None, rtol=None, name="out", max_print=8, equal_nan=False):
    """Per-element |out - ref| <= atol + rtol*|ref|; prints the worst mismatches on failure."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    d_atol, d_rtol = TOLERANCES.get(out.dtype, (0.0, 0.0))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if torch.allclose(out.double(), ref.double(), atol=atol, rtol=rtol, equal_nan=equal_nan):
        return
    o, r = out.double(), ref.double()
    bad = ~torch.isclose(o, r, atol=atol, rtol=rtol, equal_nan=equal_nan)
    lines = _worst(out, ref, atol, rtol, max_print)
    raise AssertionError(
        f"{name}: {int(bad.sum())}/{out.numel()} elements differ (atol={atol}, rtol={rtol}); "
        f"calc_diff={calc_diff(torch.nan_to_num(out), torch.nan_to_num(ref)):.3g}; worst:\n" + "\n".join(lines)
    )


def assert_bitwise_equal(out: torch.Tensor, ref: torch.Tensor, name="out", max_print=8):
    """Same bytes (compares the raw bit patterns, so -0/+0 and NaN payloads count)."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        raise AssertionError(f"{name}: {tuple(out.shape)} {out.dtype} vs reference {tuple(ref.shape)} {ref.dtype}")
    ob = out.contiguous().view(torch.uint8).reshape(out.shape + (out.element_size(),)) if out.dim() else out.view(torch.uint8)
    rb = ref.contiguous().view(torch.uint8).reshape(ref.shape + (ref.element_size(),)) if ref.dim() else ref.view(torch.uint8)
    diff = (ob != rb).any(dim=-1) if ob.dim() > out.dim() else ob != rb
    n = int(diff.sum())
    if n:
        idx = diff.nonzero()[:max_print].tolist()
        rows = [f"  at {tuple(i)}: out={out[tuple(i)].float().item()!r} ref={ref[tuple(i)].float().item()!r}" for i in idx]
        raise AssertionError(f"{name}: {n}/{diff.numel()} elements differ bitwise; first:\n" + "\n".join(rows))


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An uninitialised-looking output: NaN for float types, all-ones bytes for the rest."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point and dtype.itemsize >= 2:
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(0xFF)
    return t


def assert_all_written(t: torch.Tensor, name="out"):
    """No NaN left in a float output that was allocated with ``poisoned``."""
    if t.dtype.is_floating_point and t.dtype.itemsize >= 2:
        n = int(torch.isnan(t).sum())
        if n:
            first = torch.isnan(t).nonzero()[:4].tolist()
            raise AssertionError(f"{name}: {n} elements were never written (still NaN), first at {first}")


def seed_from(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def make_generator(seed=None, device="cpu") -> torch.Generator:
    """A generator seeded from an int or a string (e.g. the pytest node id)."""
    if seed is None:
        seed = os.environ.get("PYTEST_CURRENT_TEST", "v4kernels")
    if isinstance(seed, str):
        seed = seed_from(seed)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(*shape, gen: torch.Generator, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Standard normal values (generated on the CPU so every device sees the same inputs)."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def test_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def triton_available() -> bool:
    """Triton kernels can run: on a GPU, or on the CPU under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return True
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_backends(op_name: str) -> list:
    """Non-reference backends of an op that can run in this process (for parametrizing tests)."""
    from ._dispatch import OPS
    from ._ext import cuda_backend_available

    op = OPS[op_name]
    out = []
    if op.triton is not None and triton_available():
        out.append("triton")
    if op.cuda is not None and torch.cuda.is_available() and cuda_backend_available(torch.device("cuda")):
        out.append("cuda")
    return out


def run_opcheck(op, args, kwargs=None, *, test_utils: Optional[Sequence[str]] = None):
    """``torch.library.opcheck`` (schema, fake tensor, dispatch) on one call of a v4kernels op."""
    utils = test_utils or ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    return torch.library.opcheck(op, args, kwargs or {}, test_utils=list(utils))


if st is not None:

    @st.composite
    def lengths(draw, max_len: int = 300, min_len: int = 0):
        """Sequence lengths that hit every residue mod 4 and the edges of 128-blocks."""
        kind = draw(st.sampled_from(["any", "near128", "mod4"]))
        if kind == "near128":
            base = 128 * draw(st.integers(0, max(0, max_len // 128)))
            n = base + draw(st.integers(-3, 3))
        elif kind == "mod4":
            n = 4 * draw(st.integers(0, max_len // 4)) + draw(st.integers(0, 3))
        else:
            n = draw(st.integers(min_len, max_len))
        return max(min_len, min(max_len, n))


WGMMA_PTXAS_WARNINGS = ("C7515", "C7517", "C7519")  # wgmma serialised / warpgroup waits or arrives injected


def sm90a_ptxas_spills(src: str, out_dir: str) -> list:
    """Compile ``src`` (a .cu under csrc/) for sm_90a with ``nvcc -Xptxas -v`` into ``out_dir`` and return the
    spill-store bytes ptxas reports for each kernel. Fails (AssertionError) on a compile error or on a ptxas
    warning that it serialised wgmma instructions or injected warpgroup waits / arrives around registers an
    in-flight wgmma uses (each of those cost our kernels measurably). Needs nvcc, no GPU."""
    import re
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a", "-I",
         os.path.join(root, "csrc"), "-Xptxas", "-v", "-c", src, "-o", os.path.join(out_dir, "kernel.o")],
        capture_output=True, text=True, timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    for code in WGMMA_PTXAS_WARNINGS:
        assert code not in log, f"ptxas {code}: " + next(line for line in log.splitlines() if code in line)
    return [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
