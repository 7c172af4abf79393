#!/usr/bin/env bash
# One-off probe of the toolchain on the GPU machine (kept for reference; gpu_check.sh is the real entry point).
set -x
OUT=${OUT:-./.out}; mkdir -p $OUT
nvidia-smi | head -15
python3 -c "import torch, triton, sys; print(sys.version, torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
export PYTHONPATH=$PWD/python:$PYTHONPATH
# 1) the .so compiled on the CPU dev machine against torch 2.13 CPU, loaded by torch 2.11+cu130
python3 -c "import v4kernels; print('carried .so loads:', v4kernels.cuda_extension_loaded(), v4kernels._ext.cuda_extension_error())"
python3 -m pytest -q -p no:cacheprovider tests/quant tests/foundation 2>&1 | tail -5
# 2) a fresh build on the device
rm -f python/v4kernels/_C*.so
( time MAX_JOBS=16 V4K_FORCE_CUDA_BUILD=1 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 ) 2>&1 | tail -3
tail -3 $OUT/build.log; ls python/v4kernels/*.so
python3 -m pytest -q -p no:cacheprovider tests/quant tests/foundation 2>&1 | tail -5
python3 - <<'PY'
import torch, time
def bench(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        s.record(); f(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts)//2] / 1e3
a = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(); b = torch.empty_like(a)
t = bench(lambda: b.copy_(a)); print(f"copy {2*a.numel()/t/1e9:.0f} GB/s")
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); y = torch.randn_like(x)
t = bench(lambda: x @ y); print(f"bf16 {2*8192**3/t/1e12:.0f} TFLOP/s")
xf = x.to(torch.float8_e4m3fn); yf = y.to(torch.float8_e4m3fn).t()
one = torch.ones((), device="cuda")
t = bench(lambda: torch._scaled_mm(xf, yf, one, one, out_dtype=torch.bfloat16)); print(f"fp8 {2*8192**3/t/1e12:.0f} TFLOP/s")
import v4kernels
xa = torch.randn(32768, 7168, device="cuda", dtype=torch.bfloat16)
for be in ("triton", "cuda"):
    t = bench(lambda: v4kernels.act_quant_fp8(xa, 128, backend=be))
    print(f"act_quant {be}: {t*1e6:.1f} us, {(xa.numel()*3 + xa.numel()//128)/t/1e9:.0f} GB/s")
PY
