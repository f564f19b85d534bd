import pytest
import torch

from sparse_detr.modeling.matcher import HungarianMatcher
from sparse_detr.modeling.structures import Target


def test_matches_each_target_to_its_prediction():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]])
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 0, 1] = logits[0, 1, 3] = logits[0, 2, 0] = 5.0
    targets = [Target(torch.tensor([3, 1]), boxes[0, [1, 0]])]
    ((rows, cols),) = HungarianMatcher()(logits, boxes, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}
    assert rows.dtype == torch.int64


def test_class_cost_breaks_box_ties_and_empty_targets():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)[None].repeat(2, 1, 1)
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]]).repeat(2, 1, 1)
    targets = [
        Target(torch.tensor([1]), boxes[0, :1]),
        Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)),
    ]
    first, empty = HungarianMatcher()(logits, boxes, targets)
    assert first[0].tolist() == [1] and first[1].tolist() == [0]
    assert empty[0].numel() == 0 and empty[1].numel() == 0
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0)
