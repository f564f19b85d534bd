#!/usr/bin/env python
"""Detections of a SparseDETR model drawn on images or a video, in the manner of detectron2's demo/demo.py.

For Sparse DETR the picture also shows, for each encoder feature level, the scoring network's saliency and the
tokens the encoder updates at the inference keeping ratio (MODEL.SPARSE_DETR.TEST_RHO, else RHO); for a dense
model (Deformable DETR, Efficient DETR) the detections alone. The drawing is sparse_detr/utils/demo.py.

Examples:
  python projects/SparseDETR/demo.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
      --input images/*.jpg --output out/ MODEL.WEIGHTS sparse_detr_rho_0.1.pth
  python projects/SparseDETR/demo.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
      --video-input clip.mp4 --output out/clip.mp4 MODEL.WEIGHTS sparse_detr_rho_0.1.pth
"""

import argparse
import logging
from typing import List, Optional, Sequence

from detectron2.utils.logger import setup_logger

from sparse_detr import setup_cfg
from sparse_detr.utils.demo import run_demo


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
    """Returns the files written."""
    args = get_parser().parse_args(argv)
    for name in ("fvcore", "detectron2", "sparse_detr"):
        setup_logger(name=name)
    logging.getLogger("detectron2").info("Arguments: " + str(args))
    cfg = setup_cfg(args.config_file, args.opts)
    return run_demo(cfg, args.output, args.input, args.video_input, args.confidence_threshold)


if __name__ == "__main__":
    main()
