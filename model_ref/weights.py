"""Model weights: random initialisation with realistic scales, and the official checkpoint layout.

The in-memory state dict uses DeepSeek's official checkpoint names and dtypes (spec §1.3): FP8
e4m3 weights with ``.scale`` e8m0 [ceil(out/128), ceil(in/128)], FP4 experts packed two per byte with
``.scale`` e8m0 [out, in/32], bf16 norms/embeddings/compressor projections, fp32 mHC parameters,
``ape`` and ``attn_sink``, int64 ``tid2eid``. Saving writes that layout to safetensors (FP4 as int8,
as in the checkpoint); loading reads it back.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Iterator, Tuple

import torch

from v4kernels.reference.linear import quantize_weight_fp8_block, quantize_weight_mxfp4

from .config import ModelConfig

Weights = Dict[str, torch.Tensor]


def _normal(shape, std, gen):
    return torch.randn(*shape, generator=gen, device=gen.device) * std


def _fp8(prefix: str, out: int, inp: int, gen, w: Weights):
    wq, s = quantize_weight_fp8_block(_normal((out, inp), 1.0 / math.sqrt(inp), gen))
    w[prefix + ".weight"], w[prefix + ".scale"] = wq, s


def _fp4(prefix: str, out: int, inp: int, gen, w: Weights):
    packed, s = quantize_weight_mxfp4(_normal((out, inp), 1.0 / math.sqrt(inp), gen))
    w[prefix + ".weight"], w[prefix + ".scale"] = packed.view(torch.int8), s


def _norm(name: str, dim: int, gen, w: Weights):
    w[name] = (1.0 + 0.1 * _normal((dim,), 1.0, gen)).bfloat16()


def _hc(prefix: str, dim: int, gen, w: Weights, n_out: int = 24):
    """mHC site: small mixing logits around a base that keeps the residual scale (pre ~ 1/4 each,
    post ~ 1, comb ~ identity)."""
    w[prefix + "_fn"] = _normal((n_out, 4 * dim), 1.0 / math.sqrt(4 * dim), gen)
    if n_out == 24:
        base = torch.cat((torch.full((4,), math.log(0.25 / 0.75)), torch.zeros(4), 3.0 * torch.eye(4).flatten()))
        base = base.to(gen.device)
        w[prefix + "_scale"] = torch.tensor([0.5, 0.5, 0.5])
    else:
        base = torch.full((n_out,), math.log(0.25 / 0.75), device=gen.device)
        w[prefix + "_scale"] = torch.tensor([0.5])
    w[prefix + "_scale"] = w[prefix + "_scale"].to(gen.device)
    w[prefix + "_base"] = base + 0.1 * _normal(base.shape, 1.0, gen)


def _compressor(prefix: str, cfg: ModelConfig, ratio: int, hd: int, gen, w: Weights):
    c = 2 if ratio == 4 else 1
    std = 1.0 / math.sqrt(cfg.dim)
    w[prefix + ".wkv.weight"] = _normal((c * hd, cfg.dim), std, gen).bfloat16()
    w[prefix + ".wgate.weight"] = _normal((c * hd, cfg.dim), std, gen).bfloat16()
    w[prefix + ".ape"] = 0.5 * _normal((ratio, c * hd), 1.0, gen)
    _norm(prefix + ".norm.weight", hd, gen, w)


def _block(prefix: str, cfg: ModelConfig, layer_id: int, gen, w: Weights):
    d, H = cfg.dim, cfg.n_heads
    ratio = cfg.compress_ratios[layer_id]
    _hc(prefix + "hc_attn", d, gen, w)
    _hc(prefix + "hc_ffn", d, gen, w)
    _norm(prefix + "attn_norm.weight", d, gen, w)
    _norm(prefix + "ffn_norm.weight", d, gen, w)
    a = prefix + "attn."
    w[a + "attn_sink"] = _normal((H,), 1.0, gen)
    _fp8(a + "wq_a", cfg.q_lora_rank, d, gen, w)
    _norm(a + "q_norm.weight", cfg.q_lora_rank, gen, w)
    _fp8(a + "wq_b", H * cfg.head_dim, cfg.q_lora_rank, gen, w)
    _fp8(a + "wkv", cfg.head_dim, d, gen, w)
    _norm(a + "kv_norm.weight", cfg.head_dim, gen, w)
    _fp8(a + "wo_a", cfg.o_groups * cfg.o_lora_rank, H * cfg.head_dim // cfg.o_groups, gen, w)
    _fp8(a + "wo_b", d, cfg.o_groups * cfg.o_lora_rank, gen, w)
    if ratio > 0:
        _compressor(a + "compressor", cfg, ratio, cfg.head_dim, gen, w)
    if ratio == 4:
        _fp8(a + "indexer.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank, gen, w)
        w[a + "indexer.weights_proj.weight"] = _normal((cfg.index_n_heads, d), 1.0 / math.sqrt(d), gen).bfloat16()
        _compressor(a + "indexer.compressor", cfg, 4, cfg.index_head_dim, gen, w)
    f = prefix + "ffn."
    E = cfg.n_routed_experts
    w[f + "gate.weight"] = _normal((E, d), 1.0 / math.sqrt(d), gen).bfloat16()
    if cfg.is_hash_layer(layer_id):
        # distinct experts per token id: the first k of a random permutation of E per row
        keys = torch.rand(cfg.vocab_size, E, generator=gen, device=gen.device)
        w[f + "gate.tid2eid"] = keys.argsort(dim=-1)[:, : cfg.n_activated_experts].to(torch.int64)
    else:
        w[f + "gate.bias"] = 0.1 * _normal((E,), 1.0, gen)
    inter = cfg.moe_inter_dim
    for j in range(E):
        e = f"{f}experts.{j}."
        _fp4(e + "w1", inter, d, gen, w)
        _fp4(e + "w3", inter, d, gen, w)
        _fp4(e + "w2", d, inter, gen, w)
    _fp8(f + "shared_experts.w1", inter, d, gen, w)
    _fp8(f + "shared_experts.w3", inter, d, gen, w)
    _fp8(f + "shared_experts.w2", d, inter, gen, w)


def init_weights(cfg: ModelConfig, seed: int = 0, device="cpu") -> Weights:
    """Random weights in the official layout, generated (and quantized) on ``device``.

    The same seed gives the same weights on the same device type (CPU and CUDA generators differ)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w: Weights = {}
    w["embed.weight"] = _normal((cfg.vocab_size, cfg.dim), 1.0, gen).bfloat16()
    w["head.weight"] = _normal((cfg.vocab_size, cfg.dim), 1.0 / math.sqrt(cfg.dim), gen).bfloat16()
    _norm("norm.weight", cfg.dim, gen, w)
    _hc("hc_head", cfg.dim, gen, w, n_out=4)
    for i in range(cfg.n_layers):
        _block(f"layers.{i}.", cfg, i, gen, w)
    for m in range(cfg.n_mtp_layers):
        p = f"mtp.{m}."
        _fp8(p + "e_proj", cfg.dim, cfg.dim, gen, w)
        _fp8(p + "h_proj", cfg.dim, cfg.dim, gen, w)
        for n in ("enorm", "hnorm", "norm"):
            _norm(p + n + ".weight", cfg.dim, gen, w)
        _hc(p + "hc_head", cfg.dim, gen, w, n_out=4)
        _block(p, cfg, cfg.n_layers + m, gen, w)
    return w


def to_device(w: Weights, device) -> Weights:
    return {k: v.to(device) for k, v in w.items()}


def expert_stack(w: Weights, prefix: str, n_experts: int, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack ``{prefix}experts.{j}.{name}`` into packed uint8 [E, N, K/2] and e8m0 [E, N, K/32]."""
    packed = torch.stack([w[f"{prefix}experts.{j}.{name}.weight"] for j in range(n_experts)]).view(torch.uint8)
    scale = torch.stack([w[f"{prefix}experts.{j}.{name}.scale"] for j in range(n_experts)])
    return packed, scale


# ---------------------------------------------------------------------- safetensors I/O
def save_checkpoint(w: Weights, path: str, cfg: ModelConfig | None = None) -> None:
    """Write the official layout: one safetensors file plus ``config.json`` if ``cfg`` is given."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in w.items()}, os.path.join(path, "model.safetensors"))
    if cfg is not None:
        import json

        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"v4kernels_model_config": cfg.to_dict()}, f, indent=1)


def iter_safetensors(path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = [path] if path.endswith(".safetensors") else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
    )
    if not files:
        raise FileNotFoundError(f"path: expected a .safetensors file or a folder with some, got {path!r}")
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)


def load_checkpoint(path: str) -> Weights:
    """Read an official-layout checkpoint (one or several safetensors files, names of spec §1.3)."""
    w = dict(iter_safetensors(path))
    # FP4 experts are stored as int8 (I8) and FP8 weights/scales as float8 types: keep them as stored.
    return w
