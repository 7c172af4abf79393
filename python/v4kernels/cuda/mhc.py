"""Launcher of the one-pass hc_pre kernel (csrc/mhc/mhc_pre.cu).

Same signature as ``v4kernels.ops.mhc.mhc_pre``'s implementations (inputs checked there). Allocates
the outputs and the kernel's workspace (per 64-token block and K slice, 64 x 32 fp32 partials; one
counter per block plus the token queue, zeroed) and calls ``torch.ops.v4kernels_C.mhc_pre_out``. No
host synchronisation, CUDA-graph capturable.

Numerics: as the Triton streaming kernel (three exact bf16 parts of fn on the tensor cores, each
128-k block's MMA sum added in IEEE fp32, K slices of 1024 (V4 widths) summed in slice order); y is
``bf16(((p0 X0 + p1 X1) + p2 X2) + p3 X3)`` with one rounding per operation, bitwise equal to the
reference given the same pre; the weights agree with the reference within the tolerance stated in
``ops/mhc.py``. The slices depend on d only, so a token's outputs do not depend on T or on its batch.
"""
from __future__ import annotations

import torch

HC = 4
BT = 64  # tokens per producer tile (csrc/mhc/mhc_pre.cu kBT)
PART_STRIDE = 32


def slice_len(k: int) -> int:
    """K slice of one producer CTA (csrc/mhc/mhc_pre.cu mhc_pre_slice; the two must agree)."""
    return 1024 if k % 1024 == 0 or k > 4096 else (512 if k > 256 else 256)


def pre_supported(x, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20) -> bool:
    """bf16 streams whose K slices fit the GPU (one producer CTA per slice at least)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cuda":
        return False
    k = HC * x.shape[2]
    s = -(-k // slice_len(k))
    return s <= torch.cuda.get_device_properties(x.device).multi_processor_count


PREFERRED_MIN_T = 512


def pre_preferred(x, *args, **kwargs) -> bool:
    """Where backend "auto" takes this kernel: T >= 512 (H100: 9-22% faster than the Triton streaming
    kernel at T = 1024 .. 65536, both widths; below 512 tokens the Triton split-K path is meant for
    decode sizes)."""
    return x.shape[0] >= PREFERRED_MIN_T


def mhc_pre(x, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20, *, return_pre=False, out=None):
    """CUDA hc_pre: (y bf16 [T, d], post fp32 [T, 4], comb fp32 [T, 4, 4]) (+ pre [T, 4] for tests).

    ``out``: (y, post, comb, pre) buffers to write (tests pass NaN-poisoned ones)."""
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
        k = HC * d
        n_blocks = -(-T // BT)
        s = -(-k // slice_len(k))
        part = torch.empty((n_blocks * s * BT, PART_STRIDE), dtype=torch.float32, device=dev)
        cnt = torch.zeros((n_blocks + 1,), dtype=torch.int32, device=dev)
        torch.ops.v4kernels_C.mhc_pre_out(x, fn.contiguous(), base.contiguous(), scale.contiguous(),
                                          float(norm_eps), float(hc_eps), int(sinkhorn_iters),
                                          part, cnt, y, post, comb, pre)
    return (y, post, comb, pre) if return_pre else (y, post, comb)
