#!/usr/bin/env python
"""Inference throughput of Sparse DETR (rho = 0.1 ... 0.5) against Deformable DETR, measured in one run.

Every model runs on the same random batch (default 850x1040, the size the paper's FLOPs are quoted at) with random
weights: the work does not depend on the weights (the sparse encoder keeps int(rho * tokens) + 1 tokens whatever it
scores). The models take turns run by run (sparse_detr.measure), so a change in machine load hits all of them
alike; times are medians after warm-up, the speed-up the median of the per-run ratios to the baseline. Each model
runs as inference runs it (sparse_detr.engine.build_inference_model without weights).

Examples:
  python projects/SparseDETR/benchmark.py                                   # CPU, fp32, batch 1 and 4
  python projects/SparseDETR/benchmark.py --amp MODEL.DEVICE cuda           # GPU, fp16 autocast
  python projects/SparseDETR/benchmark.py --configs configs/swin_t/*.yaml \\
      --baseline configs/swin_t/deformable_detr_bbr_two_stage.yaml
"""

import argparse
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
from detectron2.config import CfgNode

from sparse_detr import setup_cfg
from sparse_detr.analysis import random_input
from sparse_detr.engine import build_inference_model
from sparse_detr.measure import Report, check_rounds, describe_device, interleaved_times

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIGS = [
    "configs/r50/deformable_detr.yaml",
    "configs/r50/deformable_detr_bbr_two_stage.yaml",
] + [f"configs/r50/sparse_detr_rho_0.{i}.yaml" for i in range(1, 6)]
DEFAULT_BASELINE = "configs/r50/deformable_detr_bbr_two_stage.yaml"


def resolve_config_path(path: str) -> str:
    """A config path as given, else relative to the repository (so the defaults work from any directory)."""
    for candidate in (path, str(REPO / path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"config file not found: {path}")


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


def run(
    configs: Sequence[str],
    baseline: str,
    opts: Sequence[str] = (),
    batch_sizes: Sequence[int] = (1, 4),
    warmup: int = 2,
    iters: int = 10,
    input_size: Sequence[int] = (850, 1040),
    amp: bool = False,
) -> Report:
    """Times the models of ``configs`` (``baseline`` added first if missing) on a random batch of each size.

    ``opts`` (KEY VALUE overrides) apply to every model; they must all run on one ``MODEL.DEVICE``. ``amp``:
    autocast, fp16 on CUDA (the paper's AMP), bf16 on the CPU.
    """
    check_rounds(warmup, iters)
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"--batch-sizes must be positive, got {list(batch_sizes)}")
    paths = [resolve_config_path(c) for c in configs]
    baseline = resolve_config_path(baseline)
    if baseline not in paths:
        paths.insert(0, baseline)
    cfgs = {path: setup_cfg(path, opts) for path in paths}
    devices = {cfg.MODEL.DEVICE for cfg in cfgs.values()}
    if len(devices) != 1:
        raise ValueError(f"all configs must run on one MODEL.DEVICE, got {sorted(devices)}")
    device = torch.device(devices.pop())
    models = {}
    for path, cfg in cfgs.items():
        torch.manual_seed(0)
        models[path] = build_inference_model(cfg, allow_random_weights=True)
    autocast = torch.autocast(device.type, torch.float16 if device.type == "cuda" else torch.bfloat16)

    columns = ["model", "config"] + [f"B{b} {c}" for b in batch_sizes for c in ("s/img", "img/s", "speed-up")]
    rows = {path: {"model": model_name(cfg), "config": os.path.relpath(path, REPO)} for path, cfg in cfgs.items()}
    load_before = os.getloadavg()[0]
    for b in batch_sizes:
        batch = [random_input(*input_size, seed=i) for i in range(b)]
        with torch.inference_mode(), autocast if amp else nullcontext():
            fns = {p: (lambda m=m, batch=batch: m(batch)) for p, m in models.items()}
            timings = interleaved_times(fns, warmup, iters, device)
        for path, row in rows.items():
            seconds = timings.median(path)
            row.update({f"B{b} s/img": f"{seconds / b:.3f}", f"B{b} img/s": f"{b / seconds:.2f}"})
            speedup = timings.speedup(baseline, path)
            row[f"B{b} speed-up"] = f"{speedup:.2f}x"
            row.setdefault("seconds_per_batch", {})[b] = seconds
            row.setdefault("speedup", {})[b] = speedup
    dtype = (("fp16" if device.type == "cuda" else "bf16") + " autocast") if amp else "fp32"
    header = (
        f"{describe_device(device)}; {dtype}; input {input_size[0]}x{input_size[1]}; random weights; median of "
        f"{iters} runs after {warmup} warm-up, models interleaved; speed-up over {model_name(cfgs[baseline])}; "
        f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    return Report(header, columns, list(rows.values()))


def main(argv: Optional[Sequence[str]] = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="config files, one row each")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="config the speed-up is relative to")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per model and batch size")
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per model and batch size")
    parser.add_argument("--input-size", nargs=2, type=int, default=[850, 1040], metavar=("H", "W"))
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every model")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = run(
        args.configs, args.baseline, args.opts, args.batch_sizes, args.warmup, args.iters, args.input_size, args.amp
    )
    report.emit(args.json)
    return report


if __name__ == "__main__":
    main()
