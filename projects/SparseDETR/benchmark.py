#!/usr/bin/env python
"""Inference throughput of Sparse DETR (rho = 0.1 ... 0.5) against Deformable DETR, measured in one run.

Every model runs on the same random batch (default 850x1040, the size the paper's FLOPs are quoted at) with
random weights: the work done does not depend on the weights (the sparse encoder keeps int(rho * tokens) + 1
tokens whatever it scores). Timings exclude warm-up and are medians; the models take turns iteration by
iteration, so a change in machine load hits all of them alike and the speed-up column stays comparable.

Examples:
  python projects/SparseDETR/benchmark.py                                   # CPU, fp32, batch 1 and 4
  python projects/SparseDETR/benchmark.py --amp MODEL.DEVICE cuda           # GPU, fp16 autocast
  python projects/SparseDETR/benchmark.py --configs configs/swin_t/*.yaml \\
      --baseline configs/swin_t/deformable_detr_bbr_two_stage.yaml
"""
import argparse
import os
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from tabulate import tabulate
from torch import nn

from sparse_detr import add_sparse_detr_config
from sparse_detr.utils.analysis import random_input
from sparse_detr.utils.timing import describe_device, interleaved_times

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIGS = [
    "configs/r50/deformable_detr.yaml",
    "configs/r50/deformable_detr_bbr_two_stage.yaml",
] + [f"configs/r50/sparse_detr_rho_0.{i}.yaml" for i in range(1, 6)]
DEFAULT_BASELINE = "configs/r50/deformable_detr_bbr_two_stage.yaml"


def _resolve(path: str) -> str:
    """A config path as given, else relative to the repository root (so the defaults work from anywhere)."""
    if os.path.isfile(path):
        return path
    candidate = REPO / path
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(f"config file not found: {path}")


def load_config(path: str, opts: Sequence[str]) -> CfgNode:
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(_resolve(path))
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def model_name(cfg: CfgNode) -> str:
    """The paper's name of the variant a config builds."""
    S = cfg.MODEL.SPARSE_DETR
    rho = S.TEST_RHO if S.TEST_RHO > 0 else S.RHO
    if rho > 0:
        return f"Sparse DETR (rho={rho:g})"
    if S.EFF_QUERY_INIT:
        return "Efficient DETR"
    extras = [name for on, name in ((S.WITH_BOX_REFINE, "BBR"), (S.TWO_STAGE, "two-stage")) if on]
    return " + ".join(["Deformable DETR"] + extras)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    # fp16 on GPUs as the paper's AMP; CPU autocast supports bfloat16
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(
    models: Dict[str, nn.Module],
    batch: List[Dict[str, Any]],
    device: torch.device,
    warmup: int,
    iters: int,
    amp: bool = False,
) -> Dict[str, List[float]]:
    """Seconds per forward of `batch` for each model, `iters` times after `warmup` untimed runs each, the models
    taking turns (see :func:`interleaved_times`)."""
    with _autocast(device, amp):
        return interleaved_times(
            {name: (lambda m=model: m(batch)) for name, model in models.items()}, warmup, iters,
            sync=lambda: _sync(device),
        )


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
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every model")
    return parser


def main(argv=None) -> Dict[str, Any]:
    """Prints the table; returns {"rows": [...], "header": str} (times in seconds)."""
    args = get_parser().parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        raise ValueError(f"--warmup must be >= 0 and --iters >= 1, got {args.warmup} and {args.iters}")
    if any(b < 1 for b in args.batch_sizes):
        raise ValueError(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    configs = [_resolve(c) for c in args.configs]
    baseline = _resolve(args.baseline)
    if baseline not in configs:
        configs.insert(0, baseline)

    cfgs = OrderedDict((path, load_config(path, args.opts)) for path in configs)
    devices = {cfg.MODEL.DEVICE for cfg in cfgs.values()}
    if len(devices) != 1:
        raise ValueError(f"all configs must run on one MODEL.DEVICE, got {sorted(devices)}")
    device = torch.device(devices.pop())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("MODEL.DEVICE is cuda but no GPU is available: add MODEL.DEVICE cpu to measure on the CPU")
    models = OrderedDict()
    for path, cfg in cfgs.items():
        torch.manual_seed(0)
        models[path] = build_model(cfg).eval()

    load_before = os.getloadavg()
    medians: Dict[int, Dict[str, float]] = {}
    for b in args.batch_sizes:
        batch = [random_input(*args.input_size, seed=i) for i in range(b)]
        times = measure(models, batch, device, args.warmup, args.iters, args.amp)
        medians[b] = {path: float(np.median(t)) for path, t in times.items()}
    load_after = os.getloadavg()

    headers = ["model", "config"]
    for b in args.batch_sizes:
        headers += [f"B{b} s/img", f"B{b} img/s", f"B{b} speed-up"]
    rows = []
    for path, cfg in cfgs.items():
        row: List[Any] = [model_name(cfg), os.path.relpath(path, REPO) if path.startswith(str(REPO)) else path]
        for b in args.batch_sizes:
            t = medians[b][path]
            row += [f"{t / b:.3f}", f"{b / t:.2f}", f"{medians[b][baseline] / t:.2f}x"]
        rows.append(row)
    dtype = (("fp16" if device.type == "cuda" else "bf16") + " autocast") if args.amp else "fp32"
    header = (
        f"Device: {describe_device(device)}; {dtype}; input {args.input_size[0]}x{args.input_size[1]}; random "
        f"weights; median of {args.iters} timed iterations after {args.warmup} warm-up, models interleaved; "
        f"speed-up = throughput / that of {model_name(cfgs[baseline])}; load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(header)
    print(tabulate(rows, headers=headers, tablefmt="pipe"))
    return {
        "header": header,
        "rows": [
            {"config": path, "model": model_name(cfg), "seconds_per_batch": {b: medians[b][path] for b in medians}}
            for path, cfg in cfgs.items()
        ],
        "baseline": baseline,
    }


if __name__ == "__main__":
    main()
