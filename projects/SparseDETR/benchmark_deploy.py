#!/usr/bin/env python
"""The inference paths of one model timed in one run, with the peak memory of a forward.

Paths (every one runs the whole inference of one image: normalization, backbone, transformer, post-processing):
  eager-plain   PyTorch eager, the model as written;
  eager-fast    PyTorch eager, prepared for inference (folded batch norms, channels_last backbone, fast transformer
                path: sparse_detr.modeling.prepare_for_inference; what the tools run by default);
  compile       eager-fast with the backbone compiled by torch.compile (Inductor, frozen weights);
  torch.export  the ExportedProgram's module (sparse_detr.export.export_program);
  onnxruntime   the ONNX export (GridSample attention, graph optimizer on) in an onnxruntime CPU session;
  aoti          the AOTInductor package of the ExportedProgram (compiling it takes many minutes: not a default).
The paths take turns run by run (sparse_detr.measure); peak memory: each path prepared again in a process of its
own, a forward to warm up, then the growth of the peak resident set during a second one (activations and
temporaries, not the weights).

Examples:
  python projects/SparseDETR/benchmark_deploy.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
      --threads 2 MODEL.DEVICE cpu
  python projects/SparseDETR/benchmark_deploy.py --config-file configs/r50/deformable_detr_bbr_two_stage.yaml \\
      --paths eager-plain eager-fast onnxruntime --threads 2 MODEL.DEVICE cpu
"""

import argparse
import os
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from torch import Tensor

from sparse_detr import setup_cfg
from sparse_detr.analysis import random_input
from sparse_detr.export import ExportableSparseDETR, export_program
from sparse_detr.export.torch_export import package_aoti
from sparse_detr.measure import Report, check_rounds, describe_device, interleaved_times, peak_memory
from sparse_detr.modeling import prepare_for_inference

PATHS = ("eager-plain", "eager-fast", "compile", "torch.export", "onnxruntime", "aoti")
DEFAULT_PATHS = PATHS[:-1]


def build_paths(
    cfg: CfgNode, image: Tensor, paths: Sequence[str], workdir: str, seed: int = 0
) -> Tuple[Dict[str, Callable[[], Any]], Dict[str, float]]:
    """Zero-argument callables running ``image`` through each path of the model ``cfg`` builds (random weights from
    ``seed``, the same in every path), and the seconds each took to prepare (export, compile, session)."""
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(f"paths: unknown {unknown}, choose from {list(PATHS)}")

    def new_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(cfg).eval()

    fns: Dict[str, Callable[[], Any]] = {}
    prepare: Dict[str, float] = {}
    program = None
    # onnxruntime last: translating the program to ONNX leaves it unusable for AOTInductor (see to_onnx)
    for path in sorted(paths, key=lambda p: p == "onnxruntime"):
        start = time.perf_counter()
        if path in ("eager-plain", "eager-fast"):
            model = new_model() if path == "eager-plain" else prepare_for_inference(new_model(), inplace=True)
            call = lambda x, m=model: m([{"image": x}])  # noqa: E731
        elif path == "compile":
            import torch._inductor.config as inductor_config

            # weights as constants: Inductor prepacks them for oneDNN and folds what depends on them only
            inductor_config.freezing = True
            call = ExportableSparseDETR(new_model())
            call.model.backbone = torch.compile(call.model.backbone)
            call(image)  # compiles
        else:
            if program is None:
                program = export_program(new_model(), image)
            if path == "torch.export":
                call = program.module()
            elif path == "aoti":
                call = torch._inductor.aoti_load_package(package_aoti(program, os.path.join(workdir, "aoti.pt2")))
            else:
                from sparse_detr.export.onnx import to_onnx
                from sparse_detr.export.verify import onnxruntime_runner

                onnx_path = os.path.join(workdir, "model.onnx")
                to_onnx(program, "grid_sample").save(onnx_path)
                call = onnxruntime_runner(onnx_path, threads=torch.get_num_threads())
        fns[path] = lambda c=call: c(image)
        prepare[path] = time.perf_counter() - start
    return {path: fns[path] for path in paths}, prepare


def path_runner(config_file: str, opts: Sequence[str], path: str, input_size: Sequence[int]) -> Callable[[], Any]:
    """One forward of ``path`` (the memory measurement builds it in a process of its own)."""
    workdir = tempfile.TemporaryDirectory()
    fn = build_paths(setup_cfg(config_file, opts), random_input(*input_size)["image"], [path], workdir.name)[0][path]

    def run() -> Any:
        with torch.inference_mode():
            return fn()

    run.workdir = workdir  # the exported files live as long as the runner
    return run


def run(
    config_file: str,
    opts: Sequence[str],
    paths: Sequence[str] = DEFAULT_PATHS,
    input_size: Sequence[int] = (850, 1040),
    warmup: int = 1,
    iters: int = 5,
    memory: bool = True,
) -> Report:
    """Times every path of the model of ``config_file`` (with the overrides ``opts``) on one random image."""
    check_rounds(warmup, iters)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file: no such file: {config_file}")
    cfg = setup_cfg(config_file, opts)
    if cfg.MODEL.DEVICE != "cpu":
        raise ValueError(f"this benchmark runs on the CPU: add MODEL.DEVICE cpu (got {cfg.MODEL.DEVICE})")
    image = random_input(*input_size)["image"]
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        fns, prepare = build_paths(cfg, image, paths, workdir)
        load_before = os.getloadavg()[0]
        timings = interleaved_times(fns, warmup, iters)
        load_after = os.getloadavg()[0]
    base = "eager-plain" if "eager-plain" in fns else paths[0]
    speedup = f"speed-up vs {base}"
    report = Report(
        header=f"{config_file}, {input_size[0]}x{input_size[1]}, batch 1, fp32, random weights; "
        f"{describe_device(torch.device('cpu'))}; median of {iters} runs after {warmup} warm-up, paths "
        f"interleaved; load average (1 min) {load_before:.2f} before, {load_after:.2f} after",
        columns=["path", "s/img", "img/s", speedup, "peak MiB", "prepare s"],
    )
    for path in paths:
        peak = peak_memory(path_runner, config_file, list(opts), path, list(input_size)) if memory else None
        seconds = timings.median(path)
        report.rows.append(
            {
                "path": path,
                "s/img": f"{seconds:.3f}",
                "img/s": f"{1 / seconds:.2f}",
                speedup: f"{timings.speedup(base, path):.2f}x",
                "peak MiB": "—" if peak is None else f"{peak / 2**20:.0f}",
                "prepare s": f"{prepare[path]:.0f}",
                "seconds": seconds,
                "peak_bytes": peak,
                "prepare_seconds": prepare[path],
            }
        )
    return report


def main(argv: Optional[Sequence[str]] = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=PATHS, help="rows, in order")
    parser.add_argument("--input-size", nargs=2, type=int, default=[850, 1040], metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per path")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per path")
    parser.add_argument("--threads", type=int, default=0, help="torch (and onnxruntime) CPU threads; 0: default")
    parser.add_argument("--no-memory", action="store_true", help="times only (memory takes a process per path)")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = run(args.config_file, args.opts, args.paths, args.input_size, args.warmup, args.iters, not args.no_memory)
    report.emit(args.json)
    return report


if __name__ == "__main__":
    main()
