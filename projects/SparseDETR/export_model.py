#!/usr/bin/env python
"""Export a SparseDETR model for deployment, in the manner of detectron2's tools/deploy/export_model.py.

The exported graph takes one image [3, H, W] (float pixels in INPUT.FORMAT, as the test resize made it; any H and
W) and returns what the model's post-processing returns: boxes [D, 4] (x0, y0, x1, y1 in the image's pixels,
clipped to it), scores [D] and classes [D]. Sparse DETR's kept-token count follows the image size inside the
graph, at MODEL.SPARSE_DETR.TEST_RHO (else RHO).

Examples:
  # ONNX for onnxruntime (deformable attention as GridSample), checked against PyTorch
  python projects/SparseDETR/export_model.py --config-file configs/r50/sparse_detr_rho_0.1.yaml --format onnx \\
      --output out/ --sample-image photo.jpg --verify MODEL.WEIGHTS model.pth MODEL.DEVICE cpu
  # ONNX for TensorRT (MultiscaleDeformableAttnPlugin_TRT nodes)
  python projects/SparseDETR/export_model.py --config-file configs/r50/sparse_detr_rho_0.1.yaml --format onnx \\
      --trt-plugin --output out/ MODEL.WEIGHTS model.pth MODEL.DEVICE cpu
  # torch.export ExportedProgram (.pt2), keeping the compiled op; aoti: AOTInductor package
  python projects/SparseDETR/export_model.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
      --format torch_export --output out/ MODEL.WEIGHTS model.pth MODEL.DEVICE cpu
"""

import argparse
import os
from typing import Any, Callable, Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data.detection_utils import read_image
from torch import Tensor
from torch.export import ExportedProgram

from sparse_detr import setup_cfg
from sparse_detr.data.transforms import build_test_resize, test_input
from sparse_detr.engine import build_inference_model
from sparse_detr.export import (
    Detections,
    Parity,
    coarsest_stride,
    compare,
    eager_detections,
    example_image,
    export_program,
)
from sparse_detr.export.torch_export import package_aoti
from sparse_detr.export.verify import parity_report
from sparse_detr.modeling import SparseDETR

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
    return test_input(build_test_resize(cfg), read_image(path, format=cfg.INPUT.FORMAT))


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
        from sparse_detr.export.onnx import require

        # before the model is built: a missing package is the first thing the user hears of
        require("onnx", "onnxscript", *(["onnxruntime"] if args.verify else []))

    cfg = setup_cfg(args.config_file, args.opts)
    model = build_inference_model(cfg, allow_random_weights=True)
    image = load_sample_image(cfg, args.sample_image) if args.sample_image else example_image(model)

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FORMATS[args.format])
    program = export_program(model, image)
    if args.format == "onnx":
        from sparse_detr.export.onnx import to_onnx

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
        from sparse_detr.export.verify import onnxruntime_runner

        return onnxruntime_runner(path)
    module = program.module() if fmt == "torch_export" else torch._inductor.aoti_load_package(path)

    def run(image: Tensor) -> Detections:
        with torch.no_grad():
            return Detections(*module(image))

    return run


if __name__ == "__main__":
    main()
