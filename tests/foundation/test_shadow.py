"""v4kernels.shadow: every kernel call checked against its reference on the same inputs."""
import torch

from v4kernels._dispatch import OPS
from v4kernels.ops import formats as fmt
from v4kernels.ops import numerics as num
from v4kernels.shadow import shadow_check


def test_shadow_records_small_difference_of_a_correct_kernel():
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    w = torch.randn(256)
    with shadow_check() as rep:
        y = num.rms_norm(x, w, backend="triton")
        num.rms_norm(x, w, backend="reference")  # reference calls are not shadowed
    st = rep.stats["rms_norm"]
    assert st.calls == 1 and st.nonfinite_mismatch == 0
    assert st.max_rel < 1e-2  # bf16 output, fp32 sum order
    assert y.shape == x.shape and not rep.errors


def test_shadow_flags_a_wrong_kernel(monkeypatch):
    op = OPS["rms_norm"]
    monkeypatch.setattr(op, "triton", lambda x, weight, eps=1e-6: op.reference(x, weight, eps) * 1.5)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with shadow_check() as rep:
        num.rms_norm(x, torch.ones(64), backend="triton")
    assert rep.stats["rms_norm"].max_rel > 0.3
    assert "rms_norm" in rep.table().splitlines()[1]


def test_shadow_compares_in_place_writes_and_leaves_the_inputs_as_the_kernel_wrote_them():
    page = 16
    from v4kernels.formats import KV584

    cache = torch.zeros(2, KV584.page_bytes(page), dtype=torch.uint8)
    kv = torch.randn(4, 512, dtype=torch.bfloat16)
    rows = torch.tensor([0, 3, 17, 30])
    want = cache.clone()
    fmt.kv584_write(want, rows, kv, page, backend="reference")
    with shadow_check() as rep:
        fmt.kv584_write(cache, rows, kv, page, backend="triton")
    st = rep.stats["kv584_write"]
    assert st.calls == 1 and st.compared == {"arg[0]"} and st.mismatch_frac == 0.0
    assert torch.equal(cache, want)  # the kernel's write is kept, once


def test_shadow_flags_a_wrong_in_place_write(monkeypatch):
    from v4kernels.formats import KV584

    op = OPS["kv584_write"]

    def bad(cache, rows, kv, page_size):
        op.reference(cache, rows, kv, page_size)
        cache[0, :8] += 1

    monkeypatch.setattr(op, "triton", bad)
    page = 16
    cache = torch.zeros(1, KV584.page_bytes(page), dtype=torch.uint8)
    with shadow_check() as rep:
        fmt.kv584_write(cache, torch.tensor([1]), torch.randn(1, 512, dtype=torch.bfloat16), page, backend="triton")
    assert rep.stats["kv584_write"].mismatch_frac > 0


def test_shadow_is_off_outside_the_block():
    from v4kernels import shadow

    assert shadow.active() is None
    with shadow_check():
        assert shadow.active() is not None
    assert shadow.active() is None
