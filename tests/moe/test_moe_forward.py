"""The MoE layer (spec §8): the chain of ops == the reference's per-expert loop."""
import pytest
import torch

from _moe_helpers import activations, fp8_weight, mxfp4_experts
from v4kernels.ops import moe as ops
from v4kernels.reference import moe as ref
from v4kernels.testing import assert_bitwise_equal, calc_diff, kernel_backends

BACKENDS = kernel_backends("moe_grouped_gemm_mxfp4")


def _layer(gen, E=8, d=128, inter=128, shared=True):
    p = {}
    p["gate_weight"] = (torch.randn(E, d, generator=gen) * d ** -0.5).bfloat16()
    p["gate_bias"] = torch.randn(E, generator=gen) * 0.05
    p["w1"], p["w1_scale"] = mxfp4_experts(gen, E, inter, d, scale=0.2)
    p["w3"], p["w3_scale"] = mxfp4_experts(gen, E, inter, d, scale=0.2)
    p["w2"], p["w2_scale"] = mxfp4_experts(gen, E, d, inter, scale=0.2)
    if shared:
        for n, (N, K) in (("shared_w1", (inter, d)), ("shared_w3", (inter, d)), ("shared_w2", (d, inter))):
            p[n], p[n + "_scale"] = fp8_weight(gen, N, K, scale=0.1)
    return p


def _call(fn, x, p, **kw):
    args = [p[k] for k in ("gate_weight", "gate_bias", "w1", "w1_scale", "w3", "w3_scale", "w2", "w2_scale")]
    sh = [p.get(k) for k in ("shared_w1", "shared_w1_scale", "shared_w3", "shared_w3_scale", "shared_w2",
                             "shared_w2_scale")]
    return fn(x, *args, *sh, **kw)


@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
def test_reference_chain_equals_reference_loop(mode, gen):
    p = _layer(gen)
    x = activations(gen, 11, 128)
    want = _call(ref.moe_forward, x, p, topk=3, route_scale=1.5, mode=mode)
    out = _call(ops.moe_forward, x, p, topk=3, route_scale=1.5, mode=mode, backend="reference")
    assert_bitwise_equal(out, want)


def test_hash_layer_and_no_shared(gen):
    p = _layer(gen, shared=False)
    x = activations(gen, 2, 3 * 128)[:, :128].reshape(2, 1, 128)  # [b, s, d] input shape kept
    tid2eid = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(20)]).int()
    tok = torch.tensor([[4], [17]])
    kw = dict(topk=3, route_scale=2.5, tid2eid=tid2eid)
    want = _call(ref.moe_forward, x.reshape(2, 128), p, token_ids=tok.reshape(-1), **kw)
    out = _call(ops.moe_forward, x, p, token_ids=tok, backend="reference", **kw)
    assert out.shape == x.shape
    assert_bitwise_equal(out.reshape(2, 128), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
def test_kernels_chain_close_to_reference(backend, mode, gen, device):
    p = _layer(gen)
    x = activations(gen, 6, 128)
    want = _call(ref.moe_forward, x, p, topk=3, route_scale=1.5, mode=mode)
    pd = {k: v.to(device) for k, v in p.items()}
    out = _call(ops.moe_forward, x.to(device), pd, topk=3, route_scale=1.5, mode=mode, backend=backend)
    # A one-ulp bf16 difference in h can move an FP8 act-quant step downstream; two GEMMs deep the
    # bound is a few bf16 ulps of the output.
    ref_f = want.float()
    err = (out.cpu().float() - ref_f).abs()
    assert float(err.max()) <= 2.0 ** -5 * float(ref_f.abs().max()), float(err.max())
    assert calc_diff(out.cpu().float(), ref_f) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
@pytest.mark.parametrize("T", [1, 7, 300])
def test_gpu_layer_flash_like(mode, T, gen):
    """Real-GPU compile of every kernel config (decode and prefill tiles) at a reduced V4 shape."""
    p = _layer(gen, E=32, d=512, inter=256)
    x = activations(gen, T, 512)
    want = _call(ref.moe_forward, x, p, topk=6, route_scale=1.5, mode=mode)
    pd = {k: v.cuda() for k, v in p.items()}
    out = _call(ops.moe_forward, x.cuda(), pd, topk=6, route_scale=1.5, mode=mode, backend="triton")
    assert calc_diff(out.cpu().float(), want.float()) < 1e-4
    again = _call(ops.moe_forward, x.cuda(), pd, topk=6, route_scale=1.5, mode=mode, backend="triton")
    assert torch.equal(out.view(torch.int16), again.view(torch.int16))  # deterministic


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 5])
def test_gpu_layer_cuda_graph_capture(T, gen):
    """The decode-size layer (backend auto: the CUDA decode GEMMs) captured once in a CUDA graph and
    replayed on new activations copied into its input: each replay == an eager call on the same
    input, bitwise (routing, grouping and expert counts stay on the device: nothing syncs)."""
    p = {k: v.cuda() for k, v in _layer(gen, E=32, d=512, inter=256).items()}
    xs = [activations(gen, T, 512).cuda() for _ in range(3)]
    static = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the Triton kernels) outside the capture
        _call(ops.moe_forward, static, p, topk=6, route_scale=1.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _call(ops.moe_forward, static, p, topk=6, route_scale=1.5)
    for x in xs:
        static.copy_(x)
        graph.replay()
        want = _call(ops.moe_forward, x, p, topk=6, route_scale=1.5)
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))
