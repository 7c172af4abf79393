#!/usr/bin/env bash
# The one command run on the GPU machine: build the CUDA extension in place, run the tests, run the
# benchmarks, and leave the logs and results in a few files.
#
#   scripts/gpu_check.sh [OUTDIR] [quick|full]      (run from the repository root)
#
# OUTDIR: first argument, else $OUT, else ./.out. Files written there (at most 8, flat):
#   gpu_check.log  everything this script printed (environment, step results, summary)
#   build.log      setup.py build_ext output          tests.log   both pytest runs
#   junit.xml      both pytest runs (one <testsuite> each)
#   bench.log      python -m bench output             results.json / results.md   the bench run
#   plots.tar.gz   the bench PNGs (<tag>_plots/, the folder results.md links to)
#
# Environment:
#   GPU_CHECK_SKIP_TESTS=1 / GPU_CHECK_SKIP_DEMO=1 / GPU_CHECK_SKIP_BENCH=1   skip a step
#   GPU_CHECK_SKIP_REST=1   run only the cuda-marked tests (one pytest process per tests/ folder)
#   GPU_CHECK_FAMILIES      space-separated tests/ folders for the cuda-marked tests (default: all)
#   GPU_CHECK_DEMO_ARGS     arguments of `python -m v4kernels.model_ref demo` (output in gpu_check.log)
#   GPU_CHECK_PYTEST_ARGS   extra pytest args, shell-quoted, e.g. "-k 'attention or moe'"
#   GPU_CHECK_BENCH_ARGS    extra python -m bench args, e.g. "--only mhc,moe" (not --out/--tag)
#   GPU_CHECK_DEADLINE      seconds from start by which every step must be done (default 570: the
#                           device runs a command for at most 600 s); 0 = no time limits
#   GPU_CHECK_BENCH_RESERVE seconds kept for the bench when cutting the tests short (default 200)
#   V4K_GIT_COMMIT          recorded as the commit (overrides git; for `git archive` copies)
#   PYTHON                  interpreter (default python3)
#
# Exit status: non-zero if the build or the tests failed (or timed out), decided only after the
# bench ran and every log was written. A failing bench is reported but does not change it.
set -u
set -o pipefail

MODE_ARG="${2:-quick}"
OUTDIR="${1:-${OUT:-./.out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

main() {
    local ROOT PY MODE WORK T0 DEADLINE RESERVE
    ROOT="$(pwd)"
    PY="${PYTHON:-python3}"
    MODE="$MODE_ARG"
    [ "$MODE" = "full" ] || MODE="quick"
    WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
    T0=$SECONDS
    DEADLINE="${GPU_CHECK_DEADLINE:-570}"
    RESERVE="${GPU_CHECK_BENCH_RESERVE:-200}"
    [ "${GPU_CHECK_SKIP_BENCH:-0}" = "1" ] && RESERVE=0

    # seconds left for a step that must end $1 seconds before the deadline ("" = no limit)
    budget() {
        [ "$DEADLINE" = "0" ] && { echo ""; return; }
        local left=$(( DEADLINE - (SECONDS - T0) - $1 ))
        [ "$left" -lt 30 ] && left=30
        echo "$left"
    }
    # run "$@" under a time limit $1 (seconds, "" = none); SIGTERM first, SIGKILL 15 s later
    limited() {
        local t="$1"; shift
        if [ -n "$t" ]; then timeout --signal=TERM --kill-after=15 "$t" "$@"; else "$@"; fi
    }
    hr() { printf '%s\n' "------------------------------------------------------------------------"; }

    echo "gpu_check: repo $ROOT, output $OUTDIR, mode $MODE, deadline ${DEADLINE}s, $(date -u +%FT%TZ)"
    hr
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    hr
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for m in ("matplotlib", "tqdm", "hypothesis", "pytest", "numpy"):
    try:
        mod = __import__(m); print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception:
        print(f"{m}: missing")
EOF
    hr

    # Wheels carried from the dev machine (the device has no network), e.g. nvidia-cutlass.
    local SITE=/tmp/site
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
        "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl \
            || echo "WARNING: pip install of .whl/*.whl failed (continuing)"
    fi
    # The project is not pip-installed here: import it from the tree. python/ gives v4kernels, the
    # repo root gives bench/, $SITE the carried wheels.
    export PYTHONPATH="$ROOT/python:$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # v4kernels.model_ref: setuptools maps the top-level model_ref/ folder to the package
    # v4kernels.model_ref (package-dir in pyproject.toml); an in-place tree has no such mapping.
    # A symlink python/v4kernels/model_ref -> ../../model_ref reproduces it exactly: the package is
    # found as a real subpackage of v4kernels, so both `import v4kernels.model_ref` and relative
    # imports inside it (from ..ops import ...) resolve as in an installed wheel, with no import
    # hooks. Created only when missing (never replaces a real folder) and removed on exit.
    local SHIM=""
    if [ -d model_ref ] && [ ! -e python/v4kernels/model_ref ] && [ ! -L python/v4kernels/model_ref ]; then
        ln -s ../../model_ref python/v4kernels/model_ref && SHIM="$ROOT/python/v4kernels/model_ref"
        # shellcheck disable=SC2064
        trap "rm -f '$SHIM'" EXIT
        echo "model_ref shim: python/v4kernels/model_ref -> ../../model_ref"
    fi

    # ---- build --------------------------------------------------------------------------------
    local BUILD_RC BUILD_S EXT_STATE
    echo "build: MAX_JOBS=${MAX_JOBS:-16} V4K_FORCE_CUDA_BUILD=1 $PY setup.py build_ext --inplace  (log: build.log)"
    local tb=$SECONDS
    MAX_JOBS="${MAX_JOBS:-16}" V4K_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1
    BUILD_RC=$?
    BUILD_S=$(( SECONDS - tb ))
    echo "build: rc=$BUILD_RC in ${BUILD_S}s"
    [ "$BUILD_RC" -ne 0 ] && { echo "--- build.log (tail) ---"; tail -n 40 "$OUTDIR/build.log"; }
    EXT_STATE="$("$PY" - <<'EOF' 2>&1 | tail -n 1
import v4kernels
from v4kernels._ext import cuda_extension_error, cuda_extension_loaded
try:
    import v4kernels.model_ref  # noqa: F401
    mr = "ok"
except Exception as e:
    mr = f"FAILED ({type(e).__name__}: {e})"
ok = cuda_extension_loaded()
print(f"_C loaded: {ok}" + ("" if ok else f" ({cuda_extension_error()})") + f"; import v4kernels.model_ref: {mr}")
EOF
)"
    echo "$EXT_STATE"
    hr

    # ---- tests --------------------------------------------------------------------------------
    local -a EXTRA=()
    if [ -n "${GPU_CHECK_PYTEST_ARGS:-}" ]; then eval "EXTRA=(${GPU_CHECK_PYTEST_ARGS})"; fi
    # pytest ends cleanly (summary + junit written) on KeyboardInterrupt: map SIGTERM to it
    local RUNPYTEST='import signal, sys; signal.signal(signal.SIGTERM, signal.default_int_handler); signal.signal(signal.SIGINT, signal.default_int_handler); import pytest; sys.exit(int(pytest.main(sys.argv[1:])))'
    local CUDA_RC="skipped" REST_RC="skipped" CUDA_S=0 REST_S=0 TESTS_FAILED=0
    : >"$OUTDIR/tests.log"
    if [ "${GPU_CHECK_SKIP_TESTS:-0}" != "1" ]; then
        local t
        # 1) the GPU-only tests first (fast feedback), 2) the rest of the suite (on the GPU too:
        # tests use the cuda device when there is one). Together: the full suite, each test once.
        t=$(budget $(( RESERVE + 60 )))
        # One pytest process per test folder (op family): a device-side assert poisons the CUDA
        # context of its process, and must not fail every later family's tests.
        echo "tests 1/2: pytest -m cuda, one process per family (limit ${t:-none}s; log: tests.log)"
        local ts=$SECONDS fam tf CUDA_RC=0 frc
        local -a FAMS=()
        if [ -n "${GPU_CHECK_FAMILIES:-}" ]; then
            for fam in ${GPU_CHECK_FAMILIES}; do FAMS+=("tests/$fam/"); done
        else
            FAMS=(tests/*/)
        fi
        for fam in "${FAMS[@]}"; do
            fam="${fam%/}"
            tf=$(( t - (SECONDS - ts) ))
            [ "$tf" -lt 20 ] && tf=20
            { echo "===== pytest -m cuda $fam ${EXTRA[*]}"; } >>"$OUTDIR/tests.log"
            limited "$tf" "$PY" -c "$RUNPYTEST" "$fam" -m cuda -p no:cacheprovider -rfE --durations=5 \
                --junitxml="$WORK/junit_cuda_$(basename "$fam").xml" "${EXTRA[@]}" >>"$OUTDIR/tests.log" 2>&1
            frc=$?
            echo "  $fam: rc=$frc"
            if [ "$frc" -ne 0 ] && [ "$frc" -ne 5 ]; then CUDA_RC=$frc; fi
        done
        "$PY" - "$WORK/junit_cuda.xml" "$WORK"/junit_cuda_*.xml <<'EOF2'
import os, sys
import xml.etree.ElementTree as ET
root = ET.Element("testsuite", name="cuda")
for path in sys.argv[2:]:
    r = ET.parse(path).getroot()
    for suite in ([r] if r.tag == "testsuite" else r.findall("testsuite")):
        for k in ("tests", "failures", "errors", "skipped"):
            root.set(k, str(int(root.get(k, 0)) + int(suite.get(k, 0))))
        root.extend(list(suite))
ET.ElementTree(root).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
EOF2
        CUDA_S=$(( SECONDS - ts ))
        if [ "${GPU_CHECK_SKIP_REST:-0}" != "1" ]; then
            t=$(budget $(( RESERVE + 20 )))
            echo "tests 2/2: pytest -m 'not cuda' (limit ${t:-none}s)"
            ts=$SECONDS
            { echo; echo "===== pytest -m 'not cuda' ${EXTRA[*]}"; } >>"$OUTDIR/tests.log"
            limited "$t" "$PY" -c "$RUNPYTEST" -m "not cuda" -p no:cacheprovider -rfE --durations=15 \
                --junitxml="$WORK/junit_rest.xml" "${EXTRA[@]}" >>"$OUTDIR/tests.log" 2>&1
            REST_RC=$?
            REST_S=$(( SECONDS - ts ))
        fi
        # 5 = no tests collected (e.g. a -k filter that selects none in one of the runs): not a failure
        for rc in "$CUDA_RC" "$REST_RC"; do
            [ "$rc" = "skipped" ] && continue
            if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then TESTS_FAILED=1; fi
        done
        "$PY" - "$WORK/junit_cuda.xml" "$WORK/junit_rest.xml" "$OUTDIR/junit.xml" <<'EOF'
import os, sys
import xml.etree.ElementTree as ET
root = ET.Element("testsuites")
for path, name in zip(sys.argv[1:3], ("cuda", "not_cuda")):
    if not os.path.exists(path):
        continue
    r = ET.parse(path).getroot()
    for suite in ([r] if r.tag == "testsuite" else r.findall("testsuite")):
        suite.set("name", name)
        root.append(suite)
ET.ElementTree(root).write(sys.argv[3], encoding="utf-8", xml_declaration=True)
EOF
        if [ "$TESTS_FAILED" = "1" ]; then
            echo "--- tests.log: failures (tail) ---"
            grep -E "^(FAILED|ERROR) " "$OUTDIR/tests.log" | head -n 40
            tail -n 5 "$OUTDIR/tests.log"
        fi
    fi
    hr

    # ---- model_ref demo (the README's main job) on the GPU ------------------------------------
    # GPU_CHECK_DEMO_ARGS: extra arguments (default: Flash dimensions, 4 layers, all experts).
    if [ "${GPU_CHECK_SKIP_DEMO:-0}" != "1" ]; then
        local -a DARGS=()
        if [ -n "${GPU_CHECK_DEMO_ARGS:-}" ]; then eval "DARGS=(${GPU_CHECK_DEMO_ARGS})"; fi
        local td ts2=$SECONDS
        td=$(budget 170)
        echo "demo: $PY -m v4kernels.model_ref demo ${DARGS[*]} (limit ${td:-none}s)"
        TQDM_DISABLE=1 limited "$td" "$PY" -m v4kernels.model_ref demo "${DARGS[@]}" 2>&1 | grep -v "^\s*$"
        echo "demo: rc=${PIPESTATUS[0]} in $(( SECONDS - ts2 ))s"
        hr
    fi

    # ---- bench --------------------------------------------------------------------------------
    local BENCH_RC="skipped" BENCH_S=0 TAG=""
    if [ "${GPU_CHECK_SKIP_BENCH:-0}" != "1" ]; then
        local -a BARGS=()
        if [ -n "${GPU_CHECK_BENCH_ARGS:-}" ]; then eval "BARGS=(${GPU_CHECK_BENCH_ARGS})"; fi
        [ "$MODE" = "quick" ] && BARGS+=(--quick)
        TAG="gpu_check_${MODE}_$(date -u +%Y%m%d-%H%M%S)"
        local t
        t=$(budget 20)
        echo "bench: $PY -m bench ${BARGS[*]} --tag $TAG (limit ${t:-none}s; log: bench.log)"
        local ts=$SECONDS
        # our --out/--tag come last so they win over any in GPU_CHECK_BENCH_ARGS
        TQDM_MININTERVAL=5 limited "$t" "$PY" -m bench "${BARGS[@]}" --out "$ROOT/bench/results" --tag "$TAG" \
            >"$OUTDIR/bench.log" 2>&1
        BENCH_RC=$?
        BENCH_S=$(( SECONDS - ts ))
        local R="$ROOT/bench/results/$TAG"
        [ -f "$R.json" ] && cp "$R.json" "$OUTDIR/results.json"
        [ -f "$R.md" ] && cp "$R.md" "$OUTDIR/results.md"
        if compgen -G "${R}_plots/*.png" >/dev/null; then
            tar -czf "$OUTDIR/plots.tar.gz" -C "$ROOT/bench/results" "${TAG}_plots"
        fi
        if [ "$BENCH_RC" -ne 0 ]; then echo "--- bench.log (tail) ---"; tail -n 30 "$OUTDIR/bench.log"; fi
    fi

    # ---- summary ------------------------------------------------------------------------------
    hr
    "$PY" - "$OUTDIR" "$BUILD_RC" "$BUILD_S" "$EXT_STATE" "$CUDA_RC" "$CUDA_S" "$REST_RC" "$REST_S" \
        "$BENCH_RC" "$BENCH_S" "$MODE" "$(( SECONDS - T0 ))" "$WORK" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
(out, build_rc, build_s, ext, cuda_rc, cuda_s, rest_rc, rest_s, bench_rc, bench_s, mode, total, work) = sys.argv[1:14]

def rc_text(rc):
    return {"skipped": "skipped", "0": "ok", "5": "no tests", "124": "TIMED OUT", "137": "KILLED",
            "2": "INTERRUPTED"}.get(rc, f"FAILED (rc {rc})")

def junit(path):
    if not os.path.exists(path):
        return "no junit"
    r = ET.parse(path).getroot()
    suites = [r] if r.tag == "testsuite" else r.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"

bench = "-"
res = os.path.join(out, "results.json")
if os.path.exists(res):
    d = json.load(open(res))
    rows = d.get("rows", [])
    bad = sum(1 for r in rows if not r.get("time_us"))
    miss = sum(1 for r in rows if r.get("meets_target") is False)
    mods = d.get("modules", [])
    bench = (f"{len(rows)} rows ({bad} failed), {len(mods)} modules ({len(d.get('failures', []))} failed), "
             f"{miss} rows below target" + (", INTERRUPTED" if d.get("interrupted") else ""))
elif bench_rc != "skipped":
    bench = "no results.json"
lines = [
    ("build", rc_text(build_rc), f"{build_s}s", ext),
    ("tests -m cuda", rc_text(cuda_rc), f"{cuda_s}s", junit(os.path.join(work, "junit_cuda.xml")) if cuda_rc != "skipped" else "-"),
    ("tests -m 'not cuda'", rc_text(rest_rc), f"{rest_s}s", junit(os.path.join(work, "junit_rest.xml")) if rest_rc != "skipped" else "-"),
    (f"bench ({mode})", rc_text(bench_rc) if bench_rc != "1" else "MODULE FAILED", f"{bench_s}s", bench),
]
print("gpu_check summary")
w = max(len(l[0]) for l in lines)
for name, st, t, detail in lines:
    print(f"  {name:<{w}}  {st:<14} {t:>6}  {detail}")
print(f"  total {total}s; logs in {out}: " + " ".join(sorted(os.listdir(out))))
EOF
    rm -rf "$WORK"
    if [ "$BUILD_RC" -ne 0 ] || [ "$TESTS_FAILED" = "1" ]; then
        echo "gpu_check: FAILED (build rc=$BUILD_RC, tests failed=$TESTS_FAILED)"
        return 1
    fi
    echo "gpu_check: OK"
    return 0
}

main 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
