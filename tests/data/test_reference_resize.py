"""INPUT.RESIZE_ROUNDING "reference": the reference's resize arithmetic, where detectron2 rounds differently."""

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from export_model import load_sample_image

from sparse_detr import add_sparse_detr_config
from sparse_detr.data.transforms import ReferenceResizeShortestEdge, build_detr_augmentation
from sparse_detr.engine import SaliencyPredictor


def _cfg(**input_keys):
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    for key, value in input_keys.items():
        setattr(cfg.INPUT, key, value)
    return cfg


@pytest.mark.parametrize(
    "height, width, expected, detectron2",
    [
        (600, 512, (937, 800), (938, 800)),  # the long side floored: 800 * 600 / 512 = 937.5
        (512, 600, (800, 937), (800, 938)),
        (480, 1280, (500, 1333), (500, 1333)),  # the max-size cap: short side round(1333 * 480 / 1280) = 500
        (800, 1100, (800, 1100), (800, 1100)),  # already at the size: kept as it is
    ],
)
def test_output_size(height, width, expected, detectron2):
    assert ReferenceResizeShortestEdge.get_output_shape(height, width, 800, 1333) == expected
    assert T.ResizeShortestEdge.get_output_shape(height, width, 800, 1333) == detectron2


def test_config_switches_every_resize():
    augs = build_detr_augmentation(_cfg(RESIZE_ROUNDING="reference"), is_train=False)
    assert len(augs) == 1 and isinstance(augs[0], ReferenceResizeShortestEdge)
    aug_input = T.AugInput(np.zeros((600, 512, 3), dtype=np.uint8))
    T.AugmentationList(augs)(aug_input)
    assert aug_input.image.shape[:2] == (937, 800)
    train = build_detr_augmentation(_cfg(RESIZE_ROUNDING="reference"), is_train=True)
    branches = train[-1]  # RandomSelect(multi-scale | resize, crop, multi-scale)
    resizes = [a for a in branches.first.augs + branches.second.augs if not isinstance(a, T.RandomCrop)]
    assert len(resizes) == 3 and all(isinstance(a, ReferenceResizeShortestEdge) for a in resizes)
    default = build_detr_augmentation(_cfg(), is_train=False)
    assert isinstance(default[0], T.ResizeShortestEdge)


def test_predictor_and_export_resize_as_the_evaluation(tiny_cfg, tmp_path):
    """The demo's predictor and the export tool's sample image take the evaluation's resize, rounding included."""
    cfg = tiny_cfg()
    cfg.INPUT.RESIZE_ROUNDING = "reference"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 800, 1333
    image = np.zeros((600, 512, 3), dtype=np.uint8)
    predictor = SaliencyPredictor(cfg, model=build_model(cfg).eval())
    assert predictor.aug.get_transform(image).apply_image(image).shape[:2] == (937, 800)
    path = tmp_path / "sample.png"
    cv2.imwrite(str(path), image)
    assert load_sample_image(cfg, str(path)).shape == (3, 937, 800)  # projects/SparseDETR/export_model.py


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="INPUT.RESIZE_ROUNDING must be one of"):
        build_detr_augmentation(_cfg(RESIZE_ROUNDING="floor"), is_train=False)
    with pytest.raises(ValueError, match="INPUT.MIN_SIZE_TRAIN_SAMPLING must be 'choice'"):
        build_detr_augmentation(
            _cfg(RESIZE_ROUNDING="reference", MIN_SIZE_TRAIN_SAMPLING="range", MIN_SIZE_TRAIN=(480, 800)), is_train=True
        )
