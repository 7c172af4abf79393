"""The CUDA attention loop compiles for sm_90a without what made it slow on the way (CPU test, needs nvcc).

ptxas reports (C7515) when it serialises wgmma instructions, (C7517 / C7519) when it injects warpgroup waits or
arrives around registers an in-flight wgmma uses; each cost the kernel measurably (bench/results/profiles/
attn_cuda_*). Spills: the loop reloads a few descriptor words per tile (36 bytes today); more means a change
pushed the consumers past their 192 registers."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SRC = os.path.join(ROOT, "csrc", "attention", "sparse_attn_fwd.cu")
MAX_SPILL_BYTES = 64


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_ptxas_keeps_the_wgmma_pipeline(tmp_path):
    out = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-I", os.path.join(ROOT, "csrc"),
         "-Xptxas", "-v", "-c", SRC, "-o", str(tmp_path / "attn.o")],
        capture_output=True, text=True, timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    for code in ("C7515", "C7517", "C7519"):
        assert code not in log, f"ptxas {code}: " + next(l for l in log.splitlines() if code in l)
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) <= MAX_SPILL_BYTES, log[-2000:]
