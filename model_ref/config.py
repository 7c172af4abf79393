"""Model configuration of DeepSeek-V4 (spec §1): presets and Hugging Face ``config.json`` parsing."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from v4kernels.reference.rope import YarnConfig

HEAD_DIM = 512  # fixed by the 584-byte cache format (448 nope + 64 rope)
ROPE_DIM = 64
INDEX_HEAD_DIM = 128  # fixed by the 68-byte FP4 indexer key format


@dataclass
class ModelConfig:
    """Hyper-parameters (names of the reference ``ModelArgs``; HF keys in ``from_hf_config``)."""

    name: str = "custom"
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_mtp_layers: int = 1
    n_heads: int = 64
    head_dim: int = HEAD_DIM
    rope_head_dim: int = ROPE_DIM
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: Tuple[int, ...] = ()  # n_layers + n_mtp_layers entries: 0 SWA, 4 CSA, 128 HCA
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    yarn: Optional[YarnConfig] = field(default_factory=YarnConfig)  # None: no YaRN on compressed layers
    index_n_heads: int = 64
    index_head_dim: int = INDEX_HEAD_DIM
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    max_seq_len: int = 1 << 20

    def __post_init__(self):
        if not self.compress_ratios:
            self.compress_ratios = tuple([0] * (self.n_layers + self.n_mtp_layers))
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios)
        self.validate()

    def validate(self) -> None:
        def need(cond, what):
            if not cond:
                raise ValueError(f"ModelConfig({self.name}): {what}")

        need(self.head_dim == HEAD_DIM, f"head_dim: expected {HEAD_DIM} (584-byte cache format), got {self.head_dim}")
        need(self.rope_head_dim == ROPE_DIM, f"rope_head_dim: expected {ROPE_DIM}, got {self.rope_head_dim}")
        need(self.index_head_dim == INDEX_HEAD_DIM, f"index_head_dim: expected {INDEX_HEAD_DIM}, got {self.index_head_dim}")
        need(len(self.compress_ratios) == self.n_layers + self.n_mtp_layers,
             f"compress_ratios: expected {self.n_layers + self.n_mtp_layers} entries, got {len(self.compress_ratios)}")
        need(all(r in (0, 4, 128) for r in self.compress_ratios),
             f"compress_ratios: expected values in (0, 4, 128), got {sorted(set(self.compress_ratios))}")
        need(self.n_heads % self.o_groups == 0, f"n_heads {self.n_heads} must be a multiple of o_groups {self.o_groups}")
        need(self.dim % 128 == 0, f"dim: expected a multiple of 128 (FP8 1x128 activation blocks), got {self.dim}")
        need(self.moe_inter_dim % 128 == 0, f"moe_inter_dim: expected a multiple of 128, got {self.moe_inter_dim}")
        need(self.q_lora_rank % 128 == 0, f"q_lora_rank: expected a multiple of 128, got {self.q_lora_rank}")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts > n_routed_experts")
        need(self.hc_mult == 4, f"hc_mult: expected 4, got {self.hc_mult}")

    # ---------------------------------------------------------------- derived
    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.o_groups

    def layer_ratio(self, layer_id: int) -> int:
        return self.compress_ratios[layer_id]

    def layer_kind(self, layer_id: int) -> str:
        return {0: "swa", 4: "csa", 128: "hca"}[self.compress_ratios[layer_id]]

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers and layer_id < self.n_layers

    def rope_params(self, layer_id: int):
        """(theta, yarn) of a layer: compressed layers use compress_rope_theta with YaRN."""
        if self.compress_ratios[layer_id] > 0:
            return self.compress_rope_theta, self.yarn
        return self.rope_theta, None

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("yarn") is not None and not isinstance(d["yarn"], YarnConfig):
            d["yarn"] = YarnConfig(**d["yarn"])
        return cls(**d)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------- presets
def flash(n_layers: Optional[int] = None) -> ModelConfig:
    """V4-Flash (spec §1.1). ``n_layers`` truncates the stack (keeping the pattern) for GPU slices."""
    ratios = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0]
    cfg = ModelConfig(name="v4-flash", compress_ratios=tuple(ratios))
    return truncate(cfg, n_layers) if n_layers else cfg


def pro(n_layers: Optional[int] = None) -> ModelConfig:
    """V4-Pro: dim 7168, 128 heads, 61 layers (HCA 0,1 and odd; CSA even from 2), top-k 1024."""
    ratios = [128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)] + [0]
    cfg = ModelConfig(
        name="v4-pro", dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16,
        index_topk=1024, n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5,
        compress_ratios=tuple(ratios),
    )
    return truncate(cfg, n_layers) if n_layers else cfg


def tiny(max_seq_len: int = 4096) -> ModelConfig:
    """A CPU-sized model with every layer type: SWA, CSA, HCA, hash and learned MoE, MTP.

    head_dim stays 512 and the indexer head 128 (fixed by the cache formats); the rest is small."""
    return ModelConfig(
        name="tiny", vocab_size=512, dim=256, n_layers=5, n_mtp_layers=1, n_heads=16, q_lora_rank=128,
        o_groups=2, o_lora_rank=64, compress_ratios=(0, 4, 128, 4, 128, 0), index_n_heads=16, index_topk=16,
        n_routed_experts=8, n_activated_experts=2, moe_inter_dim=128, n_hash_layers=1, route_scale=1.5,
        max_seq_len=max_seq_len,
    )


def truncate(cfg: ModelConfig, n_layers: int) -> ModelConfig:
    """The first ``n_layers`` layers of a model plus its MTP block (a slice for single-GPU runs)."""
    ratios = list(cfg.compress_ratios[:n_layers]) + list(cfg.compress_ratios[cfg.n_layers:])
    return cfg.replace(name=f"{cfg.name}[:{n_layers}]", n_layers=n_layers, compress_ratios=tuple(ratios))


PRESETS = {"flash": flash, "pro": pro, "tiny": tiny}


def preset(name: str, n_layers: Optional[int] = None) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]() if name == "tiny" or not n_layers else PRESETS[name](n_layers)


# ---------------------------------------------------------------------- Hugging Face config.json
_LAYER_TYPE_RATIO = {
    "sliding_attention": 0, "swa": 0, "sliding_window": 0,
    "compressed_sparse_attention": 4, "csa": 4, "sparse_attention": 4,
    "heavily_compressed_attention": 128, "hca": 128,
}


def from_hf_config(hf: Dict[str, Any]) -> ModelConfig:
    """Build a config from a ``deepseek_v4`` Hugging Face ``config.json`` dict (or a path to one).

    Accepts the official keys (``compress_ratios``) and the transformers port's (``layer_types`` with
    ``compress_rates``, ``rope_parameters``); YaRN is on iff ``rope_scaling`` / ``rope_parameters``
    names type ``yarn``."""
    if isinstance(hf, str):
        with open(hf) as f:
            hf = json.load(f)
    g = hf.get
    n_layers = int(g("num_hidden_layers"))
    n_mtp = int(g("num_nextn_predict_layers", 1))
    ratios = g("compress_ratios")
    if ratios is None and g("layer_types") is not None:
        rates = g("compress_rates") or {}
        ratios = []
        for t in g("layer_types"):
            if isinstance(rates, dict) and t in rates:
                ratios.append(int(rates[t]))
            elif t in _LAYER_TYPE_RATIO:
                ratios.append(_LAYER_TYPE_RATIO[t])
            else:
                raise ValueError(f"layer_types: unknown layer type {t!r}")
    if ratios is None:
        raise ValueError("config: expected 'compress_ratios' or 'layer_types', found neither")
    ratios = list(ratios)
    if len(ratios) == n_layers:  # MTP layers are SWA-only
        ratios += [0] * n_mtp
    rope = g("rope_scaling") or g("rope_parameters") or {}
    if isinstance(rope, dict) and "full_attention" in rope:  # per-layer-type rope parameters
        rope = rope.get("compressed_attention", rope["full_attention"])
    yarn = None
    rtype = (rope.get("type") or rope.get("rope_type") or "") if isinstance(rope, dict) else ""
    if rtype == "yarn":
        yarn = YarnConfig(
            factor=float(rope.get("factor", 16.0)),
            original_seq_len=int(rope.get("original_max_position_embeddings", 65536)),
            beta_fast=float(rope.get("beta_fast", 32.0)),
            beta_slow=float(rope.get("beta_slow", 1.0)),
        )
    theta = g("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0)
    return ModelConfig(
        name=g("model_type", "deepseek_v4"),
        vocab_size=int(g("vocab_size", 129280)),
        dim=int(g("hidden_size")),
        n_layers=n_layers,
        n_mtp_layers=n_mtp,
        n_heads=int(g("num_attention_heads")),
        head_dim=int(g("head_dim", HEAD_DIM)),
        rope_head_dim=int(g("qk_rope_head_dim", ROPE_DIM)),
        q_lora_rank=int(g("q_lora_rank")),
        o_groups=int(g("o_groups", 8)),
        o_lora_rank=int(g("o_lora_rank", 1024)),
        window_size=int(g("sliding_window", 128)),
        compress_ratios=tuple(ratios),
        compress_rope_theta=float(g("compress_rope_theta", 160000.0)),
        rope_theta=float(theta),
        yarn=yarn,
        index_n_heads=int(g("index_n_heads", 64)),
        index_head_dim=int(g("index_head_dim", INDEX_HEAD_DIM)),
        index_topk=int(g("index_topk", 512)),
        n_routed_experts=int(g("n_routed_experts", g("num_experts", 256))),
        n_shared_experts=int(g("n_shared_experts", 1)),
        n_activated_experts=int(g("num_experts_per_tok", 6)),
        moe_inter_dim=int(g("moe_intermediate_size", 2048)),
        n_hash_layers=int(g("num_hash_layers", 3)),
        route_scale=float(g("routed_scaling_factor", 1.5)),
        swiglu_limit=float(g("swiglu_limit", 10.0)),
        hc_mult=int(g("hc_mult", 4)),
        hc_sinkhorn_iters=int(g("hc_sinkhorn_iters", 20)),
        hc_eps=float(g("hc_eps", 1e-6)),
        norm_eps=float(g("rms_norm_eps", 1e-6)),
        max_seq_len=int(g("max_position_embeddings", 1 << 20)),
    )
