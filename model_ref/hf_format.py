"""The Hugging Face transformers ``DeepseekV4ForCausalLM`` state-dict layout <-> the official one.

Renames follow the transformers port (``model.layers.N.self_attn.q_a_proj.weight`` ...; the indexer
nests under the compressor; experts are stacked as ``mlp.experts.gate_up_proj [E, 2I, d]`` = [w1; w3]
and ``down_proj [E, d, I]``, in bf16). FP8 linears keep their e4m3 weight with the block scale named
``weight_scale_inv`` (the FineGrained-FP8 convention). The port has no MTP module: ``mtp.*`` is not
exported. Importing bf16 experts re-quantizes them to MXFP4; for weights that came from MXFP4 this
reproduces the same dequantized values exactly (codes may be re-expressed with another scale).
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from v4kernels.reference.linear import quantize_weight_mxfp4
from v4kernels.reference.quant import dequant_mxfp4

from .config import ModelConfig

# official suffix -> HF suffix (applied to names under layers.N.), longest match first
_LAYER_RENAMES = [
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.wq_b.scale", "self_attn.compressor.indexer.q_b_proj.weight_scale_inv"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
]
_FP8_LINEARS = {
    "attn.wq_a": "self_attn.q_a_proj", "attn.wq_b": "self_attn.q_b_proj", "attn.wkv": "self_attn.kv_proj",
    "attn.wo_a": "self_attn.o_a_proj", "attn.wo_b": "self_attn.o_b_proj",
    "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj", "ffn.shared_experts.w3": "mlp.shared_experts.up_proj",
    "ffn.shared_experts.w2": "mlp.shared_experts.down_proj",
}
for _o, _h in _FP8_LINEARS.items():
    _LAYER_RENAMES += [(_o + ".weight", _h + ".weight"), (_o + ".scale", _h + ".weight_scale_inv")]
for _site in ("attn", "ffn"):
    for _p in ("fn", "base", "scale"):
        _LAYER_RENAMES.append((f"hc_{_site}_{_p}", f"{_site}_hc.{_p}"))
_TOP = [
    ("embed.weight", "model.embed_tokens.weight"), ("head.weight", "lm_head.weight"),
    ("norm.weight", "model.norm.weight"), ("hc_head_fn", "model.hc_head.hc_fn"),
    ("hc_head_base", "model.hc_head.hc_base"), ("hc_head_scale", "model.hc_head.hc_scale"),
]
_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")


def to_hf_state_dict(w: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Official-layout weights -> a transformers DeepseekV4ForCausalLM state dict (no MTP)."""
    out: Dict[str, torch.Tensor] = {}
    for o, h in _TOP:
        out[h] = w[o]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for o, h in _LAYER_RENAMES:
            if p + o in w:
                out[f"model.{p}{h}"] = w[p + o]
        E = cfg.n_routed_experts

        def deq(j, name):
            return dequant_mxfp4(w[f"{p}ffn.experts.{j}.{name}.weight"].view(torch.uint8),
                                 w[f"{p}ffn.experts.{j}.{name}.scale"], torch.bfloat16)

        out[f"model.{p}mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((deq(j, "w1"), deq(j, "w3")), 0) for j in range(E)])
        out[f"model.{p}mlp.experts.down_proj"] = torch.stack([deq(j, "w2") for j in range(E)])
    return out


def from_hf_state_dict(hf: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """A transformers DeepseekV4ForCausalLM state dict -> official-layout weights (experts -> MXFP4)."""
    w: Dict[str, torch.Tensor] = {}
    missing = []
    for o, h in _TOP:
        if h not in hf:
            missing.append(h)
            continue
        w[o] = hf[h]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for o, h in _LAYER_RENAMES:
            key = f"model.{p}{h}"
            if key in hf:
                w[p + o] = hf[key]
        gu = hf.get(f"model.{p}mlp.experts.gate_up_proj")
        dn = hf.get(f"model.{p}mlp.experts.down_proj")
        if gu is None or dn is None:
            missing.append(f"model.{p}mlp.experts.*")
            continue
        inter = gu.shape[1] // 2
        for j in range(gu.shape[0]):
            for name, t in (("w1", gu[j, :inter]), ("w3", gu[j, inter:]), ("w2", dn[j])):
                packed, s = quantize_weight_mxfp4(t.float())
                w[f"{p}ffn.experts.{j}.{name}.weight"] = packed.view(torch.int8)
                w[f"{p}ffn.experts.{j}.{name}.scale"] = s
    if missing:
        raise KeyError(f"hf state dict: missing {len(missing)} tensors, e.g. {missing[:3]}")
    return w
