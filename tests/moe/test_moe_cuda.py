"""CUDA decode kernels of the MXFP4 grouped GEMMs (csrc/moe/mxfp4_decode.cu) vs the reference.

Weights: fresh random values quantized to MXFP4 per expert (per-32 scales spread over a few
binades); activations bf16 with varied 1x128 magnitudes (w4a8 quantizes them with act_quant_fp8,
as the reference does). Groups: 0..16 rows per expert (empty experts included), row ids with -1
(empty rows), rows after expert_offsets[E] (must come out 0), NaN-poisoned outputs.

Tolerance: the kernel sums each 32-K chunk on the tensor cores (fp8 MMA for w4a8, bf16 MMA for
w4a16), the chunks of a 128-K block before the activation scale, and its K-slices at the end; the
reference sums in fp32 chunk by chunk. The fp32 results differ by a few ulps (more in rare
cancellations), so an output may differ by one bf16 rounding step: |d| <= 2^-7 |ref| + 2^-8
max|ref| and calc_diff < 1e-5 (``assert_gemm_close``). Slot widths: 64 columns when there are
enough tiles for 2.5 per SM, else 48; ``test_slot_widths`` forces each on the same inputs.
"""
import pytest
import torch

from _moe_helpers import activations, assert_gemm_close, offsets_from_counts
from v4kernels.reference import linear as L
from v4kernels.reference import moe as ref
from v4kernels.testing import assert_all_written, make_generator, poisoned

MODES = ["w4a8", "w4a16"]
SHAPES = {"flash-w13": (4096, 2048), "flash-w2": (2048, 4096), "small": (512, 72)}  # (K, N)


def _cuda():
    from v4kernels.cuda import moe as cm  # noqa: F401  (imports torch.ops.v4kernels_C lazily)
    import v4kernels

    assert v4kernels.cuda_extension_loaded()
    return cm


def _experts(E, N, K, dev, seed, scale=0.05):
    """MXFP4 experts quantized on the device (fast for E=32 at Flash shapes)."""
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    ws, ss = [], []
    for _ in range(E):
        w = torch.randn(N, K, device=dev, generator=g) * scale
        binade = torch.randint(-2, 3, (N, K // 32), device=dev, generator=g).float()
        w = w * torch.exp2(binade).repeat_interleave(32, 1)
        p, s = L.quantize_weight_mxfp4(w)
        ws.append(p)
        ss.append(s)
    return torch.stack(ws), torch.stack(ss)


def _groups(gen, E, max_rows=16, tail=3, drop=0.15):
    """Random ragged groups: counts 0..max_rows (some experts empty), row ids into the activation rows
    (some -1), and `tail` rows after expert_offsets[E]."""
    counts = torch.randint(0, max_rows + 1, (E,), generator=gen)
    counts[torch.rand(E, generator=gen) < 0.3] = 0
    if int(counts.sum()) == 0:
        counts[E // 2] = 3
    off = offsets_from_counts(counts.tolist())
    M = int(off[-1]) + tail
    Ma = max(int(off[-1]), 1)
    row_ids = torch.randperm(Ma, generator=gen)[:M] if M <= Ma else torch.randint(0, Ma, (M,), generator=gen)
    row_ids = row_ids.to(torch.int32)
    row_ids[torch.rand(M, generator=gen) < drop] = -1
    return off, row_ids, Ma


def _bytes(E_active, N, K, n_mats=1):
    return E_active * n_mats * (N * K // 2 + N * K // 32)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("E", [1, 8, 32])
def test_decode_gemm_vs_reference(E, shape, mode):
    cm = _cuda()
    K, N = SHAPES[shape]
    dev = torch.device("cuda")
    gen = make_generator(f"gemm-{E}-{shape}-{mode}")
    w, s = _experts(E, N, K, dev, seed=E * 7 + K)
    off, row_ids, Ma = _groups(gen, E)
    x = activations(gen, Ma, K).to(dev)
    off, row_ids = off.to(dev), row_ids.to(dev)
    want = ref.moe_grouped_gemm_mxfp4(x, None, w, s, off, row_ids, mode)
    out = poisoned(want.shape, torch.bfloat16, dev)
    cm.moe_grouped_gemm_mxfp4_out(x, None, w, s, off, row_ids, mode, out)
    assert_all_written(out)
    assert_gemm_close(out, want)
    assert (out[int(off[-1]):] == 0).all()  # rows after the groups
    assert (out[row_ids.long() < 0] == 0).all()  # empty rows
    # the public-signature launcher, int64 offsets, and bitwise determinism
    again = cm.moe_grouped_gemm_mxfp4(x, None, w, s, off.long(), row_ids.long(), mode)
    assert torch.equal(again, out)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("E", [1, 8, 32])
def test_decode_swiglu_vs_reference(E, shape, mode):
    cm = _cuda()
    K, N = SHAPES[shape]
    dev = torch.device("cuda")
    gen = make_generator(f"swiglu-{E}-{shape}-{mode}")
    # scale: outputs of a few units, so the clamp at 10 bites on some rows
    w1, s1 = _experts(E, N, K, dev, seed=E * 11 + K, scale=4.0 / K ** 0.5)
    w3, s3 = _experts(E, N, K, dev, seed=E * 13 + K, scale=4.0 / K ** 0.5)
    off, row_ids, Ma = _groups(gen, E)
    x = activations(gen, Ma, K).to(dev)
    rw = (torch.rand(row_ids.shape[0], generator=gen) * 2).to(dev)
    off, row_ids = off.to(dev), row_ids.to(dev)
    want = ref.moe_grouped_swiglu_mxfp4(x, None, w1, s1, w3, s3, off, row_ids, rw, mode, 10.0)
    out = poisoned(want.shape, torch.bfloat16, dev)
    cm.moe_grouped_swiglu_mxfp4_out(x, None, w1, s1, w3, s3, off, row_ids, rw, mode, 10.0, out)
    assert_all_written(out)
    assert_gemm_close(out, want)
    assert (out[int(off[-1]):] == 0).all()
    assert (out[row_ids.long() < 0] == 0).all()
    again = cm.moe_grouped_swiglu_mxfp4(x, None, w1, s1, w3, s3, off, row_ids, rw, mode, 10.0)
    assert torch.equal(again, out)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_no_row_ids_fp8_input_and_large_groups(mode):
    """row_ids=None (row r reads a[r]); pre-quantized FP8 input (w4a8); groups of 17..40 rows (several
    16-row passes); a group touching the last row; swiglu without row weights."""
    cm = _cuda()
    dev = torch.device("cuda")
    gen = make_generator(f"large-{mode}")
    E, K, N = 4, 1536, 80  # N not a multiple of the 16/64-column tiles, K = 3 stages of 512
    w, s = _experts(E, N, K, dev, seed=5)
    w3, s3 = _experts(E, N, K, dev, seed=6)
    off = offsets_from_counts([17, 0, 40, 23]).to(dev)
    M = int(off[-1])
    x = activations(gen, M, K).to(dev)
    if mode == "w4a8":
        from v4kernels.reference.quant import act_quant_fp8

        a, a_s = act_quant_fp8(x, 128)
    else:
        a, a_s = x, None
    want = ref.moe_grouped_gemm_mxfp4(a, a_s, w, s, off, None, mode)
    out = poisoned(want.shape, torch.bfloat16, dev)
    cm.moe_grouped_gemm_mxfp4_out(a, a_s, w, s, off, None, mode, out)
    assert_all_written(out)
    assert_gemm_close(out, want)
    want = ref.moe_grouped_swiglu_mxfp4(a, a_s, w, s, w3, s3, off, None, None, mode, 10.0)
    out = cm.moe_grouped_swiglu_mxfp4(a, a_s, w, s, w3, s3, off, None, None, mode, 10.0)
    assert_gemm_close(out, want)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_masked_indices(mode):
    """Row ids out of range (>= Ma, < -1) give 0 rows; offsets past M are clamped as in the
    reference; all-empty groups give an all-zero output; many experts (E=256) with 6 rows."""
    cm = _cuda()
    dev = torch.device("cuda")
    gen = make_generator(f"masked-{mode}")
    K, N = 512, 64
    E = 256
    w, s = _experts(E, N, K, dev, seed=9)
    x = activations(gen, 8, K).to(dev)
    counts = [0] * E
    for e in (3, 17, 100, 101, 200, 255):
        counts[e] = 1
    off = offsets_from_counts(counts).to(dev)
    row_ids = torch.tensor([0, 7, 8, -5, 2**31 - 1, 3, -1], dtype=torch.int32, device=dev)  # M = 7 > off[E] = 6
    want = ref.moe_grouped_gemm_mxfp4(x, None, w, s, off, row_ids, mode)
    out = poisoned(want.shape, torch.bfloat16, dev)
    cm.moe_grouped_gemm_mxfp4_out(x, None, w, s, off, row_ids, mode, out)
    assert_all_written(out)
    assert_gemm_close(out, want)
    assert (out[2:5] == 0).all() and (out[6] == 0).all()
    # offsets beyond M: clamped to M
    off2 = torch.tensor([0, 2, 9, 50] + [50] * (E - 3), dtype=torch.int32, device=dev)
    want = ref.moe_grouped_gemm_mxfp4(x, None, w, s, off2, row_ids, mode)
    out = cm.moe_grouped_gemm_mxfp4(x, None, w, s, off2, row_ids, mode)
    assert_gemm_close(out, want)
    # no rows at all
    off0 = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    out = poisoned((5, N), torch.bfloat16, dev)
    cm.moe_grouped_gemm_mxfp4_out(x, None, w, s, off0, row_ids[:5], mode, out)
    assert (out == 0).all()
    # no activation rows at all (every row id is out of range)
    out = poisoned((7, N), torch.bfloat16, dev)
    cm.moe_grouped_gemm_mxfp4_out(x[:0], None, w, s, off, row_ids, mode, out)
    assert (out == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bn", ["48", "64"])
def test_slot_widths(bn, mode, monkeypatch):
    """Every slot width of the kernel (48 and 64 columns; forced through V4K_MOE_DECODE_BN, as the
    profiling script does) on the same ragged groups: N = 200 leaves a partial last tile."""
    monkeypatch.setenv("V4K_MOE_DECODE_BN", bn)
    cm = _cuda()
    dev = torch.device("cuda")
    gen = make_generator(f"bn-{bn}-{mode}")
    E, K, N = 8, 1024, 200
    w1, s1 = _experts(E, N, K, dev, seed=31, scale=4.0 / K ** 0.5)
    w3, s3 = _experts(E, N, K, dev, seed=32, scale=4.0 / K ** 0.5)
    off, row_ids, Ma = _groups(gen, E)
    x = activations(gen, Ma, K).to(dev)
    rw = (torch.rand(row_ids.shape[0], generator=gen) * 2).to(dev)
    off, row_ids = off.to(dev), row_ids.to(dev)
    want = ref.moe_grouped_gemm_mxfp4(x, None, w1, s1, off, row_ids, mode)
    out = poisoned(want.shape, torch.bfloat16, dev)
    cm.moe_grouped_gemm_mxfp4_out(x, None, w1, s1, off, row_ids, mode, out)
    assert_all_written(out)
    assert_gemm_close(out, want)
    want = ref.moe_grouped_swiglu_mxfp4(x, None, w1, s1, w3, s3, off, row_ids, rw, mode, 10.0)
    out = poisoned(want.shape, torch.bfloat16, dev)
    cm.moe_grouped_swiglu_mxfp4_out(x, None, w1, s1, w3, s3, off, row_ids, rw, mode, 10.0, out)
    assert_all_written(out)
    assert_gemm_close(out, want, swiglu=True)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_extreme_weight_scales(mode):
    """e8m0 weight scales >= 249 (2^(e-121) is not a finite fp32: the kernel's exact path), 255 (NaN,
    as the reference) and 0 (2^-127), with activations around 2^-100 so that the sums stay finite.
    At most 252: the w4a16 reference dequantizes the weights first, and 6 * 2^(253-127) is inf.
    Rows: 5 (one n8 block) and 11 (two)."""
    cm = _cuda()
    dev = torch.device("cuda")
    gen = make_generator(f"extreme-{mode}")
    E, K, N = 2, 1024, 64
    w, s = _experts(E, N, K, dev, seed=21)
    s = s.view(torch.uint8).clone()
    s[0, 3, 5] = 250
    s[0, 7, 0] = 252
    s[1, 10, 31] = 249
    s[1, 20, :4] = 0
    s[0, 40, 9] = 255
    off = offsets_from_counts([5, 11]).to(dev)
    x = (activations(gen, 16, K).float() * 2.0 ** -100).bfloat16().to(dev)
    want = ref.moe_grouped_gemm_mxfp4(x, None, w, s.view(torch.float8_e8m0fnu), off, None, mode)
    out = poisoned(want.shape, torch.bfloat16, dev)
    cm.moe_grouped_gemm_mxfp4_out(x, None, w, s, off, None, mode, out)
    nan = torch.isnan(want)
    assert nan[:5, 40].all() and int(nan.sum()) == 5
    assert torch.equal(torch.isnan(out), nan)
    assert_gemm_close(torch.where(nan, 0.0, out.float()), torch.where(nan, 0.0, want.float()))


def test_decode_supported_is_shape_only():
    """CPU tensors are never supported; the predicate reads shapes and dtypes only."""
    from v4kernels.cuda import moe as cm

    w = torch.zeros(2, 64, 256, dtype=torch.uint8)
    s = torch.zeros(2, 64, 16, dtype=torch.uint8)
    x = torch.zeros(3, 512, dtype=torch.bfloat16)
    off = torch.tensor([0, 1, 3], dtype=torch.int32)
    assert not cm.decode_supported(x, None, w, s, off)
    assert not cm.swiglu_decode_supported(x, None, w, s, w, s, off, None, None, "w4a16", 10.0)


@pytest.mark.cuda
def test_decode_supported_on_gpu():
    cm = _cuda()
    dev = torch.device("cuda")
    w = torch.zeros(8, 64, 256, dtype=torch.uint8, device=dev)
    s = torch.zeros(8, 64, 16, dtype=torch.uint8, device=dev)
    off = torch.zeros(9, dtype=torch.int32, device=dev)
    x = torch.zeros(32, 512, dtype=torch.bfloat16, device=dev)
    assert cm.decode_supported(x, None, w, s, off, None, "w4a8")
    assert cm.decode_supported(x, None, w, s, off, None, mode="w4a16")
    assert cm.swiglu_decode_supported(x, None, w, s, w, s, off, None, None, "w4a8", 10.0)
    assert cm.decode_supported(x, None, w, s, w, s, off, None, None, "w4a8", 10.0)  # swiglu arguments
    assert not cm.decode_supported(x.float(), None, w, s, off, None, "w4a16")
    assert not cm.decode_supported(torch.zeros(4096, 512, dtype=torch.bfloat16, device=dev), None, w, s, off)
    assert not cm.decode_supported(x, None, w[:, :, :64].transpose(1, 2), s, off)  # not contiguous
    # K = 640: not a multiple of the 512-K stage (the Triton kernels take it)
    w640 = torch.zeros(8, 64, 320, dtype=torch.uint8, device=dev)
    s640 = torch.zeros(8, 64, 20, dtype=torch.uint8, device=dev)
    assert not cm.decode_supported(torch.zeros(32, 640, dtype=torch.bfloat16, device=dev), None, w640, s640, off)
    # more experts than the kernel's prefix table
    big = torch.zeros(1025, 1, 256, dtype=torch.uint8, device=dev)
    assert not cm.decode_supported(x, None, big, torch.zeros(1025, 1, 16, dtype=torch.uint8, device=dev),
                                   torch.zeros(1026, dtype=torch.int32, device=dev))


@pytest.mark.cuda
def test_timing_smoke(capsys):
    """Prints GB/s on weight bytes (no assertion on speed): 8 active experts x 4 rows, N=2048, K=4096."""
    cm = _cuda()
    dev = torch.device("cuda")
    gen = make_generator("timing")
    E_total, E_act, rows, K, N = 64, 8, 4, 4096, 2048
    w, s = _experts(E_total, N, K, dev, seed=1)
    w3, s3 = _experts(E_total, N, K, dev, seed=2)
    counts = [0] * E_total
    for e in range(0, E_total, E_total // E_act):
        counts[e] = rows
    off = offsets_from_counts(counts).to(dev)
    M = int(off[-1])
    x = activations(gen, M, K).to(dev)
    from v4kernels.ops.quant import act_quant_fp8

    xq, xs = act_quant_fp8(x, 128)
    rw = torch.rand(M, device=dev)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)  # > L2: weights come from HBM

    def bench(fn, n=20):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(n):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return sorted(times)[len(times) // 2]

    lines = []
    for mode in MODES:
        a, a_s = (xq, xs) if mode == "w4a8" else (x, None)
        out = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
        t = bench(lambda: cm.moe_grouped_gemm_mxfp4_out(a, a_s, w, s, off, None, mode, out))
        gbs = _bytes(E_act, N, K) / t * 1e-3
        lines.append(f"gemm   {mode}: {t:7.1f} us  {gbs:7.0f} GB/s on weight bytes")
        t = bench(lambda: cm.moe_grouped_swiglu_mxfp4_out(a, a_s, w, s, w3, s3, off, None, rw, mode, 10.0, out))
        gbs = _bytes(E_act, N, K, 2) / t * 1e-3
        lines.append(f"swiglu {mode}: {t:7.1f} us  {gbs:7.0f} GB/s on weight bytes")
    with capsys.disabled():
        print("\nmxfp4 decode, 8 experts x 4 rows, N=2048, K=4096 (median, L2 flushed):")
        for line in lines:
            print("  " + line)
