"""The logic of `projects/SparseDETR/export_model.py`: a config (and weights) in, a deployable file out."""

import argparse
import logging
import os
from typing import Any, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from torch import Tensor
from torch.export import ExportedProgram

from ..config import setup_cfg
from ..data.transforms import build_test_resize
from ..modeling.meta_arch import SparseDETR
from .torch_export import coarsest_stride, example_image, export_program, package_aoti
from .verify import Detections, Parity, compare, eager_detections, parity_report

__all__ = ["FORMATS", "get_parser", "main"]

logger = logging.getLogger(__name__)

# --format -> file written under --output
FORMATS = {"onnx": "model.onnx", "torch_export": "model.pt2", "aoti": "model_aoti.pt2"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a SparseDETR model (inference on one image: boxes, scores, classes) to ONNX or "
        "torch.export, with dynamic image height and width.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default="onnx",
        help="onnx (default): model.onnx; torch_export: model.pt2, an ExportedProgram; aoti: model_aoti.pt2, an "
        "AOTInductor package",
    )
    parser.add_argument("--output", required=True, help="directory the exported file is written to")
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="an image to trace with (resized by the test resize of the config) and to verify on; default: random "
        "pixels",
    )
    parser.add_argument(
        "--trt-plugin",
        action="store_true",
        help="ONNX: write the deformable attention as TensorRT's MultiscaleDeformableAttnPlugin_TRT node instead "
        "of GridSample (the file then runs only in TensorRT)",
    )
    parser.add_argument(
        "--no-optimize", action="store_true", help="ONNX: skip onnxscript's graph optimizer (faster export)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare the exported model with the eager one on the sample image and on one of another size "
        "(onnxruntime for ONNX, the loaded package for aoti, the ExportedProgram for torch_export); fails if scores "
        "or boxes differ by more than 1e-4 or any class differs",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs")
    return parser


def load_sample_image(cfg: CfgNode, path: str) -> Tensor:
    """The file as the model's test input: read in INPUT.FORMAT, resized by the config's test resize.
    Returns [3, H, W] float32 pixels."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--sample-image: no such file: {path}")
    image = read_image(path, format=cfg.INPUT.FORMAT)
    resized = build_test_resize(cfg).get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1).copy())


def _second_image(model: SparseDETR, image: Tensor) -> Tensor:
    """A random image of another size than `image` (other token counts, other kept-token counts)."""
    stride = coarsest_stride(model)
    height, width = image.shape[-2:]
    return example_image(model, (height + stride + 3, max(width - stride - 5, stride + 1)), seed=1)


def _verify(model: SparseDETR, run: Callable[[Tensor], Detections], images: Dict[str, Tensor]) -> Dict[str, Parity]:
    """Prints and returns the parity of `run` with `model` on each image; raises RuntimeError if one fails."""
    results = {name: compare(eager_detections(model, image), run(image)) for name, image in images.items()}
    print(parity_report(results))
    failed = [name for name, p in results.items() if not p.within_tolerance]
    if failed:
        raise RuntimeError(f"the exported model differs from the eager one on {', '.join(failed)}")
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Writes the file; returns {"path": str, "parity": {image: Parity} with --verify}."""
    args = get_parser().parse_args(argv)
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file: no such file: {args.config_file}")
    if args.trt_plugin and args.format != "onnx":
        raise ValueError(f"--trt-plugin applies to --format onnx, not {args.format}")
    if args.trt_plugin and args.verify:
        raise ValueError("--verify runs onnxruntime, which cannot run the TensorRT plugin node (--trt-plugin)")
    if args.format == "onnx":
        from .onnx import require

        # before the model is built: a missing package is the first thing the user hears of
        require("onnx", "onnxscript", *(["onnxruntime"] if args.verify else []))

    cfg = setup_cfg(args.config_file, args.opts)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialized weights")
    image = load_sample_image(cfg, args.sample_image) if args.sample_image else example_image(model)

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FORMATS[args.format])
    program = export_program(model, image)
    if args.format == "onnx":
        from .onnx import to_onnx

        attention = "trt_plugin" if args.trt_plugin else "grid_sample"
        to_onnx(program, attention, optimize=not args.no_optimize).save(path)
    elif args.format == "torch_export":
        torch.export.save(program, path)
    else:
        package_aoti(program, path)
    print(f"wrote {path}")

    out: Dict[str, Any] = {"path": path}
    if args.verify:
        run = _runner(args.format, path, program)
        out["parity"] = _verify(model, run, {"sample image": image, "second size": _second_image(model, image)})
    return out


def _runner(fmt: str, path: str, program: ExportedProgram) -> Callable[[Tensor], Detections]:
    """What --verify runs: onnxruntime on the ONNX file; the AOTInductor package as loaded back; for an
    ExportedProgram the program itself (the file is torch.export.save of it; loading it back re-parses every
    symbolic size and takes longer than the export)."""
    if fmt == "onnx":
        from .verify import onnxruntime_runner

        return onnxruntime_runner(path)
    module = program.module() if fmt == "torch_export" else torch._inductor.aoti_load_package(path)

    def run(image: Tensor) -> Detections:
        with torch.no_grad():
            return Detections(*module(image))

    return run
