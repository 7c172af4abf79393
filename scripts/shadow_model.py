"""Localize kernel-vs-reference differences in the model_ref forward pass (GPU diagnostic).

    python scripts/shadow_model.py [--config flash] [--layers 4] [--context 1024] [--batch 2] [--decode 2]

1. Every v4kernels op call of a kernel-path prefill + decode is shadowed by its float32 reference on the
   same inputs (v4kernels.shadow): a per-op table of the worst differences.
2. The kernel path and the reference path run the same tokens (decode teacher-forced with the reference
   path's argmax), and the 4-stream residual after every layer is compared (relative max error, cosine),
   then the logits (max relative error, top-1 agreement).
"""
from __future__ import annotations

import argparse
import time

import torch

from v4kernels.model_ref import config as C
from v4kernels.model_ref.model import Transformer
from v4kernels.model_ref.weights import init_weights
from v4kernels.shadow import shadow_check


def _streams_recorder(model, store):
    orig = model._block

    def block(lid, X, batch, plan):
        out = orig(lid, X, batch, plan)
        store.append(out.detach().float().clone())
        return out

    model._block = block


def _cmp(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return rel, cos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--moe-mode", default="w4a8")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = C.tiny() if args.config == "tiny" else C.preset(args.config, args.layers)
    weights = init_weights(cfg, args.seed, device=dev)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, cfg.vocab_size, (max(1, args.context - 3 * b),), generator=g).tolist()
               for b in range(args.batch)]
    ctx = max(map(len, prompts)) + args.decode + 1
    ids = list(range(args.batch))

    def make(backend):
        m = Transformer(cfg, weights, dev, backend=backend, max_seqs=args.batch, max_context=ctx, moe_mode=args.moe_mode)
        for s in ids:
            m.new_sequence(s)
        return m

    # --- 1. per-op shadow check of the kernel path
    t0 = time.perf_counter()
    m = make(None)
    with shadow_check() as rep:
        lg = m.prefill(ids, prompts)
        nxt = lg.argmax(-1).tolist()
        for _ in range(args.decode):
            lg = m.decode(ids, nxt)
            nxt = lg.argmax(-1).tolist()
    del m
    print(f"shadowed kernel-path run: {time.perf_counter() - t0:.1f} s ({cfg.name}, {cfg.n_layers} layers, "
          f"batch {args.batch}, context {args.context}, decode {args.decode})")
    print(rep.table())

    # --- 2. layer by layer and logits, kernel path vs reference path, same tokens
    runs = {}
    for name, backend in (("reference", "reference"), ("kernel", None)):
        m = make(backend)
        streams = []
        _streams_recorder(m, streams)
        logits = [m.prefill(ids, prompts)]
        n_prefill = len(streams)
        runs[name] = (m, streams, logits, n_prefill)
    ref_m, ref_s, ref_l, n_pre = runs["reference"]
    ker_m, ker_s, ker_l, _ = runs["kernel"]
    for _ in range(args.decode):
        tok = ref_l[-1].argmax(-1).tolist()  # teacher forcing: both paths see the same tokens
        ref_l.append(ref_m.decode(ids, tok))
        ker_l.append(ker_m.decode(ids, tok))
    print("\nresidual streams after each layer (prefill), kernel vs reference: max rel error, cosine")
    for lid in range(n_pre):
        rel, cos = _cmp(ker_s[lid], ref_s[lid])
        print(f"  layer {lid} ({cfg.layer_kind(lid) if lid < cfg.n_layers else 'mtp'}): rel {rel:.3e}  cos {cos:.6f}")
    agree = total = 0
    for i, (a, b) in enumerate(zip(ker_l, ref_l)):
        rel, cos = _cmp(a, b)
        ag = int((a.argmax(-1) == b.argmax(-1)).sum())
        agree, total = agree + ag, total + a.shape[0]
        print(f"  logits {'prefill' if i == 0 else f'decode {i}'}: rel {rel:.3e}  cos {cos:.6f}  top-1 {ag}/{a.shape[0]}")
    print(f"top-1 agreement {agree}/{total}")


if __name__ == "__main__":
    main()
