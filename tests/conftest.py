"""Fixtures shared by the whole suite: one intra-op thread, a tiny SparseDETR config and inputs, a machine without
a GPU, a COCO-format dataset of one's own on disk."""

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import Boxes, Instances
from paper_variants import set_sparse_detr_keys

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
    set ``MODEL.SPARSE_DETR`` keys (a dict sets keys of a sub-node, e.g. ``DN=dict(ENABLED=True)``)."""

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
        set_sparse_detr_keys(cfg, sparse_detr)
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


# (COCO category id, name): ids that are not 1..n, as a user's json may have them
OWN_CATEGORIES = ((3, "red"), (7, "green"), (9, "blue"))


@pytest.fixture(scope="session")
def own_coco_dataset() -> Callable[..., Tuple[str, str]]:
    """``make(root, num_images, seed)``: a COCO-format json and its JPEG images under ``root`` (as a user's own data:
    80 x 64 images with 1-3 rectangles of the classes of :data:`OWN_CATEGORIES`); returns (json_file, image_root)."""

    def make(root: Path, num_images: int = 4, seed: int = 0) -> Tuple[str, str]:
        rng = np.random.default_rng(seed)
        image_root = root / "images"
        image_root.mkdir(parents=True)
        colours = {3: (0, 0, 255), 7: (0, 255, 0), 9: (255, 0, 0)}  # BGR
        images, annotations = [], []
        for i in range(num_images):
            image = np.full((64, 80, 3), 90, dtype=np.uint8)
            for _ in range(rng.integers(1, 4)):
                cat = int(rng.choice([c for c, _ in OWN_CATEGORIES]))
                x, y = int(rng.integers(0, 50)), int(rng.integers(0, 34))
                w, h = int(rng.integers(12, 30)), int(rng.integers(12, 30))
                cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colours[cat], thickness=-1)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": cat,
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
            cv2.imwrite(str(image_root / f"{i:04d}.jpg"), image)
            images.append({"id": i + 1, "file_name": f"{i:04d}.jpg", "height": 64, "width": 80})
        categories = [{"id": c, "name": n} for c, n in OWN_CATEGORIES]
        json_file = root / "annotations.json"
        json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        return str(json_file), str(image_root)

    return make
