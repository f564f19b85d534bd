#!/usr/bin/env python
"""FLOPs and parameters of a SparseDETR model, in the manner of detectron2's tools/analyze_model.py.

FLOPs are counted with fvcore as the paper counts them (the reference's `util/benchmark.py`): one fused
multiply-add is one FLOP, elementwise ops are not counted, and the deformable attention op counts as fvcore counts
the reference's grid_sample path (sparse_detr.analysis.flops), on the model as written (not prepared for inference:
the fast path's equal outputs with fewer FLOPs would shift every published figure). Both the count of this model's
inference path and the count with the heads that only training uses (which the reference also runs at inference)
are given.

Examples:
  # the paper's protocol: one random 850x1040 input, 91 classes as the reference
  python projects/SparseDETR/analyze_model.py --tasks flop parameter --approximate \\
      --config-file configs/r50/sparse_detr_rho_0.1.yaml MODEL.SPARSE_DETR.NUM_CLASSES 91
  # mean over the first 100 images of DATASETS.TEST[0], through the test mapper
  python projects/SparseDETR/analyze_model.py --tasks flop -n 100 --config-file configs/r50/sparse_detr_rho_0.1.yaml
"""

import argparse
import logging
from collections import Counter, OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from sparse_detr import setup_cfg
from sparse_detr.analysis import (
    FlopCountAnalysis,
    flop_breakdown,
    num_kept_tokens,
    parameter_breakdown,
    random_input,
    training_only_head_flops,
)
from sparse_detr.data.build import build_detr_test_loader
from sparse_detr.engine import build_inference_model

TASKS = ("flop", "parameter", "structure")
logger = logging.getLogger("sparse_detr.analyze_model")


def flop_inputs(
    cfg: CfgNode, approximate: bool, input_size: Sequence[int] = (850, 1040), num_inputs: int = 100
) -> Iterable[List[Dict[str, Any]]]:
    """One-image batches to count FLOPs on: one random input of ``input_size`` (H, W) if ``approximate``, else the
    first ``num_inputs`` images of ``DATASETS.TEST[0]`` through the test mapper."""
    if approximate:
        return [[random_input(*input_size)]]
    if not cfg.DATASETS.TEST:
        raise ValueError("counting FLOPs on dataset images (without --approximate) needs a dataset in DATASETS.TEST")
    loader = build_detr_test_loader(cfg, cfg.DATASETS.TEST[0])
    return (batch for _, batch in zip(range(num_inputs), loader))


def _giga(x: float) -> str:
    return f"{x / 1e9:.2f}"


@torch.no_grad()
def analyze_flops(
    cfg: CfgNode, approximate: bool, input_size: Sequence[int] = (850, 1040), num_inputs: int = 100
) -> Dict[str, float]:
    """Logs the GFLOPs per part and per operator of the model of ``cfg`` (weights from ``MODEL.WEIGHTS`` if set),
    averaged over :func:`flop_inputs`.

    Returns:
        the mean totals in GFLOPs: ``gflops`` (this model's inference) and ``gflops_with_training_heads``.
    """
    model = build_inference_model(cfg, allow_random_weights=True, prepare=False)
    parts: Counter = Counter()
    operators: Counter = Counter()
    totals, with_heads, sizes = [], [], []
    extra_sum: Counter = Counter()
    for idx, inputs in enumerate(flop_inputs(cfg, approximate, input_size, num_inputs)):
        flops = FlopCountAnalysis(model, inputs)
        if idx > 0:
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        breakdown = flop_breakdown(model, flops)
        extra = training_only_head_flops(model, num_kept_tokens(model, inputs))
        parts.update(breakdown)
        operators.update(flops.by_operator())
        extra_sum.update(extra)
        totals.append(breakdown["total"])
        with_heads.append(breakdown["total"] + sum(extra.values()))
        sizes.append(tuple(inputs[0]["image"].shape[-2:]))
    n = len(totals)
    if n == 0:
        raise ValueError(f"no input: DATASETS.TEST[0] ({cfg.DATASETS.TEST[0]}) is empty or --num-inputs is 0")

    where = (
        f"one random {sizes[0][0]}x{sizes[0][1]} input"
        if approximate
        else f"mean over the first {n} images of {cfg.DATASETS.TEST[0]} (mean size "
        f"{np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f})"
    )
    # the encoder aux heads do not run at inference: they are added below
    rows = [(part, _giga(v / n)) for part, v in parts.items() if part not in ("total", "encoder aux heads")]
    rows.append(("total (this model's inference)", _giga(np.mean(totals))))
    for name, v in extra_sum.items():
        rows.append((f"+ {name} (training only)", _giga(v / n)))
    label = "total with the training-only heads (the reference runs them at inference)"
    rows.append((label, _giga(np.mean(with_heads))))
    logger.info(f"GFLOPs by part, {where}:\n" + tabulate(rows, headers=["part", "GFLOPs"], tablefmt="pipe"))
    ops = sorted(((k, v / n) for k, v in operators.items()), key=lambda kv: -kv[1])
    table = tabulate([(k, _giga(v)) for k, v in ops], headers=["operator", "GFLOPs"], tablefmt="pipe")
    logger.info("GFLOPs by operator:\n" + table)
    result = {"gflops": float(np.mean(totals)) / 1e9, "gflops_with_training_heads": float(np.mean(with_heads)) / 1e9}
    if n > 1:
        logger.info(f"Total GFLOPs: {result['gflops']:.2f} ± {np.std(totals) / 1e9:.2f}")
    return result


def analyze_parameters(cfg: CfgNode) -> Dict[str, int]:
    """Logs the trainable (requires_grad) and all parameters of the model of ``cfg`` per part.

    Returns:
        the totals, ``{"trainable": ..., "all": ...}``.
    """
    model = build_model(cfg)
    trainable = parameter_breakdown(model, trainable_only=True)
    everything = parameter_breakdown(model, trainable_only=False)
    rows = [(part, f"{trainable[part]:,}", f"{everything[part]:,}") for part in trainable]
    aux = trainable.get("encoder aux heads", 0)
    if aux:
        rows.append(
            (
                "total without the encoder aux heads",
                f"{trainable['total'] - aux:,}",
                f"{everything['total'] - everything['encoder aux heads']:,}",
            )
        )
    logger.info(
        f"Parameters ({cfg.MODEL.SPARSE_DETR.NUM_CLASSES} classes):\n"
        + tabulate(rows, headers=["part", "trainable", "all"], tablefmt="pipe")
    )
    return OrderedDict(trainable=trainable["total"], all=everything["total"])


def analyze_structure(cfg: CfgNode) -> None:
    """Logs the module tree of the model of ``cfg``."""
    logger.info("Model Structure:\n" + str(build_model(cfg)))


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
