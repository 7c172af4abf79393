"""The CUDA (sm_90a) attention loop behind ``sparse_attn_*``: the layouts its launcher adapts, and "auto".

The kernel itself is tested with every other backend by test_attention.py (BACKENDS includes "cuda" on an sm_90
GPU with v4kernels._C built): reference agreement over hypothesis shapes, invalid indices, empty queries, ring
windows, splits, head blocks, CUDA graphs, NaN-poisoned outputs."""
import pytest
import torch

from v4kernels._ext import cuda_backend_available
from v4kernels.ops import attention as A
from v4kernels.testing import make_generator

from _attn_build import decode_view, make_case

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and cuda_backend_available(torch.device("cuda"))),
                       reason="needs an sm_90 GPU and v4kernels._C"),
]


@pytest.mark.parametrize("splits", [1, 3])
def test_misaligned_views_give_the_same_result(splits):
    """q rows not 16-byte aligned (copied for the kernel), out at an odd bf16 offset and lse as a strided view
    (written through temporaries): bit-identical to the aligned call."""
    g = make_generator("cuda-views")
    case = make_case(g, "csa", [700, 300], [2, 1], 64, wps=64, cps=16, topk=64, device="cuda")
    T, H = case["q"].shape[:2]
    ref_out, ref_lse = A.sparse_attn_prefill(**case, num_splits=splits, backend="cuda")

    qbig = torch.zeros(T, H, 520, dtype=torch.bfloat16, device="cuda")
    qbig[:, :, 1:513] = case["q"]
    obig = torch.full((T * H * 512 + 1,), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = obig[1:].view(T, H, 512)  # contiguous, data pointer 2 bytes past an allocation
    lse = torch.full((T, H), float("nan"), device="cuda")
    A.sparse_attn_prefill(**{**case, "q": qbig[:, :, 1:513]}, num_splits=splits, out=out, lse_out=lse,
                          backend="cuda")
    assert torch.equal(out, ref_out)
    assert torch.equal(lse, ref_lse)


def test_decode_cuda_matches_triton_closely():
    """Same inputs, the two kernels: they differ only in the order of fp32 sums (bf16 outputs mostly equal)."""
    g = make_generator("cuda-vs-triton")
    case = make_case(g, "hca", [40000, 9000, 300], [1, 1, 1], 128, wps=64, cps=64, device="cuda")
    d = decode_view(case, 1)
    oc, lc = A.sparse_attn_decode(**d, backend="cuda")
    ot, lt = A.sparse_attn_decode(**d, backend="triton")
    diff = (oc.float() - ot.float()).abs()
    assert diff.max().item() <= 2 * 2 ** -8 * ot.float().abs().max().item()
    assert (diff == 0).float().mean().item() > 0.5
    torch.testing.assert_close(lc, lt, atol=1e-4, rtol=1e-5)


def test_auto_picks_cuda_on_sm90():
    """The CUDA loop was faster than Triton at every decode and prefill shape of the benchmark (H100)."""
    from v4kernels._dispatch import OPS

    g = make_generator("cuda-auto")
    case = make_case(g, "swa", [300, 40], [1, 1], 64, wps=64, device="cuda")
    A.sparse_attn_decode(**decode_view(case, 1))
    assert OPS["sparse_attn_decode"].last_backend == "cuda"
    A.sparse_attn_prefill(**case)
    assert OPS["sparse_attn_prefill"].last_backend == "cuda"
