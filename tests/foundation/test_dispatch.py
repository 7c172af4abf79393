"""The op registration and dispatch mechanism (v4kernels/_dispatch.py) and the checks kit."""
import pytest
import torch

import v4kernels
from v4kernels import _checks
from v4kernels._dispatch import OPS
from v4kernels.testing import assert_close, calc_diff, kernel_backends, poisoned


def test_every_op_is_registered_with_backend_kwarg():
    assert OPS, "no ops registered"
    for name, op in OPS.items():
        schema = str(getattr(torch.ops.v4kernels, name).default._schema)
        assert "str? backend=None" in schema, name
        assert op.reference is not None and op.fake is not None


def test_cpu_auto_is_reference(gen):
    x = torch.randn(2, 128, generator=gen).bfloat16()
    v4kernels.act_quant_fp8(x)
    assert OPS["act_quant_fp8"].last_backend == "reference"


def test_env_var_forces_backend(monkeypatch, gen):
    x = torch.randn(2, 128, generator=gen).bfloat16()
    monkeypatch.setenv("V4K_BACKEND", "reference")
    v4kernels.act_quant_fp8(x)
    assert OPS["act_quant_fp8"].last_backend == "reference"
    monkeypatch.setenv("V4K_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        v4kernels.act_quant_fp8(x)


def test_forced_cuda_on_cpu_tensor_is_a_clear_error(gen):
    x = torch.randn(2, 128, generator=gen).bfloat16()
    with pytest.raises(NotImplementedError, match="cuda"):
        v4kernels.act_quant_fp8(x, backend="cuda")


def test_triton_backend_needs_interpreter_on_cpu(monkeypatch, gen):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    x = torch.randn(2, 128, generator=gen).bfloat16()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        v4kernels.act_quant_fp8(x, backend="triton")


def test_checks_name_argument_expectation_and_value():
    with pytest.raises(TypeError, match=r"x: expected dtype .*got torch.int32"):
        _checks.check_tensor("x", torch.zeros(2, dtype=torch.int32), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"w: expected shape \(\*, 4\), got \(3, 5\)"):
        _checks.check_tensor("w", torch.zeros(3, 5), shape=(None, 4))
    with pytest.raises(ValueError, match="block: expected one of"):
        _checks.check_choice("block", 7, (32, 64))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        _checks.check_tensor("x", [1, 2])


def test_assert_close_reports_worst_mismatch():
    ref = torch.arange(10.0)
    out = ref.clone()
    out[7] += 1
    with pytest.raises(AssertionError, match=r"at \(7,\)"):
        assert_close(out, ref, atol=1e-3, rtol=0)
    assert calc_diff(ref + 1, ref + 1) == pytest.approx(0.0, abs=1e-12)


def test_poisoned_outputs_are_nan():
    t = poisoned((3, 4), torch.bfloat16, "cpu")
    assert torch.isnan(t).all()


def test_kernel_backends_lists_what_can_run():
    b = kernel_backends("act_quant_fp8")
    assert "triton" in b  # interpreter on CPU, real GPU otherwise


@pytest.mark.cuda
def test_cuda_extension_loads_on_gpu():
    assert v4kernels.cuda_extension_loaded(), v4kernels._ext.cuda_extension_error()
    assert "cuda" in kernel_backends("act_quant_fp8")


@pytest.mark.skipif(not v4kernels.cuda_extension_loaded(), reason="v4kernels._C not built")
def test_cuda_extension_registers_every_launcher_op():
    """The ops the Python launchers (v4kernels/cuda/*.py) call are in the built extension's schema set."""
    for name in ("act_quant_fp8_out", "moe_mxfp4_decode_gemm", "moe_mxfp4_decode_swiglu", "mhc_pre_out",
                 "sparse_attn_fwd", "indexer_topk_fp4", "indexer_merge"):
        assert hasattr(torch.ops.v4kernels_C, name), name


@pytest.mark.cuda
@pytest.mark.skipif(not v4kernels.cuda_extension_loaded(), reason="v4kernels._C not built")
def test_cuda_binding_checks_raise():
    """A failed check inside a binding raises ValueError with its message (it once crashed the process: the
    bindings no longer format messages through iostreams)."""
    C = torch.ops.v4kernels_C
    x = torch.zeros(4, 100, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="last dim must be a multiple of block"):
        C.act_quant_fp8_out(x, 128, torch.empty(4, 100, dtype=torch.uint8, device="cuda"),
                            torch.empty(4, 1, device="cuda"))
    q = torch.zeros(1, 64, 100, dtype=torch.bfloat16, device="cuda")
    i32 = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="q must be bf16 \\[T, H, 512\\]"):
        C.sparse_attn_fwd(q, i32, torch.zeros(16, dtype=torch.uint8, device="cuda"),
                          torch.zeros(1, 1, dtype=torch.int64, device="cuda"),
                          torch.zeros(1, 1, dtype=torch.int64, device="cuda"), i32, None, None, None,
                          torch.zeros(1, 64, 512, dtype=torch.bfloat16, device="cuda"),
                          torch.zeros(1, 64, device="cuda"), None, None, 1)
    lists = torch.zeros(1, 1, 16, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="topk must be in"):
        C.indexer_merge(lists, None, 64, 64, 0, i32, i32, 1, None, 1, torch.zeros(1, 16, dtype=torch.int32,
                        device="cuda"), i32.clone(), torch.zeros(1, 0, dtype=torch.int32, device="cuda"))


def test_auto_takes_cuda_only_where_preferred(monkeypatch):
    """cuda_preferred narrows what "auto" sends to the CUDA kernel; a forced "cuda" needs only cuda_supported."""
    from v4kernels._dispatch import OpDef

    monkeypatch.delenv("V4K_BACKEND", raising=False)
    noop = lambda *a, **k: None  # noqa: E731
    op = OpDef("fake_op", "", reference=noop, fake=noop, triton=noop, cuda=noop,
               cuda_supported=lambda n: n > 0, cuda_preferred=lambda n: n >= 512)
    monkeypatch.setattr(OpDef, "_cuda_ok", lambda self, d, a, k: bool(self.cuda_supported(*a, **k)))
    dev = torch.device("cuda")  # a device object only: select() decides from it without touching a GPU
    assert op.select(None, dev, (1024,), {}) == "cuda"
    assert op.select(None, dev, (8,), {}) == "triton"
    assert op.select("cuda", dev, (8,), {}) == "cuda"
    with pytest.raises(NotImplementedError):
        op.select("cuda", dev, (0,), {})
