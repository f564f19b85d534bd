"""Fixtures shared by the test directories: tiny SparseDETR configs and inputs (detectron2 ResNet-18, 32-dim
transformer)."""
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import Boxes, Instances

from sparse_detr import add_sparse_detr_config


@pytest.fixture
def tiny_cfg() -> Callable[..., CfgNode]:
    def make(**sparse_detr) -> CfgNode:
        cfg = get_cfg()
        add_sparse_detr_config(cfg)
        cfg.merge_from_file("configs/Base-SparseDETR.yaml")
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        S = cfg.MODEL.SPARSE_DETR
        S.NUM_CLASSES = 5
        S.HIDDEN_DIM = 32
        S.NHEADS = 2
        S.ENC_LAYERS = 2
        S.DEC_LAYERS = 2
        S.DIM_FEEDFORWARD = 64
        S.DROPOUT = 0.0
        S.NUM_QUERIES = 10
        S.ENC_N_POINTS = 2
        S.DEC_N_POINTS = 2
        S.NUM_DETECTIONS = 20
        for key, value in sparse_detr.items():
            setattr(S, key, value)
        return cfg

    return make


@pytest.fixture
def tiny_inputs() -> Callable[..., List[Dict]]:
    def make(
        sizes: Sequence[Tuple[int, int]] = ((64, 96), (80, 64)), num_boxes: Sequence[int] = (2, 1), seed: int = 0
    ) -> List[Dict]:
        g = torch.Generator().manual_seed(seed)
        inputs = []
        for (h, w), n in zip(sizes, num_boxes):
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
            wh = (0.2 + 0.3 * torch.rand(n, 2, generator=g)) * torch.tensor([w, h])
            instances = Instances((h, w))
            instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
            instances.gt_classes = torch.randint(0, 5, (n,), generator=g)
            image = torch.rand(3, h, w, generator=g) * 255
            inputs.append({"image": image, "instances": instances, "height": h, "width": w})
        return inputs

    return make
