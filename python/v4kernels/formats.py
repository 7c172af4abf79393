"""Cache byte layouts of V4 (spec §6) and the paged cache that holds them.

Three row formats, each stored per page as structure-of-arrays: first ``page_size`` data rows,
then ``page_size`` scale rows, the page padded up to a multiple of 576 bytes (FlashMLA's alignment):

=============  ==========  ======================================================  =======
format         row bytes   data row                                                scales
=============  ==========  ======================================================  =======
``KV584``      576 + 8     448 e4m3 (nope, 7 blocks of 64) + 64 bf16 (rope)        7 e8m0 + 1 pad (0)
``IDX_FP4``    64 + 4      128 E2M1 codes, two per byte, low nibble = even elem     4 e8m0 (blocks of 32)
``IDX_FP8``    128 + 4     128 e4m3                                                 1 fp32 (power of two)
=============  ==========  ======================================================  =======

Rows are addressed by a physical row index ``row = page * page_size + offset``; a sequence's
logical position ``t`` maps to ``block_table[seq, t // page_size] * page_size + t % page_size``.
The cache tensor is ``uint8 [num_pages, page_bytes]``.

Encoding quantizes as the reference's fake-quant does, so ``decode(encode(x))`` equals the reference
value bit for bit: KV584 nope dims = ``fake_quant_fp8(x[:448], 64)``, rope dims untouched bf16;
IDX_FP4 = ``fake_quant_fp4(k, 32)``. IDX_FP8 (vLLM's layout, 1x128 e4m3 + ue8m0-rounded fp32
scale) is *not* bit-exact to the reference's FP4-simulated keys; it exists for engines that use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ._checks import check_tensor
from .reference import quant as q

PAGE_ALIGN = 576
KV_DIM, KV_NOPE, KV_ROPE = 512, 448, 64
KV_QUANT_BLOCK = 64
IDX_DIM = 128


@dataclass(frozen=True)
class RowFormat:
    name: str
    data_bytes: int
    scale_bytes: int
    dim: int

    @property
    def row_bytes(self) -> int:
        return self.data_bytes + self.scale_bytes

    def page_bytes(self, page_size: int) -> int:
        raw = page_size * self.row_bytes
        return (raw + PAGE_ALIGN - 1) // PAGE_ALIGN * PAGE_ALIGN


KV584 = RowFormat("kv584", 576, 8, KV_DIM)
IDX_FP4 = RowFormat("idx_fp4", 64, 4, IDX_DIM)
IDX_FP8 = RowFormat("idx_fp8", 128, 4, IDX_DIM)
FORMATS = {f.name: f for f in (KV584, IDX_FP4, IDX_FP8)}


# ----------------------------------------------------------------------------- row encode / decode
def encode_kv584(kv: torch.Tensor):
    """kv bf16 [N, 512] -> (data uint8 [N, 576], scales uint8 [N, 8])."""
    check_tensor("kv", kv, dtype=torch.bfloat16, shape=(None, KV_DIM))
    nq, ns = q.act_quant_fp8(kv[:, :KV_NOPE], KV_QUANT_BLOCK)
    rope = kv[:, KV_NOPE:].contiguous().view(torch.uint8)  # little-endian bf16 bytes
    data = torch.cat((nq.view(torch.uint8), rope), dim=1)
    scales = torch.cat((ns.view(torch.uint8), torch.zeros_like(ns.view(torch.uint8)[:, :1])), dim=1)
    return data, scales


def decode_kv584(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(data [N, 576], scales [N, 8]) -> bf16 [N, 512]; nope = fp8 * 2^(e-127) (exact in bf16)."""
    nope = q.dequant_fp8(data[:, :KV_NOPE].contiguous().view(torch.float8_e4m3fn), scales[:, :7], KV_QUANT_BLOCK)
    rope = data[:, KV_NOPE:].contiguous().view(torch.bfloat16)
    return torch.cat((nope.to(torch.bfloat16), rope), dim=1)


def encode_idx_fp4(k: torch.Tensor):
    """k bf16 [N, 128] (already Hadamard-rotated) -> (packed uint8 [N, 64], scales uint8 [N, 4])."""
    check_tensor("k", k, dtype=(torch.bfloat16, torch.float32), shape=(None, IDX_DIM))
    codes, s = q.quant_fp4(k, 32)
    return q.pack_fp4(codes), s.view(torch.uint8)


def decode_idx_fp4(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.dequant_fp4(q.unpack_fp4(data), scales, 32).to(torch.bfloat16)


def encode_idx_fp8(k: torch.Tensor):
    """k [N, 128] -> (e4m3 bytes [N, 128], fp32 scale bytes [N, 4]) with a 1x128 ue8m0 scale."""
    check_tensor("k", k, dtype=(torch.bfloat16, torch.float32), shape=(None, IDX_DIM))
    vals, s = q.act_quant_fp8(k, IDX_DIM)
    sf = q.e8m0_to_float(s).contiguous()  # [N, 1] fp32
    return vals.view(torch.uint8), sf.view(torch.uint8).reshape(-1, 4)


def decode_idx_fp8(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    s = scales.contiguous().view(torch.float32)  # [N, 1]
    return (data.contiguous().view(torch.float8_e4m3fn).float() * s).to(torch.bfloat16)


_CODECS = {
    "kv584": (encode_kv584, decode_kv584),
    "idx_fp4": (encode_idx_fp4, decode_idx_fp4),
    "idx_fp8": (encode_idx_fp8, decode_idx_fp8),
}


# ----------------------------------------------------------------------------- paged addressing
def _row_views(cache: torch.Tensor, fmt: RowFormat, page_size: int):
    """Views [num_pages, page_size, data_bytes] and [num_pages, page_size, scale_bytes] of a cache."""
    n_pages = cache.shape[0]
    data = cache[:, : page_size * fmt.data_bytes].view(n_pages, page_size, fmt.data_bytes)
    start = page_size * fmt.data_bytes
    scales = cache[:, start : start + page_size * fmt.scale_bytes].view(n_pages, page_size, fmt.scale_bytes)
    return data, scales


def check_cache(name: str, cache: torch.Tensor, fmt: RowFormat, page_size: int) -> None:
    check_tensor(name, cache, dtype=torch.uint8, dim=2)
    if cache.shape[1] != fmt.page_bytes(page_size):
        raise ValueError(
            f"{name}: expected {fmt.page_bytes(page_size)} bytes per page ({fmt.name}, page_size {page_size}), "
            f"got {cache.shape[1]}"
        )
    if not cache.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous cache, got strides {tuple(cache.stride())}")


def check_rows(name: str, rows: torch.Tensor, num_rows: int, allow_negative: bool = False) -> None:
    """Physical row ids must lie in [0, num_rows) (or be -1 where allowed). Syncs: use outside hot paths."""
    check_tensor(name, rows, dtype=(torch.int32, torch.int64), dim=1)
    if rows.numel() == 0:
        return
    lo, hi = int(rows.min()), int(rows.max())
    if hi >= num_rows or lo < (-1 if allow_negative else 0):
        raise ValueError(f"{name}: expected row ids in [0, {num_rows}), got values in [{lo}, {hi}]")


def write_rows(cache: torch.Tensor, fmt: RowFormat, page_size: int, rows: torch.Tensor, values: torch.Tensor):
    """Reference write: encode ``values`` [N, dim] and store them at physical ``rows`` [N] (in place)."""
    check_cache("cache", cache, fmt, page_size)
    check_rows("rows", rows, cache.shape[0] * page_size)
    data, scales = _CODECS[fmt.name][0](values)
    dv, sv = _row_views(cache, fmt, page_size)
    r = rows.long()
    dv[r // page_size, r % page_size] = data.to(cache.device)
    sv[r // page_size, r % page_size] = scales.to(cache.device)


def read_rows(cache: torch.Tensor, fmt: RowFormat, page_size: int, rows: torch.Tensor) -> torch.Tensor:
    """Reference read: decode rows [N] -> bf16 [N, dim]."""
    check_cache("cache", cache, fmt, page_size)
    check_rows("rows", rows, cache.shape[0] * page_size)
    dv, sv = _row_views(cache, fmt, page_size)
    r = rows.long()
    return _CODECS[fmt.name][1](dv[r // page_size, r % page_size], sv[r // page_size, r % page_size])


def positions_to_rows(block_table: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor, page_size: int):
    """Logical positions of sequences -> physical rows: ``bt[seq, p // ps] * ps + p % ps``; -1 for
    positions < 0 or pages not allocated (block table entry < 0)."""
    pos = positions.long()
    page_idx = torch.where(pos >= 0, pos // page_size, 0)
    valid = (pos >= 0) & (page_idx < block_table.shape[1])
    page = block_table[seq_ids.long(), page_idx.clamp(max=block_table.shape[1] - 1)].long()
    valid &= page >= 0
    return torch.where(valid, page * page_size + pos % page_size, torch.full_like(pos, -1))


# ----------------------------------------------------------------------------- the paged cache
@dataclass
class PagedCache:
    """A paged cache of one row format: pages, a free list, and per-sequence page lists.

    ``data``: uint8 [num_pages, page_bytes]. Sequences are integer ids chosen by the caller.
    ``block_table(seq_ids)`` gives the int32 [B, max_pages] table kernels take (-1 = no page).
    Allocation and release run on the host (no device sync); page contents are not cleared.
    """

    fmt: RowFormat
    num_pages: int
    page_size: int
    device: torch.device = torch.device("cpu")
    data: torch.Tensor = field(init=False)
    _free: List[int] = field(init=False, repr=False)
    _pages: Dict[int, List[int]] = field(init=False, repr=False)
    version: int = field(init=False, default=0)  # +1 whenever a sequence gains pages (for block-table mirrors)

    def __post_init__(self):
        if self.page_size < 1:
            raise ValueError(f"page_size: expected >= 1, got {self.page_size}")
        if self.num_pages < 1:
            raise ValueError(f"num_pages: expected >= 1, got {self.num_pages}")
        self.data = torch.zeros(self.num_pages, self.fmt.page_bytes(self.page_size), dtype=torch.uint8, device=self.device)
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._pages = {}

    @property
    def num_rows(self) -> int:
        return self.num_pages * self.page_size

    def pages_of(self, seq_id: int, start: int = 0) -> List[int]:
        """The pages of ``seq_id`` from its ``start``-th on (a copy), in logical order."""
        return list(self._pages.get(seq_id, [])[start:])

    def page_count(self, seq_id: int) -> int:
        return len(self._pages.get(seq_id, ()))

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make sure ``seq_id`` owns pages for positions [0, num_tokens)."""
        pages = self._pages.setdefault(seq_id, [])
        need = -(-num_tokens // self.page_size) - len(pages)
        if need > len(self._free):
            raise RuntimeError(
                f"PagedCache({self.fmt.name}): out of pages: sequence {seq_id} needs {need} more, {len(self._free)} free"
            )
        for _ in range(max(0, need)):
            pages.append(self._free.pop())
        if need > 0:
            self.version += 1

    def release(self, seq_id: int) -> None:
        for p in reversed(self._pages.pop(seq_id, [])):
            self._free.append(p)

    def block_table(self, seq_ids: Sequence[int], max_pages: Optional[int] = None) -> torch.Tensor:
        lists = [self._pages.get(s, []) for s in seq_ids]
        width = max_pages if max_pages is not None else max([len(p) for p in lists] + [1])
        bt = torch.full((len(lists), width), -1, dtype=torch.int32)
        for i, p in enumerate(lists):
            if len(p) > width:
                raise ValueError(f"max_pages: sequence {seq_ids[i]} holds {len(p)} pages, more than {width}")
            bt[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
        return bt.to(self.device)

    def rows(self, seq_id: int, positions: torch.Tensor) -> torch.Tensor:
        """Physical rows of logical ``positions`` of one sequence (raises if a page is missing)."""
        pages = self._pages.get(seq_id, [])
        pos = positions.long().cpu()
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= len(pages) * self.page_size):
            raise ValueError(
                f"positions: sequence {seq_id} has pages for [0, {len(pages) * self.page_size}), "
                f"got positions in [{int(pos.min())}, {int(pos.max())}]"
            )
        pt = torch.tensor(pages, dtype=torch.int64) if pages else torch.zeros(0, dtype=torch.int64)
        return (pt[pos // self.page_size] * self.page_size + pos % self.page_size).to(self.device)

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        write_rows(self.data, self.fmt, self.page_size, rows, values)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        return read_rows(self.data, self.fmt, self.page_size, rows)
