"""KV compressor ops (spec §3, §4, §2): softmax-gated pooling of r-token blocks fused with RMSNorm,
RoPE, FP8 / Hadamard+FP4 quantization and the paged-cache write.

Ops (all update the per-sequence compressor state in place):

* ``compress_kv``              prefill / chunked prefill of a ragged batch, entries written to the paged cache;
* ``compress_kv_decode``       one token per sequence, the whole batch in one launch;
* ``compress_kv_decode_layer`` the decode step of all compressors of one layer (CSA: main + indexer) in one
                               launch (``compress_kv_decode_pair`` underneath);
* ``compress_kv_entries``      functional prefill: returns the stored (fake-quantized) bf16 entries instead
                               (tests, ``model_ref`` in reference mode).

No op synchronizes with the host on CUDA tensors and all can be captured in a CUDA graph. The ratio-128
kernel keeps a small buffer of per-entry arrival counters that it resets itself (no memset launch); there
is one buffer per (device, stream), so calls running concurrently on different streams never share one.

State layout and semantics: see ``v4kernels.reference.compressor`` (module docstring). In short:
``state_kv`` / ``state_score`` fp32 ``[num_slots, c*r, c*hd]``, row ``state_slots[b]`` belongs to
sequence b; block 0 never reads the state's "previous block" rows, so a new sequence needs no reset;
``reset_compressor_state`` gives the reference's initial values (kv 0, score -inf). Two sequences of
one call must not share a state slot.

Index validation: on CPU tensors the ops check every index they will use (cu_seqlens, start_pos,
state slots, block-table pages of the written entries, RoPE table length) and raise ``ValueError``.
On CUDA tensors these value checks would need a host sync, so they are skipped; the kernels then mask
every access instead and the reference clamps every gather index, with the same outcome (a sequence
with a bad state slot, start or offsets is skipped; an entry whose page is missing or out of range,
or whose position is past the RoPE table, is not written). Shapes and dtypes are checked on every device.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .. import formats
from .._checks import check_choice, check_same_device, check_tensor
from .._dispatch import define_op
from ..reference import compressor as ref
from ..triton import compressor as tri

RATIOS = ref.RATIOS
KINDS = ref.KINDS
ROPE_HALF = 32


# ----------------------------------------------------------------------------- checks
def _value_checks(t) -> bool:
    """Index values are checked on real CPU tensors only (no host sync on GPUs, nothing under fake tensors)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not is_fake(t)


def _check_params(ratio, kind):
    check_choice("kind", kind, KINDS)
    check_choice("ratio", ratio, RATIOS)
    if kind == "indexer" and ratio != 4:
        raise ValueError(f"ratio: the indexer compressor has ratio 4, got {ratio}")


def _check_common(kv, score, state_slots, state_kv, state_score, ape, norm_weight, cos, sin, ratio, kind):
    _check_params(ratio, kind)
    hd, c, _ = ref.dims(ratio, kind)
    check_tensor("kv", kv, dtype=torch.float32, shape=(None, c * hd), contiguous=True)
    check_tensor("score", score, dtype=torch.float32, shape=(kv.shape[0], c * hd), contiguous=True)
    check_tensor("state_kv", state_kv, dtype=torch.float32, shape=(None, c * ratio, c * hd), contiguous=True)
    check_tensor("state_score", state_score, dtype=torch.float32, shape=tuple(state_kv.shape), contiguous=True)
    check_tensor("state_slots", state_slots, dtype=torch.int32, dim=1, contiguous=True)
    check_tensor("ape", ape, dtype=torch.float32, shape=(ratio, c * hd), contiguous=True)
    check_tensor("norm_weight", norm_weight, dtype=torch.float32, shape=(hd,), contiguous=True)
    check_tensor("cos", cos, dtype=torch.float32, shape=(None, ROPE_HALF), contiguous=True)
    check_tensor("sin", sin, dtype=torch.float32, shape=tuple(cos.shape), contiguous=True)
    dev = check_same_device(kv=kv, score=score, state_slots=state_slots, state_kv=state_kv,
                            state_score=state_score, ape=ape, norm_weight=norm_weight, cos=cos, sin=sin)
    return hd, c, dev


def _check_cache(cache, block_table, page_size, kind, B):
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
    formats.check_cache("cache", cache, ref.FORMAT[kind], page_size)
    check_tensor("block_table", block_table, dtype=torch.int32, shape=(B, None))
    check_same_device(cache=cache, block_table=block_table)


def _check_slot_values(state_slots, num_slots):
    s = state_slots.tolist()
    if s and (min(s) < 0 or max(s) >= num_slots):
        raise ValueError(f"state_slots: expected ids in [0, {num_slots}), got values in [{min(s)}, {max(s)}]")
    if len(set(s)) != len(s):
        raise ValueError(f"state_slots: expected distinct slots (one per sequence), got {s}")


def _check_pages(block_table, num_pages, page_size, seqs, entry_ids):
    """Every written entry's page must exist: bt[seq, i // page_size] in [0, num_pages)."""
    width = block_table.shape[1]
    bt = block_table.tolist()
    for b, i in zip(seqs, entry_ids):
        pi = i // page_size
        if pi >= width:
            raise ValueError(f"block_table: sequence {b} writes compressed entry {i}, which needs page index {pi}, "
                             f"but the table has {width} columns")
        page = bt[b][pi]
        if page < 0 or page >= num_pages:
            raise ValueError(f"block_table: sequence {b}, page index {pi} (entry {i}): expected a page in "
                             f"[0, {num_pages}), got {page}")


def _check_rope_len(cos, max_entry_pos):
    if max_entry_pos >= cos.shape[0]:
        raise ValueError(f"cos: expected a RoPE table covering position {max_entry_pos}, got {cos.shape[0]} rows")


def _prefill_entries_list(cu, starts, ratio):
    seqs, ids = [], []
    for b, s0 in enumerate(starts):
        n = cu[b + 1] - cu[b]
        for i in range(s0 // ratio, (s0 + n) // ratio):
            seqs.append(b)
            ids.append(i)
    return seqs, ids


def _check_prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos,
                   sin, ratio, kind):
    hd, c, dev = _check_common(kv, score, state_slots, state_kv, state_score, ape, norm_weight, cos, sin,
                               ratio, kind)
    check_tensor("start_pos", start_pos, dtype=torch.int32, dim=1, contiguous=True)
    B = start_pos.shape[0]
    check_tensor("cu_seqlens", cu_seqlens, dtype=torch.int32, shape=(B + 1,), contiguous=True)
    check_tensor("state_slots", state_slots, shape=(B,))
    check_same_device(kv=kv, cu_seqlens=cu_seqlens, start_pos=start_pos)
    if not _value_checks(kv):
        return None
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != kv.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {kv.shape[0]} (kv rows), got {cu}")
    starts = start_pos.tolist()
    if starts and min(starts) < 0:
        raise ValueError(f"start_pos: expected positions >= 0, got {starts}")
    _check_slot_values(state_slots, state_kv.shape[0])
    seqs, ids = _prefill_entries_list(cu, starts, ratio)
    if ids:
        _check_rope_len(cos, max(ids) * ratio)
    return seqs, ids


def _check_compress_kv(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight,
                       cos, sin, cache, block_table, page_size, ratio, kind):
    got = _check_prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight,
                         cos, sin, ratio, kind)
    _check_cache(cache, block_table, page_size, kind, start_pos.shape[0])
    check_same_device(kv=kv, cache=cache)
    if got is not None:
        _check_pages(block_table, cache.shape[0], page_size, *got)


def _check_entries(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos,
                   sin, ratio, kind):
    _check_prefill(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos,
                   sin, ratio, kind)


def _check_decode(kv, score, positions, state_slots, state_kv, state_score, ape, norm_weight, cos, sin, cache,
                  block_table, page_size, ratio, kind):
    hd, c, dev = _check_common(kv, score, state_slots, state_kv, state_score, ape, norm_weight, cos, sin,
                               ratio, kind)
    B = kv.shape[0]
    check_tensor("positions", positions, dtype=torch.int32, shape=(B,), contiguous=True)
    check_tensor("state_slots", state_slots, shape=(B,))
    _check_cache(cache, block_table, page_size, kind, B)
    check_same_device(kv=kv, positions=positions, cache=cache)
    if not _value_checks(kv):
        return
    pos = positions.tolist()
    live = [b for b, p in enumerate(pos) if p >= 0]
    slots = state_slots.tolist()
    _check_slot_values(torch.tensor([slots[b] for b in live], dtype=torch.int32), state_kv.shape[0])
    emit = [b for b in live if (pos[b] + 1) % ratio == 0]
    if emit:
        ids = [pos[b] // ratio for b in emit]
        _check_rope_len(cos, max(ids) * ratio)
        _check_pages(block_table, cache.shape[0], page_size, emit, ids)


def _check_decode_pair(positions, state_slots, cos, sin, kv_a, score_a, state_kv_a, state_score_a, ape_a,
                       norm_weight_a, cache_a, block_table_a, page_size_a, ratio_a, kind_a, kv_b, score_b, state_kv_b,
                       state_score_b, ape_b, norm_weight_b, cache_b, block_table_b, page_size_b, ratio_b, kind_b):
    _check_decode(kv_a, score_a, positions, state_slots, state_kv_a, state_score_a, ape_a, norm_weight_a, cos, sin,
                  cache_a, block_table_a, page_size_a, ratio_a, kind_a)
    _check_decode(kv_b, score_b, positions, state_slots, state_kv_b, state_score_b, ape_b, norm_weight_b, cos, sin,
                  cache_b, block_table_b, page_size_b, ratio_b, kind_b)
    from torch._subclasses.fake_tensor import is_fake

    for name, a, b in (("state_kv", state_kv_a, state_kv_b), ("state_score", state_score_a, state_score_b),
                       ("cache", cache_a, cache_b)):
        if a is b or (not is_fake(a) and not is_fake(b) and a.numel() and a.data_ptr() == b.data_ptr()):
            raise ValueError(f"{name}_a, {name}_b: expected two different tensors (one per compressor), got the same")


# ----------------------------------------------------------------------------- fakes
def _fake_none(*args, **kwargs):
    return None


def _fake_entries(kv, score, cu_seqlens, start_pos, state_slots, state_kv, state_score, ape, norm_weight, cos, sin,
                  ratio, kind):
    hd = ref.dims(ratio, kind)[0]
    rows = kv.shape[0] // ratio + start_pos.shape[0]
    return (kv.new_empty((rows, hd), dtype=torch.bfloat16), kv.new_empty((rows,), dtype=torch.int32),
            kv.new_empty((rows,), dtype=torch.int32))


# ----------------------------------------------------------------------------- registrations
_STATE_ARGS = ("Tensor state_slots, Tensor(a!) state_kv, Tensor(b!) state_score, Tensor ape, Tensor norm_weight, "
               "Tensor cos, Tensor sin")

compress_kv_op = define_op(
    f"compress_kv(Tensor kv, Tensor score, Tensor cu_seqlens, Tensor start_pos, {_STATE_ARGS}, Tensor(c!) cache, "
    "Tensor block_table, int page_size, int ratio, str kind, *, str? backend=None) -> ()",
    check=_check_compress_kv,
    reference=ref.compress_kv,
    fake=_fake_none,
    triton=tri.compress_kv,
)

compress_kv_decode_op = define_op(
    f"compress_kv_decode(Tensor kv, Tensor score, Tensor positions, {_STATE_ARGS}, Tensor(c!) cache, "
    "Tensor block_table, int page_size, int ratio, str kind, *, str? backend=None) -> ()",
    check=_check_decode,
    reference=ref.compress_kv_decode,
    fake=_fake_none,
    triton=tri.compress_kv_decode,
)


def _ref_decode_pair(positions, state_slots, cos, sin, kv_a, score_a, state_kv_a, state_score_a, ape_a, norm_weight_a,
                     cache_a, block_table_a, page_size_a, ratio_a, kind_a, kv_b, score_b, state_kv_b, state_score_b,
                     ape_b, norm_weight_b, cache_b, block_table_b, page_size_b, ratio_b, kind_b):
    ref.compress_kv_decode(kv_a, score_a, positions, state_slots, state_kv_a, state_score_a, ape_a, norm_weight_a, cos,
                           sin, cache_a, block_table_a, page_size_a, ratio_a, kind_a)
    ref.compress_kv_decode(kv_b, score_b, positions, state_slots, state_kv_b, state_score_b, ape_b, norm_weight_b, cos,
                           sin, cache_b, block_table_b, page_size_b, ratio_b, kind_b)


def _tri_decode_pair(positions, state_slots, cos, sin, *args):
    tri.compress_kv_decode_pair(positions, state_slots, cos, sin, tuple(args[:11]), tuple(args[11:]))


_COMP_ARGS = ("Tensor kv_{x}, Tensor score_{x}, Tensor({m}!) state_kv_{x}, Tensor({n}!) state_score_{x}, "
              "Tensor ape_{x}, Tensor norm_weight_{x}, Tensor({o}!) cache_{x}, Tensor block_table_{x}, "
              "int page_size_{x}, int ratio_{x}, str kind_{x}")

compress_kv_decode_pair_op = define_op(
    "compress_kv_decode_pair(Tensor positions, Tensor state_slots, Tensor cos, Tensor sin, "
    + _COMP_ARGS.format(x="a", m="a", n="b", o="c") + ", " + _COMP_ARGS.format(x="b", m="d", n="e", o="f")
    + ", *, str? backend=None) -> ()",
    check=_check_decode_pair,
    reference=_ref_decode_pair,
    fake=_fake_none,
    triton=_tri_decode_pair,
)

compress_kv_entries_op = define_op(
    f"compress_kv_entries(Tensor kv, Tensor score, Tensor cu_seqlens, Tensor start_pos, {_STATE_ARGS}, "
    "int ratio, str kind, *, str? backend=None) -> (Tensor, Tensor, Tensor)",
    check=_check_entries,
    reference=ref.compress_kv_entries,
    fake=_fake_entries,
    triton=tri.compress_kv_entries,
)


# ----------------------------------------------------------------------------- public API
def _slots(state_slots, n, device):
    if state_slots is None:
        return torch.arange(n, dtype=torch.int32, device=device)
    return state_slots


def compress_kv(kv, score, cu_seqlens, start_pos, state_kv, state_score, ape, norm_weight, cos, sin, cache,
                block_table, page_size: int, ratio: int, kind: str, *, state_slots: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> None:
    """Compress the new tokens of a ragged batch (prefill or chunked prefill, any start position).

    For every block of ``ratio`` tokens that becomes complete, one entry is pooled, normalised,
    rotated, quantized and written to the paged ``cache`` at logical position i (the block index) of
    its sequence; the compressor state is updated in place.

    Entry i (spec §3.1; overlap when ratio == 4, c = 2; else c = 1)::

        e   = sum_t softmax_t(score_t + ape[t % r])[ch] * kv_t[ch]  over the block's slots (per channel)
        y   = RoPE_{i*r}(RMSNorm(bf16(e)) * w)          (last 64 dims, interleaved pairs) -> bf16
        main:    KV584 row = [e4m3(y[:448]) with ue8m0 per 64, bf16 y[448:]]
        indexer: IDX_FP4 row = e2m1(bf16(Hadamard128(y))) with ue8m0 per 32

    Parameters
    ----------
    kv, score : fp32 [N, c*hd], contiguous. hd = 512 (kind "main") or 128 ("indexer").
    cu_seqlens : int32 [B+1], token row offsets of the B sequences (cu_seqlens[0] = 0, [B] = N).
    start_pos : int32 [B], position of each sequence's first new token (any value >= 0).
    state_kv, state_score : fp32 [num_slots, c*r, c*hd] compressor state (updated in place).
    ape : fp32 [r, c*hd]; norm_weight : fp32 [hd]; cos, sin : fp32 [max_pos, 32] (compressed-layer table,
        ``v4kernels.reference.rope.rope_table(max_pos, 160000, YarnConfig())``).
    cache : uint8 [num_pages, page_bytes], KV584 ("main") or IDX_FP4 ("indexer") pages (written in place).
    block_table : int32 [B, max_pages]: sequence b's compressed-cache pages.
    page_size : rows per page. ratio : 4 or 128 (indexer: 4). kind : "main" or "indexer".
    state_slots : int32 [B], the state row of each sequence (default: ``arange(B)``).
    backend : "reference" | "triton" | "auto" (default ``V4K_BACKEND`` or auto).
    """
    slots = _slots(state_slots, start_pos.shape[0], kv.device)
    compress_kv_op(kv, score, cu_seqlens, start_pos, slots, state_kv, state_score, ape, norm_weight, cos, sin,
                   cache, block_table, page_size, ratio, kind, backend=backend)


def compress_kv_decode(kv, score, positions, state_kv, state_score, ape, norm_weight, cos, sin, cache, block_table,
                       page_size: int, ratio: int, kind: str, *, state_slots: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None) -> None:
    """One new token per sequence (decode), one launch for the batch (spec §3.3).

    Token b at position ``positions[b]`` (int32 [B]; a negative position marks a padding row, which is
    left alone: fixed batch shapes for CUDA graphs) goes into its state; if ``(p + 1) % r == 0`` the entry
    ``p // r`` is emitted exactly as in ``compress_kv`` (same formula, same pooling code). kv, score fp32
    [B, c*hd]; block_table int32 [B, max_pages]; other arguments as in ``compress_kv``.
    """
    slots = _slots(state_slots, positions.shape[0], kv.device)
    compress_kv_decode_op(kv, score, positions, slots, state_kv, state_score, ape, norm_weight, cos, sin, cache,
                          block_table, page_size, ratio, kind, backend=backend)


class DecodeCompressor(NamedTuple):
    """One compressor's arguments for ``compress_kv_decode_layer`` (meanings as in ``compress_kv_decode``)."""

    kv: torch.Tensor
    score: torch.Tensor
    state_kv: torch.Tensor
    state_score: torch.Tensor
    ape: torch.Tensor
    norm_weight: torch.Tensor
    cache: torch.Tensor
    block_table: torch.Tensor
    page_size: int
    ratio: int
    kind: str


def compress_kv_decode_layer(positions, cos, sin, compressors: Sequence[DecodeCompressor], *,
                             state_slots: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> None:
    """Decode step of all compressors of one layer, sequences at the same ``positions`` (int32 [B]).

    ``compressors``: one (HCA layer: main, ratio 128) or two (CSA layer: main and indexer, ratio 4)
    ``DecodeCompressor`` tuples. Two ratio-4 compressors run in one launch (the CSA layer's step is one
    kernel); the result is exactly that of ``compress_kv_decode`` called for each. ``state_slots``
    (int32 [B], default ``arange(B)``) indexes both compressors' states; ``cos``/``sin`` are the
    compressed-layer RoPE table both use.
    """
    comps = [DecodeCompressor(*c) for c in compressors]
    if len(comps) not in (1, 2):
        raise ValueError(f"compressors: expected 1 or 2 compressors of one layer, got {len(comps)}")
    slots = _slots(state_slots, positions.shape[0], positions.device)
    if len(comps) == 1:
        c = comps[0]
        compress_kv_decode_op(c.kv, c.score, positions, slots, c.state_kv, c.state_score, c.ape, c.norm_weight, cos,
                              sin, c.cache, c.block_table, c.page_size, c.ratio, c.kind, backend=backend)
        return
    compress_kv_decode_pair_op(positions, slots, cos, sin, *comps[0], *comps[1], backend=backend)


def compress_kv_entries(kv, score, cu_seqlens, start_pos, state_kv, state_score, ape, norm_weight, cos, sin,
                        ratio: int, kind: str, *, state_slots: Optional[torch.Tensor] = None, trim: bool = False,
                        backend: Optional[str] = None):
    """Functional ``compress_kv``: returns the entries instead of writing a cache (state still updated).

    Returns
    -------
    entries : bf16 [N//r + B, hd], the values the reference stores (FP8/FP4 fake-quantized), sequence-major,
        entries of one sequence in position order, then padding rows (zeros).
    entry_seq : int32 [N//r + B], the batch row of each entry (-1 for padding).
    entry_pos : int32 [N//r + B], the entry index i = logical compressed-cache position (-1 for padding).
    With ``trim=True`` the padding rows are dropped (a host sync).
    """
    slots = _slots(state_slots, start_pos.shape[0], kv.device)
    out = compress_kv_entries_op(kv, score, cu_seqlens, start_pos, slots, state_kv, state_score, ape, norm_weight,
                                 cos, sin, ratio, kind, backend=backend)
    if trim:
        n = int((out[2] >= 0).sum())
        out = tuple(t[:n] for t in out)
    return out


def new_compressor_state(num_slots: int, ratio: int, kind: str, device=None):
    """Fresh (state_kv, state_score) for ``num_slots`` sequences: fp32 zeros and -inf [num_slots, c*r, c*hd]."""
    _check_params(ratio, kind)
    return ref.new_state(num_slots, ratio, kind, device)


def reset_compressor_state(state_kv, state_score, slots=None) -> None:
    """Reset state slots (all when None) to kv 0 / score -inf, e.g. when a slot is given to a new sequence.

    Not needed for correctness (block 0 never reads the previous-block rows), but keeps states comparable."""
    ref.reset_state(state_kv, state_score, slots)
