"""Paged cache write/read ops of the V4 row formats (spec §6): KV584 and the 68-B FP4 indexer keys.

Layout and codecs: ``v4kernels.formats``. Writes quantize exactly as the reference's fake-quant, so
``read(write(x)) == fake_quant(x)`` bit for bit (KV: FP8 block 64 on the 448 nope dims, rope dims
bf16 as is; indexer: FP4 E2M1 block 32 on all 128 dims).
"""
from __future__ import annotations

import torch

from .. import formats as F
from .._checks import check_same_device, check_tensor
from .._dispatch import define_op
from ..triton import formats as tri


def _concrete(t: torch.Tensor) -> bool:
    """Values can be read on the host: not a fake/meta tensor, not inside CUDA-graph capture."""
    from torch._subclasses.fake_tensor import is_fake

    if t.device.type == "meta" or is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_rows(rows, cache, page_size):
    check_tensor("rows", rows, dtype=(torch.int32, torch.int64), dim=1)
    if not _concrete(rows):
        return  # fake/meta tensors (tracing) or CUDA-graph capture: no host sync; the kernels mask bad rows
    F.check_rows("rows", rows, cache.shape[0] * page_size, allow_negative=True)


def _check_page_size(page_size):
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size: expected an int >= 1, got {page_size!r}")


def _make_checks(fmt, value_name, value_dtypes):
    def check_write(cache, rows, values, page_size):
        _check_page_size(page_size)
        F.check_cache("cache", cache, fmt, page_size)
        _check_rows(rows, cache, page_size)
        check_tensor(value_name, values, dtype=value_dtypes, shape=(rows.shape[0], fmt.dim))
        check_same_device(cache=cache, rows=rows, **{value_name: values})

    def check_read(cache, rows, page_size):
        _check_page_size(page_size)
        F.check_cache("cache", cache, fmt, page_size)
        _check_rows(rows, cache, page_size)
        check_same_device(cache=cache, rows=rows)

    return check_write, check_read


def _make_refs(fmt):
    def ref_write(cache, rows, values, page_size):
        keep = rows >= 0
        if bool(keep.any()):
            F.write_rows(cache, fmt, page_size, rows[keep], values[keep])

    def ref_read(cache, rows, page_size):
        out = torch.zeros(rows.shape[0], fmt.dim, dtype=torch.bfloat16, device=cache.device)
        keep = rows >= 0
        if bool(keep.any()):
            out[keep] = F.read_rows(cache, fmt, page_size, rows[keep])
        return out

    return ref_write, ref_read


def _fake_read(fmt):
    return lambda cache, rows, page_size: cache.new_empty((rows.shape[0], fmt.dim), dtype=torch.bfloat16)


_kv_cw, _kv_cr = _make_checks(F.KV584, "kv", torch.bfloat16)
_kv_rw, _kv_rr = _make_refs(F.KV584)
_idx_cw, _idx_cr = _make_checks(F.IDX_FP4, "k", (torch.bfloat16, torch.float32))
_idx_rw, _idx_rr = _make_refs(F.IDX_FP4)

kv584_write_op = define_op(
    "kv584_write(Tensor(a!) cache, Tensor rows, Tensor kv, int page_size, *, str? backend=None) -> ()",
    check=_kv_cw, reference=_kv_rw, fake=lambda cache, rows, kv, page_size: None, triton=tri.kv584_write,
)
kv584_read_op = define_op(
    "kv584_read(Tensor cache, Tensor rows, int page_size, *, str? backend=None) -> Tensor",
    check=_kv_cr, reference=_kv_rr, fake=_fake_read(F.KV584), triton=tri.kv584_read,
)
idx_fp4_write_op = define_op(
    "idx_fp4_write(Tensor(a!) cache, Tensor rows, Tensor k, int page_size, *, str? backend=None) -> ()",
    check=_idx_cw, reference=_idx_rw, fake=lambda cache, rows, k, page_size: None, triton=tri.idx_fp4_write,
)
idx_fp4_read_op = define_op(
    "idx_fp4_read(Tensor cache, Tensor rows, int page_size, *, str? backend=None) -> Tensor",
    check=_idx_cr, reference=_idx_rr, fake=_fake_read(F.IDX_FP4), triton=tri.idx_fp4_read,
)


def kv584_write(cache, rows, kv, page_size: int, *, backend: str | None = None) -> None:
    """Quantize and store KV rows into a paged 584-B cache, in place (spec §6.2).

    Parameters
    ----------
    cache : uint8 [num_pages, KV584.page_bytes(page_size)], contiguous (per page: page_size data rows of
        576 B = 448 e4m3 + 64 bf16 rope, then page_size scale rows of 8 B = 7 e8m0 + 1 zero pad).
    rows : int32/int64 [N] physical rows ``page * page_size + offset``; -1 = skip. Values outside
        [-1, num_pages*page_size) raise ValueError (checked on the host; skipped under CUDA-graph capture,
        where the kernel still masks them).
    kv : bf16 [N, 512]: nope = kv[:, :448] quantized FP8 e4m3 with one ue8m0 scale per 64 (act_quant
        block 64), rope = kv[:, 448:] stored as is.
    Duplicate rows: which one is stored is unspecified.
    """
    kv584_write_op(cache, rows, kv, page_size, backend=backend)


def kv584_read(cache, rows, page_size: int, *, backend: str | None = None) -> torch.Tensor:
    """Gather and decode KV rows: bf16 [N, 512], nope = e4m3 * 2^(e-127) (exact), rope as stored; rows -1 -> 0."""
    return kv584_read_op(cache, rows, page_size, backend=backend)


def idx_fp4_write(cache, rows, k, page_size: int, *, backend: str | None = None) -> None:
    """Quantize and store indexer keys into a paged 68-B MXFP4 cache, in place (spec §6.3).

    cache : uint8 [num_pages, IDX_FP4.page_bytes(page_size)] (per page: page_size rows of 64 B packed E2M1,
        low nibble = even element, then page_size rows of 4 e8m0 scales, one per 32).
    rows : int32/int64 [N], -1 = skip, others in [0, num_rows) (ValueError otherwise).
    k : bf16 or fp32 [N, 128] (Hadamard-rotated keys); stored value = fake_quant_fp4(k, 32).
    """
    idx_fp4_write_op(cache, rows, k, page_size, backend=backend)


def idx_fp4_read(cache, rows, page_size: int, *, backend: str | None = None) -> torch.Tensor:
    """Gather and decode indexer keys: bf16 [N, 128] = E2M1 * 2^(e-127); rows -1 -> zeros."""
    return idx_fp4_read_op(cache, rows, page_size, backend=backend)
