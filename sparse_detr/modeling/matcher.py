"""Hungarian matching of predictions to ground truth with a focal-style class cost, L1 and GIoU box costs."""

from typing import List, Tuple

import torch
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from .structures import Target

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimizing
    cost_class * C_cls + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)), where C_cls is the focal loss of the
    target class as positive minus its focal loss as negative.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (not all zero).
        alpha, gamma: focal parameters of the class cost (the reference fixes them to 0.25 and 2, whatever the
            loss's alpha).
    """

    @configurable
    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError(
                "HungarianMatcher: cost_class, cost_bbox and cost_giou (MODEL.SPARSE_DETR.SET_COST_CLASS, "
                "SET_COST_BBOX, SET_COST_GIOU) cannot all be 0"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg):
        S = cfg.MODEL.SPARSE_DETR
        return {"cost_class": S.SET_COST_CLASS, "cost_bbox": S.SET_COST_BBOX, "cost_giou": S.SET_COST_GIOU}

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: List[Target]) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            pred_logits: [N, Q, num_classes]
            pred_boxes: [N, Q, 4] normalized cxcywh.
            targets: per image.
        Returns:
            per image (prediction indices, target indices), int64 CPU tensors of length min(Q, T_i).
        """
        N, Q = pred_logits.shape[:2]
        prob = pred_logits.flatten(0, 1).sigmoid()
        boxes = pred_boxes.flatten(0, 1)
        tgt_labels = torch.cat([t.labels for t in targets])
        tgt_boxes = torch.cat([t.boxes for t in targets]).to(boxes.dtype)

        neg_cost = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
        cost_class = pos_cost[:, tgt_labels] - neg_cost[:, tgt_labels]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        C = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        C = C.view(N, Q, -1).cpu()

        sizes = [len(t.boxes) for t in targets]
        indices = []
        for i, c in enumerate(C.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[i])
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
