"""A predictor for single images that also returns Sparse DETR's saliency, as detectron2's ``DefaultPredictor``."""

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor

from ..data.transforms import build_test_resize

__all__ = ["SaliencyPredictor"]


class SaliencyPredictor(DefaultPredictor):
    """detectron2's `DefaultPredictor` (test resize, input format, weights from MODEL.WEIGHTS) that also returns the
    scoring network's saliency of Sparse DETR models."""

    def __init__(self, cfg: CfgNode):
        super().__init__(cfg)
        # DefaultPredictor builds detectron2's resize; the evaluation's honours INPUT.RESIZE_ROUNDING
        self.aug = build_test_resize(cfg)

    @property
    def has_saliency(self) -> bool:
        return self.model.transformer.has_scoring_network

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
