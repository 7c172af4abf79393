"""v4kernels benchmark kit: ``python -m bench`` (see bench/__main__.py), the harness every
``bench/bench_<family>.py`` uses (bench/harness.py) and the reports (bench/report.py)."""
