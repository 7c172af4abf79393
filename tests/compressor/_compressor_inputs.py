"""Input builders shared by the compressor tests (fresh random inputs from a seeded generator)."""
from dataclasses import dataclass

import torch

from v4kernels import formats
from v4kernels.reference import compressor as C
from v4kernels.reference.rope import YarnConfig, rope_table

CONFIGS = [("main", 4), ("indexer", 4), ("main", 128)]
CONFIG_IDS = ["main-r4", "indexer-r4", "main-r128"]
MAX_POS = 1024
_TABLES = {}


def tables(max_pos=MAX_POS):
    if max_pos not in _TABLES:
        _TABLES[max_pos] = rope_table(max_pos, 160000.0, YarnConfig())
    return _TABLES[max_pos]


@dataclass
class Problem:
    kind: str
    ratio: int
    hd: int
    c: int
    ape: torch.Tensor
    w: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def width(self):
        return self.c * self.hd

    @property
    def fmt(self):
        return C.FORMAT[self.kind]


def problem(kind, ratio, gen, device="cpu", max_pos=MAX_POS):
    hd, c, _ = C.dims(ratio, kind)
    cos, sin = tables(max_pos)
    ape = torch.randn(ratio, c * hd, generator=gen)
    w = torch.rand(hd, generator=gen) + 0.5
    return Problem(kind, ratio, hd, c, ape.to(device), w.to(device), cos.to(device), sin.to(device))


def tokens(pb, n, gen, device="cpu"):
    kv = torch.randn(n, pb.width, generator=gen)
    score = torch.randn(n, pb.width, generator=gen) * 2
    return kv.to(device), score.to(device)


def random_state(pb, num_slots, gen, device="cpu"):
    shape = C.state_shape(num_slots, pb.ratio, pb.kind)
    return torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device)


def fresh_state(pb, num_slots, device="cpu"):
    return C.new_state(num_slots, pb.ratio, pb.kind, device)


def cache(pb, num_pages, page_size, device="cpu"):
    """A cache poisoned with 0xFF bytes (e8m0 NaN scales, fp8/bf16 NaNs) so stray writes show."""
    return torch.full((num_pages, pb.fmt.page_bytes(page_size)), 0xFF, dtype=torch.uint8, device=device)


def block_table(B, max_pages, num_pages, gen, device="cpu"):
    """Distinct random pages for each sequence."""
    perm = torch.randperm(num_pages, generator=gen)[: B * max_pages]
    return perm.view(B, max_pages).to(torch.int32).to(device)


def i32(x, device="cpu"):
    return torch.tensor(x, dtype=torch.int32, device=device)


def cu_of(lens, device="cpu"):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return i32(out, device)


def read_entries(cache_t, pb, page_size, bt, seq, pos):
    rows = formats.positions_to_rows(bt.cpu(), torch.as_tensor(seq).long(), torch.as_tensor(pos).long(), page_size)
    return formats.read_rows(cache_t.cpu(), pb.fmt, page_size, rows)


def unwritten_bytes(cache_t, pb, page_size, bt, seqs, ids):
    """Bool mask over ``cache_t`` (CPU) of the bytes outside entries ``ids`` of sequences ``seqs``:
    each entry's data bytes and its scale bytes (after the page's data block) are excluded."""
    mask = torch.ones(cache_t.shape, dtype=torch.bool)
    fmt = pb.fmt
    for b, i in zip(seqs, ids):
        page, o = int(bt[b, i // page_size]), i % page_size
        mask[page, o * fmt.data_bytes:(o + 1) * fmt.data_bytes] = False
        s0 = page_size * fmt.data_bytes + o * fmt.scale_bytes
        mask[page, s0:s0 + fmt.scale_bytes] = False
    return mask
