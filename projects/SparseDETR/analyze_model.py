#!/usr/bin/env python
"""FLOPs and parameters of a SparseDETR model, in the manner of detectron2's tools/analyze_model.py.

FLOPs are counted as the paper counts them, with and without the heads that only training uses (the reference
runs them at inference too); how: sparse_detr/utils/analysis_tables.py.

Examples:
  # the paper's protocol: one random 850x1040 input, 91 classes as the reference
  python projects/SparseDETR/analyze_model.py --tasks flop parameter --approximate \\
      --config-file configs/r50/sparse_detr_rho_0.1.yaml MODEL.SPARSE_DETR.NUM_CLASSES 91
  # mean over the first 100 images of DATASETS.TEST[0], through the test mapper
  python projects/SparseDETR/analyze_model.py --tasks flop -n 100 --config-file configs/r50/sparse_detr_rho_0.1.yaml
"""

import argparse
from typing import Any, Dict, Optional, Sequence

from detectron2.engine import default_argument_parser
from detectron2.utils.logger import setup_logger

from sparse_detr import setup_cfg
from sparse_detr.utils.analysis_tables import analyze_flops, analyze_parameters, analyze_structure

TASKS = ("flop", "parameter", "structure")


def get_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--tasks", choices=TASKS, required=True, nargs="+")
    parser.add_argument(
        "-n",
        "--num-inputs",
        default=100,
        type=int,
        help="images of DATASETS.TEST[0] averaged over (FLOPs depend on the image size)",
    )
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="count on one random input of --input-size instead of dataset images (the paper's protocol)",
    )
    parser.add_argument("--input-size", nargs=2, type=int, default=[850, 1040], metavar=("H", "W"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = get_parser().parse_args(argv)
    if args.eval_only or args.num_gpus != 1:
        raise ValueError("analyze_model.py runs in one process: --eval-only and --num-gpus do not apply")
    for name in ("fvcore", "detectron2", "sparse_detr"):
        setup_logger(name=name)
    # images are loaded in this process: counting their FLOPs, not loading them, takes the time
    cfg = setup_cfg(args.config_file, ["DATALOADER.NUM_WORKERS", "0", *args.opts])
    run = {
        "flop": lambda: analyze_flops(cfg, args.approximate, args.input_size, args.num_inputs),
        "parameter": lambda: analyze_parameters(cfg),
        "structure": lambda: analyze_structure(cfg),
    }
    return {task: run[task]() for task in args.tasks}


if __name__ == "__main__":
    main()
