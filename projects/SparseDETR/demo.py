#!/usr/bin/env python
"""Detections of a SparseDETR model drawn on images or a video, in the manner of detectron2's demo/demo.py.

For Sparse DETR the picture also shows, for each encoder feature level, the scoring network's saliency and the
tokens the encoder updates at the inference keeping ratio (MODEL.SPARSE_DETR.TEST_RHO, else RHO); for a dense
model (Deformable DETR, Efficient DETR) the detections alone.

Examples:
  python projects/SparseDETR/demo.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
      --input images/*.jpg --output out/ MODEL.WEIGHTS sparse_detr_rho_0.1.pth
  python projects/SparseDETR/demo.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
      --video-input clip.mp4 --output out/clip.mp4 MODEL.WEIGHTS sparse_detr_rho_0.1.pth
"""
import argparse
import glob
import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import tqdm
from detectron2.config import CfgNode, get_cfg
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger

from sparse_detr import add_sparse_detr_config
from sparse_detr.utils.visualizer import render_saliency_figure

logger = logging.getLogger("detectron2")


def setup_cfg(args) -> CfgNode:
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE is {cfg.MODEL.DEVICE} but no GPU is available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


class SaliencyPredictor(DefaultPredictor):
    """detectron2's `DefaultPredictor` (test resize, input format, weights from MODEL.WEIGHTS) that also returns the
    scoring network's saliency of Sparse DETR models."""

    @property
    def has_saliency(self) -> bool:
        return self.model.transformer.token_selection

    def __call__(self, original_image: np.ndarray) -> Tuple[Dict, Optional[Dict[str, List[torch.Tensor]]]]:
        """
        Args:
            original_image: [H, W, 3] uint8 in BGR order (OpenCV's).
        Returns:
            the model's output for the image ({"instances": ...}) and, for Sparse DETR, its saliency
            (see `SparseDETR.inference_with_saliency`), else None.
        """
        if not self.has_saliency:
            return super().__call__(original_image), None
        with torch.no_grad():
            image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
            height, width = image.shape[:2]
            resized = self.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs = [{"image": tensor, "height": height, "width": width}]
            results, saliency = self.model.inference_with_saliency(inputs)
        return results[0], saliency[0]


class Demo:
    """Runs the predictor and renders the picture of each image (RGB uint8)."""

    def __init__(self, cfg: CfgNode, confidence_threshold: float):
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"--confidence-threshold must be in [0, 1], got {confidence_threshold}")
        self.predictor = SaliencyPredictor(cfg)
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else Metadata()
        self.threshold = confidence_threshold

    def __call__(self, image_bgr: np.ndarray) -> Tuple[Dict, np.ndarray]:
        predictions, saliency = self.predictor(image_bgr)
        figure = render_saliency_figure(
            np.ascontiguousarray(image_bgr[:, :, ::-1]), predictions["instances"], saliency, self.metadata,
            self.threshold,
        )
        return predictions, figure


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files and glob patterns -> sorted list of files; a pattern that matches nothing is an error."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: no such file")
        paths += matches
    return paths


def output_path(output: str, source: str, many: bool, suffix: str = "") -> str:
    """Where the picture of `source` goes: into `output` if it is a directory, has no file extension or there are
    several sources (named as the source, with `suffix` as extension if given), else `output` itself."""
    if many or os.path.isdir(output) or not os.path.splitext(output)[1]:
        os.makedirs(output, exist_ok=True)
        stem, ext = os.path.splitext(os.path.basename(source))
        return os.path.join(output, stem + (suffix or ext))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return output


def run_images(demo: Demo, paths: List[str], output: str) -> List[str]:
    written = []
    for path in tqdm.tqdm(paths, disable=len(paths) < 2):
        image = read_image(path, format="BGR")
        start = time.perf_counter()
        predictions, figure = demo(image)
        logger.info(f"{path}: detected {len(predictions['instances'])} instances in {time.perf_counter() - start:.2f}s")
        target = output_path(output, path, many=len(paths) > 1)
        if not cv2.imwrite(target, figure[:, :, ::-1]):
            raise OSError(f"could not write {target} (is the extension an image format?)")
        written.append(target)
    return written


def run_video(demo: Demo, video: str, output: str) -> str:
    capture = cv2.VideoCapture(video)
    if not capture.isOpened():
        raise FileNotFoundError(f"--video-input {video}: cannot be opened")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    target = output_path(output, video, many=False, suffix=".mp4")
    writer = None
    try:
        for _ in tqdm.trange(num_frames):
            ok, frame = capture.read()
            if not ok:
                break
            _, figure = demo(frame)
            if writer is None:
                # the picture's size follows from the first frame (panels of the frame's size)
                height, width = figure.shape[:2]
                writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height), True)
                if not writer.isOpened():
                    raise OSError(f"cannot write the video {target} (mp4v codec)")
            writer.write(np.ascontiguousarray(figure[:, :, ::-1]))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise ValueError(f"--video-input {video}: no frame could be read")
    return target


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--input", nargs="+", help="image files or glob patterns, e.g. 'directory/*.jpg'")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument(
        "--output", required=True,
        help="a file, or a directory (an existing one, a path without extension, or several inputs) for the pictures",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of drawn detections")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs")
    return parser


def main(argv=None) -> List[str]:
    """Returns the files written."""
    args = get_parser().parse_args(argv)
    if bool(args.input) == bool(args.video_input):
        raise ValueError("give exactly one of --input and --video-input")
    setup_logger(name="fvcore")
    setup_logger()
    logger.info("Arguments: " + str(args))
    demo = Demo(setup_cfg(args), args.confidence_threshold)
    if args.input:
        return run_images(demo, expand_inputs(args.input), args.output)
    return [run_video(demo, args.video_input, args.output)]


if __name__ == "__main__":
    main()
