"""GPU-only kernel paths compile for sm_90 (checked on the CPU, no GPU needed).

Kernels whose launchers pick other dtypes or constexprs on a GPU than under the interpreter (FP8
``tl.dot`` instead of decoded fp32 dots, larger tiles) are not covered by the ``V4K_SM90_CHECK``
recorder, which sees the interpreter's launches. Each family lists its GPU specializations here (or
in its own test file through ``compile_specs``); this test compiles them with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` in a subprocess.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest


def compile_specs(specs):
    """Compile records (see v4kernels._sm90_check) in a fresh process without TRITON_INTERPRET."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(specs, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "v4kernels._sm90_check", f.name], env=env, capture_output=True,
                          text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def _gemm_spec(out, bm, bn, split, warps, stages):
    sig = {"x_ptr": "*fp8e4nv", "sx_ptr": "*u8", "w_ptr": "*fp8e4nv", "sw_ptr": "*u8", "out_ptr": out, "M": "i32",
           "N": "i32", "KB": "i32", "KB_PER_SPLIT": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "FP8_DOT": "constexpr", "SPLIT": "constexpr"}
    return {"module": "v4kernels.triton.linear", "name": "_fp8_gemm_kernel", "signature": sig,
            "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "FP8_DOT": True, "SPLIT": split},
            "options": {"num_warps": warps, "num_stages": stages}}


GPU_SPECS = [  # (why) the GPU tiles of fp8_linear: FP8 tl.dot, bf16 output and the split-K workspace
    _gemm_spec("*bf16", 16, 128, False, 4, 4),
    _gemm_spec("*fp32", 16, 128, True, 4, 4),
    _gemm_spec("*bf16", 128, 128, False, 8, 3),
]


def _gpu_target_compiles():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _gpu_target_compiles(), reason="triton with a CUDA backend is not installed")
def test_gpu_only_kernel_paths_compile_for_sm90():
    rc, out = compile_specs(GPU_SPECS)
    assert rc == 0, out[-4000:]
