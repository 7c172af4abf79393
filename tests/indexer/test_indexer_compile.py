"""The indexer's Triton kernels must compile for a Hopper GPU (sm_90), checked on the CPU.

The CPU tests run the kernels under the interpreter, which accepts code the GPU compiler rejects
(non-constexpr globals, reassigned constexpr names, ...). ``_compile_sm90.py`` drives the launchers
with meta tensors and the GPU heuristics and compiles every kernel specialization they launch with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` in a subprocess without TRITON_INTERPRET
(ptxas bundled with triton; no GPU needed). Skipped when this machine cannot compile for sm_90.
"""
import os
import subprocess
import sys

import pytest

_SCRIPT = os.path.join(os.path.dirname(__file__), "_compile_sm90.py")


def _run(*flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, _SCRIPT, *flags], env=env, capture_output=True, text=True,
                          timeout=1800)
    out = proc.stdout + proc.stderr
    if proc.returncode == 3:
        pytest.skip(out.strip().splitlines()[-1] if out.strip() else "cannot compile for sm_90 here")
    assert proc.returncode == 0, "indexer kernels fail to compile for sm_90:\n" + out[-12000:]
    return out


def test_kernels_compile_for_sm90():
    """V4 decode/prefill shapes at topk 512 (FP4/FP8, 64/128 heads, batch 1 and 128), logits, test shapes."""
    _run("--jobs", "2")


@pytest.mark.slow
def test_kernels_compile_for_sm90_full():
    """Also topk 1024/2048, 16/32 heads, block_q 1/2, pages 1..64, 1M entries, every test-suite shape."""
    _run("--full", "--jobs", str(min(8, os.cpu_count() or 2)))
