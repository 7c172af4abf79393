"""The CUDA attention loop compiles for sm_90a without what made it slow on the way (CPU test, needs nvcc).

ptxas reports (C7515) when it serialises wgmma instructions, (C7517 / C7519) when it injects warpgroup waits or
arrives around registers an in-flight wgmma uses; each cost the kernel measurably (bench/results/profiles/
attn_cuda_*). Spills: the loop reloads a few descriptor words per tile (36 bytes today); more means a change
pushed the consumers past their 192 registers."""
import os
import shutil

import pytest

from v4kernels.testing import sm90a_ptxas_spills

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SRC = os.path.join(ROOT, "csrc", "attention", "sparse_attn_fwd.cu")
MAX_SPILL_BYTES = 64


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_ptxas_keeps_the_wgmma_pipeline(tmp_path):
    spills = sm90a_ptxas_spills(SRC, str(tmp_path))
    assert spills and max(spills) <= MAX_SPILL_BYTES, spills
