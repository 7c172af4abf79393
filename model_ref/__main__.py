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
    d.add_argument("--moe-mode", default="w4a8", choices=("w4a8", "w4a16"))
    d.add_argument("--no-check", action="store_true", help="skip the reference-path validation")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        sys.exit(2)
    return args


def main(argv=None):
    args = _parse(argv)
    if args.backend == "triton":
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    from .demo import run_demo

    run_demo(args)


if __name__ == "__main__":
    main()
