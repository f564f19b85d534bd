"""Typed records passed between the parts of the model: a set of predictions and an image's targets."""

from typing import NamedTuple

from torch import Tensor

__all__ = ["Prediction", "Target"]


class Prediction(NamedTuple):
    """One set of detections of a batch, as the losses and the post-processing read them.

    logits: [N, Q, num_classes] class logits (sigmoid scores, no "no-object" class).
    boxes: [N, Q, 4] (cx, cy, w, h), normalized by the image size before padding.
    """

    logits: Tensor
    boxes: Tensor


class Target(NamedTuple):
    """The ground truth of one image.

    labels: [T] int64 class indices.
    boxes: [T, 4] (cx, cy, w, h), normalized by the image size before padding.
    """

    labels: Tensor
    boxes: Tensor
