"""``python -m v4kernels.model_ref demo``: build a V4 model with random weights, prefill and decode a
batch, validate the kernel path against the reference path, and print a summary."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m v4kernels.model_ref")
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="random-weight model: prefill + decode, kernels vs reference")
    d.add_argument("--config", default=None, help="tiny | flash | pro | path to a HF config.json "
                   "(default: tiny on CPU, flash on a GPU)")
    d.add_argument("--layers", type=int, default=None, help="truncate flash/pro to this many layers (GPU default 4)")
    d.add_argument("--context", type=int, default=None, help="prompt length per sequence (default 300 CPU, 4096 GPU)")
    d.add_argument("--batch", type=int, default=2, help="sequences (prompt lengths differ by a few tokens)")
    d.add_argument("--decode-steps", type=int, default=None, help="decode steps after the prefill (default 4 / 32)")
    d.add_argument("--backend", default=None, help="auto | triton | cuda | reference (default auto; on a CPU "
                   "'triton' runs the kernels under TRITON_INTERPRET=1)")
    d.add_argument("--numerics", default="reference", choices=("reference", "dense"),
                   help="reference: every fake-quant point of the spec; dense: no quantization simulation")
    d.add_argument("--moe-mode", default="w4a8", choices=("w4a8", "w4a16"))
    d.add_argument("--check-steps", type=int, default=None,
                   help="decode steps validated against the reference path (default 4; the reference is slow)")
    d.add_argument("--check-tokens", type=int, default=1024,
                   help="prompt tokens per sequence in the reference-path validation (default 1024)")
    d.add_argument("--no-check", action="store_true", help="skip the reference-path validation")
    d.add_argument("--no-graph", action="store_true",
                   help="decode eagerly (default on a GPU with reference numerics: steps replayed from a CUDA graph)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        sys.exit(2)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        import torch as _t

        if not _t.cuda.is_available():
            # Triton on the CPU runs under the interpreter, which must be chosen before the kernel
            # modules are imported (importing this package already did): restart with it set.
            os.environ["TRITON_INTERPRET"] = "1"
            os.execv(sys.executable, [sys.executable, "-m", "v4kernels.model_ref", *argv])
    from .demo import run_demo

    run_demo(args)


if __name__ == "__main__":
    main()
