"""Performance benchmark: the bundle's training and scoring against a plain PyTorch loop and the machine's limit.

    python scripts/benchmark.py --out runs/bench/bench.json [--quick] [--repeats N]
    python scripts/benchmark.py --scale --out runs/bench/scale.json [--quick]     # cohort scale (the slice cache)
    python scripts/benchmark.py --gpu --out runs/bench/bench_gpu.json              # CUDA only

Everything runs in one process (``--scale``: one per cohort). What each section measures: :mod:`pipeline.benchmarks`
(``cpu``, ``scale``, ``gpu``). Prints a markdown summary and writes the JSON with the summary next to it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.benchmarks.cpu import KEYS, cpu_benchmark
from pipeline.benchmarks.gpu import GPU_MODES, gpu_training
from pipeline.benchmarks.measure import summary
from pipeline.benchmarks.scale import SCALE_KEYS, scale_benchmark
from pipeline.io import WriteError, atomic_write_json, atomic_write_text, make_output_folder


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="bench.json to write (a .md summary goes next to it)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that writes every key")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved training rounds (default 5, quick 1)")
    parser.add_argument("--gpu", action="store_true", help="only the CUDA section (pipeline.benchmarks.gpu)")
    parser.add_argument("--gpu-modes", nargs="+", choices=list(GPU_MODES), default=list(GPU_MODES))
    parser.add_argument("--scale", action="store_true", help="only the cohort-scale section (the slice cache)")
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=None, help="subjects (default 50 200 1000)")
    parser.add_argument("--workers", type=int, default=2, help="with --scale: preprocessing processes (default 2)")
    parser.add_argument("--scale-datalist", type=Path, default=None, help="with --scale: real training volumes")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device, and this torch build sees none; run it on a GPU machine.")
    return args


def run(args: argparse.Namespace) -> tuple[dict, Sequence[str]]:
    if args.gpu:
        results = {
            "torch": torch.__version__,
            **gpu_training([64] if args.quick else [64, 192], 3 if args.quick else 6, args.gpu_modes),
        }
        return results, list(results)
    if args.scale:
        sizes = args.scale_sizes or ([25, 100, 200] if args.quick else [50, 200, 1000])
        results = {
            "quick": args.quick,
            "machine": f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
            "torch": torch.__version__,
            **scale_benchmark(args.quick, sizes, args.workers, args.scale_datalist),
        }
        return results, SCALE_KEYS
    return cpu_benchmark(args.quick, args.repeats or (1 if args.quick else 5)), KEYS


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    try:  # before minutes of benchmarking
        make_output_folder(out.parent, "--out folder")
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results, keys = run(args)
    print(summary(results, keys), flush=True)
    try:
        atomic_write_json(results, out)
        atomic_write_text(summary(results, keys), out.with_suffix(".md"))
    except OSError as err:  # the figures are printed above
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
