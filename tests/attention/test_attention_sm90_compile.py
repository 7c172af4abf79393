"""The GPU-path specializations of the attention kernels compile for sm_90 on the CPU, without spills.

The launcher picks other constexprs on a GPU (native FP8 conversion, bf16 dots, BH = 64, BN = 64, 8 warps,
3 stages) than under the interpreter, so the ``V4K_SM90_CHECK`` recorder does not see them. This file compiles them with ``triton.compile(..., GPUTarget("cuda", 90, 32))``
in a fresh process (no TRITON_INTERPRET) and checks registers / spills of the cubin.

``python tests/attention/test_attention_sm90_compile.py`` prints the register table (used to pick tiles).
"""
import json
import os
import subprocess
import sys

import pytest

_PTR = {
    "q_ptr": "*bf16", "tok_pos_ptr": "*i32", "cache": "*u8", "cache16": "*bf16", "rows_ptr": "*i64",
    "nkeys_ptr": "*i32",
    "scw_ptr": "*i64", "tklen_ptr": "*i32", "sink_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
    "out_ptr": "*bf16", "lse_ptr": "*fp32", "po_ptr": "*fp32", "pl_ptr": "*fp32", "qk_scale": "fp32",
}
# what the JIT specializes at the V4 shapes (values divisible by 16: pointers, strides, NK = 128 + top-k, ...)
_DIV16 = ("stride_qt", "stride_qh", "NK", "stride_ot", "stride_oh", "stride_lt", "H")


def _signature(fn_name):
    import inspect

    from v4kernels.triton import attention as T

    fn = getattr(T, fn_name)
    sig = {}
    for p in inspect.signature(fn.fn).parameters.values():
        if "constexpr" in str(p.annotation):
            sig[p.name] = "constexpr"
        else:
            sig[p.name] = _PTR.get(p.name, "i32")
    return sig


def _attrs(sig):
    names = list(sig)
    return {str(names.index(n)): [["tt.divisibility", 16]] for n in names
            if sig[n].startswith("*") or n in _DIV16}


def gpu_specs():
    """(label, record) of the attention-kernel launches the GPU path makes (the key kind only changes the rows
    kernel): the direct path (batch-64 decode, prefill; with the fused inverse RoPE) and the split-KV path
    (batch 1, HCA at 1M context). Flash and Pro share them (64-head blocks)."""
    from v4kernels.triton import attention as T

    bh, bn, warps, stages = T.HEAD_BLOCK, 64, 8, 3
    specs = []
    for direct, rope in ((True, True), (True, False), (False, False)):
        cx = dict(HAS_SINK=True, HAS_ROPE=rope, DIRECT=direct, NATIVE_FP8=True, DOT_BF16=True, BH=bh, BN=bn)
        sig = _signature("_attn_kernel")
        rec = {"module": "v4kernels.triton.attention", "name": "_attn_kernel", "signature": sig,
               "constexprs": cx, "attrs": _attrs(sig), "options": {"num_warps": warps, "num_stages": stages}}
        specs.append((f"{'direct' if direct else 'split'}{' rope' if rope else ''} BH{bh} BN{bn} w{warps} "
                      f"s{stages}", rec))
    return specs


def _resources(cubin: bytes) -> dict:
    """Registers and spill bytes of a cubin (cuobjdump -res-usage; CompiledKernel.n_regs needs a GPU)."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", txt)
    stack = re.search(r"STACK:(\d+)", txt)
    return {"n_regs": int(regs.group(1)) if regs else -1,
            # spilled registers live in the local stack frame (STACK); LOCAL is other local memory
            "n_spills": int(stack.group(1)) if stack else 0,
            "res": txt.strip().splitlines()[-1][:200]}


def _compile_report(records):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from v4kernels._sm90_check import _decode_constexpr
    from v4kernels.triton import attention as T

    rows = []
    for label, rec in records:
        fn = getattr(T, rec["name"])
        attrs = {(int(k),): v for k, v in rec.get("attrs", {}).items()}
        src = ASTSource(fn=fn, signature=rec["signature"],
                        constexprs={k: _decode_constexpr(v) for k, v in rec["constexprs"].items()}, attrs=attrs)
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(rec["options"]))
            rows.append({"label": label, **_resources(k.asm["cubin"]), "shared": k.metadata.shared})
        except Exception as exc:  # noqa: BLE001 - report every failure
            rows.append({"label": label, "error": f"{type(exc).__name__}: {str(exc)[-800:]}"})
    return rows


def run_report(extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gpu_target_compiles():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _gpu_target_compiles(), reason="triton with a CUDA backend is not installed")
def test_attention_gpu_paths_compile_for_sm90_without_spills():
    rows = run_report()
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    # the split path keeps an 8-byte stack frame (measured); more is a real spill of the [64, 512] accumulator
    spills = [r for r in rows if r["n_spills"] > 16]
    assert not spills, spills


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    rows = _compile_report(gpu_specs())
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(r)
