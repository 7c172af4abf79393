"""Run the benchmark suite: ``python -m bench [--quick] [--only a,b] [--out DIR] [--tag TAG]``.

Discovers ``bench/bench_<family>.py`` modules, measures the ceilings once, runs each module's
``run(ctx)`` (a failing module is logged and recorded; the run goes on), and writes
``<out>/<tag>.json``, ``<tag>.md`` and ``<tag>_plots/``. The JSON is rewritten after every module,
so a run that is killed (SIGTERM/SIGINT) still leaves its rows. Without a GPU it exits 0 with a
message unless ``--allow-cpu`` (a smoke run with tiny sizes; Triton under the interpreter).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pkgutil
import re
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def discover() -> list:
    """Family names (``bench_<family>.py`` in this package), sorted."""
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([HERE]) if m.name.startswith("bench_"))


def _default_tag(env: dict, quick: bool) -> str:
    gpu = env.get("gpu", "cpu")
    gpu = re.sub(r"^NVIDIA\s+", "", gpu.split(" (")[0])
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-") or "gpu"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{gpu}_{'quick' if quick else 'full'}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (a few minutes on one H100)")
    p.add_argument("--only", default="", help="comma-separated families, e.g. quant,mhc")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    p.add_argument("--tag", default=None, help="file stem of the outputs (default: date_gpu_mode)")
    p.add_argument("--allow-cpu", action="store_true", help="without a GPU, run a CPU smoke test with tiny sizes")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--benchmarks-md", metavar="PATH", help="also regenerate BENCHMARKS.md from this run")
    p.add_argument("--list", action="store_true", help="list the families and exit")
    args = p.parse_args(argv)

    families = discover()
    if args.list:
        print("\n".join(families))
        return 0
    if args.only:
        wanted = [f.strip() for f in args.only.split(",") if f.strip()]
        unknown = [f for f in wanted if f not in families]
        if unknown:
            print(f"python -m bench: unknown families {unknown}; available: {families}", file=sys.stderr)
            return 2
        families = wanted

    import torch

    if not torch.cuda.is_available():
        if not args.allow_cpu:
            print("python -m bench: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to "
                  "benchmark. Use --allow-cpu for a CPU smoke run with tiny sizes.")
            return 0
        # Triton kernels run under the interpreter on the CPU; must be set before any @triton.jit
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        args.quick = True
    else:
        device = torch.device("cuda", torch.cuda.current_device())

    from .harness import BenchContext, capture_environment, measure_ceilings
    from .report import results_dict, write_benchmarks_md, write_json, write_report

    old_handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):  # a timeout still leaves a report
        old_handlers[sig] = signal.signal(sig, _interrupt)

    t_start = time.time()
    env = capture_environment(device)
    tag = args.tag or _default_tag(env, args.quick)
    os.makedirs(args.out, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"[bench] {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | commit {env['git_commit'][:12]}")
    log(f"[bench] families: {', '.join(families) or '(none)'}; output {os.path.join(args.out, tag)}.*")

    ctx = BenchContext(device=device, quick=args.quick, ceilings={}, environment=env)
    modules = []
    state = {"interrupted": False}

    def dump(final=False):
        data = results_dict(ctx, tag, argv=sys.argv[1:] if argv is None else list(argv), modules=modules,
                            interrupted=state["interrupted"], duration_s=round(time.time() - t_start, 1))
        if final:
            return write_report(data, args.out, tag, plots=not args.no_plots)
        write_json(data, os.path.join(args.out, f"{tag}.json"))
        return None

    try:
        t0 = time.time()
        ceilings = measure_ceilings(device, quick=args.quick)
        ctx.ceilings.update(ceilings)
        log(f"[bench] ceilings ({time.time() - t0:.1f} s): HBM {ceilings['hbm_gbs'] or 0:.0f} GB/s, "
            f"BF16 {ceilings['bf16_tflops'] or 0:.1f} TFLOP/s, FP8 {ceilings['fp8_tflops'] or 0:.1f} TFLOP/s")
        try:
            from tqdm import tqdm

            bar = tqdm(families, desc="bench", unit="family", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = families
        for family in bar:
            if hasattr(bar, "set_description"):
                bar.set_description(f"bench {family}")
            ctx.family = family
            n_before = len(ctx.rows)
            t0 = time.time()
            status, err = "ok", None
            try:
                mod = importlib.import_module(f"bench.bench_{family}")
                if not hasattr(mod, "run"):
                    raise AttributeError(f"bench/bench_{family}.py defines no run(ctx)")
                mod.run(ctx)
            except KeyboardInterrupt:
                status, err = "interrupted", "interrupted (timeout or Ctrl-C)"
                state["interrupted"] = True
            except Exception as exc:  # a failing module is recorded, the run goes on
                status = "failed"
                err = f"{type(exc).__name__}: {exc}"
                ctx.failures.append({"family": family, "error": err[:2000], "traceback": traceback.format_exc()[-8000:]})
                ctx.log(f"[bench] {family} FAILED: {err}\n{traceback.format_exc()}")
            finally:
                if device.type == "cuda":
                    try:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    except Exception as exc:  # a sticky CUDA error: the later modules will fail too
                        ctx.log(f"[bench] CUDA context unusable after {family}: {exc}")
            rows = len(ctx.rows) - n_before
            modules.append({"family": family, "status": status, "seconds": round(time.time() - t0, 1),
                            "rows": rows, **({"error": err} if err else {})})
            ctx.log(f"[bench] {family}: {status}, {rows} rows, {time.time() - t0:.1f} s")
            dump()
            if state["interrupted"]:
                break
    except KeyboardInterrupt:
        state["interrupted"] = True
        log("[bench] interrupted: writing what was measured")
    finally:
        for sig in old_handlers:  # report writing must not be cut short
            signal.signal(sig, signal.SIG_IGN)
        try:
            paths = dump(final=True)
            log(f"[bench] wrote {paths['json']}, {paths['md']} and {len(paths['plots'])} plots "
                f"({len(ctx.rows)} rows, {len(ctx.failures)} failed modules, {time.time() - t_start:.0f} s)")
            if args.benchmarks_md:
                log(f"[bench] wrote {write_benchmarks_md(paths['json'], args.benchmarks_md)}")
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h if h is not None else signal.SIG_DFL)
    if state["interrupted"]:
        return 130
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
