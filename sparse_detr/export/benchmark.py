"""The inference paths of one model timed in one run, with the peak memory of a forward: the logic of
`projects/SparseDETR/benchmark_deploy.py`.

Paths (every one runs the whole inference of one image: normalization, backbone, transformer, post-processing):

- ``eager-plain``: PyTorch eager with MODEL.SPARSE_DETR.FAST_INFERENCE off (the model as written);
- ``eager-fast``: PyTorch eager, the default (folded frozen batch norms, channels_last backbone);
- ``compile``: eager-fast with the backbone compiled by torch.compile (Inductor, frozen weights);
- ``torch.export``: the ExportedProgram's module (:func:`export_program`);
- ``onnxruntime``: the ONNX export (GridSample attention, graph optimizer on) in an onnxruntime CPU session;
- ``aoti``: the AOTInductor package of the ExportedProgram (compiling it takes many minutes: not a default).

Peak memory: each path is prepared again in a process of its own, which runs one forward to warm up and measures
the growth of its peak resident set during a second one (activations and temporaries; not the weights, nor the
buffers kept from the warm-up such as the fast path's folded backbone copy). In the timing process, memory freed by
the other paths' runs stays resident and is reused unseen, which would make later paths look free.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from tabulate import tabulate
from torch import Tensor

from ..config import setup_cfg
from ..modeling.meta_arch import SparseDETR
from ..utils.analysis import random_input
from ..utils.timing import describe_device, interleaved_times, peak_memory_growth, return_freed_memory
from .torch_export import export_program, package_aoti
from .wrapper import ExportableSparseDETR

__all__ = ["PATHS", "DEFAULT_PATHS", "build_paths", "get_parser", "main"]

PATHS = ("eager-plain", "eager-fast", "compile", "torch.export", "onnxruntime", "aoti")
DEFAULT_PATHS = PATHS[:-1]


def _eager(model: SparseDETR, fast: bool, image: Tensor) -> Callable[[], Any]:
    model.fast_inference = fast
    inputs = [{"image": image}]
    return lambda: model(inputs)


def build_paths(
    cfg: CfgNode, image: Tensor, paths: Sequence[str], workdir: str, seed: int = 0
) -> Tuple[Dict[str, Callable[[], Any]], Dict[str, float]]:
    """Zero-argument callables running `image` through each path of the model `cfg` builds (random weights from
    `seed`, the same in every path), and the seconds each took to prepare (export, compile, session)."""
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(f"paths: unknown {unknown}, choose from {list(PATHS)}")

    def new_model() -> SparseDETR:
        torch.manual_seed(seed)
        return build_model(cfg).eval()

    fns: Dict[str, Callable[[], Any]] = {}
    prepare: Dict[str, float] = {}
    program = None
    # onnxruntime last: translating the program to ONNX leaves it unusable for AOTInductor (see to_onnx)
    for path in sorted(paths, key=lambda p: p == "onnxruntime"):
        start = time.perf_counter()
        if path in ("eager-plain", "eager-fast"):
            fns[path] = _eager(new_model(), path == "eager-fast", image)
        elif path == "compile":
            import torch._inductor.config as inductor_config

            # weights as constants: Inductor prepacks them for oneDNN and folds what depends on them only
            inductor_config.freezing = True
            wrapper = ExportableSparseDETR(new_model())
            wrapper.model.backbone = torch.compile(wrapper.model.backbone)
            wrapper(image)  # compiles
            fns[path] = lambda w=wrapper: w(image)
        else:
            if program is None:
                program = export_program(new_model(), image)
            if path == "torch.export":
                module = program.module()
                fns[path] = lambda m=module: m(image)
            elif path == "aoti":
                runner = torch._inductor.aoti_load_package(package_aoti(program, os.path.join(workdir, "aoti.pt2")))
                fns[path] = lambda r=runner: r(image)
            else:
                from .onnx import to_onnx
                from .verify import onnxruntime_runner

                onnx_path = os.path.join(workdir, "model.onnx")
                to_onnx(program, "grid_sample").save(onnx_path)
                run = onnxruntime_runner(onnx_path, threads=torch.get_num_threads())
                fns[path] = lambda r=run: r(image)
        prepare[path] = time.perf_counter() - start
    return {path: fns[path] for path in paths}, prepare


_PROBE = "peak bytes of a forward:"


def _peak_in_fresh_process(args: argparse.Namespace, path: str) -> Optional[int]:
    """The peak memory growth of a forward of `path` after a warm-up, in a new process that prepares only it."""
    argv = [sys.executable, "-m", __spec__.name, "--config-file", args.config_file, "--memory-probe", path]
    argv += ["--input-size", *map(str, args.input_size), "--threads", str(args.threads), *args.opts]
    result = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(_PROBE)]
    if result.returncode or not lines:
        raise RuntimeError(f"measuring the memory of path {path} failed:\n{result.stderr[-2000:]}")
    value = lines[-1][len(_PROBE) :].strip()
    return None if value == "None" else int(value)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=PATHS, help="rows, in order")
    parser.add_argument("--input-size", nargs=2, type=int, default=[850, 1040], metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per path")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per path")
    parser.add_argument("--threads", type=int, default=0, help="torch (and onnxruntime) CPU threads; 0: default")
    parser.add_argument("--memory-probe", choices=PATHS, help=argparse.SUPPRESS)  # the child of a memory measurement
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs")
    return parser


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Prints the table; returns {"header": str, "rows": {path: {"seconds", "peak_bytes", "prepare_seconds"}}}."""
    args = get_parser().parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        raise ValueError(f"--warmup must be >= 0 and --iters >= 1, got {args.warmup} and {args.iters}")
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file: no such file: {args.config_file}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, args.opts)
    if cfg.MODEL.DEVICE != "cpu":
        raise ValueError(f"this benchmark runs on the CPU: add MODEL.DEVICE cpu (got {cfg.MODEL.DEVICE})")
    image = random_input(*args.input_size)["image"]
    if args.memory_probe:
        return_freed_memory()
        with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
            fn = build_paths(cfg, image, [args.memory_probe], workdir)[0][args.memory_probe]
            fn()
            print(f"{_PROBE} {peak_memory_growth(fn)}")
        return {}

    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        fns, prepare = build_paths(cfg, image, args.paths, workdir)
        load_before = os.getloadavg()[0]
        times = interleaved_times(fns, args.warmup, args.iters)
        load_after = os.getloadavg()[0]
    peaks = {name: _peak_in_fresh_process(args, name) for name in args.paths}

    base = "eager-plain" if "eager-plain" in fns else args.paths[0]
    medians = {name: float(np.median(t)) for name, t in times.items()}
    rows = []
    for name in args.paths:
        peak = peaks[name]
        rows.append(
            [
                name,
                f"{medians[name]:.3f}",
                f"{1 / medians[name]:.2f}",
                f"{medians[base] / medians[name]:.2f}x",
                "—" if peak is None else f"{peak / 2**20:.0f}",
                f"{prepare[name]:.0f}",
            ]
        )
    header = (
        f"{args.config_file}, {args.input_size[0]}x{args.input_size[1]}, batch 1, fp32, random weights; "
        f"{describe_device(torch.device('cpu'))}; median of {args.iters} runs after {args.warmup} warm-up, paths "
        f"interleaved; load average (1 min) {load_before:.2f} before, {load_after:.2f} after"
    )
    print(header)
    print(
        tabulate(
            rows, headers=["path", "s/img", "img/s", f"speed-up vs {base}", "peak MiB", "prepare s"], tablefmt="pipe"
        )
    )
    return {
        "header": header,
        "rows": {
            name: {"seconds": medians[name], "peak_bytes": peaks[name], "prepare_seconds": prepare[name]}
            for name in args.paths
        },
    }


if __name__ == "__main__":
    main()
