"""The pictures of projects/SparseDETR/demo.py: a model's detections and, for Sparse DETR, the scoring network's
saliency and the kept tokens of each encoder level, drawn on images or on the frames of a video.
"""

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

from ..data.datasets import dataset_metadata
from ..engine.predictor import SaliencyPredictor
from .visualizer import render_saliency_figure

__all__ = ["Demo", "expand_inputs", "output_path", "run_demo", "run_images", "run_video"]

logger = logging.getLogger(__name__)


class Demo:
    """Runs the predictor and renders the picture of each image (RGB uint8)."""

    def __init__(self, cfg: CfgNode, confidence_threshold: float):
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"--confidence-threshold must be in [0, 1], got {confidence_threshold}")
        self.predictor = SaliencyPredictor(cfg)
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


def run_demo(
    cfg: CfgNode,
    output: str,
    inputs: Optional[Sequence[str]] = None,
    video_input: Optional[str] = None,
    confidence_threshold: float = 0.5,
) -> List[str]:
    """Draws the pictures of the image files or glob patterns ``inputs``, or of the frames of ``video_input``
    (exactly one of them), with the model of ``cfg``; returns the files written under ``output``."""
    if bool(inputs) == bool(video_input):
        raise ValueError("give exactly one of --input and --video-input")
    demo = Demo(cfg, confidence_threshold)
    if inputs:
        return run_images(demo, expand_inputs(inputs), output)
    return [run_video(demo, video_input, output)]
