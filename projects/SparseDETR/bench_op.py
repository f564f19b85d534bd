#!/usr/bin/env python
"""Benchmark of the multi-scale deformable attention core: the compiled op vs the grid_sample reference.

Three calls of Sparse DETR at the paper's test size (encoder, sparse encoder, decoder), forward and forward+backward
time and peak memory of each implementation; what is measured and how: sparse_detr/utils/op_benchmark.py.

Usage: python projects/SparseDETR/bench_op.py [--repeats 7] [--warmup 1] [--threads T]
                                              [--calls encoder,sparse_encoder,decoder] [--json FILE]
                                              [--targets cpu:float32,cuda:bfloat16,...]
"""

import argparse
import json
from typing import Optional, Sequence

import torch

from sparse_detr.utils.op_benchmark import CALLS, describe_setup, format_results, run_op_benchmark


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each implementation (median kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, help="intra-op threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--calls", default=",".join(CALLS), help=f"comma-separated subset of {CALLS}")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument(
        "--targets",
        help="comma-separated DEVICE:DTYPE pairs (default: cpu:float32, and "
        "cuda:float32, cuda:float16 where the CUDA kernels run)",
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_setup(args.warmup, args.repeats) + "\n")
    targets = [tuple(t.split(":", 1)) for t in args.targets.split(",") if t] if args.targets else None
    results = run_op_benchmark(
        [c for c in args.calls.split(",") if c], args.warmup, args.repeats, args.threads, targets
    )
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
