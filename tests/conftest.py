"""Test configuration: CPU runs Triton kernels under the interpreter; `cuda` tests skip cleanly."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decorator runs (v4kernels imports triton lazily per family).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("gpu", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))


_SM90_CHECK = os.environ.get("V4K_SM90_CHECK") == "1" and not torch.cuda.is_available()
if _SM90_CHECK:  # record every Triton launch of the CPU run, compile each for sm_90 at the end
    from v4kernels._sm90_check import install_recorder

    install_recorder()


def pytest_sessionfinish(session, exitstatus):
    """With V4K_SM90_CHECK=1 (CI): every kernel specialization the tests ran under the interpreter
    must also compile for a Hopper GPU (see v4kernels/_sm90_check.py)."""
    if not _SM90_CHECK:
        return
    import json
    import subprocess
    import sys
    import tempfile

    from v4kernels._sm90_check import records

    recs = records()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(recs, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "v4kernels._sm90_check", f.name], env=env,
                          capture_output=True, text=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    out = reporter.write_line if reporter else print
    for line in (proc.stdout + proc.stderr).strip().splitlines()[-400:]:
        out(line)
    if proc.returncode != 0:
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen(request):
    from v4kernels.testing import make_generator

    return make_generator(request.node.nodeid)
