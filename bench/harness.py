"""Benchmark harness: ceilings, timing, result rows. Every ``bench/bench_<family>.py`` codes against it.

A family module defines ``run(ctx)`` and uses only this API::

    ctx.quick, ctx.device, ctx.ceilings            # ceilings: {"hbm_gbs", "bf16_tflops", "fp8_tflops"}
    ctx.cpu                                        # True on a CPU smoke run (--allow-cpu): use tiny sizes
    ctx.pick(full, quick, cpu=None)                # size choice for this run
    sets = ctx.make_arg_sets(factory, bytes_per_set)  # enough fresh input sets to keep L2 cold
    t_us = ctx.time(fn, arg_sets=sets, graph=True)     # median microseconds
    ctx.record(family=..., op=..., backend=..., shape={...}, time_us=t_us, flops=..., bytes=...,
               bound="hbm"|"bf16"|"fp8"|None, target_pct=90, target_note="...")
    ctx.record_failure(family, op, backend, shape, error)   # a backend that could not run
    fn_c = torch_compile(fn)                       # torch.compile with a high recompile limit

Timing (see ``BenchContext.time``): CUDA events, median over repetitions, cold L2 (rotation through
input sets, or a 256 MB write between calls that is not timed), optional CUDA graph replays for
microsecond kernels; on the CPU, ``time.perf_counter``.

Derived fields of a row: ``tflops = flops / t``, ``gbs = bytes / t``, ``pct_of_ceiling`` (percent of
the ceiling named by ``bound``), ``meets_target`` (``pct_of_ceiling >= target_pct``) and ``speedup``:
for every other backend of the same (family, op, shape), ``time(other) / time(this)`` (> 1: this row
is faster), with ``speedup_vs_reference`` / ``_torch_compile`` / ``_torch_bf16`` as shortcuts.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time as _time
from typing import Callable, Dict, List, Optional, Sequence

import torch

BOUNDS = ("hbm", "bf16", "fp8")
BOUND_CEILING = {"hbm": "hbm_gbs", "bf16": "bf16_tflops", "fp8": "fp8_tflops"}
BASELINES = ("reference", "torch_compile", "torch_bf16")
FLUSH_BYTES = 256 * 1024 * 1024
DEFAULT_L2_BYTES = 50 * 1024 * 1024
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# environment and ceilings


def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except Exception:  # no git, not a repository, timeout
        return None


def capture_environment(device: Optional[torch.device] = None) -> dict:
    """GPU, library versions, commit and date of this run (JSON-serializable)."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
    }
    # V4K_GIT_COMMIT names the commit a tree was exported from (`git archive`, e.g. the copy sent to
    # the GPU machine): it wins over git, whose .git there may belong to an enclosing checkout.
    pinned = os.environ.get("V4K_GIT_COMMIT")
    if pinned:
        env["git_commit"], env["git_dirty"] = pinned, False
    else:
        env["git_commit"] = _git("rev-parse", "HEAD") or "unknown"
        status = _git("status", "--porcelain", "--untracked-files=no")
        env["git_dirty"] = None if status is None else bool(status)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "none"
    try:
        import v4kernels
        from v4kernels._ext import cuda_extension_error, cuda_extension_loaded

        env["v4kernels"] = getattr(v4kernels, "__version__", "unknown")
        env["v4kernels_C"] = bool(cuda_extension_loaded())
        if not env["v4kernels_C"]:
            env["v4kernels_C_error"] = cuda_extension_error()
    except Exception as exc:  # the harness must work even when the package does not import
        env["v4kernels"] = f"import failed: {exc}"
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_sms"] = props.multi_processor_count
        env["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        env["gpu_l2_bytes"] = int(getattr(props, "L2_cache_size", 0)) or None
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                 "--format=csv,noheader", f"--id={device.index or 0}"],
                capture_output=True, text=True, timeout=20, check=True,
            )
            drv, clk, pwr = [s.strip() for s in out.stdout.strip().split(",")][:3]
            env.update(driver=drv, sm_clock_max=clk, power_limit=pwr)
        except Exception:
            env["driver"] = "unknown"
    else:
        env["gpu"] = "none (CPU: " + (platform.processor() or platform.machine()) + ")"
    return env


def _hbm_ceiling(device, quick, timer) -> dict:
    # A device-to-device copy: bytes read + bytes written. 1 GiB (quick: 512 MiB) is far above L2.
    n = (64 << 20) if device.type == "cpu" else ((512 << 20) if quick else (1 << 30))
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return {"value": 2 * n / (t * 1e-6) / 1e9, "bytes": n, "time_us": t}


def _bf16_ceiling(device, quick, timer) -> dict:
    # 8192^3 in both modes on a GPU: smaller products run below the chip's rate and would inflate
    # every "% of ceiling"; a quick run only repeats fewer times.
    n = 512 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timer(lambda: torch.mm(a, b))
    return {"value": 2 * n**3 / (t * 1e-6) / 1e12, "n": n, "time_us": t}


def _fp8_ceiling(device, quick, timer) -> Optional[dict]:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    n = 8192
    a = (torch.randn(n, n, device=device) * 8).to(torch.float8_e4m3fn)
    b = (torch.randn(n, n, device=device) * 8).to(torch.float8_e4m3fn).t()  # column-major operand
    one = torch.ones((), device=device, dtype=torch.float32)
    # the better of cuBLAS's two accumulation modes is the chip's FP8 ceiling
    times = {}
    for fast in (False, True):
        fn = lambda fast=fast: torch._scaled_mm(  # noqa: E731
            a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=fast)
        try:
            fn()
            times["fast_accum" if fast else "default"] = timer(fn)
        except Exception as exc:  # keep the mode that works
            times[("fast_accum" if fast else "default") + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
    ok = {k: v for k, v in times.items() if not k.endswith("_error")}
    if not ok:
        raise RuntimeError(f"torch._scaled_mm failed: {times}")
    t = min(ok.values())
    return {"value": 2 * n**3 / (t * 1e-6) / 1e12, "n": n, "time_us": t, "modes_us": times}


def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Measured ceilings of this device: ``{"hbm_gbs", "bf16_tflops", "fp8_tflops", "details"}``.

    fp8_tflops is None where ``torch._scaled_mm`` is unavailable (CPU, pre-Hopper, old torch)."""
    device = torch.device(device)
    probe = BenchContext(device=device, quick=quick, ceilings={})
    timer = lambda fn: probe.time(fn, warmup_ms=50, rep_ms=200 if not quick else 100)  # noqa: E731
    details = {}
    out = {}
    for key, f in (("hbm_gbs", _hbm_ceiling), ("bf16_tflops", _bf16_ceiling), ("fp8_tflops", _fp8_ceiling)):
        try:
            d = f(device, quick, timer)
        except Exception as exc:  # e.g. no fp8 GEMM for this GPU / build
            d = None
            details[key + "_error"] = f"{type(exc).__name__}: {exc}"
        out[key] = None if d is None else float(d["value"])
        if d is not None:
            details[key] = d
    probe.release()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["details"] = details
    return out


# --------------------------------------------------------------------------------------------
# compile helper


def torch_compile(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn, dynamic=False)`` with the recompile limits raised, so a benchmark that
    sweeps many shapes keeps compiling instead of silently falling back to eager after 8 shapes."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(256, getattr(dynamo.config, name)))
    if hasattr(dynamo.config, "accumulated_recompile_limit"):
        dynamo.config.accumulated_recompile_limit = max(4096, dynamo.config.accumulated_recompile_limit)
    kwargs.setdefault("dynamic", False)
    return torch.compile(fn, **kwargs)


# --------------------------------------------------------------------------------------------
# the context


def _jsonable(v):
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if hasattr(v, "item"):  # numpy / 0-d tensors
        return _jsonable(v.item())
    return str(v)


def shape_key(shape: dict) -> str:
    """Canonical text of a shape dict (rows with the same key are compared with each other)."""
    return json.dumps(_jsonable(shape), sort_keys=True)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class BenchContext:
    """What a family's ``run(ctx)`` receives: device, mode, ceilings, a timer and a row recorder."""

    def __init__(self, device, quick: bool = False, ceilings: Optional[dict] = None, environment: Optional[dict] = None):
        self.device = torch.device(device)
        self.quick = bool(quick)
        self.ceilings = dict(ceilings or {})
        self.environment = environment or {}
        self.rows: List[dict] = []
        self.failures: List[dict] = []
        self.family: Optional[str] = None  # set by the runner while a module runs
        self.last_timing: Optional[dict] = None
        self._flush_buf: Optional[torch.Tensor] = None
        self.l2_bytes = DEFAULT_L2_BYTES
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.l2_bytes = int(getattr(props, "L2_cache_size", 0)) or DEFAULT_L2_BYTES

    # ---- helpers for family modules -------------------------------------------------------

    @property
    def cpu(self) -> bool:
        """A CPU smoke run: families should use tiny sizes."""
        return self.device.type != "cuda"

    def pick(self, full, quick, cpu=None):
        """``cpu`` on a CPU run (default: ``quick``), ``quick`` with --quick, else ``full``."""
        if self.cpu:
            return quick if cpu is None else cpu
        return quick if self.quick else full

    def log(self, msg: str):
        try:
            from tqdm import tqdm

            tqdm.write(str(msg), file=sys.stderr)
        except ImportError:
            print(msg, file=sys.stderr, flush=True)

    def make_arg_sets(self, factory: Callable[[], tuple], bytes_per_set: int, max_sets: int = 64, min_sets: int = 1) -> list:
        """``factory()`` called enough times that the sets together exceed 2x the L2 (cold-cache
        rotation), capped at ``max_sets`` (tiny inputs stay partly in L2: they are latency-bound)."""
        target = 2 * self.l2_bytes if not self.cpu else 0
        n = max(min_sets, min(max_sets, math.ceil(target / max(1, bytes_per_set))))
        sets = []
        for _ in range(n):
            a = factory()
            sets.append(a if isinstance(a, tuple) else tuple(a) if isinstance(a, list) else (a,))
        return sets

    def release(self):
        self._flush_buf = None

    # ---- timing ---------------------------------------------------------------------------

    def _flush(self):
        if self._flush_buf is None:
            self._flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=self.device)
        self._flush_buf.fill_(0x5A)

    def time(self, fn: Callable, arg_sets: Optional[Sequence[tuple]] = None, graph: bool = False,
             warmup_ms: float = 25, rep_ms: float = 100) -> float:
        """Median time of one call ``fn(*args)`` in microseconds.

        arg_sets: list of argument tuples, rotated call after call (make their total exceed the L2,
            see ``make_arg_sets``); without it ``fn()`` is called and L2 is flushed before each
            timed call by writing 256 MB (not timed).
        graph: capture several calls into one CUDA graph and time its replays (per-call time =
            replay time / calls): removes launch gaps, for microsecond kernels. Without arg_sets the
            graph's calls after the first see a warm L2. Falls back to eager timing (noted in
            ``ctx.last_timing``) when capture fails.
        On the CPU: ``time.perf_counter`` around each call.
        """
        sets = [tuple(a) for a in arg_sets] if arg_sets else None
        if not sets and arg_sets is not None:
            raise ValueError("arg_sets: expected a non-empty list of argument tuples, got an empty list")
        if self.quick:
            warmup_ms, rep_ms = warmup_ms / 2, rep_ms / 2
        if self.device.type != "cuda":
            t, info = self._time_cpu(fn, sets, warmup_ms, rep_ms)
        else:
            info = None
            if graph:
                try:
                    t, info = self._time_graph(fn, sets, warmup_ms, rep_ms)
                except Exception as exc:  # capture not possible (host sync, unsupported op)
                    try:
                        torch.cuda.synchronize(self.device)
                    except Exception:  # a sticky error: the eager attempt below raises it
                        pass
                    fallback = f"graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); eager timing"
                    self.log(f"[bench] {fallback}")
                    info = {"note": fallback}
            if info is None or "note" in info:
                note = info["note"] if info else None
                t, info = self._time_eager(fn, sets, warmup_ms, rep_ms)
                if note:
                    info["note"] = note
        info["time_us"] = t
        self.last_timing = info
        return t

    def _calls(self, fn, sets, count, start=0):
        if sets is None:
            for _ in range(count):
                fn()
        else:
            n = len(sets)
            for i in range(start, start + count):
                fn(*sets[i % n])

    def _estimate_cuda(self, fn, sets) -> float:
        """Warm up once (compiles, autotunes, allocates) and estimate one call in us."""
        self._calls(fn, sets, 1)
        torch.cuda.synchronize(self.device)
        n = 1 if sets is None else min(len(sets), 4)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        self._calls(fn, sets, n)
        e.record()
        torch.cuda.synchronize(self.device)
        return max(1e-3, s.elapsed_time(e) * 1e3 / n)

    def _time_eager(self, fn, sets, warmup_ms, rep_ms):
        est = self._estimate_cuda(fn, sets)
        n_warm = int(min(1000, warmup_ms * 1e3 / est))
        self._calls(fn, sets, n_warm)
        if sets is None:
            # one timed call per iteration; the flush before it is outside the events and gives the
            # host a head start, so eager launch overhead of a single-launch op is mostly hidden
            reps = int(max(5, min(2000, rep_ms * 1e3 / est)))
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for s, e in ev:
                self._flush()
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) * 1e3 for s, e in ev]
            method, per = "cuda_events+flush", 1
        else:
            # one timed pass over all sets per iteration (back-to-back calls, cold by rotation)
            per = len(sets)
            reps = int(max(3, min(1000, rep_ms * 1e3 / (est * per))))
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for s, e in ev:
                s.record()
                self._calls(fn, sets, per)
                e.record()
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) * 1e3 / per for s, e in ev]
            method = "cuda_events+rotate"
        return statistics.median(times), self._info(method, times, calls_per_sample=per)

    def _time_graph(self, fn, sets, warmup_ms, rep_ms):
        est = self._estimate_cuda(fn, sets)
        n_sets = 1 if sets is None else len(sets)
        # enough calls per graph that a replay lasts >= ~200 us (launch cost amortized)
        rounds = max(1, math.ceil(200.0 / (est * n_sets)))
        calls = n_sets * rounds if sets is not None else min(64, rounds)
        calls = max(calls, n_sets)
        if sets is not None and calls > max(n_sets, 512):
            calls = max(n_sets, 512 - 512 % n_sets)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph requires
            self._calls(fn, sets, min(3, n_sets) if sets is not None else 2)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._calls(fn, sets, calls)
        g.replay()
        torch.cuda.synchronize(self.device)
        per_replay = est * calls
        n_warm = int(min(200, warmup_ms * 1e3 / per_replay))
        for _ in range(n_warm):
            g.replay()
        reps = int(max(5, min(1000, rep_ms * 1e3 / per_replay)))
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            if sets is None:
                self._flush()
            s.record()
            g.replay()
            e.record()
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) * 1e3 / calls for s, e in ev]
        del g
        return statistics.median(times), self._info(
            "cuda_graph+rotate" if sets is not None else "cuda_graph+flush", times, calls_per_sample=calls
        )

    def _time_cpu(self, fn, sets, warmup_ms, rep_ms):
        self._calls(fn, sets, 1)  # warm-up (compiles, allocates)
        t0 = _time.perf_counter()
        self._calls(fn, sets, 1, start=1)
        est = max(1e-7, _time.perf_counter() - t0)
        n_warm = int(min(100, warmup_ms * 1e-3 / est))
        self._calls(fn, sets, n_warm)
        reps = int(max(3, min(1000, rep_ms * 1e-3 / est)))
        times = []
        n = 1 if sets is None else len(sets)
        for i in range(reps):
            t0 = _time.perf_counter()
            if sets is None:
                fn()
            else:
                fn(*sets[i % n])
            times.append((_time.perf_counter() - t0) * 1e6)
        return statistics.median(times), self._info("perf_counter", times, calls_per_sample=1)

    @staticmethod
    def _info(method, times, calls_per_sample):
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        return {
            "method": method,
            "samples": len(times),
            "calls_per_sample": calls_per_sample,
            "min_us": min(times),
            "p10_us": q[0],
            "p90_us": q[-1],
        }

    # ---- rows -----------------------------------------------------------------------------

    def record(self, family: str, op: str, backend: str, shape: dict, time_us: Optional[float],
               flops: float = 0, bytes: float = 0, bound: Optional[str] = "hbm",
               target_pct: Optional[float] = None, target_note: str = "", note: str = "") -> dict:
        """Store one measurement and return its row (derived fields filled in, see module doc)."""
        if bound is not None and bound not in BOUNDS:
            raise ValueError(f"bound: expected one of {BOUNDS} or None, got {bound!r}")
        if not isinstance(shape, dict):
            raise TypeError(f"shape: expected a dict of shape parameters, got {type(shape).__name__}")
        t = float(time_us) if time_us is not None else None
        ok = t is not None and math.isfinite(t) and t > 0
        row = {
            "family": str(family),
            "op": str(op),
            "backend": str(backend),
            "shape": _jsonable(shape),
            "time_us": t if ok else None,
            "flops": float(flops or 0),
            "bytes": float(bytes or 0),
            "bound": bound,
            "tflops": flops / t / 1e6 if ok and flops else None,
            "gbs": bytes / t / 1e3 if ok and bytes else None,
            "pct_of_ceiling": None,
            "target_pct": target_pct,
            "target_note": target_note,
            "meets_target": None,
            "note": note,
        }
        if bound is not None and ok:
            ceiling = self.ceilings.get(BOUND_CEILING[bound])
            achieved = row["gbs"] if bound == "hbm" else row["tflops"]
            if _finite(ceiling) and achieved is not None:
                row["pct_of_ceiling"] = 100.0 * achieved / ceiling
        if target_pct is not None and row["pct_of_ceiling"] is not None:
            row["meets_target"] = bool(row["pct_of_ceiling"] >= target_pct)
        if ok and self.last_timing is not None and self.last_timing.get("time_us") == t:
            row["timing"] = {k: v for k, v in self.last_timing.items() if k != "time_us"}
        self.rows.append(row)
        update_speedups(self.rows, row)
        return row

    def record_failure(self, family: str, op: str, backend: str, shape: dict, error) -> dict:
        """A row for a backend that failed on this shape (no time; the error text is kept)."""
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        row = self.record(family, op, backend, shape, None, bound=None, note="")
        row["error"] = text[:2000]
        self.log(f"[bench] {family}/{op}/{backend} {shape_key(shape)} failed: {text[:300]}")
        return row


def update_speedups(rows: List[dict], changed: Optional[dict] = None):
    """Fill ``speedup`` (and the ``speedup_vs_*`` shortcuts) of every row in the group of
    ``changed`` (same family, op and shape), or of all rows when ``changed`` is None."""
    key = lambda r: (r["family"], r["op"], shape_key(r["shape"]))  # noqa: E731
    groups: Dict[tuple, List[dict]] = {}
    want = key(changed) if changed is not None else None
    for r in rows:
        k = key(r)
        if want is None or k == want:
            groups.setdefault(k, []).append(r)
    for members in groups.values():
        best: Dict[str, float] = {}  # backend -> fastest time in this group
        for r in members:
            t = r.get("time_us")
            if _finite(t) and (r["backend"] not in best or t < best[r["backend"]]):
                best[r["backend"]] = t
        for r in members:
            t = r.get("time_us")
            sp = {}
            if _finite(t):
                sp = {b: bt / t for b, bt in best.items() if b != r["backend"]}
            r["speedup"] = sp
            for b in BASELINES:
                r[f"speedup_vs_{b}"] = sp.get(b)
