"""A predictor for single images that also returns Sparse DETR's saliency, as detectron2's ``DefaultPredictor``."""

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from torch import nn

from ..data.transforms import build_test_resize, test_input
from .inference import build_inference_model

__all__ = ["SaliencyPredictor"]


class SaliencyPredictor:
    """What detectron2's ``DefaultPredictor`` does (the config's test resize, its input format, the model of
    :func:`build_inference_model`), returning also the scoring network's saliency of Sparse DETR models.

    Args:
        cfg: the model's config.
        model: the model to run (eval mode); default: :func:`build_inference_model` of ``cfg``.
    """

    def __init__(self, cfg: CfgNode, model: Optional[nn.Module] = None):
        self.cfg = cfg.clone()
        self.model = build_inference_model(cfg) if model is None else model
        # the evaluation's resize, which honours INPUT.RESIZE_ROUNDING (DefaultPredictor builds detectron2's)
        self.aug = build_test_resize(cfg)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")

    @property
    def has_saliency(self) -> bool:
        return self.model.transformer.has_scoring_network

    @torch.no_grad()
    def __call__(self, original_image: np.ndarray) -> Tuple[Dict, Optional[Dict[str, List[torch.Tensor]]]]:
        """
        Args:
            original_image: [H, W, 3] uint8 in BGR order (OpenCV's).
        Returns:
            the model's output for the image ({"instances": ...}) and, for Sparse DETR, its saliency
            (see `SparseDETR.inference_with_saliency`), else None.
        """
        image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
        height, width = image.shape[:2]
        inputs = [{"image": test_input(self.aug, image), "height": height, "width": width}]
        if not self.has_saliency:
            return self.model(inputs)[0], None
        results, saliency = self.model.inference_with_saliency(inputs)
        return results[0], saliency[0]
