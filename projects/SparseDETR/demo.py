#!/usr/bin/env python
"""Detections of a SparseDETR model drawn on images or a video, in the manner of detectron2's demo/demo.py.

For Sparse DETR the picture also shows, for each encoder feature level, the scoring network's saliency and the
tokens the encoder updates at the inference keeping ratio (MODEL.SPARSE_DETR.TEST_RHO, else RHO); for a dense
model (Deformable DETR, Efficient DETR) the detections alone (drawn by sparse_detr.visualizer).

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
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tqdm
from detectron2.config import CfgNode
from detectron2.data import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from torch import nn

from sparse_detr import setup_cfg
from sparse_detr.data.datasets import dataset_metadata
from sparse_detr.engine import SaliencyPredictor
from sparse_detr.visualizer import render_saliency_figure

logger = logging.getLogger("sparse_detr.demo")


class Demo:
    """Runs the predictor (of ``model``, default the config's with MODEL.WEIGHTS) and renders the picture of each
    image (RGB uint8)."""

    def __init__(self, cfg: CfgNode, confidence_threshold: float, model: Optional[nn.Module] = None):
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"--confidence-threshold must be in [0, 1], got {confidence_threshold}")
        self.predictor = SaliencyPredictor(cfg, model)
        self.metadata = dataset_metadata(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else Metadata()
        self.threshold = confidence_threshold

    def __call__(self, image_bgr: np.ndarray) -> Tuple[Dict, np.ndarray]:
        """
        Args:
            image_bgr: [H, W, 3] uint8 in BGR order (OpenCV's).
        Returns:
            the model's output for the image and the picture, [H', W', 3] uint8 RGB: the image's size for a dense
            model, panels of it (detections, input, then saliency and kept tokens per level) for Sparse DETR.
        """
        predictions, saliency = self.predictor(image_bgr)
        figure = render_saliency_figure(
            np.ascontiguousarray(image_bgr[:, :, ::-1]),
            predictions["instances"],
            saliency,
            self.metadata,
            self.threshold,
        )
        return predictions, figure


def expand_inputs(patterns: Sequence[str]) -> List[str]:
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


def run_images(demo: Demo, paths: Sequence[str], output: str) -> List[str]:
    """Draws the picture of each image file in ``paths`` to :func:`output_path`; returns the files written."""
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
    """Draws the picture of every frame of ``video`` into an mp4 video at :func:`output_path`; returns its path."""
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
        "--output",
        required=True,
        help="a file, or a directory (an existing one, a path without extension, or several inputs) for the pictures",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of drawn detections")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Draws the pictures of the image files or glob patterns of --input, or of the frames of --video-input
    (exactly one of them); returns the files written."""
    args = get_parser().parse_args(argv)
    for name in ("fvcore", "detectron2", "sparse_detr"):
        setup_logger(name=name)
    logger.info("Arguments: " + str(args))
    if bool(args.input) == bool(args.video_input):
        raise ValueError("give exactly one of --input and --video-input")
    demo = Demo(setup_cfg(args.config_file, args.opts), args.confidence_threshold)
    if args.input:
        return run_images(demo, expand_inputs(args.input), args.output)
    return [run_video(demo, args.video_input, args.output)]


if __name__ == "__main__":
    main()
