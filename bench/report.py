"""Reports of a benchmark run: JSON, markdown tables, PNG plots, and the top-level BENCHMARKS.md.

    python -m bench.report bench/results/<tag>.json                      # rewrite <tag>.md and plots
    python -m bench.report bench/results/<tag>.json --benchmarks-md BENCHMARKS.md

BENCHMARKS.md is always produced by this command from a results JSON, never edited by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import warnings
from typing import Dict, List, Optional

try:  # package import (python -m bench.report); the fallback serves `python bench/report.py`
    from .harness import BASELINES, BOUND_CEILING, _jsonable, shape_key, update_speedups
except ImportError:  # pragma: no cover  (run as a plain script)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.harness import BASELINES, BOUND_CEILING, _jsonable, shape_key, update_speedups

SCHEMA_VERSION = 1
# shape keys preferred as the x axis of time plots, in this order
SWEEP_KEYS = ("context", "ctx_len", "context_len", "seq_len", "s_kv", "kv_len", "tokens", "num_tokens",
              "M", "m", "n", "batch", "topk")


# --------------------------------------------------------------------------------------------
# results dict


def results_dict(ctx, tag: str, **extra) -> dict:
    """Everything of a run, JSON-ready: environment, ceilings, rows, module status, failures."""
    update_speedups(ctx.rows)
    data = {
        "schema": SCHEMA_VERSION,
        "tag": tag,
        "quick": ctx.quick,
        "device": str(ctx.device),
        "environment": ctx.environment,
        "ceilings": ctx.ceilings,
        "rows": ctx.rows,
        "failures": ctx.failures,
    }
    data.update(extra)
    return _jsonable(data)


def load_results(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(data: dict, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(data), f, indent=1, allow_nan=False)
    os.replace(tmp, path)  # a killed run never leaves a half-written JSON


# --------------------------------------------------------------------------------------------
# formatting


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.{digits - 1}f}"
    return f"{v:.{digits}g}"


def _fmt_shape(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.3g}x"


def _target(r) -> str:
    if r.get("target_pct") is None:
        return "-"
    m = r.get("meets_target")
    mark = "-" if m is None else ("yes" if m else "NO")
    return f"{mark} (>= {r['target_pct']:g}%)"


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _families(rows) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in rows:
        out.setdefault(r["family"], []).append(r)
    return out


def _ceiling_lines(ceilings: dict) -> List[str]:
    c = ceilings or {}
    d = c.get("details") or {}

    def size(key, default):
        n = (d.get(key) or {}).get("n", default)
        return f"{n}^3"

    def val(key, unit):
        return f"{_fmt(c.get(key))} {unit}" if c.get(key) else "not measured"

    mib = (d.get("hbm_gbs") or {}).get("bytes", 1 << 30) >> 20
    return [
        "| ceiling | measured |",
        "|---|---|",
        f"| HBM (device copy of {mib} MiB, read+write bytes) | {val('hbm_gbs', 'GB/s')} |",
        f"| BF16 matmul {size('bf16_tflops', 8192)} | {val('bf16_tflops', 'TFLOP/s')} |",
        f"| FP8 e4m3 `torch._scaled_mm` {size('fp8_tflops', 8192)} | {val('fp8_tflops', 'TFLOP/s')} |",
    ]


def _env_lines(env: dict) -> List[str]:
    commit = env.get("git_commit", "unknown")
    if env.get("git_dirty"):
        commit += " (uncommitted changes)"
    return [
        f"- GPU: {env.get('gpu', '?')}" + (f" (sm_{env['gpu_capability'].replace('.', '')}, "
                                          f"{env.get('gpu_sms')} SMs, driver {env.get('driver', '?')})"
                                          if env.get("gpu_capability") else ""),
        f"- torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, triton {env.get('triton', '?')}, "
        f"python {env.get('python', '?')}, v4kernels._C loaded: {_fmt(env.get('v4kernels_C'))}",
        f"- commit {commit}, date {env.get('date', '?')}",
    ]


# --------------------------------------------------------------------------------------------
# markdown of one run


def markdown(data: dict, plots: Optional[List[str]] = None) -> str:
    env = data.get("environment", {})
    lines = [f"# Benchmark run `{data.get('tag', '?')}`" + (" (quick)" if data.get("quick") else ""), ""]
    lines += _env_lines(env) + [""] + _ceiling_lines(data.get("ceilings", {})) + [""]
    lines += [
        "Times are medians in microseconds (cold L2). GB/s and TFLOP/s use the minimum bytes and FLOPs. "
        "% of ceiling is against the bound's measured ceiling above. Speed-up vs X = time(X) / time(row).",
        "",
    ]
    for family, rows in _families(data.get("rows", [])).items():
        lines += [f"## {family}", "",
                  "| op | shape | backend | time (us) | TFLOP/s | GB/s | % of ceiling | target met | "
                  "vs reference | vs torch_compile | vs torch_bf16 |",
                  "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in rows:
            pct = _fmt(r.get("pct_of_ceiling"))
            if r.get("pct_of_ceiling") is not None:
                pct += f" ({r['bound']})"
            time_cell = _fmt(r.get("time_us")) if r.get("time_us") else f"failed: {_esc(r.get('error', ''))[:80]}"
            lines.append(
                f"| {r['op']} | {_esc(_fmt_shape(r['shape']))} | {r['backend']} | {time_cell} | "
                f"{_fmt(r.get('tflops'))} | {_fmt(r.get('gbs'))} | {pct} | {_target(r)} | "
                f"{_fmt_x(r.get('speedup_vs_reference'))} | {_fmt_x(r.get('speedup_vs_torch_compile'))} | "
                f"{_fmt_x(r.get('speedup_vs_torch_bf16'))} |"
            )
        notes = sorted({r["target_note"] for r in rows if r.get("target_note")})
        if notes:
            lines += [""] + [f"- target: {_esc(n)}" for n in notes]
        lines.append("")
    failures = data.get("failures", [])
    if failures:
        lines += ["## Failed modules", ""]
        for f in failures:
            lines.append(f"- `{f.get('family')}`: {_esc(f.get('error', ''))}")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# summaries (shared by the plots and BENCHMARKS.md)


def _best_backend(rows: List[dict]) -> Optional[str]:
    """Fastest non-baseline backend of an op (by geometric mean speed over its shapes that carry a
    target, else over all its shapes); a baseline only when the op has nothing else."""
    timed = [r for r in rows if r.get("time_us")]
    ours = [r for r in timed if r["backend"] not in BASELINES] or timed
    targeted = {shape_key(r["shape"]) for r in ours if r.get("target_pct") is not None}
    if targeted:  # e.g. mhc_pre: the CUDA kernel is meant for T >= 512 and loses below, where no target applies
        ours = [r for r in ours if shape_key(r["shape"]) in targeted]
    if not ours:
        return None
    by_b: Dict[str, List[dict]] = {}
    for r in ours:
        by_b.setdefault(r["backend"], []).append(r)
    shapes = {shape_key(r["shape"]) for r in ours}

    def score(b):
        rs = by_b[b]
        cover = len({shape_key(r["shape"]) for r in rs}) / len(shapes)
        # geometric mean of time relative to the fastest row of each shape (1.0 = fastest everywhere)
        fastest = {}
        for r in ours:
            k = shape_key(r["shape"])
            fastest[k] = min(fastest.get(k, math.inf), r["time_us"])
        rel = [fastest[shape_key(r["shape"])] / r["time_us"] for r in rs]
        return (cover, math.exp(sum(math.log(x) for x in rel) / len(rel)))

    return max(by_b, key=score)


def _ops(rows) -> Dict[tuple, List[dict]]:
    out: Dict[tuple, List[dict]] = {}
    for r in rows:
        out.setdefault((r["family"], r["op"]), []).append(r)
    return out


def _gmean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _fastest_elsewhere(rows: List[dict], best: Optional[str]) -> List[str]:
    """Other non-baseline backends that are the fastest of ours at some shape (with a target if the
    op has targets), e.g. a decode kernel next to the kernel that covers every shape."""
    ours = [r for r in rows if r.get("time_us") and r["backend"] not in BASELINES]
    targeted = {shape_key(r["shape"]) for r in ours if r.get("target_pct") is not None}
    fastest: Dict[str, dict] = {}
    for r in ours:
        k = shape_key(r["shape"])
        if targeted and k not in targeted:
            continue
        if k not in fastest or r["time_us"] < fastest[k]["time_us"]:
            fastest[k] = r
    return sorted({r["backend"] for r in fastest.values()} - {best})


def _entry(family: str, op: str, rows: List[dict], backend: Optional[str]) -> dict:
    rb = [r for r in rows if r["backend"] == backend and r.get("time_us")]
    pcts = [r["pct_of_ceiling"] for r in rb if r.get("pct_of_ceiling") is not None]
    ent = {
        "family": family,
        "op": op,
        "best_backend": backend,
        "backends": sorted({r["backend"] for r in rows}),
        "shapes": len({shape_key(r["shape"]) for r in (rb if rb else rows)}),
        "bound": rb[0]["bound"] if rb else None,
        "pct_min": min(pcts) if pcts else None,
        "pct_median": statistics.median(pcts) if pcts else None,
        "pct_max": max(pcts) if pcts else None,
        "failed_rows": sum(1 for r in rows if not r.get("time_us") and (backend is None or r["backend"] == backend)),
    }
    for b in BASELINES:
        sp = [r.get(f"speedup_vs_{b}") for r in rb if r.get(f"speedup_vs_{b}")]
        ent[f"vs_{b}"] = (_gmean(sp), min(sp), max(sp)) if sp else None
    with_target = [r for r in rb if r.get("target_pct") is not None]
    ent["target_met"] = sum(1 for r in with_target if r.get("meets_target"))
    ent["target_total"] = len(with_target)
    ent["target_pct"] = with_target[0]["target_pct"] if with_target else None
    return ent


def summarize(data: dict) -> List[dict]:
    """One entry per (family, op): best backend, its % of roofline (min/median/max over its shapes),
    speed-ups vs the baselines (geometric mean, min, max) and how many shapes met their target.
    ``also``: entries of the same form for other backends that are the fastest of ours at some
    shape (BENCHMARKS.md lists them under the best one)."""
    out = []
    for (family, op), rows in _ops(data.get("rows", [])).items():
        best = _best_backend(rows)
        ent = _entry(family, op, rows, best)
        ent["shapes"] = len({shape_key(r["shape"]) for r in rows})
        ent["failed_rows"] = sum(1 for r in rows if not r.get("time_us"))
        ent["also"] = [_entry(family, op, rows, b) for b in _fastest_elsewhere(rows, best)]
        out.append(ent)
    return out


# --------------------------------------------------------------------------------------------
# plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _sweep_key(rows) -> Optional[str]:
    values: Dict[str, set] = {}
    for r in rows:
        for k, v in r["shape"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(k, set()).add(v)
    varying = [k for k, vs in values.items() if len(vs) >= 3] or [k for k, vs in values.items() if len(vs) >= 2]
    if not varying:
        return None
    for k in SWEEP_KEYS:
        if k in varying:
            return k
    return max(varying, key=lambda k: len(values[k]))


def write_plots(data: dict, out_dir: str, max_panels: int = 6) -> List[str]:
    """PNG plots into ``out_dir``; returns their paths. Never raises (a missing matplotlib or a plot
    error only warns): plots must not fail a run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        warnings.warn(f"bench.report: matplotlib unavailable ({exc}); no plots written")
        return []
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    try:
        paths += _plot_roofline(data, out_dir, plt)
    except Exception as exc:
        warnings.warn(f"bench.report: roofline plot failed: {exc}")
    for (family, op), rows in _ops(data.get("rows", [])).items():
        try:
            p = _plot_sweep(family, op, rows, out_dir, plt, max_panels)
            if p:
                paths.append(p)
        except Exception as exc:
            warnings.warn(f"bench.report: plot of {family}/{op} failed: {exc}")
        finally:
            plt.close("all")
    return paths


def _plot_roofline(data, out_dir, plt) -> List[str]:
    summ = [s for s in summarize(data) if s["pct_max"] is not None]
    if not summ:
        return []
    rows_by_op = _ops(data.get("rows", []))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(summ) + 1.5))
    labels = []
    for i, s in enumerate(summ):
        ax.barh(i, s["pct_max"], color="#4C72B0", alpha=0.8)
        pts = [r["pct_of_ceiling"] for r in rows_by_op[(s["family"], s["op"])]
               if r["backend"] == s["best_backend"] and r.get("pct_of_ceiling") is not None]
        ax.scatter(pts, [i] * len(pts), color="black", s=10, zorder=3)
        if s["target_pct"] is not None:
            ax.plot([s["target_pct"]] * 2, [i - 0.4, i + 0.4], color="red", lw=2)
        labels.append(f"{s['family']}/{s['op']} [{s['best_backend']}, {s['bound']}]")
    ax.set_yticks(range(len(summ)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("% of measured ceiling (bar: best shape; dots: every shape; red: target)")
    ax.set_xlim(0, max(105, max(s["pct_max"] for s in summ) * 1.05))
    ax.axvline(100, color="gray", ls="--", lw=0.8)
    ax.set_title(f"% of roofline per op, best backend ({data.get('environment', {}).get('gpu', '?')})", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "roofline.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _plot_sweep(family, op, rows, out_dir, plt, max_panels) -> Optional[str]:
    rows = [r for r in rows if r.get("time_us")]
    key = _sweep_key(rows)
    if key is None:
        return None
    panels: Dict[str, List[dict]] = {}
    for r in rows:
        if key not in r["shape"]:
            continue
        rest = {k: v for k, v in r["shape"].items() if k != key}
        panels.setdefault(_fmt_shape(rest) or "all", []).append(r)
    names = list(panels)
    if len(names) > max_panels:
        warnings.warn(f"bench.report: {family}/{op}: {len(names)} panels, plotting the first {max_panels}")
        names = names[:max_panels]
    ncol = min(3, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    for ax, name in zip(axes.flat, names):
        by_b: Dict[str, List[tuple]] = {}
        for r in panels[name]:
            by_b.setdefault(r["backend"], []).append((r["shape"][key], r["time_us"]))
        for b, pts in sorted(by_b.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=b,
                    ls="--" if b in BASELINES else "-")
        xs = sorted({r["shape"][key] for r in panels[name]})
        if xs and xs[0] > 0 and xs[-1] / xs[0] >= 8:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("time (us)")
        ax.set_title(name, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{family} / {op}: time vs {key}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{_safe(family)}__{_safe(op)}__vs_{_safe(key)}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# one run's files


def write_report(data: dict, out_dir: str, tag: Optional[str] = None, plots: bool = True,
                 json_file: bool = True) -> dict:
    """Write ``<out_dir>/<tag>.json``, ``<tag>.md`` and ``<tag>_plots/*.png``; returns their paths."""
    tag = tag or data.get("tag") or "run"
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{tag}.json"), "md": os.path.join(out_dir, f"{tag}.md"), "plots": []}
    if json_file:
        write_json(data, paths["json"])
    if plots:
        paths["plots"] = write_plots(data, os.path.join(out_dir, f"{tag}_plots"))
    rel = [os.path.relpath(p, out_dir) for p in paths["plots"]]
    with open(paths["md"], "w") as f:
        f.write(markdown(data, rel))
    return paths


# --------------------------------------------------------------------------------------------
# BENCHMARKS.md


def _family_table(data: dict, family: str) -> List[str]:
    def sp(v):
        return "-" if v is None else f"{v[0]:.3g}x [{v[1]:.3g} - {v[2]:.3g}]"

    lines = ["| op | best backend | shapes | % of roofline (min / med / max) | vs reference | "
             "vs torch_compile | vs torch_bf16 | target met |",
             "|---|---|---:|---|---|---|---|---|"]
    for best in summarize(data):
        if best["family"] != family:
            continue
        for s in [best] + best["also"]:
            pct = "-" if s["pct_median"] is None else (
                f"{_fmt(s['pct_min'])} / {_fmt(s['pct_median'])} / {_fmt(s['pct_max'])} ({s['bound']})")
            tgt = "-" if not s["target_total"] else f"{s['target_met']}/{s['target_total']} (>= {s['target_pct']:g}%)"
            fail = f", {s['failed_rows']} failed" if s["failed_rows"] else ""
            name = s["best_backend"] or "-"
            if s is not best:  # fastest on some shapes only: its own shapes, its own counts
                name += " (fastest on some shapes)"
            lines.append(
                f"| {s['op']} | {name} | {s['shapes']}{fail} | {pct} | {sp(s['vs_reference'])} | "
                f"{sp(s['vs_torch_compile'])} | {sp(s['vs_torch_bf16'])} | {tgt} |")
    return lines


def _measured_families(data: dict) -> List[str]:
    """Families with at least one timed row in this run (in first-row order)."""
    fams: List[str] = []
    for r in data.get("rows", []):
        if r.get("time_us") and r["family"] not in fams:
            fams.append(r["family"])
    return fams


def benchmarks_md(runs: List[tuple], md_dir: Optional[str] = None) -> str:
    """BENCHMARKS.md from one or more runs ``[(results_path, data), ...]``: every family appears once per
    GPU, from the newest run (by its recorded date) on that GPU that measured it, with that run's GPU,
    versions, commit and ceilings. GPUs in the order of their first run (the machine measured first
    leads)."""
    runs = sorted(runs, key=lambda pd: pd[1].get("environment", {}).get("date", ""), reverse=True)

    def rel(path):
        return os.path.relpath(path, md_dir) if md_dir else path

    cmd = "python -m bench.report " + " ".join(rel(p) for p, _ in sorted(runs)) + " --benchmarks-md BENCHMARKS.md"
    source: Dict[tuple, tuple] = {}  # (gpu, family) -> (path, data)
    first_seen = {}
    for path, data in sorted(runs, key=lambda pd: pd[1].get("environment", {}).get("date", "")):
        first_seen.setdefault(data.get("environment", {}).get("gpu", "?"), len(first_seen))
    for path, data in runs:
        gpu = data.get("environment", {}).get("gpu", "?")
        for fam in _measured_families(data):
            source.setdefault((gpu, fam), (path, data))
    source = dict(sorted(source.items(), key=lambda kv: first_seen[kv[0][0]]))
    lines = [
        "# v4kernels benchmarks",
        "",
        f"<!-- generated by `{cmd}`; do not edit by hand -->",
        "",
        "Each op family, per GPU, from the newest benchmark run on that GPU that measured it "
        "(`python -m bench`, usually through `scripts/gpu_check.sh` on the GPU). Per op: the best v4kernels "
        "backend (fastest over the shapes that carry a target, else over all shapes measured), its % of the "
        "measured roofline (min / median / max over shapes), its speed-up against the baselines (geometric "
        "mean, [min - max]), and how many shapes met the `../shared/ANCHORS.md` target. Full per-shape "
        "tables and plots: the run's `.md` next to its JSON.",
        "",
        "| family | run | GPU | commit | date |",
        "|---|---|---|---|---|",
    ]
    for (_, fam), (path, data) in source.items():
        env = data.get("environment", {})
        commit = (env.get("git_commit") or "unknown")[:10] + (" + uncommitted" if env.get("git_dirty") else "")
        lines.append(f"| {fam} | [`{data.get('tag', '?')}`]({os.path.splitext(rel(path))[0]}.md)"
                     + (" (quick)" if data.get("quick") else "")
                     + f" | {env.get('gpu', '?')} | {commit} | {env.get('date', '?')} |")
    lines.append("")
    shown_runs = []
    for _, (path, data) in source.items():
        if path not in shown_runs:
            shown_runs.append(path)
    for path in shown_runs:
        data = dict(runs)[path]
        fams = [f for (_, f), (p, _) in source.items() if p == path]
        lines += [f"## Run `{data.get('tag', '?')}`: {', '.join(fams)}", ""]
        lines += _env_lines(data.get("environment", {})) + [""] + _ceiling_lines(data.get("ceilings", {})) + [""]
        for fam in fams:
            lines += [f"### {fam}", ""] + _family_table(data, fam) + [""]
        failures = [f for f in data.get("failures", []) if f.get("family") in fams]
        if failures:
            lines += ["Modules that failed in this run:", ""]
            lines += [f"- `{f.get('family')}`: {_esc(f.get('error', ''))}" for f in failures] + [""]
    newest_path, newest = runs[0]
    unmeasured = [f for f in newest.get("failures", []) if f.get("family") not in {fam for _, fam in source}]
    if unmeasured:
        lines += [f"## Modules that failed in the newest run (`{newest.get('tag', '?')}`) and were never measured", ""]
        lines += [f"- `{f.get('family')}`: {_esc(f.get('error', ''))}" for f in unmeasured] + [""]
    return "\n".join(lines)


def write_benchmarks_md(results_paths, out_path: str = "BENCHMARKS.md") -> str:
    if isinstance(results_paths, str):
        results_paths = [results_paths]
    runs = [(p, load_results(p)) for p in results_paths]
    text = benchmarks_md(runs, os.path.dirname(os.path.abspath(out_path)))
    with open(out_path, "w") as f:
        f.write(text)
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results JSON(s) written by python -m bench; with "
                   "--benchmarks-md, each family is taken from the newest run that measured it")
    p.add_argument("--benchmarks-md", metavar="PATH", help="write the top-level BENCHMARKS.md summary here")
    p.add_argument("--regen", action="store_true",
                   help="rewrite <tag>.md and plots next to the JSON (the default without --benchmarks-md)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.regen or not args.benchmarks_md:
        for path in args.results:
            out_dir = os.path.dirname(os.path.abspath(path))
            tag = os.path.splitext(os.path.basename(path))[0]
            paths = write_report(load_results(path), out_dir, tag, plots=not args.no_plots, json_file=False)
            print(f"wrote {paths['md']} and {len(paths['plots'])} plots")
    if args.benchmarks_md:
        print(f"wrote {write_benchmarks_md(args.results, args.benchmarks_md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
