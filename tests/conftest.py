"""Fixtures shared by the whole suite: one intra-op thread, a tiny SparseDETR config and inputs, a machine without
a GPU."""
import logging
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import Boxes, Instances

import sparse_detr.config
from sparse_detr import add_sparse_detr_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and when the cores are oversubscribed the spinning threads
    make the tests many times slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cfg() -> Callable[..., CfgNode]:
    """``make(**sparse_detr)``: detectron2 ResNet-18, 32-dim transformer, 5 classes, on the CPU; keyword arguments
    set ``MODEL.SPARSE_DETR`` keys."""

    def make(**sparse_detr) -> CfgNode:
        cfg = get_cfg()
        add_sparse_detr_config(cfg)
        cfg.merge_from_file(str(ROOT / "configs" / "Base-SparseDETR.yaml"))
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
    """``make(sizes, num_boxes, seed)``: detectron2 training inputs, images ``[3, H, W]`` of random pixels in
    [0, 255) with random boxes of classes 0..4."""

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


@pytest.fixture
def no_gpu(monkeypatch, caplog) -> pytest.LogCaptureFixture:
    """A machine without CUDA, on which the device policy has warned about nothing yet; its warnings are captured."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sparse_detr.config, "_warned_devices", set())
    # train_net's setup_logger(name="sparse_detr") stops propagation to the root logger, where caplog listens
    monkeypatch.setattr(logging.getLogger("sparse_detr"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="sparse_detr.config")
    return caplog
