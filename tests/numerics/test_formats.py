"""Cache formats (spec §6): codecs bit-exact to the reference fake-quant, page layout, PagedCache, write/read ops."""
import pytest
import torch
from hypothesis import given, strategies as st

from v4kernels import formats as F
from v4kernels.ops import formats as ops
from v4kernels.reference import quant as q
from v4kernels.testing import assert_bitwise_equal, kernel_backends, make_generator, run_opcheck


def _special(n, dim, gen, dtype=torch.bfloat16):
    """Random values with magnitudes 1e-6..1e4 per row, plus +-0, exact FP8/FP4 ties and tiny values."""
    x = torch.randn(n, dim, generator=gen) * torch.logspace(-6, 4, n)[:, None]
    if n > 3:
        x[0, :8] = torch.tensor([0.0, -0.0, 448.0, -448.0, 1e-30, -1e-30, 2.0 ** -10, 0.0])
        x[1] = 0.0  # an all-zero row: amax floor
        x[2, ::2] = -0.0
        x[3, :7] = torch.tensor([6.0, 5.0, 0.25, 0.75, 2.5, 3.5, -1.25])  # FP4 ties at s = 1
        x[3, 32:35] = torch.tensor([448.0, 12.5, 13.5])  # FP8 ties at s = 1 (-> 12, 14)
    if n > 4:
        x[4] = torch.randn(dim, generator=gen) * 1e-38  # FP4 scale floor 2^-126: subnormal bf16 values
    return x.to(dtype)


# ----------------------------------------------------------------------------- codecs
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_kv584_roundtrip_equals_fake_quant(n, seed):
    x = _special(n, 512, make_generator(seed))
    data, scales = F.encode_kv584(x)
    assert data.shape == (n, 576) and scales.shape == (n, 8) and bool((scales[:, 7] == 0).all())
    want = torch.cat((q.fake_quant_fp8(x[:, :448], 64), x[:, 448:]), dim=1)
    assert_bitwise_equal(F.decode_kv584(data, scales), want)


@given(n=st.integers(1, 12), seed=st.integers(0, 2**31), f32=st.booleans())
def test_idx_fp4_roundtrip_equals_fake_quant(n, seed, f32):
    x = _special(n, 128, make_generator(seed), torch.float32 if f32 else torch.bfloat16)
    data, scales = F.encode_idx_fp4(x)
    assert data.shape == (n, 64) and scales.shape == (n, 4)
    assert_bitwise_equal(F.decode_idx_fp4(data, scales), q.fake_quant_fp4(x, 32))


@given(n=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_idx_fp8_roundtrip_equals_fake_quant(n, seed):
    x = _special(n, 128, make_generator(seed))
    data, scales = F.encode_idx_fp8(x)
    assert data.shape == (n, 128) and scales.shape == (n, 4)
    assert_bitwise_equal(F.decode_idx_fp8(data, scales), q.fake_quant_fp8(x, 128))


def test_fp4_packing_low_nibble_is_even_element():
    k = torch.zeros(1, 128)
    k[0, 0], k[0, 1] = 1.0, 6.0  # codes 2 and 7 with scale 1
    data, scales = F.encode_idx_fp4(k)
    assert data[0, 0].item() == 0x72 and scales[0, 0].item() == 127


def test_page_layout_and_sizes():
    assert F.KV584.row_bytes == 584 and F.IDX_FP4.row_bytes == 68 and F.IDX_FP8.row_bytes == 132
    for fmt in F.FORMATS.values():
        for ps in (1, 16, 64, 256):
            pb = fmt.page_bytes(ps)
            assert pb % 576 == 0 and ps * fmt.row_bytes <= pb < ps * fmt.row_bytes + 576
    assert F.KV584.page_bytes(64) == 64 * 584 + (576 - 64 * 584 % 576) % 576
    # data rows first, then scale rows
    cache = torch.zeros(2, F.KV584.page_bytes(4), dtype=torch.uint8)
    x = torch.randn(1, 512).bfloat16()
    F.write_rows(cache, F.KV584, 4, torch.tensor([6]), x)  # page 1, offset 2
    data, scales = F.encode_kv584(x)
    assert torch.equal(cache[1, 2 * 576:3 * 576], data[0])
    assert torch.equal(cache[1, 4 * 576 + 2 * 8:4 * 576 + 3 * 8], scales[0])
    assert int(cache[0].sum()) == 0 and int(cache[1, 4 * 584:].sum()) == 0  # padding untouched


# ----------------------------------------------------------------------------- PagedCache
def test_paged_cache_allocation_and_tables():
    pc = F.PagedCache(F.IDX_FP4, num_pages=5, page_size=4)
    pc.reserve(7, 9)   # 3 pages
    pc.reserve(3, 4)   # 1 page
    assert len(pc.pages_of(7)) == 3 and len(pc.pages_of(3)) == 1
    assert len(set(pc.pages_of(7)) | set(pc.pages_of(3))) == 4
    bt = pc.block_table([7, 3, 99])
    assert bt.dtype == torch.int32 and bt.shape == (3, 3)
    assert bt[1, 1:].tolist() == [-1, -1] and bt[2].tolist() == [-1, -1, -1]
    rows = F.positions_to_rows(bt, torch.tensor([0, 0, 1, 1, 2]), torch.tensor([5, 12, 3, 4, 0]), 4)
    p7 = pc.pages_of(7)
    assert rows.tolist() == [p7[1] * 4 + 1, -1, pc.pages_of(3)[0] * 4 + 3, -1, -1]
    assert torch.equal(pc.rows(7, torch.tensor([0, 5, 8])), torch.tensor([p7[0] * 4, p7[1] * 4 + 1, p7[2] * 4]))
    with pytest.raises(ValueError, match="positions"):
        pc.rows(7, torch.tensor([12]))
    with pytest.raises(RuntimeError, match="out of pages"):
        pc.reserve(1, 9)
    pc.release(7)
    pc.reserve(1, 9)
    assert len(pc.pages_of(1)) == 3
    x = torch.randn(3, 128).bfloat16()
    r = pc.rows(1, torch.tensor([0, 4, 8]))
    pc.write(r, x)
    assert_bitwise_equal(pc.read(r), q.fake_quant_fp4(x, 32))
    with pytest.raises(ValueError, match="max_pages"):
        pc.block_table([1], max_pages=2)


# ----------------------------------------------------------------------------- write / read ops
OPS = [("kv584", F.KV584, ops.kv584_write, ops.kv584_read, 512),
       ("idx_fp4", F.IDX_FP4, ops.idx_fp4_write, ops.idx_fp4_read, 128)]


def _want(name, x):
    if name == "kv584":
        return torch.cat((q.fake_quant_fp8(x[:, :448], 64), x[:, 448:]), dim=1)
    return q.fake_quant_fp4(x, 32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name,fmt,write,read,dim", OPS, ids=[o[0] for o in OPS])
@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
def test_write_read_ops(backend, name, fmt, write, read, dim, rows_dtype, gen, device):
    if backend == "triton" and not kernel_backends(f"{name}_write"):
        pytest.skip("no Triton here")
    ps = 4
    garbage = torch.randint(0, 256, (5, fmt.page_bytes(ps)), generator=gen, dtype=torch.uint8)
    cache = garbage.clone().to(device)
    x = _special(7, dim, gen)
    rows = torch.tensor([3, 17, -1, 0, 19, 8, -1], dtype=rows_dtype)
    write(cache, rows.to(device), x.to(device), ps, backend=backend)
    keep = rows >= 0
    ref_cache = garbage.clone()
    F.write_rows(ref_cache, fmt, ps, rows[keep], x[keep])
    assert torch.equal(cache.cpu(), ref_cache)  # written rows exact, every other byte untouched
    out = read(cache, torch.tensor([0, -1, 3, 19, 8, 17], dtype=rows_dtype).to(device), ps, backend=backend).cpu()
    want = _want(name, x)
    assert_bitwise_equal(out[0], want[3])
    assert_bitwise_equal(out[1], torch.zeros(dim, dtype=torch.bfloat16))
    assert_bitwise_equal(out[2:], want[[0, 4, 5, 1]])


@pytest.mark.parametrize("name,fmt,write,read,dim", OPS, ids=[o[0] for o in OPS])
@given(n=st.integers(0, 9), ps=st.sampled_from([1, 3, 16]), seed=st.integers(0, 2**31))
def test_write_read_hypothesis(name, fmt, write, read, dim, n, ps, seed):
    if not kernel_backends(f"{name}_write"):
        pytest.skip("no Triton here")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = make_generator(seed)
    pages = 3
    n = min(n, pages * ps)
    perm = torch.randperm(pages * ps, generator=g)[:n]
    rows = torch.where(torch.rand(n, generator=g) < 0.2, -1, perm[:n]) if n else perm
    x = _special(n, dim, g)
    cache = torch.zeros(pages, fmt.page_bytes(ps), dtype=torch.uint8, device=dev)
    write(cache, rows.to(dev), x.to(dev), ps, backend="triton")
    ref_cache = torch.zeros(pages, fmt.page_bytes(ps), dtype=torch.uint8)
    write(ref_cache, rows, x, ps, backend="reference")
    assert torch.equal(cache.cpu(), ref_cache)
    out = read(cache, rows.to(dev), ps, backend="triton").cpu()
    want = torch.where((rows >= 0)[:, None], _want(name, x), torch.zeros((), dtype=torch.bfloat16))
    assert_bitwise_equal(out, want)


@pytest.mark.parametrize("name,fmt,write,read,dim", OPS, ids=[o[0] for o in OPS])
def test_bad_inputs(name, fmt, write, read, dim):
    ps = 4
    cache = torch.zeros(2, fmt.page_bytes(ps), dtype=torch.uint8)
    x = torch.zeros(2, dim, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"rows: expected row ids in \[0, 8\), got values in \[0, 8\]"):
        write(cache, torch.tensor([0, 8]), x, ps)
    with pytest.raises(ValueError, match="rows: expected row ids"):
        read(cache, torch.tensor([-2]), ps)
    with pytest.raises(TypeError, match="rows: expected dtype"):
        write(cache, torch.tensor([0.0, 1.0]), x, ps)
    with pytest.raises(ValueError, match="cache: expected .* bytes per page"):
        write(torch.zeros(2, 576, dtype=torch.uint8), torch.tensor([0, 1]), x, 2 if name == "kv584" else 100)
    with pytest.raises(TypeError, match="cache: expected dtype"):
        read(cache.float(), torch.tensor([0]), ps)
    with pytest.raises(ValueError, match=r"expected shape \(2, %d\)" % dim):
        write(cache, torch.tensor([0, 1]), torch.zeros(2, dim + 2, dtype=torch.bfloat16), ps)
    with pytest.raises(TypeError, match="expected dtype"):
        write(cache, torch.tensor([0, 1]), x.to(torch.float16), ps)
    with pytest.raises(ValueError, match="page_size"):
        read(cache, torch.tensor([0]), 0)


@pytest.mark.parametrize("name,fmt,write,read,dim", OPS, ids=[o[0] for o in OPS])
def test_opcheck(name, fmt, write, read, dim, gen, device):
    ps = 4
    cache = torch.zeros(2, fmt.page_bytes(ps), dtype=torch.uint8, device=device)
    x = torch.randn(3, dim, generator=gen).bfloat16().to(device)
    rows = torch.tensor([1, -1, 6], device=device)
    run_opcheck(getattr(torch.ops.v4kernels, f"{name}_write").default, (cache, rows, x, ps))
    run_opcheck(getattr(torch.ops.v4kernels, f"{name}_read").default, (cache, rows, ps))


@pytest.mark.cuda
def test_cuda_graph_capture_skips_host_checks():
    ps = 64
    cache = torch.zeros(16, F.KV584.page_bytes(ps), dtype=torch.uint8, device="cuda")
    x = torch.randn(32, 512, device="cuda").bfloat16()
    rows = torch.arange(32, device="cuda") * 3
    ops.kv584_write(cache, rows, x, ps)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.kv584_write(cache, rows, x, ps)
        out = ops.kv584_read(cache, rows, ps)
    g.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(out.cpu(), _want("kv584", x.cpu()))
