"""The MoE kernels' GPU paths compile for sm_90 (on the CPU, no GPU needed).

Under the interpreter the launchers pick other dtypes and tiles than on a GPU (decoded fp32 dots
instead of FP8 / bf16 ``tl.dot``, one small tile config, no inline PTX), so the ``V4K_SM90_CHECK``
recorder does not see the GPU specializations. This test builds them from the launchers' own GPU
tile choice (``_config`` / ``_fold_config`` with the interpreter switched off) for the V4-Flash and
V4-Pro expert shapes, decode and prefill row counts, the W4A16 kernel (also W4A8 decode) and the
W4A8 FP8-MMA kernel, fused W1/W3 + SwiGLU and plain, plus the router and combine kernels, and
compiles each with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``.
"""
import importlib.util
import os

import pytest
import triton

from v4kernels.triton import moe as tri

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "_sm90_compile_foundation", os.path.join(_HERE, "..", "foundation", "test_sm90_compile.py"))
_foundation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_foundation)
compile_specs = _foundation.compile_specs

MOD = "v4kernels.triton.moe"
MODELS = {"flash": dict(d=4096, inter=2048, E=256), "pro": dict(d=7168, inter=3072, E=384)}


def _gpu(fn, *args):
    orig = tri._interp
    tri._interp = lambda: False
    try:
        return fn(*args)
    finally:
        tri._interp = orig


_COMMON = {"rid_ptr": "*i32", "w1_ptr": "*u8", "s1_ptr": "*u8", "w3_ptr": "*u8", "s3_ptr": "*u8", "off_ptr": "*i32",
           "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "Ma": "i32", "E": "i32", "num_n": "i32",
           "limit": "fp32"}


def _a16_spec(M, E, N, K, swiglu, has_rid, has_rw):
    """W4A16 kernel (also W4A8 decode, on the dequantized activations)."""
    BM, BN, BK, warps, stages = _gpu(tri._config, M, E, N, K, swiglu)
    sig = {"a_ptr": "*bf16", "rw_ptr": "*fp32" if has_rw else "*bf16", **_COMMON}
    cx = {"HAS_RID": has_rid, "HAS_RW": has_rw, "SWIGLU": swiglu, "DOT_F32": False,
          "EP": triton.next_power_of_2(E + 2), "BM": BM, "BN": BN, "BK": BK}
    for k in cx:
        sig[k] = "constexpr"
    return {"module": MOD, "name": "_grouped_mxfp4_kernel", "signature": sig, "constexprs": cx,
            "options": {"num_warps": warps, "num_stages": stages}}


def _fold_spec(M, E, N, K, swiglu, has_rid, has_rw):
    """W4A8 FP8-MMA kernel (prefill)."""
    BT, BW, warps, stages = _gpu(tri._fold_config, M, E, N, K, swiglu)
    sig = {"a_ptr": "*fp8e4nv", "as_ptr": "*u8", "rw_ptr": "*fp32" if has_rw else "*bf16", **_COMMON}
    sig = {k: sig[k] for k in ("a_ptr", "as_ptr", "rid_ptr", "rw_ptr", "w1_ptr", "s1_ptr", "w3_ptr", "s3_ptr",
                               "off_ptr", "out_ptr", "M", "N", "K", "Ma", "E", "num_n", "limit")}
    cx = {"HAS_RID": has_rid, "HAS_RW": has_rw, "SWIGLU": swiglu, "DOT_F32": False,
          "EP": triton.next_power_of_2(E + 2), "BT": BT, "BW": BW}
    for k in cx:
        sig[k] = "constexpr"
    return {"module": MOD, "name": "_w4a8_fold_kernel", "signature": sig, "constexprs": cx,
            "options": {"num_warps": warps, "num_stages": stages}}


def grouped_specs():
    """Every GPU specialization the grouped-GEMM launcher uses at the V4 shapes (deduplicated)."""
    specs = {}
    for cfg in MODELS.values():
        d, inter, E = cfg["d"], cfg["inter"], cfg["E"]
        for rows_per_expert in (1, 16, 64, 256, 4096):  # decode, mid, prefill tiles
            n_exp = 32
            M = rows_per_expert * n_exp
            # layer calls: W1/W3 + SwiGLU with row ids and weights; W2 plain on the grouped rows
            for N, K, swiglu, rid, rw in ((inter, d, True, True, True), (d, inter, False, False, False),
                                          (inter, d, True, False, False), (d, inter, False, True, False)):
                makers = [_a16_spec]
                if tri._a8_path(M, E) == "fold":
                    makers.append(_fold_spec)
                for make in makers:
                    s = make(M, E, N, K, swiglu, rid, rw)
                    key = s["name"] + repr(sorted(s["constexprs"].items())) + repr(s["options"])
                    specs[key] = s
    return list(specs.values())


def router_specs():
    specs = []
    for dt, bf16 in (("*bf16", True), ("*fp32", False)):
        sig = {"x_ptr": dt, "w_ptr": dt, "part_ptr": "*fp32", "T": "i32", "E": "i32", "K": "i32", "KS": "i32",
               "BT": "constexpr", "BE": "constexpr", "BK": "constexpr", "BF16_DOT": "constexpr"}
        specs.append({"module": MOD, "name": "_router_logits_kernel", "signature": sig,
                      "constexprs": {"BT": 16, "BE": 64, "BK": 128, "BF16_DOT": bf16}, "options": {"num_warps": 4}})
    for E in (256, 384):
        EP = triton.next_power_of_2(E)
        for hashed in (False, True):
            sig = {"part_ptr": "*fp32", "bias_ptr": "*fp32", "tid_ptr": "*i32", "tok_ptr": "*i64", "ids_ptr": "*i32",
                   "w_ptr": "*fp32", "T": "i32", "E": "i32", "V": "i32", "SPLIT": "i32", "TE": "i32",
                   "route_scale": "fp32", "TOPK": "constexpr", "KP": "constexpr", "BT": "constexpr",
                   "EP": "constexpr", "HAS_BIAS": "constexpr", "HASH": "constexpr"}
            cx = {"TOPK": 6, "KP": 8, "BT": 4 if EP >= 512 else 8, "EP": EP, "HAS_BIAS": not hashed, "HASH": hashed}
            specs.append({"module": MOD, "name": "_router_select_kernel", "signature": sig, "constexprs": cx,
                          "options": {"num_warps": 4}})
    return specs


def combine_specs():
    specs = []
    for out_f32, has_sh in ((False, True), (True, False)):
        sig = {"y_ptr": "*bf16", "pr_ptr": "*i32", "rw_ptr": "*bf16", "sh_ptr": "*bf16" if has_sh else "*bf16",
               "out_ptr": "*fp32" if out_f32 else "*bf16", "M": "i32", "N": "i32", "TOPK": "i32",
               "KP": "constexpr", "BN": "constexpr", "HAS_RW": "constexpr", "HAS_SH": "constexpr",
               "OUT_F32": "constexpr"}
        cx = {"KP": 8, "BN": 1024, "HAS_RW": False, "HAS_SH": has_sh, "OUT_F32": out_f32}
        specs.append({"module": MOD, "name": "_combine_kernel", "signature": sig, "constexprs": cx,
                      "options": {"num_warps": 4}})
    return specs


def all_specs():
    return grouped_specs() + router_specs() + combine_specs()


def _gpu_target_compiles():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _gpu_target_compiles(), reason="triton with a CUDA backend is not installed")
def test_moe_gpu_paths_compile_for_sm90():
    rc, out = compile_specs(all_specs())
    assert rc == 0, out[-6000:]
