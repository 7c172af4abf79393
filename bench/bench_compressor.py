"""Benchmark of the KV compressor ops (spec §3): v4kernels.compress_kv (prefill) and compress_kv_decode.

The compressor's shapes are the same in V4-Flash and V4-Pro (hd 512 main / 128 indexer, ratios 4 and
128; only the model dim, which lives in the engine's wkv/wgate GEMMs, differs), so one sweep covers both.

Prefill (``op = compress_kv``): one sequence of T tokens from position 0, and a ragged batch of 8
sequences of T/8 tokens at mixed start positions (chunked prefill). Memory-bound. Minimum bytes = kv +
score read once (2 * T * c*hd * 4) + one cache row per entry (584 B main, 68 B indexer) written once
+ the compressor state the op's contract makes it carry (fp32 kv and score rows, 8*c*hd bytes each):
the latest min(n, r) tokens of every sequence written to the state (overlap: also the last complete
block, r rows), the pending rows of a block started by an earlier call read back (start % r rows; overlap:
also the previous block's first half) + ape read once. The state is small for long single sequences but
not for chunks of 512 tokens at ratio 128 (up to 128 rows of 4 KB written per sequence), so the row's
note also gives the % of HBM on the issue's strict formula (kv + score + cache rows only).
Target: >= 90% of the measured HBM bandwidth.

Decode (``op = compress_kv_decode_layer``): all compressors of one layer for a batch of 64 sequences
through ``compress_kv_decode_layer``: CSA layer = main ratio 4 + indexer ratio 4 (one launch), HCA layer
= main ratio 128 (one launch); "emit_all" puts every sequence at the end of a block (worst case: every
sequence pools and writes), "mixed" uses random positions. Target: <= 5 us per layer step (time is the
figure of merit; bytes: the token rows read, the state rows written and, for emitting sequences, the
state rows pooled, the overlap shift of the state (rows [r, 2r) -> [0, r)) and the cache row written).
At ratio 128 an emitting sequence pools 128 state rows of 512 channels, kv and score: 512 KB; with all
64 sequences emitting that is 33.5 MB of state, ~11 us at 2.96 TB/s, so "HCA emit_all" cannot meet
5 us under the state layout of the op (raw slots): its row reports the bandwidth reached instead.

Baseline: the eager float32 reference through the op (backend "reference"). torch.compile of the reference
is not recorded: it loops over sequences and syncs on the host (``tolist``), so it graph-breaks.
Each kernel's cache bytes are compared with the reference's on the first input before timing; the
fraction of differing bytes (exp/summation-order rounding flips) goes in the row's note.
"""
from __future__ import annotations

import torch

FAMILY = "compressor"
TARGET_PCT = 90.0
DECODE_TARGET_US = 5.0
CONFIGS = (("main", 4), ("indexer", 4), ("main", 128))
PAGE_SIZE = 64


def _tables(max_pos, device):
    from v4kernels.reference.rope import YarnConfig, rope_table

    cos, sin = rope_table(max_pos, 160000.0, YarnConfig())
    return cos.to(device), sin.to(device)


def _params(kind, ratio, device, gen):
    from v4kernels.reference import compressor as C

    hd, c, _ = C.dims(ratio, kind)
    ape = torch.randn(ratio, c * hd, device=device, generator=gen)
    w = torch.rand(hd, device=device, generator=gen) + 0.5
    return hd, c, ape, w


def _paged(kind, ratio, lens_end, device, page_size=PAGE_SIZE):
    """Cache + block table with enough pages for every sequence's entries up to position lens_end[b]."""
    from v4kernels.reference import compressor as C

    fmt = C.FORMAT[kind]
    pages = [max(1, -(-(e // ratio) // page_size)) for e in lens_end]
    width = max(pages)
    total = sum(pages)
    bt = torch.full((len(pages), width), -1, dtype=torch.int32)
    nxt = 0
    for b, p in enumerate(pages):
        bt[b, :p] = torch.arange(nxt, nxt + p, dtype=torch.int32)
        nxt += p
    cache = torch.zeros(total, fmt.page_bytes(page_size), dtype=torch.uint8, device=device)
    return cache, bt.to(device)


def _state_bytes(kind, ratio, starts, lens):
    """Bytes of compressor state the op must move for sequences (start, n): see the module doc."""
    from v4kernels.reference import compressor as C

    hd, c, overlap = C.dims(ratio, kind)
    row = 2 * c * hd * 4                       # one state row, kv + score
    total = ratio * c * hd * 4                 # ape, read once
    for s, n in zip(starts, lens):
        cnt = (s % ratio + n) // ratio
        total += min(n, ratio) * row           # latest tokens -> state
        if overlap and (s + n) // ratio > s // ratio:
            total += ratio * row               # rows [0, r) <- last complete block
        if cnt >= 1:
            total += (s % ratio) * row         # pending rows read back by the first entry
            if overlap and s // ratio > 0:
                total += ratio * hd * 8        # previous block's first half
    return total


def _diff_note(a, b):
    n = int((a != b).sum())
    return "" if n == 0 else f"{n}/{a.numel()} cache bytes differ from the reference ({n / a.numel():.2e})"


def _prefill(ctx, kernels):
    import v4kernels.ops.compressor as ops
    from v4kernels.reference import compressor as C

    tokens = ctx.pick(full=(4096, 16384, 65536), quick=(4096, 32768), cpu=(16,))
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(1234)
    for kind, ratio in CONFIGS:
        for T in tokens:
            T = max(T, 2 * ratio) if ctx.cpu else T
            for layout in ("single", "batch8"):
                if layout == "single":
                    lens, starts = [T], [0]
                else:
                    lens = [T // 8] * 8
                    starts = [(97 * b) % (4 * ratio) for b in range(8)]
                B = len(lens)
                hd, c, ape, w = _params(kind, ratio, ctx.device, gen)
                cos, sin = _tables(max(starts) + max(lens) + ratio, ctx.device)
                cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(B)], dtype=torch.int32, device=ctx.device)
                sp = torch.tensor(starts, dtype=torch.int32, device=ctx.device)
                slots = torch.arange(B, dtype=torch.int32, device=ctx.device)
                cache, bt = _paged(kind, ratio, [s + n for s, n in zip(starts, lens)], ctx.device)
                n_ent = sum((s % ratio + n) // ratio for s, n in zip(starts, lens))
                strict = 2 * T * c * hd * 4 + n_ent * C.FORMAT[kind].row_bytes
                nbytes = strict + _state_bytes(kind, ratio, starts, lens)
                shape = {"kind": kind, "ratio": ratio, "tokens": T, "seqs": B, "hd": hd}
                sets = ctx.make_arg_sets(
                    lambda: (torch.randn(T, c * hd, device=ctx.device, generator=gen),
                             torch.randn(T, c * hd, device=ctx.device, generator=gen) * 2),
                    bytes_per_set=2 * T * c * hd * 4, max_sets=8)
                skv, ssc = C.new_state(B, ratio, kind, ctx.device)

                def call(kv, sc, be):
                    ops.compress_kv(kv, sc, cu, sp, skv, ssc, ape, w, cos, sin, cache, bt, PAGE_SIZE, ratio, kind,
                                    state_slots=slots, backend=be)

                ref_bytes = None
                for be in ["reference"] + kernels:
                    try:
                        note = ""
                        skv.zero_(); ssc.fill_(float("-inf")); cache.zero_()
                        call(*sets[0], be)
                        if be == "reference":
                            ref_bytes = cache.clone()
                        elif ref_bytes is not None:
                            note = _diff_note(cache, ref_bytes)
                        t = ctx.time(lambda kv, sc, be=be: call(kv, sc, be), arg_sets=sets, graph=be != "reference")
                        hbm = ctx.ceilings.get("hbm_gbs")
                        if hbm and t:
                            pct = 100.0 * strict / t / 1e3 / hbm
                            note = "; ".join(x for x in (note, f"strict bytes (no state): {pct:.1f}% of HBM") if x)
                        ctx.record(FAMILY, "compress_kv", be, shape, t, flops=0, bytes=nbytes, bound="hbm",
                                   target_pct=TARGET_PCT,
                                   target_note=f">= {TARGET_PCT:g}% of HBM bandwidth (kv+score read, rows written)",
                                   note=note)
                    except Exception as exc:  # one backend failing must not hide the others
                        ctx.record_failure(FAMILY, "compress_kv", be, shape, exc)
                del sets, ref_bytes, cache


def _decode(ctx, kernels):
    import v4kernels.ops.compressor as ops
    from v4kernels.reference import compressor as C

    B = ctx.pick(full=64, quick=64, cpu=4)
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(4321)
    max_blocks = 256  # positions up to 256 * 128
    cos, sin = _tables(max_blocks * 128 + 128, ctx.device)
    layers = {"CSA": (("main", 4), ("indexer", 4)), "HCA": (("main", 128),)}
    for layer, comps in layers.items():
        for mode in ("emit_all", "mixed"):
            parts = []
            nbytes = 0
            for kind, ratio in comps:
                hd, c, ape, w = _params(kind, ratio, ctx.device, gen)
                blocks = torch.randint(1, max_blocks, (B,), generator=torch.Generator().manual_seed(7))
                if mode == "emit_all":
                    pos = blocks * ratio + ratio - 1
                else:
                    pos = blocks * ratio + torch.randint(0, ratio, (B,), generator=torch.Generator().manual_seed(8))
                cache, bt = _paged(kind, ratio, (pos + 1).tolist(), ctx.device)
                skv = torch.randn(C.state_shape(B, ratio, kind), device=ctx.device, generator=gen)
                ssc = torch.randn(C.state_shape(B, ratio, kind), device=ctx.device, generator=gen)
                emit = int(((pos + 1) % ratio == 0).sum())
                row = C.FORMAT[kind].row_bytes
                pooled = (2 * ratio - 1) * hd if c == 2 else (ratio - 1) * hd
                # overlap shift: rows [r, 2r) -> [0, r): first halves of r-1 rows read besides the pooled
                # second halves, r rows of 2*hd written
                shift = ((ratio - 1) * hd + ratio * 2 * hd) * 2 * 4 if c == 2 else 0
                nbytes += B * 2 * c * hd * 4 * 2 + emit * (2 * pooled * 4 + row + shift)
                parts.append(dict(kind=kind, ratio=ratio, ape=ape, w=w, cache=cache, bt=bt, skv=skv, ssc=ssc,
                                  pos=pos.to(torch.int32).to(ctx.device), c=c, hd=hd))
            shape = {"layer": layer, "batch": B, "mode": mode}
            sets = ctx.make_arg_sets(
                lambda: tuple(torch.randn(B, p["c"] * p["hd"], device=ctx.device, generator=gen)
                              for p in parts for _ in range(2)),
                bytes_per_set=sum(2 * B * p["c"] * p["hd"] * 4 for p in parts), max_sets=64)

            pos_t = parts[0]["pos"]

            def step(*tensors, be):
                comps = [ops.DecodeCompressor(tensors[2 * k], tensors[2 * k + 1], p["skv"], p["ssc"], p["ape"], p["w"],
                                              p["cache"], p["bt"], PAGE_SIZE, p["ratio"], p["kind"])
                         for k, p in enumerate(parts)]
                ops.compress_kv_decode_layer(pos_t, cos, sin, comps, backend=be)

            for be in ["reference"] + kernels:
                try:
                    t = ctx.time(lambda *a, be=be: step(*a, be=be), arg_sets=sets, graph=be != "reference")
                    ctx.record(FAMILY, "compress_kv_decode_layer", be, shape, t, flops=0, bytes=nbytes, bound="hbm",
                               target_pct=None,
                               target_note=f"all compressors of one layer <= {DECODE_TARGET_US:g} us at batch 64")
                except Exception as exc:
                    ctx.record_failure(FAMILY, "compress_kv_decode_layer", be, shape, exc)
            del sets, parts


def run(ctx):
    import v4kernels.ops.compressor  # noqa: F401  (registers the ops)
    from v4kernels.testing import kernel_backends

    kernels = kernel_backends("compress_kv")
    _prefill(ctx, kernels)
    _decode(ctx, kernels)
