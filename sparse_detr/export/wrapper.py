"""`SparseDETR` inference on one image as a function of tensors, the form torch.export and ONNX take."""

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from ..modeling.fast_inference import prepare_for_inference
from ..modeling.meta_arch import SparseDETR

__all__ = ["ExportableSparseDETR"]


class ExportableSparseDETR(nn.Module):
    """One image in, its detections out, exactly as `SparseDETR`'s inference computes them.

    The module holds the model prepared for inference (:func:`~sparse_detr.modeling.prepare_for_inference`: the
    folded, channels_last backbone and the transformer's fast path), so the exported graph and weights are the ones
    inference runs fastest.

    Args:
        model: a `SparseDETR`; one not prepared yet is copied, not changed.
    """

    def __init__(self, model: SparseDETR):
        super().__init__()
        if model.backbone.padding_constraints.get("square_size", 0) > 0:
            raise ValueError(
                "model: backbones that pad images to a square (padding_constraints square_size) are not exportable "
                "here; the exported graph pads to size_divisibility only"
            )
        self.model = prepare_for_inference(model)

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            image: [C, H, W] float pixels in the model's input format (cfg.INPUT.FORMAT, 0..255), any H and W: the
                image as the test-time resize made it.
        Returns:
            boxes: [D, 4] float (x0, y0, x1, y1) in the pixels of `image`, clipped to it;
            scores: [D] float, by decreasing score;
            classes: [D] int64;
            D <= NUM_DETECTIONS: what `detector_postprocess` keeps (it drops boxes that are empty after clipping).
        """
        model = self.model
        height, width = image.shape[-2:]
        x = model.normalize(image)
        divisor = model.backbone.size_divisibility
        if divisor > 1:
            x = F.pad(x, (0, -width % divisor, 0, -height % divisor))
        images = ImageList(x[None], [(height, width)])
        results, _ = model.detect(images, model.backbone(images.tensor))
        return clip_and_drop_empty(results[0], height, width)


def clip_and_drop_empty(result: Instances, height: int, width: int) -> Tuple[Tensor, Tensor, Tensor]:
    """What `detector_postprocess` does at the input's own size, without its data-dependent `assert` (finite
    boxes), which torch.export cannot trace: clip the boxes to the image, drop those left empty.

    Returns:
        boxes [D, 4], scores [D], classes [D] of the kept detections, in their order.
    """
    boxes = result.pred_boxes.tensor
    x0, y0, x1, y1 = boxes.unbind(-1)
    boxes = torch.stack(
        [
            x0.clamp(min=0, max=width),
            y0.clamp(min=0, max=height),
            x1.clamp(min=0, max=width),
            y1.clamp(min=0, max=height),
        ],
        dim=-1,
    )
    keep = Boxes(boxes).nonempty()
    return boxes[keep], result.scores[keep], result.pred_classes[keep]
