"""Launcher of the one-pass hc_pre kernel (csrc/mhc/mhc_pre.cu).

Same signature as ``v4kernels.ops.mhc.mhc_pre``'s implementations (inputs checked there). Plans the
kernel (``plan``: channel slice per CTA and ring depth), allocates the outputs and the workspace (a ring of
per-CTA partial sums; one zeroed buffer with a counter per 64-token tile and the per-token pre (value, flag)
pairs) and calls
``torch.ops.v4kernels_C.mhc_pre_out``. No host synchronisation, CUDA-graph capturable.

Numerics: fn is split into three exact bf16 parts on the tensor cores, so every product is exact; each
CTA's per-stream partial sums (CH channels) are added in IEEE fp32, then the NC CTA partials in CTA order.
y is ``bf16(((p0 X0 + p1 X1) + p2 X2) + p3 X3)`` with one rounding per operation, bitwise equal to the
reference given the same pre; the weights agree with the reference within the tolerance stated in
``ops/mhc.py``. The plan depends on (d, SM count) only, so a token's outputs do not depend on T or on its
batch, and repeated calls give the same bytes.
"""
from __future__ import annotations

import functools

import torch

HC = 4
TILE = 64  # tokens per tile (csrc/mhc/mhc_pre.cu kTile)
PART_STRIDE = 32
MAX_SLICES = 128  # channel slices (CTAs); fewer on GPUs with fewer SMs
MAX_STAGES = 12
MIN_STAGES = 2
SMEM_BUDGET = 227 * 1024 - 2 * 1024  # dynamic shared memory per CTA: the sm_90 opt-in maximum less barriers and pre


@functools.lru_cache(maxsize=None)
def plan(d: int, sms: int) -> tuple[int, int, int]:
    """(ch, nc, stages): channels per CTA (a multiple of 8), CTAs = ceil(d / ch) <= min(sms, 128), and the depth
    of the shared-memory ring of 64-token tiles (rows of 4 ch + 8 bf16; the fn slice takes 3 x 24 such rows)."""
    n = min(sms, MAX_SLICES)
    ch = -(-d // n)
    ch = -(-ch // 8) * 8
    nc = -(-d // ch)
    row = (4 * ch + 8) * 2
    stages = min(MAX_STAGES, (SMEM_BUDGET - 3 * 24 * row) // (TILE * row))
    return ch, nc, stages


def _sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def pre_supported(x, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20) -> bool:
    """bf16 streams on a GPU where the plan fits (at least 2 ring stages)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cuda":
        return False
    return plan(int(x.shape[2]), _sms(x.device))[2] >= MIN_STAGES


def mhc_pre(x, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20, *, return_pre=False, out=None,
            stages=None, trace=None):
    """CUDA hc_pre: (y bf16 [T, d], post fp32 [T, 4], comb fp32 [T, 4, 4]) (+ pre [T, 4] for tests).

    ``out``: (y, post, comb, pre) buffers to write (tests pass NaN-poisoned ones). ``stages`` (ring depth,
    2..16): override for profiling; it does not change the results. ``trace``: int64 [ceil(T / 64), 9 + 2 NC] that receives the kernel's timeline
    (profiling; events in csrc/mhc/mhc_pre.cu)."""
    T, _, d = x.shape
    dev = x.device
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    if out is None:
        out = (torch.empty((T, d), dtype=torch.bfloat16, device=dev),
               torch.empty((T, HC), dtype=torch.float32, device=dev),
               torch.empty((T, HC, HC), dtype=torch.float32, device=dev),
               torch.empty((T, HC), dtype=torch.float32, device=dev))
    y, post, comb, pre = out
    if T > 0:
        ch, nc, r = plan(int(d), _sms(dev))
        r = int(stages or r)
        part = torch.empty((r * TILE * nc, PART_STRIDE), dtype=torch.float32, device=dev)
        nt = -(-T // TILE)
        # zeroed: one counter per tile (rounded up to 16 bytes), then 4 (pre, flag) 8-byte pairs per token
        cnt = torch.zeros((-(-nt // 4) * 4 + 8 * T,), dtype=torch.int32, device=dev)
        torch.ops.v4kernels_C.mhc_pre_out(x, fn.contiguous(), base.contiguous(), scale.contiguous(),
                                          float(norm_eps), float(hc_eps), int(sinkhorn_iters), ch, r,
                                          part, cnt, y, post, comb, pre, trace)
    return (y, post, comb, pre) if return_pre else (y, post, comb)
