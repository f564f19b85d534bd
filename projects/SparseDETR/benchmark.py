#!/usr/bin/env python
"""Inference throughput of Sparse DETR (rho = 0.1 ... 0.5) against Deformable DETR, measured in one run.

Every model runs on the same random batch (default 850x1040, the size the paper's FLOPs are quoted at) with
random weights, the models taking turns iteration by iteration (sparse_detr/utils/benchmark.py says why).

Examples:
  python projects/SparseDETR/benchmark.py                                   # CPU, fp32, batch 1 and 4
  python projects/SparseDETR/benchmark.py --amp MODEL.DEVICE cuda           # GPU, fp16 autocast
  python projects/SparseDETR/benchmark.py --configs configs/swin_t/*.yaml \\
      --baseline configs/swin_t/deformable_detr_bbr_two_stage.yaml
"""

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from sparse_detr.utils.benchmark import run_benchmark

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIGS = [
    "configs/r50/deformable_detr.yaml",
    "configs/r50/deformable_detr_bbr_two_stage.yaml",
] + [f"configs/r50/sparse_detr_rho_0.{i}.yaml" for i in range(1, 6)]
DEFAULT_BASELINE = "configs/r50/deformable_detr_bbr_two_stage.yaml"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="config files, one row each")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="config the speed-up is relative to")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per model and batch size")
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per model and batch size")
    parser.add_argument("--input-size", nargs=2, type=int, default=[850, 1040], metavar=("H", "W"))
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the returned result to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every model")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Prints the table; returns run_benchmark's result (times in seconds)."""
    args = get_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = run_benchmark(
        args.configs,
        args.baseline,
        args.opts,
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        iters=args.iters,
        input_size=args.input_size,
        amp=args.amp,
        root=str(REPO),
    )
    print(result["header"])
    print(result["table"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
