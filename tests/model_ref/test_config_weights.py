"""model_ref configuration presets, Hugging Face config parsing, weights and checkpoint layouts."""
import json

import pytest
import torch

from v4kernels.model_ref import config as C
from v4kernels.model_ref import hf_format, weights as W
from v4kernels.model_ref.cache import sequence_bytes


def test_presets_match_the_spec_layer_schedule():
    f, p = C.flash(), C.pro()
    assert len(f.compress_ratios) == 44 and f.compress_ratios[:4] == (0, 0, 4, 128) and f.compress_ratios[-2:] == (4, 0)
    assert f.compress_ratios.count(4) == 21 and f.compress_ratios.count(128) == 20
    assert len(p.compress_ratios) == 62 and p.compress_ratios[:3] == (128, 128, 4) and p.compress_ratios[-1] == 0
    assert p.compress_ratios.count(4) == 30 and p.compress_ratios.count(128) == 31
    t = C.tiny()
    assert {t.layer_kind(i) for i in range(t.n_layers)} == {"swa", "csa", "hca"}
    assert t.is_hash_layer(0) and not t.is_hash_layer(1)


def test_cache_bytes_at_1m_match_spec_table():
    # spec §6.4: 584-B KV + 68-B FP4 indexer: Flash 3.69 GB, Pro 5.28 GB per sequence at 1,048,576 tokens
    assert sequence_bytes(C.flash(), 1 << 20) / 1e9 == pytest.approx(3.69, abs=0.01)
    assert sequence_bytes(C.pro(), 1 << 20) / 1e9 == pytest.approx(5.28, abs=0.01)


@pytest.mark.parametrize("numerics", ["reference", "dense"])
def test_manager_bytes_predicts_the_allocation(numerics):
    from v4kernels.model_ref.cache import CacheManager, manager_bytes

    cfg = C.tiny()
    got = CacheManager(cfg, "cpu", 3, 300, 16, numerics).allocated_bytes()
    assert manager_bytes(cfg, 3, 300, 16, numerics) == got
    # a window ring (max_context beyond 128 + max_batch_tokens - 1) holds fewer window pages
    ringed = CacheManager(cfg, "cpu", 3, 300, 16, numerics, max_batch_tokens=40)
    assert manager_bytes(cfg, 3, 300, 16, numerics, max_batch_tokens=40) == ringed.allocated_bytes()
    assert ringed.window_ring == (0 if numerics == "dense" else 176)  # 128 + 40 - 1 -> 11 pages of 16
    if numerics == "reference":
        assert ringed.allocated_bytes() < got


def test_from_hf_config_official_keys(tmp_path):
    hf = {
        "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
        "num_attention_heads": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "head_dim": 512,
        "qk_rope_head_dim": 64, "compress_ratios": list(C.flash().compress_ratios), "index_topk": 512,
        "n_routed_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "num_hash_layers": 3,
        "routed_scaling_factor": 1.5, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
    }
    cfg = C.from_hf_config(hf)
    assert cfg.compress_ratios == C.flash().compress_ratios and cfg.yarn is not None and cfg.yarn.factor == 16
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    assert C.from_hf_config(str(path)).dim == 4096


def test_from_hf_config_layer_types_and_no_yarn():
    hf = {
        "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 16, "q_lora_rank": 128, "o_groups": 2,
        "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        "moe_intermediate_size": 128, "n_routed_experts": 8, "num_experts_per_tok": 2,
    }
    cfg = C.from_hf_config(hf)
    assert cfg.compress_ratios == (0, 4, 128, 0) and cfg.yarn is None


def test_bad_config_raises_named_errors():
    with pytest.raises(ValueError, match="head_dim"):
        C.ModelConfig(head_dim=256)
    with pytest.raises(ValueError, match="compress_ratios"):
        C.ModelConfig(n_layers=2, n_mtp_layers=0, compress_ratios=(0, 3))
    with pytest.raises(ValueError, match="layer_types"):
        C.from_hf_config({"hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 16,
                          "q_lora_rank": 128, "layer_types": ["weird"]})


@pytest.fixture(scope="module")
def tiny_weights():
    return C.tiny(), W.init_weights(C.tiny(), seed=3)


def test_weights_have_official_names_and_dtypes(tiny_weights):
    cfg, w = tiny_weights
    assert w["layers.1.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert w["layers.1.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert w["layers.1.attn.wq_a.scale"].shape == (1, 2)
    assert w["layers.1.ffn.experts.0.w1.weight"].dtype == torch.int8
    assert w["layers.1.ffn.experts.0.w1.weight"].shape == (cfg.moe_inter_dim, cfg.dim // 2)
    assert w["layers.1.ffn.experts.0.w1.scale"].shape == (cfg.moe_inter_dim, cfg.dim // 32)
    assert w["layers.0.ffn.gate.tid2eid"].shape == (cfg.vocab_size, cfg.n_activated_experts)
    assert "layers.1.ffn.gate.bias" in w and "layers.1.attn.indexer.compressor.ape" in w
    assert w["layers.2.attn.compressor.ape"].shape == (128, 512)
    assert w["layers.1.attn.compressor.ape"].shape == (4, 1024)
    assert "mtp.0.e_proj.weight" in w and "mtp.0.hc_head_fn" in w


def test_safetensors_round_trip_is_exact(tiny_weights, tmp_path):
    cfg, w = tiny_weights
    W.save_checkpoint(w, str(tmp_path / "ckpt"), cfg)
    back = W.load_checkpoint(str(tmp_path / "ckpt"))
    assert set(back) == set(w)
    for k in w:
        assert back[k].dtype == w[k].dtype and torch.equal(back[k].view(torch.uint8), w[k].view(torch.uint8)), k


def test_hf_state_dict_round_trip_keeps_dequantized_values(tiny_weights):
    cfg, w = tiny_weights
    hf = hf_format.to_hf_state_dict(w, cfg)
    assert hf["model.layers.1.mlp.experts.gate_up_proj"].shape == (cfg.n_routed_experts, 2 * cfg.moe_inter_dim, cfg.dim)
    assert "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight_scale_inv" in hf
    back = hf_format.from_hf_state_dict(hf, cfg)
    main = {k for k in w if not k.startswith("mtp.")}
    assert set(back) == main
    from v4kernels.reference.quant import dequant_mxfp4

    for k in main:
        if ".experts." in k and k.endswith(".weight"):
            sk = k[: -len("weight")] + "scale"
            a = dequant_mxfp4(w[k].view(torch.uint8), w[sk])
            b = dequant_mxfp4(back[k].view(torch.uint8), back[sk])
            assert torch.equal(a, b), k
        elif ".experts." not in k:
            assert torch.equal(back[k].view(torch.uint8), w[k].view(torch.uint8)), k
