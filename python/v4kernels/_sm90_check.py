"""Compile every Triton kernel launched by the CPU test suite for a Hopper GPU (sm_90), on the CPU.

The Triton interpreter (``TRITON_INTERPRET=1``, how the CPU tests run kernels) accepts code that the
real compiler rejects (non-constexpr globals, reassigned constexprs, invalid casts, dot shapes...).
This tool closes that gap without a GPU: ``install_recorder()`` wraps the interpreter's launch to
record each kernel specialization the tests use (argument types and constexpr values), and
``compile_records`` compiles each one with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``
down to a cubin (ptxas included) in a fresh process where ``@triton.jit`` builds real JIT functions.

tests/conftest.py enables it with ``V4K_SM90_CHECK=1`` (CI does): a kernel that does not compile for
sm_90 fails the test session. ``python -m v4kernels._sm90_check records.json`` runs the compile step.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from typing import Dict, List

_RECORDS: Dict[str, dict] = {}

_DTYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5", "float8_e8m0fnu": "u8",
    "int8": "i8", "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1",
}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "num_ctas", "maxnreg")


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def _encode_constexpr(v):
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"tl_dtype": str(v)}
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    return {"repr": repr(v)}


def _arg_type(v):
    import torch

    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[str(v.dtype).replace("torch.", "")], None
    if isinstance(v, bool):
        return "i1", None
    if isinstance(v, int):
        if v == 1:  # the JIT specializes 1 as a constant
            return "constexpr", 1
        return ("i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"), None
    if isinstance(v, float):
        return "fp32", None
    if v is None:
        return "constexpr", None
    raise TypeError(f"unsupported kernel argument type {type(v).__name__}")


def _record(fn, args, kwargs):
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    options = {}
    for k, v in kwargs.items():
        if k in _OPTIONS:
            options[k] = v
        elif k in [p.name for p in params]:
            bound[k] = v
    signature, constexprs = {}, {}
    for p in params:
        if p.name not in bound:
            if p.default is inspect.Parameter.empty:
                return  # cannot describe this launch
            bound[p.name] = p.default
        v = bound[p.name]
        if _is_constexpr(p):
            signature[p.name] = "constexpr"
            constexprs[p.name] = _encode_constexpr(v)
        else:
            t, c = _arg_type(v)
            signature[p.name] = t
            if t == "constexpr":
                constexprs[p.name] = c
    rec = {"module": fn.__module__, "name": fn.__qualname__, "signature": signature, "constexprs": constexprs,
           "options": options}
    _RECORDS[json.dumps(rec, sort_keys=True, default=str)] = rec


def install_recorder() -> None:
    """Record every interpreter launch (call before kernels run; needs TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    if getattr(InterpretedFunction.run, "_v4k_recording", False):
        return
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        try:
            _record(self.fn, args, kwargs)
        except Exception:  # recording must never break a test
            pass
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._v4k_recording = True
    InterpretedFunction.run = run


def records() -> List[dict]:
    return list(_RECORDS.values())


def _decode_constexpr(v):
    import triton.language as tl

    if isinstance(v, dict) and "tl_dtype" in v:
        return getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(v["tl_dtype"], v["tl_dtype"]))
    return v


def _compile_one(rec: dict):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    src = ASTSource(fn=fn, signature=rec["signature"],
                    constexprs={k: _decode_constexpr(v) for k, v in rec["constexprs"].items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(rec["options"]))


def _worker(rec):
    try:
        _compile_one(rec)
        return None
    except Exception as exc:  # report, do not stop the other compiles
        return f"{rec['module']}.{rec['name']} {rec['constexprs']} {rec['options']}: {type(exc).__name__}: " + \
            str(exc).strip().splitlines()[-1][:300] + "\n" + str(exc)[:1500]


def compile_records(recs: List[dict], jobs: int = 2) -> List[str]:
    """Compile each record for sm_90; returns one message per failure."""
    if jobs > 1 and len(recs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as ex:
            return [m for m in ex.map(_worker, recs) if m]
    return [m for m in map(_worker, recs) if m]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.pop("TRITON_INTERPRET", None)
    with open(argv[0]) as f:
        recs = json.load(f)
    failures = compile_records(recs, int(os.environ.get("V4K_SM90_JOBS", "2")))
    print(f"sm90 compile check: {len(recs) - len(failures)}/{len(recs)} kernel specializations compiled")
    for m in failures:
        print("FAILED", m)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
