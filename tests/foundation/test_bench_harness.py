"""The benchmark kit on the CPU: row maths, timing, report files, BENCHMARKS.md, the runner."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # `bench` lives at the repo root, beside the installed package
    sys.path.insert(0, REPO)

from bench import report  # noqa: E402
from bench.harness import BenchContext, shape_key, update_speedups  # noqa: E402

CEIL = {"hbm_gbs": 3000.0, "bf16_tflops": 800.0, "fp8_tflops": 1500.0}


def _ctx(ceilings=CEIL):
    return BenchContext(device=torch.device("cpu"), quick=True, ceilings=dict(ceilings), environment={"gpu": "test"})


def test_record_hbm_pct_and_target():
    ctx = _ctx()
    # 3e9 bytes in 2000 us = 1500 GB/s = 50% of 3000 GB/s
    r = ctx.record("fam", "op", "triton", {"M": 8}, 2000.0, bytes=3e9, bound="hbm", target_pct=40)
    assert r["gbs"] == pytest.approx(1500.0)
    assert r["tflops"] is None
    assert r["pct_of_ceiling"] == pytest.approx(50.0)
    assert r["meets_target"] is True
    r2 = ctx.record("fam", "op", "cuda", {"M": 8}, 2000.0, bytes=3e9, bound="hbm", target_pct=60)
    assert r2["meets_target"] is False
    r3 = ctx.record("fam", "op", "cuda", {"M": 9}, 2000.0, bytes=3e9, bound="hbm")
    assert r3["meets_target"] is None


@pytest.mark.parametrize("bound,ceiling", [("bf16", 800.0), ("fp8", 1500.0)])
def test_record_compute_pct(bound, ceiling):
    ctx = _ctx()
    # 4e11 FLOP in 1000 us = 400 TFLOP/s
    r = ctx.record("fam", "gemm", "cuda", {"n": 1}, 1000.0, flops=4e11, bound=bound, target_pct=45)
    assert r["tflops"] == pytest.approx(400.0)
    assert r["pct_of_ceiling"] == pytest.approx(100 * 400.0 / ceiling)
    assert r["meets_target"] == (100 * 400.0 / ceiling >= 45)


def test_record_missing_ceiling_and_bad_bound():
    ctx = _ctx({"hbm_gbs": 3000.0, "bf16_tflops": 800.0, "fp8_tflops": None})
    r = ctx.record("fam", "gemm", "cuda", {"n": 1}, 1000.0, flops=4e11, bound="fp8", target_pct=50)
    assert r["pct_of_ceiling"] is None and r["meets_target"] is None
    r = ctx.record("fam", "gemm", "cuda", {"n": 2}, 1000.0, flops=4e11, bound=None)
    assert r["pct_of_ceiling"] is None and r["tflops"] == pytest.approx(400.0)
    with pytest.raises(ValueError, match="bound"):
        ctx.record("fam", "gemm", "cuda", {"n": 1}, 1.0, bound="fp4")
    with pytest.raises(TypeError, match="shape"):
        ctx.record("fam", "gemm", "cuda", (1, 2), 1.0)


def test_speedups_against_every_backend():
    ctx = _ctx()
    shape = {"M": 4, "K": 128}
    ctx.record("f", "op", "reference", shape, 100.0, bytes=1e6)
    ctx.record("f", "op", "torch_compile", shape, 40.0, bytes=1e6)
    tri = ctx.record("f", "op", "triton", shape, 10.0, bytes=1e6)
    # recorded before the bf16 baseline: the speed-ups of earlier rows are updated too
    bf16 = ctx.record("f", "op", "torch_bf16", dict(reversed(list(shape.items()))), 20.0, bytes=1e6)
    other = ctx.record("f", "op", "reference", {"M": 8, "K": 128}, 1.0, bytes=1e6)  # other shape
    assert tri["speedup"] == pytest.approx({"reference": 10.0, "torch_compile": 4.0, "torch_bf16": 2.0})
    assert tri["speedup_vs_reference"] == pytest.approx(10.0)
    assert tri["speedup_vs_torch_compile"] == pytest.approx(4.0)
    assert tri["speedup_vs_torch_bf16"] == pytest.approx(2.0)
    assert bf16["speedup_vs_reference"] == pytest.approx(5.0)
    assert bf16["speedup"]["triton"] == pytest.approx(0.5)
    assert other["speedup"] == {} and other["speedup_vs_reference"] is None
    assert shape_key({"a": 1, "b": 2}) == shape_key({"b": 2, "a": 1})
    # a failed row has no time and no speed-ups, and does not disturb the others
    fail = ctx.record_failure("f", "op", "cuda", shape, RuntimeError("boom"))
    assert fail["time_us"] is None and fail["speedup"] == {} and "boom" in fail["error"]
    update_speedups(ctx.rows)
    assert tri["speedup_vs_reference"] == pytest.approx(10.0)


def test_time_cpu_median_and_rotation():
    ctx = _ctx()
    calls = []
    sets = [(torch.randn(4),), (torch.randn(4),), (torch.randn(4),)]
    t = ctx.time(lambda x: calls.append(x), arg_sets=sets, warmup_ms=1, rep_ms=2)
    assert t > 0 and math.isfinite(t)
    assert {id(c) for c in calls} == {id(s[0]) for s in sets}  # every set was used
    assert ctx.last_timing["method"] == "perf_counter"
    r = ctx.record("f", "op", "reference", {"n": 1}, t, bytes=16)
    assert r["timing"]["samples"] >= 3
    t2 = ctx.time(lambda: sum(range(100)), warmup_ms=1, rep_ms=2)
    assert t2 > 0
    with pytest.raises(ValueError, match="arg_sets"):
        ctx.time(lambda: None, arg_sets=[])


def test_make_arg_sets_and_pick():
    ctx = _ctx()
    sets = ctx.make_arg_sets(lambda: torch.randn(2), bytes_per_set=8)
    assert len(sets) == 1 and isinstance(sets[0], tuple)  # no L2 to defeat on the CPU
    ctx.l2_bytes, ctx.device = 1000, torch.device("cpu")
    assert ctx.pick(full=1, quick=2, cpu=3) == 3 and ctx.pick(full=1, quick=2) == 2


def _fake_data():
    ctx = _ctx()
    for m in (1, 64, 4096):
        shape = {"tokens": m, "K": 4096, "block": 128}
        nb = 3 * m * 4096
        ctx.record("quant", "act_quant_fp8", "reference", shape, 50.0 * m ** 0.5, bytes=nb)
        ctx.record("quant", "act_quant_fp8", "triton", shape, 5.0 * m ** 0.5, bytes=nb, bound="hbm",
                   target_pct=90 if m >= 4096 else None, target_note="90% for large M")
        ctx.record("quant", "act_quant_fp8", "cuda", shape, 4.0 * m ** 0.5, bytes=nb, bound="hbm",
                   target_pct=90 if m >= 4096 else None, target_note="90% for large M")
    ctx.record("gemm", "mm", "torch_bf16", {"n": 4096}, 200.0, flops=2 * 4096 ** 3, bound="bf16")
    ctx.record("gemm", "mm", "triton", {"n": 4096}, 250.0, flops=2 * 4096 ** 3, bound="bf16")
    ctx.record_failure("gemm", "mm", "cuda", {"n": 4096}, "NotImplementedError: no kernel")
    ctx.failures.append({"family": "broken", "error": "ImportError: nope", "traceback": "..."})
    ctx.ceilings["details"] = {"hbm_gbs": {"bytes": 1 << 30}}
    return report.results_dict(ctx, "t1", modules=[])


def test_report_files(tmp_path):
    data = _fake_data()
    paths = report.write_report(data, str(tmp_path), "t1")
    loaded = json.loads((tmp_path / "t1.json").read_text())
    assert loaded["tag"] == "t1" and len(loaded["rows"]) == 12 and loaded["ceilings"]["hbm_gbs"] == 3000.0
    assert loaded["failures"][0]["family"] == "broken"
    md = (tmp_path / "t1.md").read_text()
    assert "## quant" in md and "## gemm" in md and "act_quant_fp8" in md
    assert "tokens=4096, K=4096, block=128" in md
    assert "10x" in md  # triton vs reference
    assert "broken" in md and "failed: NotImplementedError" in md
    pytest.importorskip("matplotlib")
    names = sorted(os.path.basename(p) for p in paths["plots"])
    assert "roofline.png" in names
    assert "quant__act_quant_fp8__vs_tokens.png" in names
    for p in paths["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_never_fail(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.warns(UserWarning, match="matplotlib"):
        paths = report.write_report(_fake_data(), str(tmp_path), "t2")
    assert paths["plots"] == [] and (tmp_path / "t2.md").exists()


def test_summary_and_benchmarks_md(tmp_path):
    data = _fake_data()
    summ = {(s["family"], s["op"]): s for s in report.summarize(data)}
    q = summ[("quant", "act_quant_fp8")]
    assert q["best_backend"] == "cuda"  # fastest non-baseline
    assert q["vs_reference"][0] == pytest.approx(12.5)
    assert q["target_total"] == 1
    g = summ[("gemm", "mm")]
    assert g["best_backend"] == "triton" and g["vs_torch_bf16"][0] == pytest.approx(0.8)
    assert g["failed_rows"] == 1
    res = tmp_path / "results" / "t1.json"
    res.parent.mkdir()
    report.write_json(data, str(res))
    out = tmp_path / "BENCHMARKS.md"
    assert report.main([str(res), "--benchmarks-md", str(out)]) == 0
    text = out.read_text()
    assert "do not edit by hand" in text and "results/t1.json" in text
    assert "| act_quant_fp8 | cuda |" in text and "12.5x" in text and "### gemm" in text
    assert "3,000 GB/s" in text and "test" in text  # ceilings and GPU name
    assert "broken" in text


def _benchmarks_md_of_two_runs(tmp_path, old_gpu="test", new_gpu="test"):
    """BENCHMARKS.md of two fake runs: ``old`` (2026-01, every family) and ``new`` (2026-02, quant only);
    the newer run's JSON is passed first."""
    runs = []
    for tag, gpu, date in (("new", new_gpu, "2026-02-01"), ("old", old_gpu, "2026-01-01")):
        d = _fake_data()
        d["tag"] = tag
        d["environment"]["gpu"] = gpu
        d["environment"]["date"] = f"{date}T00:00:00+00:00"
        if tag == "new":
            d["rows"] = [r for r in d["rows"] if r["family"] == "quant"]
        runs.append(str(tmp_path / f"{tag}.json"))
        report.write_json(d, runs[-1])
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(runs + ["--benchmarks-md", str(out)]) == 0
    return out.read_text()


def test_benchmarks_md_takes_each_family_from_the_newest_run_that_measured_it(tmp_path):
    text = _benchmarks_md_of_two_runs(tmp_path)
    assert "## Run `new`: quant" in text and "## Run `old`: gemm" in text
    assert text.count("### quant") == 1 and text.count("### gemm") == 1


def test_benchmarks_md_keeps_each_gpu_apart(tmp_path):
    """A newer run on another GPU does not replace a family's run on the first GPU: one section each."""
    text = _benchmarks_md_of_two_runs(tmp_path, old_gpu="NVIDIA H100 80GB HBM3", new_gpu="NVIDIA H200")
    assert text.count("### quant") == 2 and text.count("### gemm") == 1
    assert text.index("## Run `old`") < text.index("## Run `new`")  # the first GPU measured leads
    assert "| quant | [`new`]" in text and "| quant | [`old`]" in text


def test_runner_without_gpu_exits_zero():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    out = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU" in out.stdout


def test_runner_lists_and_rejects_unknown():
    out = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "quant" in out.stdout.split()
    out = subprocess.run([sys.executable, "-m", "bench", "--only", "nosuchfamily"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "nosuchfamily" in out.stderr


def test_runner_records_failing_module(tmp_path, monkeypatch):
    """A module that raises is recorded in the JSON and the run goes on (in-process, CPU)."""
    import bench.__main__ as runner

    if torch.cuda.is_available():
        pytest.skip("CPU path only")
    fake = type(sys)("bench.bench_zz_broken")
    fake.run = lambda ctx: (_ for _ in ()).throw(RuntimeError("deliberate failure"))
    ok = type(sys)("bench.bench_zz_ok")
    ok.run = lambda ctx: ctx.record("zz", "op", "reference", {"n": 1}, ctx.time(lambda: None, rep_ms=1), bytes=8)
    monkeypatch.setitem(sys.modules, "bench.bench_zz_broken", fake)
    monkeypatch.setitem(sys.modules, "bench.bench_zz_ok", ok)
    monkeypatch.setattr(runner, "discover", lambda: ["zz_broken", "zz_ok"])
    monkeypatch.setattr("bench.harness.measure_ceilings", lambda device, quick=False: dict(CEIL, details={}))
    rc = runner.main(["--allow-cpu", "--out", str(tmp_path), "--tag", "run", "--no-plots"])
    assert rc == 1
    data = json.loads((tmp_path / "run.json").read_text())
    assert [m["status"] for m in data["modules"]] == ["failed", "ok"]
    assert "deliberate failure" in data["failures"][0]["error"]
    assert len(data["rows"]) == 1 and data["rows"][0]["family"] == "zz"
    assert (tmp_path / "run.md").exists()


def test_best_backend_is_judged_on_the_shapes_with_a_target():
    """A backend meant for large shapes (slower on the small ones, where no target applies) is the best."""
    def row(backend, n, t, target):
        return {"family": "f", "op": "o", "backend": backend, "shape": {"n": n}, "time_us": t,
                "target_pct": 85.0 if target else None}
    rows = [row("triton", 1, 10.0, False), row("cuda", 1, 30.0, False),
            row("triton", 4096, 100.0, True), row("cuda", 4096, 80.0, True)]
    assert report._best_backend(rows) == "cuda"
    assert report._best_backend([dict(r, target_pct=None) for r in rows]) == "triton"  # no targets: all shapes
