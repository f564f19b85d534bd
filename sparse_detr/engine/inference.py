"""The model for inference from a config: built, its weights loaded, prepared (every inference tool starts here)."""

import logging
from typing import Optional

from detectron2.config import CfgNode
from detectron2.modeling import build_model
from torch import nn

from ..checkpoint import SparseDetrCheckpointer
from ..modeling import prepare_for_inference

__all__ = ["build_inference_model"]

logger = logging.getLogger(__name__)


def build_inference_model(
    cfg: CfgNode, allow_random_weights: bool = False, prepare: Optional[bool] = None
) -> nn.Module:
    """The model of ``cfg`` as inference runs it: built on ``MODEL.DEVICE``, ``MODEL.WEIGHTS`` loaded, in eval mode
    and, with ``MODEL.SPARSE_DETR.FAST_INFERENCE``, prepared (:func:`~sparse_detr.modeling.prepare_for_inference`).

    Args:
        allow_random_weights: an empty ``MODEL.WEIGHTS`` builds a randomly initialized model, with a warning (the
            benchmarks time such models; the tools that show detections do not allow it).
        prepare: whether to prepare the model; None: as ``MODEL.SPARSE_DETR.FAST_INFERENCE`` says (FLOPs are
            counted on the model as written, unprepared).
    Raises:
        ValueError: ``MODEL.WEIGHTS`` is empty and ``allow_random_weights`` is not set.
    """
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        SparseDetrCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    elif allow_random_weights:
        logger.warning("MODEL.WEIGHTS is empty: the model has random weights")
    else:
        raise ValueError("MODEL.WEIGHTS is empty: set it to a checkpoint of this model (a .pth file)")
    model.eval()
    if cfg.MODEL.SPARSE_DETR.FAST_INFERENCE if prepare is None else prepare:
        model = prepare_for_inference(model, inplace=True)
    return model
