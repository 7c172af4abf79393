"""mHC ops (spec §7): reference vs the model's formulas, Triton kernels vs the reference.

Bitwise: mhc_post, and y of mhc_pre/mhc_head given the kernel's own pre weights (fixed-order
4-term fp32 sums). Tolerance: pre/post/comb (4d-long dot products summed in another order), see
the module docstring of v4kernels.ops.mhc.
"""
import math
import os
import shutil

import pytest
import torch
from hypothesis import given, strategies as st

from v4kernels.ops import mhc as ops
from v4kernels.reference import mhc as ref
from v4kernels.testing import (assert_bitwise_equal as _assert_bitwise_equal, assert_close, assert_all_written, calc_diff,
                               kernel_backends, make_generator, run_opcheck, sm90a_ptxas_spills)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
BACKENDS = kernel_backends("mhc_pre")
POST_BACKENDS = kernel_backends("mhc_post")
HEAD_BACKENDS = kernel_backends("mhc_head")
# Tested bounds of kernel vs reference (see ops/mhc.py docstring):
W_ATOL = 1e-5  # pre / post / comb, absolute (they lie in (0, 2))
W_V4 = 2e-5  # the same at V4 widths (4d = 16384 / 28672 products per logit)
Y_RTOL = 2.0 ** -7  # y: one bf16 ulp (relative 2^-8) either side, plus headroom for ties
DS_COL_TOL = 1e-5  # |colsum - 1| after the final column normalisation (eps/colsum + fp32 rounding)
DS_ROW_TOL = 1e-5  # |rowsum - 1| after 20 iterations, on well-conditioned logits (std <= 0.5)
DS_ROW_TOL_ANY = 0.1  # |rowsum - 1| for logits of std up to 5: 20 iterations do not converge further


def assert_bitwise_equal(out, want, name="out"):
    # testing.assert_bitwise_equal cannot reshape 0-element tensors (T = 0): compare those by shape/dtype
    if out.numel() == 0:
        assert out.shape == want.shape and out.dtype == want.dtype, name
        return
    _assert_bitwise_equal(out, want, name)


def _params(gen, d, nmix=24, nscale=3, fn_scale=2.0):
    fn = torch.randn(nmix, 4 * d, generator=gen) * (fn_scale / math.sqrt(4 * d))  # mix ~ N(0, fn_scale^2)
    base = torch.randn(nmix, generator=gen)
    scale = torch.rand(nscale, generator=gen) + 0.5
    return fn, base, scale


def _streams(gen, t, d, dtype=torch.bfloat16, magnitude=1.0):
    return (torch.randn(t, 4, d, generator=gen) * magnitude).to(dtype)


def _to(dev, *ts):
    return [t.to(dev) for t in ts]


def _model_hc_pre(x, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6):
    """The V4 model's hc_pre + hc_split_sinkhorn, written as the model writes it (torch.sum forms)."""
    shape, dtype = x.size(), x.dtype
    xf = x.flatten(1).float()
    rsqrt = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    mixes = torch.nn.functional.linear(xf, fn) * rsqrt
    pre = torch.sigmoid(mixes[:, :4] * scale[0] + base[:4]) + eps
    post = 2 * torch.sigmoid(mixes[:, 4:8] * scale[1] + base[4:8])
    comb = (mixes[:, 8:] * scale[2] + base[8:]).view(-1, 4, 4)
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    y = torch.sum(pre.unsqueeze(-1) * xf.view(shape), dim=1)
    return y.to(torch.bfloat16), post, comb


def _model_hc_post(out, x, post, comb):
    y = post.unsqueeze(-1) * out.unsqueeze(-2) + torch.sum(comb.unsqueeze(-1) * x.unsqueeze(-2), dim=1)
    return y.to(x.dtype)


# ---------------------------------------------------------------- reference = the model's formulas
def test_reference_equals_model_formulas(gen):
    d = 64
    x = _streams(gen, 9, d)
    fn, base, scale = _params(gen, d)
    for a, b, name in zip(ref.mhc_pre(x, fn, base, scale), _model_hc_pre(x, fn, base, scale), ("y", "post", "comb")):
        assert_bitwise_equal(a, b, name)
    y, post, comb = ref.mhc_pre(x, fn, base, scale)
    out = torch.randn(9, d, generator=gen).bfloat16()
    assert_bitwise_equal(ref.mhc_post(out, x, post, comb), _model_hc_post(out, x, post, comb), "x_new")


def test_reference_post_is_transposed_comb(gen):
    # X_new[j] = post_j out + Σ_i C[i][j] X_i: with C a permutation matrix P (C[i][p(i)] = 1), stream p(i) gets X_i
    d = 32
    x = _streams(gen, 3, d, torch.float32)
    perm = [2, 0, 3, 1]
    comb = torch.zeros(3, 4, 4)
    for i, j in enumerate(perm):
        comb[:, i, j] = 1.0
    xn = ref.mhc_post(torch.zeros(3, d), x, torch.zeros(3, 4), comb)
    for i, j in enumerate(perm):
        assert torch.equal(xn[:, j], x[:, i])


@pytest.mark.parametrize("std,row_tol", [(0.5, DS_ROW_TOL), (5.0, DS_ROW_TOL_ANY)])
def test_reference_sinkhorn_doubly_stochastic(std, row_tol, gen):
    c = ref.sinkhorn(torch.randn(4096, 4, 4, generator=gen) * std)
    assert (c >= 0).all()
    assert (c.sum(-2) - 1).abs().max() <= DS_COL_TOL
    assert (c.sum(-1) - 1).abs().max() <= row_tol


# ---------------------------------------------------------------- kernels vs reference
def _check_pre_outputs(got, want, name="", w_atol=W_ATOL, y_atol=1e-6):
    y, post, comb = got
    yr, pr, cr = want
    assert_close(post.cpu(), pr, atol=w_atol, rtol=0, name=f"post{name}")
    assert_close(comb.cpu(), cr, atol=w_atol, rtol=0, name=f"comb{name}")
    assert_close(y.cpu().float(), yr.float(), atol=y_atol, rtol=Y_RTOL, name=f"y{name}")


CASES = [  # (T, d, why)
    (1, 64, "decode: one token, split-K path"),
    (5, 32, "tokens not a multiple of the 16-token block"),
    (16, 16, "smallest d"),
    (40, 64, "fused path, 32-token blocks"),
    (130, 16, "fused path, 64-token blocks, ragged last block"),
    (0, 64, "empty batch"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T,d", [c[:2] for c in CASES], ids=[c[2] for c in CASES])
def test_mhc_pre_kernel_vs_reference(backend, dtype, T, d, gen, device):
    if backend == "cuda" and dtype != torch.bfloat16:
        pytest.skip("the CUDA hc_pre kernel takes bf16 streams (fp32 streams run the Triton kernel)")
    x = _streams(gen, T, d, dtype)
    fn, base, scale = _params(gen, d)
    want = ref.mhc_pre(x, fn, base, scale)
    got = ops.mhc_pre(*_to(device, x, fn, base, scale), backend=backend)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert got[0].shape == (T, d) and got[1].shape == (T, 4) and got[2].shape == (T, 4, 4)
    _check_pre_outputs(got, want)


PATHS = {  # tiling of the Triton hc_pre: split-K path (split, d_split) or streaming path (stream, K slice)
    "fused": dict(split=1, d_split=1), "k2": dict(split=2, d_split=1), "k3-d2": dict(split=3, d_split=2),
    "k4-d3": dict(split=4, d_split=3),
    "stream": dict(stream=True), "stream-ks32": dict(stream=True, ks=32), "stream-ks256": dict(stream=True, ks=256),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("path", list(PATHS))
def test_triton_pre_paths_y_bitwise_given_pre(path, dtype, gen, device):
    """Every tiling gives y == bf16(Σ pre_i X_i) bitwise for its own pre, and pre/post/comb within tolerance."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    from v4kernels.triton import mhc as tri

    T, d = 21, 64
    x = _streams(gen, T, d, dtype)
    fn, base, scale = _params(gen, d)
    y, post, comb, pre = tri.mhc_pre(*_to(device, x, fn, base, scale), return_pre=True, **PATHS[path])
    assert_bitwise_equal(y.cpu(), ref.weighted_sum(x, pre.cpu()).to(torch.bfloat16), "y given pre")
    assert_close(pre.cpu(), ref.mhc_pre_weights(x, fn, base, scale), atol=W_ATOL, rtol=0, name="pre")
    _check_pre_outputs((y, post, comb), ref.mhc_pre(x, fn, base, scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e3, 1e4])
def test_mhc_pre_large_magnitude_streams(backend, magnitude, gen, device):
    T, d = 18, 64
    x = _streams(gen, T, d, magnitude=magnitude)
    x[::3] *= 7.0  # tokens of different magnitudes in one block: the RMS statistic is per token
    fn, base, scale = _params(gen, d)
    got = ops.mhc_pre(*_to(device, x, fn, base, scale), backend=backend)
    _check_pre_outputs(got, ref.mhc_pre(x, fn, base, scale))


def _degenerate_base(kind, gen):
    base = torch.randn(24, generator=gen)
    hot = torch.full((4, 4), -40.0)
    if kind == "same-column":  # every row one-hot in column 0: columns 1..3 hold only eps, slow Sinkhorn
        hot[:, 0] = 40.0
    elif kind == "permutation":
        hot[torch.arange(4), torch.tensor([1, 3, 0, 2])] = 40.0
    else:  # "two-rows-tied": rows 0 and 1 one-hot in the same column, rows 2/3 split between two columns
        hot[0, 2] = hot[1, 2] = 40.0
        hot[2, 0] = hot[2, 1] = hot[3, 0] = hot[3, 1] = 40.0
    base[8:] = hot.flatten()
    return base


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["same-column", "permutation", "two-rows-tied"])
def test_mhc_pre_degenerate_sinkhorn(backend, kind, gen, device):
    T, d = 17, 32
    x = _streams(gen, T, d)
    fn, _, scale = _params(gen, d)
    base = _degenerate_base(kind, gen)
    want = ref.mhc_pre(x, fn, base, scale)
    got = ops.mhc_pre(*_to(device, x, fn, base, scale), backend=backend)
    _check_pre_outputs(got, want)
    col = got[2].cpu().sum(-2)
    assert (col - 1).abs().max() <= DS_COL_TOL  # columns: always, last step is a column normalisation
    if kind == "permutation":
        assert (got[2].cpu().sum(-1) - 1).abs().max() <= DS_ROW_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_mhc_pre_doubly_stochastic(backend, gen, device):
    T, d = 33, 32
    x = _streams(gen, T, d)
    fn, base, scale = _params(gen, d, fn_scale=0.3)
    base = base * 0.2  # well-conditioned logits (std < 0.5): 20 iterations converge to fp32 precision
    _, _, comb = ops.mhc_pre(*_to(device, x, fn, base, scale), backend=backend)
    comb = comb.cpu()
    assert (comb >= 0).all()
    assert (comb.sum(-2) - 1).abs().max() <= DS_COL_TOL
    assert (comb.sum(-1) - 1).abs().max() <= DS_ROW_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@given(T=st.integers(0, 40), d=st.sampled_from([16, 48, 64]), seed=st.integers(0, 2**31))
def test_mhc_pre_hypothesis_tokens(backend, T, d, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = make_generator(seed)
    x = _streams(g, T, d)
    fn, base, scale = _params(g, d)
    got = ops.mhc_pre(*_to(dev, x, fn, base, scale), backend=backend)
    _check_pre_outputs(got, ref.mhc_pre(x, fn, base, scale))


@pytest.mark.parametrize("T,d", [(1, 16), (5, 48), (40, 64), (70, 32)])
@pytest.mark.parametrize("head", [False, True], ids=["pre", "head"])
def test_triton_stream_path(T, d, head, gen, device):
    """The streaming kernel (producers, finisher, consumers) at ragged T and several K slices per token."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    from v4kernels.triton import mhc as tri

    x = _streams(gen, T, d, magnitude=3.0)
    if head:
        fn, base, scale = _params(gen, d, nmix=4, nscale=1)
        y, pre = tri.mhc_head(*_to(device, x, fn, base, scale), stream=True, return_pre=True)
        assert_close(y.cpu().float(), ref.mhc_head(x, fn, base, scale).float(), atol=1e-6, rtol=Y_RTOL, name="y")
        assert_close(pre.cpu(), ref.mhc_head_weights(x, fn, base, scale), atol=W_ATOL, rtol=0, name="pre")
    else:
        fn, base, scale = _params(gen, d)
        y, post, comb, pre = tri.mhc_pre(*_to(device, x, fn, base, scale), stream=True, return_pre=True)
        _check_pre_outputs((y, post, comb), ref.mhc_pre(x, fn, base, scale))
        assert_close(pre.cpu(), ref.mhc_pre_weights(x, fn, base, scale), atol=W_ATOL, rtol=0, name="pre")
    assert_bitwise_equal(y.cpu(), ref.weighted_sum(x, pre.cpu()).to(torch.bfloat16), "y given pre")
    if not head:  # same bytes again (the finisher of a block is whichever producer arrives last)
        again = tri.mhc_pre(*_to(device, x, fn, base, scale), stream=True)
        for a, b, n in zip(again, (y, post, comb), ("y", "post", "comb")):
            assert_bitwise_equal(a, b, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mhc_pre_deterministic(backend, gen, device):
    for T in (3, 40):  # split-K path and fused path
        x = _streams(gen, T, 64)
        args = _to(device, x, *_params(gen, 64))
        first = ops.mhc_pre(*args, backend=backend)
        for _ in range(2):
            again = ops.mhc_pre(*args, backend=backend)
            for a, b, n in zip(again, first, ("y", "post", "comb")):
                assert_bitwise_equal(a, b, n)


# ---------------------------------------------------------------- mhc_post
@pytest.mark.parametrize("backend", POST_BACKENDS)
@pytest.mark.parametrize("xdtype,odtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32)], ids=["bf16", "fp32", "x-bf16-out-fp32"])
@pytest.mark.parametrize("T,d", [(1, 64), (7, 48), (0, 16), (19, 80)])
def test_mhc_post_bitwise(backend, xdtype, odtype, T, d, gen, device):
    x = _streams(gen, T, d, xdtype, magnitude=100.0)
    out = torch.randn(T, d, generator=gen).to(odtype)
    post = torch.rand(T, 4, generator=gen) * 2
    comb = ref.sinkhorn(torch.randn(T, 4, 4, generator=gen))
    want = ref.mhc_post(out, x, post, comb)
    got = ops.mhc_post(*_to(device, out, x, post, comb), backend=backend)
    assert got.dtype == xdtype and got.shape == (T, 4, d)
    assert_all_written(got)
    assert_bitwise_equal(got.cpu(), want, "x_new")


@pytest.mark.parametrize("backend", POST_BACKENDS)
@given(T=st.integers(0, 30), d=st.sampled_from([16, 32, 96]), seed=st.integers(0, 2**31))
def test_mhc_post_hypothesis(backend, T, d, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = make_generator(seed)
    x = _streams(g, T, d, magnitude=1e3)
    out = torch.randn(T, d, generator=g).bfloat16()
    post = torch.rand(T, 4, generator=g) * 2
    comb = torch.rand(T, 4, 4, generator=g)
    got = ops.mhc_post(*_to(dev, out, x, post, comb), backend=backend)
    assert_bitwise_equal(got.cpu(), ref.mhc_post(out, x, post, comb), "x_new")


# ---------------------------------------------------------------- mhc_head
@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("T,d", [(1, 64), (23, 32), (0, 16)])
def test_mhc_head_kernel(backend, T, d, gen, device):
    x = _streams(gen, T, d, magnitude=30.0)
    fn, base, scale = _params(gen, d, nmix=4, nscale=1)
    want = ref.mhc_head(x, fn, base, scale)
    got = ops.mhc_head(*_to(device, x, fn, base, scale), backend=backend)
    assert got.dtype == torch.bfloat16 and got.shape == (T, d)
    assert_close(got.cpu().float(), want.float(), atol=1e-6, rtol=Y_RTOL, name="y")
    if backend == "triton":
        from v4kernels.triton import mhc as tri

        y, pre = tri.mhc_head(*_to(device, x, fn, base, scale), return_pre=True)
        assert_bitwise_equal(y.cpu(), ref.weighted_sum(x, pre.cpu()).to(torch.bfloat16), "y given pre")
        assert_close(pre.cpu(), ref.mhc_head_weights(x, fn, base, scale), atol=W_ATOL, rtol=0, name="pre")


def test_head_reference_formula(gen):
    d = 32
    x = _streams(gen, 6, d)
    fn, base, scale = _params(gen, d, nmix=4, nscale=1)
    xf = x.flatten(1).float()
    mix = torch.nn.functional.linear(xf, fn) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(mix * scale + base) + 1e-6
    want = torch.sum(pre.unsqueeze(-1) * x.float(), dim=1).bfloat16()
    assert_bitwise_equal(ref.mhc_head(x, fn, base, scale), want)


# ---------------------------------------------------------------- API: leading dims, errors, opcheck
def test_leading_dims(gen):
    d = 32
    x = _streams(gen, 6, d).view(2, 3, 4, d)
    fn, base, scale = _params(gen, d)
    y, post, comb = ops.mhc_pre(x, fn, base, scale)
    assert y.shape == (2, 3, d) and post.shape == (2, 3, 4) and comb.shape == (2, 3, 4, 4)
    yf, _, _ = ops.mhc_pre(x.view(6, 4, d), fn, base, scale)
    assert torch.equal(y.view(6, d), yf)
    xn = ops.mhc_post(y, x, post, comb)
    assert xn.shape == x.shape


def test_bad_inputs_raise_typed_errors():
    d = 32
    x = torch.randn(3, 4, d).bfloat16()
    fn, base, scale = torch.randn(24, 4 * d), torch.randn(24), torch.rand(3)
    pre = torch.ops.v4kernels.mhc_pre
    with pytest.raises(ValueError, match=r"fn: expected shape \(24, 128\), got \(24, 64\)"):
        pre(x, fn[:, :64], base, scale)
    with pytest.raises(ValueError, match=r"fn: expected shape \(24, 128\), got \(4, 128\)"):
        pre(x, fn[:4], base, scale)
    with pytest.raises(ValueError, match=r"x: expected shape \(T, 4, d\).*got \(3, 2, 32\)"):
        pre(x[:, :2], fn, base, scale)
    with pytest.raises(ValueError, match=r"x: expected a 3-d tensor, got shape \(12, 32\)"):
        pre(x.view(12, d), fn, base, scale)
    with pytest.raises(ValueError, match=r"d\).*multiple of 16, got 24"):
        pre(torch.randn(3, 4, 24).bfloat16(), torch.randn(24, 96), base, scale)
    with pytest.raises(TypeError, match="x: expected dtype torch.bfloat16 or torch.float32, got torch.float16"):
        pre(x.half(), fn, base, scale)
    with pytest.raises(TypeError, match="fn: expected dtype torch.float32, got torch.bfloat16"):
        pre(x, fn.bfloat16(), base, scale)
    with pytest.raises(ValueError, match=r"base: expected shape \(24\)"):
        pre(x, fn, base[:4], scale)
    with pytest.raises(ValueError, match=r"scale: expected shape \(3\)"):
        pre(x, fn, base, scale[:1])
    with pytest.raises(ValueError, match="sinkhorn_iters: expected a value in"):
        pre(x, fn, base, scale, 1e-6, 1e-6, 0)
    with pytest.raises(ValueError, match=r"fn: expected shape \(4, 128\)"):
        torch.ops.v4kernels.mhc_head(x, fn, base[:4], scale[:1])
    with pytest.raises(ValueError, match=r"scale: expected shape \(1\)"):
        torch.ops.v4kernels.mhc_head(x, fn[:4], base[:4], scale)
    post_op = torch.ops.v4kernels.mhc_post
    out, post, comb = torch.randn(3, d).bfloat16(), torch.rand(3, 4), torch.rand(3, 4, 4)
    with pytest.raises(ValueError, match=r"out: expected shape \(3, 32\), got \(2, 32\)"):
        post_op(out[:2], x, post, comb)
    with pytest.raises(ValueError, match=r"comb: expected a 3-d tensor, got shape \(3, 16\)"):
        post_op(out, x, post, comb.view(3, 16))
    with pytest.raises(TypeError, match="post: expected dtype torch.float32, got torch.bfloat16"):
        post_op(out, x, post.bfloat16(), comb)
    with pytest.raises(TypeError, match="out: expected dtype"):
        post_op(out.to(torch.int32), x, post, comb)
    with pytest.raises(ValueError, match="backend: expected one of"):
        pre(x, fn, base, scale, backend="nope")


def test_opcheck(gen, device):
    d = 32
    x = _streams(gen, 5, d).to(device)
    fn, base, scale = _to(device, *_params(gen, d))
    run_opcheck(torch.ops.v4kernels.mhc_pre.default, (x, fn, base, scale))
    y, post, comb = ops.mhc_pre(x, fn, base, scale)
    run_opcheck(torch.ops.v4kernels.mhc_post.default, (y, x, post, comb))
    fh, bh, sh = _to(device, *_params(gen, d, nmix=4, nscale=1))
    run_opcheck(torch.ops.v4kernels.mhc_head.default, (x, fh, bh, sh))
    for backend in BACKENDS:  # the kernels' outputs have the fake's shapes/dtypes too
        run_opcheck(torch.ops.v4kernels.mhc_pre.default, (x, fn, base, scale), {"backend": backend},
                    test_utils=("test_schema", "test_faketensor"))
        run_opcheck(torch.ops.v4kernels.mhc_post.default, (y, x, post, comb), {"backend": backend},
                    test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- GPU: V4 widths, graphs, compile
@pytest.mark.cuda
@pytest.mark.parametrize("d", [4096, 7168], ids=["flash", "pro"])
@pytest.mark.parametrize("T", [1, 64, 1000, 4096])
def test_cuda_v4_widths(d, T):
    g = make_generator(f"cuda-{d}-{T}")
    x = _streams(g, T, d)
    fn, base, scale = _params(g, d)
    want = ref.mhc_pre(x, fn, base, scale)
    for backend in BACKENDS:
        args = _to("cuda", x, fn, base, scale)
        got = ops.mhc_pre(*args, backend=backend)
        # The reference here is the CPU's BLAS order over 4d = 16384 / 28672 products (1.3e-6 from a
        # float64 evaluation at d = 7168); the kernel sums in tensor-core tile order, promoting each
        # K block to an IEEE fp32 sum (chained MMA accumulation was 2.4e-4 off on the H100). y may
        # differ by ~4 * W_V4 * max|X| where the 4-stream sum cancels. Tighter bounds hold at the
        # small widths above.
        _check_pre_outputs(got, want, f"[{backend}]", w_atol=W_V4, y_atol=1e-3)
        assert calc_diff(got[0].cpu(), want[0]) < 1e-7
        for a, b in zip(got[1:], want[1:]):
            assert calc_diff(a.cpu(), b) < 1e-9
        again = ops.mhc_pre(*args, backend=backend)
        for a, b in zip(again, got):
            assert_bitwise_equal(a, b)
        from v4kernels.triton import mhc as tri

        y, _, _, pre = tri.mhc_pre(*args, return_pre=True)
        assert_bitwise_equal(y.cpu(), ref.weighted_sum(x, pre.cpu()).to(torch.bfloat16), "y given pre")
        out = torch.randn(T, d, generator=g).bfloat16()
        xn = ops.mhc_post(*_to("cuda", out, x, want[1], want[2]), backend=backend)
        assert_bitwise_equal(xn.cpu(), ref.mhc_post(out, x, want[1], want[2]))


@pytest.mark.cuda
@pytest.mark.parametrize("d", [4096, 7168], ids=["flash", "pro"])
@pytest.mark.parametrize("T", [1000, 4096])
def test_cuda_stream_and_split_paths(d, T):
    """Both Triton tilings at V4 widths: y bitwise given the kernel's own pre, the weights within the
    tolerance of test_cuda_v4_widths, and the two tilings within that tolerance of each other; the
    streaming path's outputs do not depend on the batch (tiling fixed by d, a token's sums do not
    depend on its neighbours)."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton backend")
    from v4kernels.triton import mhc as tri

    g = make_generator(f"paths-{d}-{T}")
    x = _streams(g, T, d)
    fn, base, scale = _params(g, d)
    args = _to("cuda", x, fn, base, scale)
    want = ref.mhc_pre(x, fn, base, scale)
    outs = {}
    for name, kw in (("stream", dict(stream=True)), ("split", dict(stream=False))):
        y, post, comb, pre = tri.mhc_pre(*args, return_pre=True, **kw)
        assert_bitwise_equal(y.cpu(), ref.weighted_sum(x, pre.cpu()).to(torch.bfloat16), f"y given pre [{name}]")
        _check_pre_outputs((y, post, comb), want, f"[{name}]", w_atol=W_V4, y_atol=1e-3)
        outs[name] = (post.cpu(), comb.cpu())
    for a, b in zip(outs["stream"], outs["split"]):
        assert_close(a, b, atol=W_V4, rtol=0, name="stream vs split")
    # batch invariance of the streaming tiling: the first 300 tokens alone give the same bytes
    y1, p1, c1 = tri.mhc_pre(args[0][:300].contiguous(), *args[1:], stream=True)
    yf, pf, cf = tri.mhc_pre(*args, stream=True)
    for a, b, n in zip((y1, p1, c1), (yf[:300], pf[:300], cf[:300]), ("y", "post", "comb")):
        assert_bitwise_equal(a, b, n)
    yh, preh = tri.mhc_head(args[0], fn[:4].cuda(), base[:4].cuda(), scale[:1].cuda(), stream=True, return_pre=True)
    assert_bitwise_equal(yh.cpu(), ref.weighted_sum(x, preh.cpu()).to(torch.bfloat16), "head y given pre")
    assert_close(preh.cpu(), ref.mhc_head_weights(x, fn[:4], base[:4], scale[:1]), atol=W_V4, rtol=0, name="head pre")


@pytest.mark.cuda
@pytest.mark.parametrize("T", [8, 1024], ids=["split", "stream"])
def test_cuda_graph_and_compile(T):
    g = make_generator("graph")
    d = 4096
    x, fn, base, scale = _to("cuda", _streams(g, T, d), *_params(g, d))
    for backend in BACKENDS:
        want = ops.mhc_pre(x, fn, base, scale, backend=backend)
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg):
            got = ops.mhc_pre(x, fn, base, scale, backend=backend)
        cg.replay()
        torch.cuda.synchronize()
        for a, b in zip(got, want):
            assert_bitwise_equal(a, b)
        f = torch.compile(lambda *a: ops.mhc_pre(*a, backend=backend), fullgraph=True)
        for a, b in zip(f(x, fn, base, scale), want):
            assert_bitwise_equal(a, b)


def test_cuda_pre_plan():
    """The CUDA kernel's plan (CPU): channel slices a multiple of 8 covering d with at most min(SMs, 128) CTAs,
    the last slice non-empty, and a ring of >= 2 tiles that fits the shared memory the launcher allows."""
    from v4kernels.cuda import mhc as cu

    for sms in (132, 114, 78):
        for d in (16, 48, 64, 1536, 4096, 7168, 8192):
            ch, nc, stages = cu.plan(d, sms)
            assert ch % 8 == 0 and nc <= min(sms, cu.MAX_SLICES) and (nc - 1) * ch < d <= nc * ch, (d, sms)
            row = (4 * ch + 8) * 2
            assert 2 <= stages <= cu.MAX_STAGES and 3 * 24 * row + stages * cu.TILE * row <= cu.SMEM_BUDGET


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_pre_compiles_without_spills(tmp_path):
    """csrc/mhc/mhc_pre.cu for sm_90a (CPU): no register spills (15 warps at 128 registers)."""
    spills = sm90a_ptxas_spills(os.path.join(ROOT, "csrc", "mhc", "mhc_pre.cu"), str(tmp_path))
    assert spills == [0], spills


@pytest.mark.cuda
@pytest.mark.parametrize("T,d", [(1000, 4096), (700, 7168), (130, 64), (5, 48), (64, 16), (300, 1536)])
def test_cuda_pre_kernel(T, d):
    """The CUDA hc_pre kernel: every output written (NaN-poisoned buffers), y bitwise given its own pre,
    the weights within the tolerance of their width, the same bytes on a repeated call, for a prefix of
    the batch alone (channel slices fixed by d) and with other ring depths (2, 3 tiles: more waits on
    stage reuse), T not a multiple of the 64-token tile, d = 48 (slices of 8 channels, 6 CTAs), d = 1536
    (16 channels per slice: no k8 tail), the V4 widths (32 / 56 channels: a k8 tail at 56). The timeline
    trace fills every event of every tile."""
    if "cuda" not in BACKENDS:
        pytest.skip("v4kernels._C (sm_90a) not available")
    from v4kernels.cuda import mhc as cu
    from v4kernels.testing import poisoned

    g = make_generator(f"cuda-pre-{T}-{d}")
    x = _streams(g, T, d, magnitude=3.0)
    fn, base, scale = _params(g, d)
    args = _to("cuda", x, fn, base, scale)
    out = (poisoned((T, d), torch.bfloat16, "cuda"), poisoned((T, 4), torch.float32, "cuda"),
           poisoned((T, 4, 4), torch.float32, "cuda"), poisoned((T, 4), torch.float32, "cuda"))
    y, post, comb, pre = cu.mhc_pre(*args, return_pre=True, out=out)
    for t, n in zip((y, post, comb, pre), ("y", "post", "comb", "pre")):
        assert_all_written(t, n)
    w_atol = W_V4 if d >= 1024 else W_ATOL
    want = ref.mhc_pre(x, fn, base, scale)
    _check_pre_outputs((y, post, comb), want, "[cuda]", w_atol=w_atol, y_atol=1e-3 if d >= 1024 else 1e-6)
    assert_close(pre.cpu(), ref.mhc_pre_weights(x, fn, base, scale), atol=w_atol, rtol=0, name="pre")
    assert_bitwise_equal(y.cpu(), ref.weighted_sum(x, pre.cpu()).to(torch.bfloat16), "y given pre")
    again = cu.mhc_pre(*args)
    for a, b, n in zip(again, (y, post, comb), ("y", "post", "comb")):
        assert_bitwise_equal(a, b, n)
    k = min(T, 77)
    part = cu.mhc_pre(args[0][:k].contiguous(), *args[1:])
    for a, b, n in zip(part, (y[:k], post[:k], comb[:k]), ("y", "post", "comb")):
        assert_bitwise_equal(a, b, n)
    for stages in (2, 3):
        for a, b, n in zip(cu.mhc_pre(*args, stages=stages), (y, post, comb), ("y", "post", "comb")):
            assert_bitwise_equal(a, b, f"{n} ({stages} stages)")
    ch, nc, _ = cu.plan(d, torch.cuda.get_device_properties(0).multi_processor_count)
    nt = -(-T // cu.TILE)
    trace = torch.zeros((nt, 9 + 2 * nc), dtype=torch.int64, device="cuda")
    cu.mhc_pre(*args, trace=trace)
    assert bool((trace > 0).all())
    assert bool((trace[:, 1] >= trace[:, 0]).all()) and bool((trace[:, 2] >= trace[:, 1]).all())
