"""The DETR mapper keeps boxes on the pixels they annotate through flip, resize and crop."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from sparse_detr import add_sparse_detr_config
from sparse_detr.data import DetrDatasetMapper, RandomSelect, attach_image_bytes, build_detr_augmentation

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], dtype=np.uint8)


def small_cfg():
    """The base config's augmentation at a scale of about 1/5, so the crop branch does crop 60-140 px images."""
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    cfg.INPUT.MIN_SIZE_TRAIN = (48, 56, 64, 72, 80)
    cfg.INPUT.MAX_SIZE_TRAIN = 130
    cfg.INPUT.CROP.MIN_SIZE_BEFORE_CROP = (60, 80, 100)
    cfg.INPUT.CROP.SIZE = (40, 90)
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 100
    return cfg


def random_sample(rng):
    """A black image with up to 6 non-touching rectangles; rectangle k has colour PALETTE[k] and class k."""
    h, w = rng.integers(60, 141, size=2)
    image = np.zeros((h, w, 3), dtype=np.uint8)
    occupied = np.zeros((h, w), dtype=bool)
    annos = []
    for k in range(len(PALETTE)):
        for _ in range(20):
            bw, bh = rng.integers(4, w // 2), rng.integers(4, h // 2)
            x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
            # Keep 3 px between rectangles so resizing never blends two colours.
            if occupied[max(y0 - 3, 0) : y0 + bh + 3, max(x0 - 3, 0) : x0 + bw + 3].any():
                continue
            occupied[y0 : y0 + bh, x0 : x0 + bw] = True
            image[y0 : y0 + bh, x0 : x0 + bw] = PALETTE[k]
            annos.append({"bbox": [x0, y0, bw, bh], "bbox_mode": BoxMode.XYWH_ABS, "category_id": k, "iscrowd": 0})
            break
    return {"file_name": "unused", "image_id": 0, "height": h, "width": w, "annotations": annos}, image


def check_boxes_bound_colours(out, image_shape):
    image = out["image"].permute(1, 2, 0).numpy().astype(np.int32)
    inst = out["instances"]
    assert inst.image_size == image_shape
    boxes, classes = inst.gt_boxes.tensor.numpy(), inst.gt_classes.numpy()
    assert len(set(classes.tolist())) == len(classes)
    for k, colour in enumerate(PALETTE):
        core = np.abs(image - colour.astype(np.int32)).max(axis=2) <= 30
        ys, xs = np.nonzero(core)
        if k not in classes:
            # A rectangle may only vanish if (almost) none of it is left in the image.
            assert core.sum() <= 4, f"class {k} has {core.sum()} pixels but no box"
            continue
        x0, y0, x1, y1 = boxes[list(classes).index(k)]
        assert 0 <= x0 < x1 <= image_shape[1] and 0 <= y0 < y1 <= image_shape[0]
        if min(x1 - x0, y1 - y0) < 2:  # a sliver left by the crop; resizing may have blended it away
            continue
        assert core.any(), f"box of class {k} covers no pixel of its colour"
        # The pure colour lies inside the box (1 px of resampling slack) ...
        assert xs.min() >= x0 - 1 and xs.max() + 1 <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() + 1 <= y1 + 1
        # ... and the box is tight: resampling blurs the rectangle's edges symmetrically, so the pixels covered at
        # least half by it (more than half its colour, blended with black) span the box up to pixel quantization.
        if min(x1 - x0, y1 - y0) < 3:
            continue
        on, off = image[..., colour == 255].min(axis=2), image[..., colour == 0].max(axis=2)
        ys, xs = np.nonzero((on >= 128) & (off < on / 2))
        assert abs(xs.min() - x0) <= 1.0 and abs(xs.max() + 1 - x1) <= 1.0
        assert abs(ys.min() - y0) <= 1.0 and abs(ys.max() + 1 - y1) <= 1.0


def test_train_augmentation_keeps_boxes_on_their_pixels(monkeypatch):
    cfg = small_cfg()
    mapper = DetrDatasetMapper(cfg, is_train=True)
    rng = np.random.default_rng(0)
    np.random.seed(0)  # detectron2's augmentations draw from numpy's global generator
    sizes, samples_losing_boxes = set(), 0
    for _ in range(60):
        d, image = random_sample(rng)
        monkeypatch.setattr("sparse_detr.data.image_cache.utils.read_image", lambda *a, im=image, **k: im)
        out = mapper(d)
        shape = tuple(out["image"].shape[1:])
        # The last step is always the multi-scale resize: shorter side from MIN_SIZE_TRAIN unless the longer
        # side would pass MAX_SIZE_TRAIN.
        assert max(shape) <= cfg.INPUT.MAX_SIZE_TRAIN
        assert min(shape) in cfg.INPUT.MIN_SIZE_TRAIN or max(shape) >= cfg.INPUT.MAX_SIZE_TRAIN - 1
        sizes.add(min(shape))
        check_boxes_bound_colours(out, shape)
        samples_losing_boxes += len(out["instances"]) < len(d["annotations"])
    assert len(sizes) >= 4  # multi-scale
    assert samples_losing_boxes > 0  # the crop branch ran
    assert "annotations" not in out


def test_crop_that_removes_every_box_gives_empty_instances(monkeypatch):
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[5:15, 5:15] = PALETTE[0]
    d = {
        "file_name": "unused",
        "image_id": 0,
        "height": 100,
        "width": 100,
        "annotations": [{"bbox": [5, 5, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0}],
    }
    monkeypatch.setattr("sparse_detr.data.image_cache.utils.read_image", lambda *a, **k: image)
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.CropTransform(50, 50, 40, 30)], image_format="RGB")
    out = mapper(d)
    assert out["image"].shape == (3, 30, 40)
    inst = out["instances"]
    assert len(inst) == 0 and inst.gt_boxes.tensor.shape == (0, 4) and inst.gt_classes.shape == (0,)
    assert inst.gt_classes.dtype == torch.int64


def test_crop_clips_boxes_and_crowd_is_dropped(monkeypatch):
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    d = {
        "file_name": "unused",
        "image_id": 0,
        "height": 100,
        "width": 100,
        "annotations": [
            {"bbox": [10, 10, 40, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3, "iscrowd": 0},
            {"bbox": [30, 30, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 1},
        ],
    }
    monkeypatch.setattr("sparse_detr.data.image_cache.utils.read_image", lambda *a, **k: image)
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.CropTransform(30, 20, 50, 60)], image_format="RGB")
    out = mapper(d)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [3]
    assert inst.gt_boxes.tensor.tolist() == [[0.0, 0.0, 20.0, 30.0]]
    assert len(d["annotations"]) == 2 and d["annotations"][0]["bbox"] == [10, 10, 40, 40]  # input untouched


def test_test_mapper_resizes_and_drops_annotations(monkeypatch):
    cfg = small_cfg()
    image = np.zeros((80, 120, 3), dtype=np.uint8)
    monkeypatch.setattr("sparse_detr.data.image_cache.utils.read_image", lambda *a, **k: image)
    d = {
        "file_name": "unused",
        "image_id": 7,
        "height": 80,
        "width": 120,
        "annotations": [{"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}],
    }
    out = DetrDatasetMapper(cfg, is_train=False)(d)
    assert out["image"].shape == (3, 64, 96) and out["image"].dtype == torch.uint8
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"], out["image_id"]) == (80, 120, 7)


def test_augmentation_structure_follows_config():
    cfg = small_cfg()
    train = build_detr_augmentation(cfg, is_train=True)
    assert isinstance(train[0], T.RandomFlip) and isinstance(train[1], RandomSelect)
    assert [type(a) for a in train[1].second.augs] == [T.ResizeShortestEdge, T.RandomCrop, T.ResizeShortestEdge]
    assert train[1].second.augs[1].crop_type == "absolute_range"
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.RANDOM_FLIP = "none"
    assert [type(a) for a in build_detr_augmentation(cfg, is_train=True)] == [T.ResizeShortestEdge]
    (test,) = build_detr_augmentation(cfg, is_train=False)
    assert test.short_edge_length == (64, 64) and test.max_size == 100
    with pytest.raises(ValueError, match="prob"):
        RandomSelect([], [], prob=1.5)


def test_random_select_takes_both_branches_about_equally():
    class Tag(T.Augmentation):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def get_transform(self, image):
            return T.NoOpTransform()

    seen = []
    sel = RandomSelect([Tag("a")], [Tag("b")], prob=0.5)
    sel.first.augs[0].get_transform = lambda image: seen.append("a") or T.NoOpTransform()
    sel.second.augs[0].get_transform = lambda image: seen.append("b") or T.NoOpTransform()
    np.random.seed(1)
    for _ in range(400):
        sel(T.AugInput(np.zeros((4, 4, 3), dtype=np.uint8)))
    assert 160 < seen.count("a") < 240 and seen.count("a") + seen.count("b") == 400


def test_cached_bytes_decode_to_the_same_image(tmp_path):
    import cv2

    image = np.random.default_rng(0).integers(0, 255, size=(20, 30, 3), dtype=np.uint8)
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, image[:, :, ::-1])
    dicts = [{"file_name": path, "image_id": 1, "height": 20, "width": 30}]
    mapper = DetrDatasetMapper(is_train=False, augmentations=[], image_format="RGB")
    plain = mapper(dicts[0])
    attach_image_bytes(dicts)
    assert isinstance(dicts[0]["image_bytes"], bytes)
    cached = mapper(dicts[0])
    assert "image_bytes" not in cached and "image_bytes" in dicts[0]
    assert torch.equal(plain["image"], cached["image"]) and torch.equal(
        cached["image"].permute(1, 2, 0), torch.from_numpy(image)
    )
