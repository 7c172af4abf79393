"""Build script for v4kernels.

The Python package (references + Triton kernels) installs everywhere. The CUDA extension
``v4kernels._C`` is built when nvcc is found (or forced) and torch is importable in the build
environment (install with ``pip install --no-build-isolation``, as for any torch extension).
It targets PyTorch's stable C ABI (``TORCH_TARGET_VERSION`` = 2.10) and the CPython limited API
(abi3), so one .so loads on CPU-only torch 2.13 / Python 3.11 and on torch 2.11+cu130 / Python 3.12.

Environment variables (see README):
  V4K_SKIP_CUDA_BUILD=1     never build the extension
  V4K_FORCE_CUDA_BUILD=1    fail if the extension cannot be built (CI uses this)
  V4K_CUDA_ARCH_LIST        semicolon/space separated archs, default "9.0a"
  MAX_JOBS                  parallel compile jobs (ninja), default: cores
  NVCC_THREADS              nvcc --threads, default 1
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET_VERSION = "0x020a000000000000"  # stable ABI of torch 2.10: loads on 2.10 and newer


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _arch_flags():
    archs = os.environ.get("V4K_CUDA_ARCH_LIST", "9.0a").replace(";", " ").split()
    flags = []
    for arch in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _cutlass_include():
    """CUTLASS/CuTe headers from the PyPI package nvidia-cutlass, if installed."""
    try:
        import cutlass_library  # noqa: F401  (nvidia-cutlass)

        inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
        return [inc] if os.path.isdir(inc) else []
    except ImportError:
        return []


def _find_cuda_home(torch_cuda_home):
    """CUDA_HOME / CUDA_PATH, torch's guess, the folder of nvcc, or /usr/local/cuda: the first
    that holds bin/nvcc and include/cuda_runtime.h (nvcc on PATH may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_cuda_home]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.exists(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


def _cuda_extension():
    if _flag("V4K_SKIP_CUDA_BUILD"):
        print("v4kernels: V4K_SKIP_CUDA_BUILD set, building the pure-Python package only")
        return [], {}
    force = _flag("V4K_FORCE_CUDA_BUILD")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError:
        if force:
            raise
        print("v4kernels: torch not importable at build time (use --no-build-isolation); skipping _C")
        return [], {}
    cuda_home = _find_cuda_home(CUDA_HOME)
    if cuda_home is None:
        if force:
            raise RuntimeError("V4K_FORCE_CUDA_BUILD=1 but nvcc was not found")
        print("v4kernels: nvcc not found, building the pure-Python package only")
        return [], {}
    from setuptools import Extension

    # The CPU wheel of torch leaves cpp_extension.CUDA_HOME unset; BuildExtension reads it for nvcc.
    import torch.utils.cpp_extension as cpp_ext

    cpp_ext.CUDA_HOME = cuda_home
    torch_dir = os.path.dirname(torch.__file__)
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True)) + ["csrc/bindings.cpp"]
    # BuildExtension adds -DPy_LIMITED_API for py_limited_api extensions (abi3).
    common = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", "-O3"]
    nvcc_flags = common + _arch_flags() + [
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        f"--threads={os.environ.get('NVCC_THREADS', '1')}",
    ]
    ext = Extension(
        name="v4kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(cuda_home, "include")]
        + cpp_ext.include_paths()
        + _cutlass_include(),
        library_dirs=[os.path.join(torch_dir, "lib"), os.path.join(cuda_home, "lib64")],
        # cudart is linked statically so the .so needs no libcudart at load time (CPU-only torch).
        libraries=["torch_cpu", "cudart_static", "rt", "dl", "pthread"],
        extra_compile_args={"cxx": common + ["-std=c++17", "-fvisibility=hidden"], "nvcc": nvcc_flags},
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if ext_modules else {},
)
