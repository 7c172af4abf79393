"""End-to-end benchmark of model_ref (issue 11; ANCHORS.md §4 "end to end").

Model: a V4-Flash-dimension layer slice on one GPU: 3 layers CSA, HCA, SWA (dim 4096, 64 heads, all
256 routed experts, indexer top-512, the full vocabulary and fp32 head; hash MoE on the CSA layer,
learned on the others; no MTP). CPU smoke run (--allow-cpu): the same slice of the tiny config.

Ops (rows), all wall-clock times of whole model calls (host + GPU, CUDA-synchronized, eager Python;
at batch 1 the host launch overhead is part of what is measured):
* ``prefill_chunk`` {context C, new_tokens N}: prefill N new tokens of one sequence whose first C - N
  tokens are already cached (C = N: a prefill from scratch). The history is written synthetically
  (random valid cache rows, see ``_fill_history``; timing does not depend on the values), so long
  contexts cost no quadratic indexer prefill to set up. FLOPs: the slice's GEMMs, attention and
  indexer scores for the N tokens (``_prefill_flops``), for TFLOP/s.
* ``prefill`` {context C}: a real prefill of C tokens from scratch in chunks of 8192 (kernels only).
* ``decode`` {context C, batch B}: one decode step (B sequences at position C) after a synthetic
  history of C tokens: median over steps. Caches at full size: a size is measured where
  ``model_ref.cache.manager_bytes`` says its caches fit in the free GPU memory (else a failed row
  says how much it needs). Kernel rows carry the minimum bytes of a step (weights
  touched + cache rows read, ``_decode_bytes``) for % of the HBM roofline.
Backends: ``kernels`` (model_ref, backend auto: CUDA > Triton > reference per op), ``kernels_graph``
(decode only, on a GPU: the same step replayed from a CUDA graph, model_ref/graph.py), ``reference``
(model_ref, float32 references of every op; 4K context only, it is slow), ``torch_bf16`` (the ANCHORS
baseline: ``DenseMaskSlice`` below, an eager bf16 PyTorch implementation with dense masked attention
over all tokens; at 4K and 64K).
Memory: per sequence at 1M context from ``model_ref.cache.sequence_bytes`` against spec §6.4 (in
the decode rows' target note and the log), and what model_ref's CacheManager allocates for the slice.

Contexts: quick 4K and 64K; full 4K .. 1M (prefill from scratch up to 128K: beyond, its indexer
prefill is quadratic, ~4.4 PFLOP at 1M).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F_

FAMILY = "model"
NEW_TOKENS = 4096
PREFILL_CHUNK = 8192
LAYERS = "CSA,HCA,SWA"
SPEC_GB_1M = {("v4-flash", "v4"): 3.69, ("v4-flash", "v4_fp8_index"): 4.04, ("v4-flash", "bf16"): 7.22,
              ("v4-pro", "v4"): 5.28, ("v4-pro", "v4_fp8_index"): 5.78, ("v4-pro", "bf16"): 10.33}


def slice_config(cpu: bool):
    from v4kernels.model_ref import config as C

    base = C.tiny() if cpu else C.flash()
    return base.replace(name=f"{base.name}[{LAYERS}]", n_layers=3, n_mtp_layers=0, n_hash_layers=1,
                        compress_ratios=(4, 128, 0))


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _wall(fn, dev) -> float:
    """Seconds of one call, device-synchronized before and after."""
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def _tokens(cfg, n, gen):
    return torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()


# ----------------------------------------------------------------------------- synthetic history
def _fill_history(model, seq_id: int, n: int, gen) -> None:
    """Sequence ``seq_id`` gets a history of ``n`` tokens without a prefill: random rows (written
    through the cache ops, so they are valid FP8/FP4 rows) in its window (last 128 positions),
    compressed and indexer caches. Compressor states keep their reset values."""
    from v4kernels import formats as F
    from v4kernels.ops import formats as fmt_ops

    caches, dev, ps = model.caches, model.device, model.caches.page_size
    caches.reserve(seq_id, n)
    g = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))

    def write(cache, table, lo, hi, dim, fn, ring=0):
        for a in range(lo, hi, 1 << 16):  # bounded temporaries at 1M context
            pos = torch.arange(a, min(hi, a + (1 << 16)), device=dev)
            rows = F.positions_to_rows(table, torch.zeros_like(pos), pos % ring if ring else pos, ps)
            fn(cache.data, rows, torch.randn(pos.numel(), dim, device=dev, generator=g).to(torch.bfloat16), ps)

    for lid, lc in enumerate(caches.layers):
        bt = caches.block_tables(lid, [seq_id])
        write(lc.window, bt["window"], max(0, n - 128), n, 512, fmt_ops.kv584_write, caches.window_ring)
        if lc.compressed is not None:
            write(lc.compressed, bt["compressed"], 0, n // lc.ratio, 512, fmt_ops.kv584_write)
        if lc.indexer is not None:
            write(lc.indexer, bt["indexer"], 0, n // 4, 128, fmt_ops.idx_fp4_write)


# ----------------------------------------------------------------------------- work estimates
def _weights_per_token(cfg, lid):
    """(MACs per token of the layer's GEMMs with 6 routed + 1 shared expert, bytes of its non-expert
    weights, bytes of one routed expert)."""
    d, H, q, G, o = cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    I, E, r = cfg.moe_inter_dim, cfg.n_routed_experts, cfg.compress_ratios[lid]
    fp8 = q * d + H * 512 * q + 512 * d + d * G * o  # wq_a, wq_b, wkv, wo_b (1 B each)
    wo_a = G * o * (H * 512 // G)  # bf16
    macs = fp8 + wo_a + (cfg.n_activated_experts + 1) * 3 * I * d + E * d
    wbytes = fp8 + 2 * wo_a + 3 * I * d + 2 * E * d + 2 * 24 * 4 * d * 4  # + shared (fp8), gate, mHC fn
    if r > 0:
        c = 2 if r == 4 else 1
        macs += 2 * c * 512 * d
        wbytes += 2 * 2 * c * 512 * d
    if r == 4:
        macs += 64 * 128 * q + 64 * d + 2 * 2 * 128 * d
        wbytes += 64 * 128 * q + 2 * 64 * d + 2 * 2 * 2 * 128 * d
    expert = 3 * I * d // 2 + 3 * I * d // 32  # packed FP4 + e8m0 scales
    return macs, wbytes, expert


def _prefill_flops(cfg, start: int, n: int) -> float:
    """FLOPs of prefilling tokens [start, start + n) (GEMMs, attention, indexer scores, one head row)."""
    f = 2.0 * cfg.vocab_size * cfg.dim
    for lid, r in enumerate(cfg.compress_ratios[: cfg.n_layers]):
        macs = _weights_per_token(cfg, lid)[0]
        f += 2.0 * macs * n
        keys = 128 * n
        if r == 4:
            keys += cfg.index_topk * n
            f += 2.0 * 64 * 128 * n * (start + n / 2) / 4  # indexer scores over the visible entries
        elif r == 128:
            keys += n * (start + n / 2) / 128
        f += 2.0 * cfg.n_heads * 1024 * keys
    return f


def _decode_bytes(cfg, context: int, batch: int) -> float:
    """Minimum bytes of a decode step: every weight the step touches once (experts: the expected
    number of distinct experts among batch x 6 uniform picks), the fp32 head as model_ref holds it,
    and each sequence's cache rows (window 128, CSA top-k rows + all indexer keys, HCA all entries)."""
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    total = 4.0 * cfg.vocab_size * cfg.dim + batch * 2 * cfg.dim
    touched = E * (1 - (1 - k / E) ** batch)
    for lid, r in enumerate(cfg.compress_ratios[: cfg.n_layers]):
        _, wbytes, expert = _weights_per_token(cfg, lid)
        total += wbytes + touched * expert
        rows = 128 * 584
        if r == 4:
            rows += min(cfg.index_topk, context // 4) * 584 + (context // 4) * 68
        elif r == 128:
            rows += (context // 128) * 584
        total += batch * rows
    return total


# ----------------------------------------------------------------------------- the baseline
class DenseMaskSlice:
    """The ANCHORS end-to-end baseline: a straightforward eager PyTorch implementation of the same
    layers in bf16, HF-"eager" style, with **dense masked attention over all tokens**.

    * weights dequantized to bf16 once (FP8 linears and all routed experts: 12.9 GB per layer at V4-Flash
      dimensions), bf16 GEMMs; the MoE is a Python loop over the experts that received tokens;
    * caches: the raw bf16 KV of **every** position (1 KB per token and layer), bf16 compressed entries,
      bf16 indexer keys;
    * attention: each query block scores ALL cached keys (raw positions + compressed entries) with one
      bf16 GEMM, then a mask (window band, causal compressed entries, the indexer's top-k as a
      scattered mask), the sink column, an fp32 softmax and a bf16 P.V over all keys;
    * indexer: bf16 scores of every query against every visible key, top-k in PyTorch.
    mHC, norms, RoPE, the compressor pooling and the router are the float32 PyTorch references
    (eager code either way). One sequence."""

    def __init__(self, cfg, w, device, max_context: int):
        from v4kernels.reference.linear import dequant_weight_fp8_block
        from v4kernels.reference.quant import dequant_mxfp4
        from v4kernels.reference.rope import rope_table
        from v4kernels.reference import compressor as comp_ref

        self.cfg, self.w, self.dev = cfg, w, torch.device(device)
        self.length = 0
        lin = lambda n: dequant_weight_fp8_block(w[n + ".weight"], w[n + ".scale"], torch.bfloat16)  # noqa: E731
        self.layers = []
        self.rope = {}
        for lid in range(cfg.n_layers):
            p, r = f"layers.{lid}.", cfg.compress_ratios[lid]
            L = {"ratio": r}
            for n in ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.shared_experts.w1",
                      "ffn.shared_experts.w3", "ffn.shared_experts.w2") + (("attn.indexer.wq_b",) if r == 4 else ()):
                L[n] = lin(p + n)
            L["attn.wo_a"] = lin(p + "attn.wo_a").view(cfg.o_groups, cfg.o_lora_rank, -1)
            deq = lambda j, n: dequant_mxfp4(w[f"{p}ffn.experts.{j}.{n}.weight"].view(torch.uint8),  # noqa: E731
                                             w[f"{p}ffn.experts.{j}.{n}.scale"], torch.bfloat16)
            E = cfg.n_routed_experts
            L["w13"] = torch.empty(E, 2 * cfg.moe_inter_dim, cfg.dim, dtype=torch.bfloat16, device=self.dev)
            L["w2"] = torch.empty(E, cfg.dim, cfg.moe_inter_dim, dtype=torch.bfloat16, device=self.dev)
            for j in range(E):
                L["w13"][j, : cfg.moe_inter_dim] = deq(j, "w1")
                L["w13"][j, cfg.moe_inter_dim:] = deq(j, "w3")
                L["w2"][j] = deq(j, "w2")
            L["kv"] = torch.zeros(max_context, 512, dtype=torch.bfloat16, device=self.dev)
            if r > 0:
                L["comp"] = torch.zeros(max_context // r + 1, 512, dtype=torch.bfloat16, device=self.dev)
                L["state"] = comp_ref.new_state(1, r, "main", self.dev)
            if r == 4:
                L["ikeys"] = torch.zeros(max_context // 4 + 1, 128, dtype=torch.bfloat16, device=self.dev)
                L["istate"] = comp_ref.new_state(1, 4, "indexer", self.dev)
            key = cfg.rope_params(lid)
            if key not in self.rope:
                c, s = rope_table(max_context + 1, *key)
                self.rope[key] = (c.to(self.dev), s.to(self.dev))
            self.layers.append(L)
        self.head = w["head.weight"].to(torch.bfloat16)

    def fill_history(self, n: int, gen) -> None:
        """Random cache contents for positions [0, n) (timing does not depend on the values)."""
        g = torch.Generator(device=self.dev).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        for L in self.layers:
            L["kv"][:n] = torch.randn(n, 512, device=self.dev, generator=g).to(torch.bfloat16)
            if "comp" in L:
                L["comp"][: n // L["ratio"]] = torch.randn(n // L["ratio"], 512, device=self.dev, generator=g)
            if "ikeys" in L:
                L["ikeys"][: n // 4] = torch.randn(n // 4, 128, device=self.dev, generator=g)
        self.length = n

    def _rms(self, x, name):
        from v4kernels.reference.norm import rms_norm

        return rms_norm(x, self.w[name].float(), self.cfg.norm_eps)

    @torch.no_grad()
    def forward(self, tokens) -> torch.Tensor:
        """Append ``tokens`` (list of ints) to the sequence; fp32 logits of the last position."""
        from v4kernels.reference import mhc as mhc_ref

        cfg = self.cfg
        ids = torch.tensor(tokens, device=self.dev)
        start = self.length
        pos = torch.arange(start, start + len(tokens), device=self.dev)
        X = self.w["embed.weight"][ids][:, None, :].expand(-1, cfg.hc_mult, -1).contiguous()
        hc = (cfg.norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters)
        for lid in range(cfg.n_layers):
            p = f"layers.{lid}."
            y, post, comb = mhc_ref.mhc_pre(X, self.w[p + "hc_attn_fn"], self.w[p + "hc_attn_base"],
                                            self.w[p + "hc_attn_scale"], *hc)
            X = mhc_ref.mhc_post(self._attention(lid, self._rms(y, p + "attn_norm.weight"), pos), X, post, comb)
            y, post, comb = mhc_ref.mhc_pre(X, self.w[p + "hc_ffn_fn"], self.w[p + "hc_ffn_base"],
                                            self.w[p + "hc_ffn_scale"], *hc)
            X = mhc_ref.mhc_post(self._moe(lid, self._rms(y, p + "ffn_norm.weight"), ids), X, post, comb)
        self.length = start + len(tokens)
        h = mhc_ref.mhc_head(X[-1:], self.w["hc_head_fn"], self.w["hc_head_base"], self.w["hc_head_scale"],
                             cfg.norm_eps, cfg.hc_eps)
        return F_.linear(self._rms(h, "norm.weight"), self.head).float()

    def _attention(self, lid, x, pos):
        from v4kernels.model_ref import dense
        from v4kernels.reference.hadamard import hadamard_transform
        from v4kernels.reference.norm import head_rms_norm_bf16
        from v4kernels.reference.rope import apply_rope

        cfg, L = self.cfg, self.layers[lid]
        a, r = f"layers.{lid}.attn.", L["ratio"]
        T, H = x.shape[0], cfg.n_heads
        cos, sin = self.rope[cfg.rope_params(lid)]
        start, end = int(pos[0]), int(pos[-1]) + 1
        qr = self._rms(F_.linear(x, L["attn.wq_a"]), a + "q_norm.weight")
        q = apply_rope(head_rms_norm_bf16(F_.linear(qr, L["attn.wq_b"]).view(T, H, 512)), pos, cos, sin)
        L["kv"][start:end] = apply_rope(self._rms(F_.linear(x, L["attn.wkv"]), a + "kv_norm.weight"), pos, cos, sin)

        def compress(prefix, kind, state, cache, ratio):
            kv = F_.linear(x.float(), self.w[prefix + "wkv.weight"].float())
            sc = F_.linear(x.float(), self.w[prefix + "wgate.weight"].float())
            v, _, i = dense.compress(kv, sc, [start], [T], [0], *state, self.w[prefix + "ape"],
                                     self.w[prefix + "norm.weight"].float(), cos, sin, ratio, kind)
            cache[i] = v

        n_c = 0
        if r > 0:
            compress(a + "compressor.", "main", L["state"], L["comp"], r)
            n_c = end // r
        keys = torch.cat((L["kv"][:end], L["comp"][:n_c])) if r > 0 else L["kv"][:end]
        sel = None
        if r == 4:  # dense indexer: every query against every key, then top-k
            ic = a + "indexer."
            qi = F_.linear(qr, L["attn.indexer.wq_b"]).view(T, cfg.index_n_heads, 128)
            qi = hadamard_transform(apply_rope(qi, pos, cos, sin))
            wts = F_.linear(x, self.w[ic + "weights_proj.weight"]) * (128 ** -0.5 * cfg.index_n_heads ** -0.5)
            compress(ic + "compressor.", "indexer", L["istate"], L["ikeys"], 4)
            sel = torch.empty(T, n_c, dtype=torch.bool, device=self.dev)
            for q0 in range(0, T, 256):
                qs = slice(q0, min(T, q0 + 256))
                s = torch.einsum("thd,nd->thn", qi[qs], L["ikeys"][:n_c])  # bf16
                score = (torch.relu(s) * wts[qs, :, None]).sum(1).float()
                lim = torch.div(pos[qs, None] + 1, 4, rounding_mode="floor")
                vis = torch.arange(n_c, device=self.dev)[None, :] < lim
                score = score.masked_fill(~vis, float("-inf"))
                top = score.topk(min(cfg.index_topk, n_c), dim=-1)
                m = torch.zeros(score.shape, dtype=torch.bool, device=self.dev)
                m.scatter_(1, top.indices, torch.isfinite(top.values))
                sel[qs] = m
        # dense masked attention over all keys, query blocks sized to ~1.5 GB of fp32 scores
        sink = self.w[a + "attn_sink"].float()
        Tk = keys.shape[0]
        qb = max(1, min(1024, int(1.5e9 // (H * Tk * 4))))
        kpos = torch.arange(end, device=self.dev)
        o = torch.empty(T, H, 512, dtype=torch.bfloat16, device=self.dev)
        for q0 in range(0, T, qb):
            qs = slice(q0, min(T, q0 + qb))
            p_ = pos[qs, None]
            mask = (kpos[None, :] <= p_) & (kpos[None, :] > p_ - 128)
            if r == 128:
                lim = torch.div(p_ + 1, 128, rounding_mode="floor")
                mask = torch.cat((mask, torch.arange(n_c, device=self.dev)[None, :] < lim), 1)
            elif r == 4:
                mask = torch.cat((mask, sel[qs]), 1)
            s = torch.einsum("qhd,kd->hqk", q[qs], keys).float() * 512 ** -0.5
            s = s.masked_fill(~mask[None], float("-inf"))
            s = torch.cat((s, sink[:, None, None].expand(-1, s.shape[1], 1)), dim=-1)
            pr = torch.softmax(s, dim=-1)[..., :-1].to(torch.bfloat16)
            o[qs] = torch.einsum("hqk,kd->qhd", pr, keys)
        o = apply_rope(o, pos, cos, sin, inverse=True)
        z = torch.einsum("tgd,grd->tgr", o.view(T, cfg.o_groups, -1), L["attn.wo_a"])
        return F_.linear(z.flatten(1), L["attn.wo_b"])

    def _moe(self, lid, x, ids):
        from v4kernels.reference.moe import swiglu_clamp

        cfg, L, f = self.cfg, self.layers[lid], f"layers.{lid}.ffn."
        k, I = cfg.n_activated_experts, cfg.moe_inter_dim
        s = torch.sqrt(F_.softplus(F_.linear(x.float(), self.w[f + "gate.weight"].float())))
        if f + "gate.tid2eid" in self.w:
            eid = self.w[f + "gate.tid2eid"][ids].long()
        else:
            eid = (s + self.w[f + "gate.bias"]).topk(k, dim=-1).indices
        wts = s.gather(1, eid)
        wts = wts / wts.sum(-1, keepdim=True) * cfg.route_scale
        y = torch.zeros(x.shape[0], cfg.dim, dtype=torch.float32, device=self.dev)
        for e in eid.unique().tolist():  # eager expert loop (host sync per layer)
            tok, slot = (eid == e).nonzero(as_tuple=True)
            gu = F_.linear(x[tok], L["w13"][e])
            h = swiglu_clamp(gu[:, :I], gu[:, I:], cfg.swiglu_limit) * wts[tok, slot, None]
            y.index_add_(0, tok, F_.linear(h.to(torch.bfloat16), L["w2"][e]).float())
        hs = swiglu_clamp(F_.linear(x, L["ffn.shared_experts.w1"]), F_.linear(x, L["ffn.shared_experts.w3"]),
                          cfg.swiglu_limit)
        y += F_.linear(hs.to(torch.bfloat16), L["ffn.shared_experts.w2"]).float()
        return y.to(torch.bfloat16)


# ----------------------------------------------------------------------------- measurements
def _model(cfg, w, dev, backend, context, batch=1):
    """A model_ref Transformer with caches for ``batch`` sequences of ``context`` (+64) tokens; raises
    MemoryError before allocating when model_ref/cache.py says the caches would not fit."""
    from v4kernels.model_ref.cache import manager_bytes
    from v4kernels.model_ref.model import Transformer

    if dev.type == "cuda":
        need = manager_bytes(cfg, batch, context + 64)
        free = torch.cuda.mem_get_info(dev)[0]
        if need > 0.8 * free:
            raise MemoryError(f"caches of {batch} x {context} tokens need {need / 1e9:.1f} GB "
                              f"(model_ref/cache.py), {free / 1e9:.1f} GB free")
    return Transformer(cfg, w, dev, backend=backend, max_seqs=batch, max_context=context + 64)


def _prefill_chunk(model, cfg, context, n_new, gen, reps):
    """Seconds to prefill n_new tokens after a synthetic history of context - n_new (last of reps runs)."""
    t = None
    for _ in range(reps):
        model.new_sequence(0)
        _fill_history(model, 0, context - n_new, gen)
        toks = _tokens(cfg, n_new, gen)
        t = _wall(lambda: model.prefill([0], [toks]), model.device)
        model.release(0)
    return t


def _decode(model, cfg, context, batch, gen, warm, steps, graph=False):
    """Median seconds of a decode step of ``batch`` sequences at ``context`` (synthetic history);
    ``graph``: steps replayed from a CUDA graph (model_ref/graph.py; the first warm step captures)."""
    ids = list(range(batch))
    for s in ids:
        model.new_sequence(s)
        _fill_history(model, s, context, gen)
    toks = _tokens(cfg, batch, gen)
    if graph:
        from v4kernels.model_ref.graph import DecodeGraph

        g = DecodeGraph(model, ids)
        step = lambda: g.step(toks)  # noqa: E731
    else:
        step = lambda: model.decode(ids, toks)  # noqa: E731
    times = [_wall(step, model.device) for _ in range(warm + steps)][warm:]
    for s in ids:
        model.release(s)
    return statistics.median(times)


def _memory_lines(cfg):
    from v4kernels.model_ref import config as C
    from v4kernels.model_ref.cache import sequence_bytes

    lines, parts = [], []
    for full in (C.flash(), C.pro()):
        for layout in ("v4", "v4_fp8_index", "bf16"):
            gb = sequence_bytes(full, 1 << 20, layout) / 1e9
            spec = SPEC_GB_1M[(full.name, layout)]
            lines.append(f"  {full.name:9s} {layout:13s} {gb:6.2f} GB per sequence at 1M (spec §6.4: {spec:.2f} GB)")
            if layout == "v4":
                parts.append(f"{full.name} {gb:.2f} GB (spec {spec:.2f})")
    from v4kernels.model_ref.cache import manager_bytes

    lines.append(f"  model_ref's CacheManager for one v4-flash sequence at 1M: "
                 f"{manager_bytes(C.flash(), 1, 1 << 20) / 1e9:.2f} GB (window ring of 8320 rows per layer, "
                 f"for prefill chunks of up to 8192 tokens; compressor states included)")
    note = ("memory per sequence at 1M context, whole model (cache.py, 584-B KV + 68-B FP4 indexer keys): "
            + ", ".join(parts) + f"; this {cfg.n_layers}-layer slice: {sequence_bytes(cfg, 1 << 20) / 1e9:.3f} GB")
    return lines, note


def run(ctx):
    from v4kernels.model_ref.model import release_derived
    from v4kernels.model_ref.weights import init_weights

    dev = ctx.device
    cfg = slice_config(ctx.cpu)
    gen = torch.Generator().manual_seed(1234)
    n_new = ctx.pick(full=NEW_TOKENS, quick=NEW_TOKENS, cpu=64)
    contexts = ctx.pick(full=(4096, 16384, 65536, 131072, 262144, 1 << 20), quick=(4096, 65536), cpu=(64, 192))
    prefill_max = ctx.pick(full=131072, quick=65536, cpu=192)
    batches = ctx.pick(full=(1, 16), quick=(1,), cpu=(1,))
    small, anchor = contexts[0], ctx.pick(full=65536, quick=65536, cpu=192)
    mem_lines, mem_note = _memory_lines(cfg)
    ctx.log("[bench] model: cache bytes per sequence (model_ref/cache.py) vs spec §6.4:\n" + "\n".join(mem_lines))
    t0 = time.perf_counter()
    w = init_weights(cfg, seed=0, device=dev)
    _sync(dev)
    ctx.log(f"[bench] model: {cfg.name} weights {sum(v.numel() * v.element_size() for v in w.values()) / 1e9:.1f} GB "
            f"in {time.perf_counter() - t0:.1f} s")
    shape0 = {"layers": LAYERS, "dim": cfg.dim}
    anchor_note = ("ANCHORS §4 end to end: model_ref decode at 1M context on one GPU, >= 100x faster than an "
                   "eager dense-mask implementation at 64K; " + mem_note)

    def rec(op, backend, shape, seconds, **kw):
        ctx.record(FAMILY, op, backend, {**shape0, **shape}, seconds * 1e6 if seconds else None, **kw)

    # ---- kernels (backend auto), then the reference path at the smallest context
    for backend, label in ((None, "kernels"), ("reference", "reference")):
        ref = backend == "reference"
        for C in (contexts[:1] if ref else contexts):
            shape = {"context": C, "new_tokens": min(n_new, C), "batch": 1}
            try:
                m = _model(cfg, w, dev, backend, C)
                if not ref and C == contexts[0] and not ctx.cpu:  # warm-up: Triton compilation
                    _prefill_chunk(m, cfg, min(C, 512), min(C, 512) // 2, gen, 1)
                n = min(n_new, C)
                t = _prefill_chunk(m, cfg, C, n, gen, 1 if ref else 2)
                rec("prefill_chunk", label, shape, t, flops=_prefill_flops(cfg, C - n, n), bound=None,
                    note=f"{n / t:,.0f} tokens/s")
                ctx.log(f"[bench] model {label} prefill_chunk C={C}: {t * 1e3:.1f} ms, {n / t:,.0f} tokens/s")
            except Exception as exc:
                ctx.record_failure(FAMILY, "prefill_chunk", label, {**shape0, **shape}, exc)
            finally:
                m = None  # free the caches (and the derived weights with release_derived below)
            if not ref and n_new < C <= prefill_max:
                shape = {"context": C, "chunk": PREFILL_CHUNK}
                try:
                    m = _model(cfg, w, dev, backend, C)
                    toks = _tokens(cfg, C, gen)
                    if not ctx.cpu:  # warm-up of the chunk shape (Triton specializations)
                        m.new_sequence(0)
                        m.prefill([0], [toks[:PREFILL_CHUNK]])
                        m.release(0)
                    m.new_sequence(0)

                    def full_prefill():
                        for a in range(0, C, PREFILL_CHUNK):
                            m.prefill([0], [toks[a:a + PREFILL_CHUNK]])

                    t = _wall(full_prefill, dev)
                    rec("prefill", label, shape, t, flops=sum(_prefill_flops(cfg, a, min(PREFILL_CHUNK, C - a))
                                                              for a in range(0, C, PREFILL_CHUNK)),
                        bound=None, note=f"{C / t:,.0f} tokens/s")
                    ctx.log(f"[bench] model {label} prefill C={C}: {t:.2f} s, {C / t:,.0f} tokens/s")
                except Exception as exc:
                    ctx.record_failure(FAMILY, "prefill", label, {**shape0, **shape}, exc)
                finally:
                    m = None
            for B in batches:
                if B > 1 and (ref or C > 65536):
                    continue
                shape = {"context": C, "batch": B}
                try:
                    m = _model(cfg, w, dev, backend, C, B)
                    warm, steps = (1, 2) if ref else (1 if ctx.cpu else 3, ctx.pick(full=20, quick=10, cpu=2))
                    t = _decode(m, cfg, C, B, gen, warm, steps)
                    note = f"{B / t:,.0f} tokens/s"
                    if C == contexts[-1] and not ref:
                        note += (f"; model_ref CacheManager holds {m.caches.allocated_bytes() / 1e9:.2f} GB for this "
                                 f"slice (window ring of 8320 rows per layer)")
                    kw = dict(bytes=_decode_bytes(cfg, C, B), bound="hbm", target_note=anchor_note) if not ref else {}
                    rec("decode", label, shape, t, note=note, **kw)
                    ctx.log(f"[bench] model {label} decode C={C} B={B}: {t * 1e3:.2f} ms/step")
                except Exception as exc:
                    ctx.record_failure(FAMILY, "decode", label, {**shape0, **shape}, exc)
                    m = None  # sequences may be left allocated: a fresh model below
                if not ref and dev.type == "cuda":  # the same step replayed from a CUDA graph
                    try:
                        m = m if m is not None else _model(cfg, w, dev, backend, C, B)
                        t = _decode(m, cfg, C, B, gen, 2, ctx.pick(full=20, quick=10, cpu=2), graph=True)
                        rec("decode", "kernels_graph", shape, t, note=f"{B / t:,.0f} tokens/s",
                            bytes=_decode_bytes(cfg, C, B), bound="hbm", target_note=anchor_note)
                        ctx.log(f"[bench] model kernels_graph decode C={C} B={B}: {t * 1e3:.3f} ms/step")
                    except Exception as exc:
                        ctx.record_failure(FAMILY, "decode", "kernels_graph", {**shape0, **shape}, exc)
                m = None
        release_derived()  # the stacked experts / fp32 head of this path
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # ---- the eager dense-mask bf16 baseline (ANCHORS §4) at the smallest context and at 64K
    try:
        base = DenseMaskSlice(cfg, w, dev, anchor + 64)
    except Exception as exc:  # e.g. out of memory: 12.9 GB of bf16 experts per layer at V4-Flash size
        ctx.record_failure(FAMILY, "prefill_chunk", "torch_bf16", {**shape0, "context": anchor}, exc)
        _summary(ctx)
        return
    for C in sorted({small, anchor}):
        n = min(n_new, C)
        shape = {"context": C, "new_tokens": n, "batch": 1}
        try:
            t = None
            for _ in range(2):  # warm-up, then timed
                base.fill_history(C - n, gen)
                toks = _tokens(cfg, n, gen)
                t = _wall(lambda: base.forward(toks), dev)
            rec("prefill_chunk", "torch_bf16", shape, t, flops=_prefill_flops(cfg, C - n, n), bound=None,
                note=f"{n / t:,.0f} tokens/s (dense mask over {C} positions)")
            ctx.log(f"[bench] model torch_bf16 prefill_chunk C={C}: {t * 1e3:.1f} ms")
        except Exception as exc:
            ctx.record_failure(FAMILY, "prefill_chunk", "torch_bf16", {**shape0, **shape}, exc)
        shape = {"context": C, "batch": 1}
        try:
            base.fill_history(C, gen)
            tok = _tokens(cfg, 1, gen)
            times = [_wall(lambda: base.forward(tok), dev) for _ in range(ctx.pick(full=8, quick=5, cpu=3))][1:]
            t = statistics.median(times)
            rec("decode", "torch_bf16", shape, t, note=f"{1 / t:,.0f} tokens/s")
            ctx.log(f"[bench] model torch_bf16 decode C={C}: {t * 1e3:.2f} ms/step")
        except Exception as exc:
            ctx.record_failure(FAMILY, "decode", "torch_bf16", {**shape0, **shape}, exc)
    del base
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    _summary(ctx)


def _summary(ctx):
    """Log kernels vs baselines side by side (the rows carry the same as speedup_vs_*)."""
    rows = [r for r in ctx.rows if r["family"] == FAMILY and r.get("time_us")]
    for r in rows:
        if r["backend"] not in ("kernels", "kernels_graph"):
            continue
        sp = {b: r.get(f"speedup_vs_{b}") for b in ("reference", "torch_bf16") if r.get(f"speedup_vs_{b}")}
        if sp:
            ctx.log(f"[bench] model {r['op']} {r['shape']}: kernels " +
                    ", ".join(f"{v:.1f}x faster than {b}" for b, v in sp.items()))
