"""The compressor kernels compile for a Hopper GPU (sm_90), checked on the CPU (no GPU needed).

The launchers have no interpreter-only branches, but the CPU tests launch them on tiny batches
(B = 1 specializes as a constant, small page sizes). Here every launcher (``compress_kv``,
``compress_kv_entries``, ``compress_kv_decode``; main ratio 4 / 128 and indexer ratio 4; and
``compress_kv_decode_pair``, the CSA layer's two compressors in one launch) is called at
GPU-like shapes (8 sequences, 64-row pages) with the kernel launch intercepted: the recorded
specializations (argument types, constexprs, num_warps) are then compiled with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` down to a cubin in a fresh process without
``TRITON_INTERPRET`` (see ``v4kernels/_sm90_check.py``).

Regressions this catches (all accepted by the interpreter): a ``tl.constexpr`` local reassigned in an
unrolled loop (the indexer's Hadamard), non-constexpr globals, type-unstable jit helpers.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from v4kernels.reference import compressor as C
from v4kernels.triton import compressor as tri

from _compressor_inputs import CONFIG_IDS, CONFIGS, cu_of, i32, problem, tokens

PAGE = 64


def _can_record():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.interpreter import InterpretedFunction  # noqa: F401
    except ImportError:
        return False
    return True


def _gpu_like_launches(kind, ratio, gen):
    """Call the three launchers at GPU-like shapes on CPU tensors, recording (not running) each launch."""
    pb = problem(kind, ratio, gen)
    B = 8 if ratio == 4 else 3
    lens = [37, 0, 9, 64, 5, 33, 12, 1][:B] if ratio == 4 else [300, 130, 7]
    starts = [0, 5, 3, 130, 7, 64, 1, 0][:B] if ratio == 4 else [0, 125, 1000]
    kv, sc = tokens(pb, sum(lens), gen)
    skv, ssc = C.new_state(B + 2, ratio, kind)
    slots = i32(list(range(B)))
    bt = torch.arange(B * 4, dtype=torch.int32).view(B, 4)
    cch = torch.zeros(B * 4, pb.fmt.page_bytes(PAGE), dtype=torch.uint8)
    cu, st = cu_of(lens), i32(starts)
    tri.compress_kv(kv, sc, cu, st, slots, skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt, PAGE, ratio, kind)
    tri.compress_kv_entries(kv, sc, cu, st, slots, skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, ratio, kind)
    pos = i32([3, 7, -1, 130, 11, 0, 255, 127][:B])
    tri.compress_kv_decode(kv[:B], sc[:B], pos, slots, skv, ssc, pb.ape, pb.w, pb.cos, pb.sin, cch, bt, PAGE, ratio,
                           kind)


def _gpu_like_pair_launch(gen):
    """The CSA layer's decode: main and indexer compressors in one launch."""
    B = 8
    pos = i32([3, 7, -1, 130, 11, 0, 255, 127])
    slots = i32(list(range(B)))
    comps = []
    for kind in ("main", "indexer"):
        pb = problem(kind, 4, gen)
        kv, sc = tokens(pb, B, gen)
        skv, ssc = C.new_state(B + 2, 4, kind)
        bt = torch.arange(B * 4, dtype=torch.int32).view(B, 4)
        cch = torch.zeros(B * 4, pb.fmt.page_bytes(PAGE), dtype=torch.uint8)
        comps.append((kv, sc, skv, ssc, pb.ape, pb.w, cch, bt, PAGE, 4, kind))
    tri.compress_kv_decode_pair(pos, slots, pb.cos, pb.sin, *comps)


def _record_specs(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    from v4kernels import _sm90_check

    specs = {}

    def record_only(self, *args, grid, warmup, **kwargs):
        _sm90_check._record(self.fn, args, kwargs)

    # a private record dict: the session-wide recorder (V4K_SM90_CHECK=1) is left unchanged
    monkeypatch.setattr(_sm90_check, "_RECORDS", specs)
    monkeypatch.setattr(InterpretedFunction, "run", record_only)
    gen = torch.Generator().manual_seed(0)
    for kind, ratio in CONFIGS:
        _gpu_like_launches(kind, ratio, gen)
    _gpu_like_pair_launch(gen)
    monkeypatch.undo()
    return list(specs.values())


@pytest.mark.skipif(not _can_record(), reason="needs the Triton interpreter (CPU run) and a CUDA compiler backend")
def test_compressor_kernels_compile_for_sm90(monkeypatch):
    specs = _record_specs(monkeypatch)
    names = {(s["name"], s["constexprs"].get("HD"), s["constexprs"].get("R"), s["constexprs"].get("WRITE_CACHE"),
              s["constexprs"].get("DECODE")) for s in specs}
    # 3 configs x (prefill cache, prefill functional, decode) + the CSA decode pair kernel
    assert len(names) == 10, sorted(names, key=str)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(specs, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "v4kernels._sm90_check", f.name], env=env, capture_output=True,
                          text=True, timeout=900)
    os.unlink(f.name)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert f"{len(specs)}/{len(specs)} kernel specializations compiled" in proc.stdout

