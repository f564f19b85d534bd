"""Datasets are checked when the loaders are built, with errors that name the problem."""

import json
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode

from sparse_detr import add_sparse_detr_config
from sparse_detr.data import DetrDatasetMapper
from sparse_detr.data.build import build_detr_test_loader, build_detr_train_loader, load_dataset_dicts
from sparse_detr.data.datasets import SyntheticShapesSpec, ensure_synthetic_shapes


@pytest.fixture
def coco_split(tmp_path):
    """A valid COCO-format split on disk: (json_file, image_root)."""
    return ensure_synthetic_shapes(str(tmp_path / "split"), SyntheticShapesSpec(num_images=4, height=48, width=48))


@pytest.fixture
def register():
    names = []

    def _register(name, json_file, image_root):
        register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
        return name

    yield _register
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_valid_dataset_loads(coco_split, register):
    name = register("test_build_valid", *coco_split)
    dicts = load_dataset_dicts([name])
    assert len(dicts) == 4 and all("annotations" in d for d in dicts)


def test_unknown_name_suggests_close_names():
    with pytest.raises(KeyError, match="'synthetic_shapes_tarin' is not registered.*synthetic_shapes_train"):
        load_dataset_dicts(["synthetic_shapes_tarin"])


def test_missing_annotation_file(coco_split, register, tmp_path):
    name = register("test_build_no_json", str(tmp_path / "missing.json"), coco_split[1])
    with pytest.raises(RuntimeError, match="Could not load dataset 'test_build_no_json'.*missing.json"):
        load_dataset_dicts([name])


def test_malformed_annotation_file(coco_split, register, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    name = register("test_build_bad_json", str(bad), coco_split[1])
    with pytest.raises(RuntimeError, match="Could not load dataset 'test_build_bad_json'.*bad.json"):
        load_dataset_dicts([name])


def test_missing_image_directory(coco_split, register, tmp_path):
    name = register("test_build_no_images", coco_split[0], str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="Image directory of dataset 'test_build_no_images'.*nowhere"):
        load_dataset_dicts([name])


def test_missing_image_file(coco_split, register):
    os.remove(os.path.join(coco_split[1], "000002.jpg"))
    name = register("test_build_no_image", *coco_split)
    with pytest.raises(FileNotFoundError, match="1 of 4 images of dataset 'test_build_no_image'.*000002.jpg"):
        load_dataset_dicts([name])


def test_empty_dataset(tmp_path, register, coco_split):
    empty = tmp_path / "empty.json"
    coco = json.load(open(coco_split[0]))
    empty.write_text(json.dumps({**coco, "images": [], "annotations": []}))
    name = register("test_build_empty", str(empty), coco_split[1])
    with pytest.raises(RuntimeError, match="has no images"):
        load_dataset_dicts([name])


def _cfg(train_name):
    """The base config at the scale of the 48 x 48 test images, 4 classes, training on ``train_name``."""
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            (train_name,),
            "MODEL.SPARSE_DETR.NUM_CLASSES",
            4,
            "DATALOADER.NUM_WORKERS",
            0,
            "SOLVER.IMS_PER_BATCH",
            3,
            "INPUT.MIN_SIZE_TRAIN",
            (32, 40),
            "INPUT.MAX_SIZE_TRAIN",
            64,
            "INPUT.MIN_SIZE_TEST",
            40,
            "INPUT.CROP.MIN_SIZE_BEFORE_CROP",
            (40,),
            "INPUT.CROP.SIZE",
            (24, 36),
        ]
    )
    return cfg


def test_loaders_yield_model_inputs(coco_split, register):
    name = register("test_build_loaders", *coco_split)
    cfg = _cfg(name)
    cfg.DATALOADER.CACHE_IMAGES = True
    batch = next(iter(build_detr_train_loader(cfg)))
    assert len(batch) == 3
    for x in batch:
        assert x["image"].dtype.is_floating_point is False and x["image"].shape[0] == 3
        assert x["instances"].gt_boxes.tensor.shape[1] == 4 and "image_bytes" not in x
    outs = list(build_detr_test_loader(cfg, name))
    assert len(outs) == 4 and all(o[0]["image"].shape[1:] == (40, 40) for o in outs)


def test_class_ids_beyond_num_classes_name_the_dataset(coco_split):
    """A dataset registered from Python without category names: its ids are checked against the model's classes."""
    json_file, image_root = coco_split
    dicts = [
        {
            "file_name": os.path.join(image_root, "000001.jpg"),
            "height": 48,
            "width": 48,
            "image_id": 1,
            "annotations": [{"bbox": [1, 1, 9, 9], "bbox_mode": BoxMode.XYWH_ABS, "category_id": c} for c in (0, 7)],
        }
    ]
    DatasetCatalog.register("test_build_ids", lambda: dicts)
    try:
        with pytest.raises(
            ValueError,
            match=r"Dataset 'test_build_ids' has class id 7 in .*000001.jpg, outside the "
            r"model's MODEL.SPARSE_DETR.NUM_CLASSES = 4 classes \(ids 0..3\)",
        ):
            load_dataset_dicts(["test_build_ids"], num_classes=4)
        assert len(load_dataset_dicts(["test_build_ids"], num_classes=8)) == 1
    finally:
        DatasetCatalog.remove("test_build_ids")


def test_num_classes_must_match_the_categories(coco_split, register):
    name = register("test_build_classes", *coco_split)
    with pytest.raises(
        ValueError,
        match=r"class id 3 \('cross' of 4 categories\) in .*, outside the model's "
        r"MODEL.SPARSE_DETR.NUM_CLASSES = 3 classes",
    ):
        load_dataset_dicts([name], num_classes=3)
    with pytest.raises(
        ValueError,
        match=r"MODEL.SPARSE_DETR.NUM_CLASSES is 80 but dataset 'test_build_classes' has 4 "
        r"categories \(circle, square, triangle, cross\); set "
        r"MODEL.SPARSE_DETR.NUM_CLASSES 4",
    ):
        load_dataset_dicts([name], num_classes=80)
    assert len(load_dataset_dicts([name], num_classes=4)) == 4


def test_images_that_fail_to_decode_are_named(coco_split, register):
    json_file, image_root = coco_split
    broken = os.path.join(image_root, "000002.jpg")
    with open(broken, "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated, as by an interrupted copy
    name = register("test_build_truncated", json_file, image_root)
    dicts = load_dataset_dicts([name])  # by default images are read when drawn
    mapper = DetrDatasetMapper(_cfg(name), is_train=True)
    with pytest.raises(OSError, match=r"Cannot decode image .*000002.jpg: OSError: image file is truncated"):
        mapper([d for d in dicts if d["file_name"] == broken][0])
    with pytest.raises(
        OSError,
        match=r"1 of 4 images of dataset 'test_build_truncated' cannot be decoded: "
        r".*000002.jpg \(OSError: image file is truncated",
    ):
        load_dataset_dicts([name], check_images=True)


def test_unsupported_sampler_names_the_key(coco_split, register):
    cfg = _cfg(register("test_build_sampler", *coco_split))
    cfg.DATALOADER.SAMPLER_TRAIN = "RandomSubsetTrainingSampler"
    with pytest.raises(
        ValueError, match="DATALOADER.SAMPLER_TRAIN must be 'TrainingSampler' or 'RepeatFactorTrainingSampler'"
    ):
        build_detr_train_loader(cfg)
