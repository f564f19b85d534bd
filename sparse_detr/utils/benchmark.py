"""Inference throughput of several model configs measured in one run (projects/SparseDETR/benchmark.py).

Every model runs on the same random batch with random weights: the work done does not depend on the weights (the
sparse encoder keeps int(rho * tokens) + 1 tokens whatever it scores). Timings exclude warm-up and are medians; the
models take turns iteration by iteration, so a change in machine load hits all of them alike and the speed-up column
stays comparable.
"""

import os
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from tabulate import tabulate
from torch import nn

from ..config import setup_cfg
from .analysis import random_input
from .timing import describe_device, interleaved_times

__all__ = ["measure", "model_name", "resolve_config_path", "run_benchmark"]


def resolve_config_path(path: str, root: str) -> str:
    """A config path as given, else relative to ``root`` (so a tool's default configs work from any directory)."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(root, path)
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


def _autocast(device: torch.device, amp: bool) -> ContextManager:
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
    taking turns (see :func:`~sparse_detr.utils.timing.interleaved_times`)."""
    with _autocast(device, amp):
        return interleaved_times(
            {name: (lambda m=model: m(batch)) for name, model in models.items()},
            warmup,
            iters,
            sync=lambda: _sync(device),
        )


def run_benchmark(
    configs: Sequence[str],
    baseline: str,
    opts: Sequence[str] = (),
    *,
    batch_sizes: Sequence[int] = (1, 4),
    warmup: int = 2,
    iters: int = 10,
    input_size: Sequence[int] = (850, 1040),
    amp: bool = False,
    root: str = ".",
) -> Dict[str, Any]:
    """Times the models of ``configs`` (the ``baseline`` added first if missing) on random batches of each size.

    Args:
        configs, baseline: config files, found as given or under ``root``; the speed-up is relative to ``baseline``.
        opts: config overrides (KEY VALUE pairs) for every model; they must all run on one ``MODEL.DEVICE``.
        batch_sizes: images per batch, one timing of every model each.
        warmup, iters: untimed and timed forwards per model and batch size.
        input_size: (H, W) of the random images.
        amp: autocast (fp16 on CUDA, bf16 on the CPU).

    Returns:
        ``{"header": str, "table": str, "rows": [{"config", "model", "seconds_per_batch": {batch size: s}}],
        "baseline": path}``, the header and table ready to print.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"--warmup must be >= 0 and --iters >= 1, got {warmup} and {iters}")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"--batch-sizes must be positive, got {list(batch_sizes)}")
    paths = [resolve_config_path(c, root) for c in configs]
    baseline = resolve_config_path(baseline, root)
    if baseline not in paths:
        paths.insert(0, baseline)

    cfgs = OrderedDict((path, setup_cfg(path, opts)) for path in paths)
    devices = {cfg.MODEL.DEVICE for cfg in cfgs.values()}
    if len(devices) != 1:
        raise ValueError(f"all configs must run on one MODEL.DEVICE, got {sorted(devices)}")
    device = torch.device(devices.pop())
    models = OrderedDict()
    for path, cfg in cfgs.items():
        torch.manual_seed(0)
        models[path] = build_model(cfg).eval()

    load_before = os.getloadavg()
    medians: Dict[int, Dict[str, float]] = {}
    for b in batch_sizes:
        batch = [random_input(*input_size, seed=i) for i in range(b)]
        times = measure(models, batch, device, warmup, iters, amp)
        medians[b] = {path: float(np.median(t)) for path, t in times.items()}
    load_after = os.getloadavg()

    headers = ["model", "config"]
    for b in batch_sizes:
        headers += [f"B{b} s/img", f"B{b} img/s", f"B{b} speed-up"]
    rows = []
    root = os.path.abspath(root)
    for path, cfg in cfgs.items():
        row: List[Any] = [model_name(cfg), os.path.relpath(path, root) if path.startswith(root) else path]
        for b in batch_sizes:
            t = medians[b][path]
            row += [f"{t / b:.3f}", f"{b / t:.2f}", f"{medians[b][baseline] / t:.2f}x"]
        rows.append(row)
    dtype = (("fp16" if device.type == "cuda" else "bf16") + " autocast") if amp else "fp32"
    header = (
        f"Device: {describe_device(device)}; {dtype}; input {input_size[0]}x{input_size[1]}; random "
        f"weights; median of {iters} timed iterations after {warmup} warm-up, models interleaved; "
        f"speed-up = throughput / that of {model_name(cfgs[baseline])}; load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    return {
        "header": header,
        "table": tabulate(rows, headers=headers, tablefmt="pipe"),
        "rows": [
            {"config": path, "model": model_name(cfg), "seconds_per_batch": {b: medians[b][path] for b in medians}}
            for path, cfg in cfgs.items()
        ],
        "baseline": baseline,
    }
