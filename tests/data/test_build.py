"""Datasets are checked when the loaders are built, with errors that name the problem."""
import json
import os

import pytest

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from sparse_detr import add_sparse_detr_config
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


def test_loaders_yield_model_inputs(coco_split, register):
    name = register("test_build_loaders", *coco_split)
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    cfg.merge_from_list(["DATASETS.TRAIN", (name,), "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 3,
                         "INPUT.MIN_SIZE_TRAIN", (32, 40), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 40,
                         "INPUT.CROP.MIN_SIZE_BEFORE_CROP", (40,), "INPUT.CROP.SIZE", (24, 36),
                         "DATALOADER.CACHE_IMAGES", True])
    batch = next(iter(build_detr_train_loader(cfg)))
    assert len(batch) == 3
    for x in batch:
        assert x["image"].dtype.is_floating_point is False and x["image"].shape[0] == 3
        assert x["instances"].gt_boxes.tensor.shape[1] == 4 and "image_bytes" not in x
    outs = list(build_detr_test_loader(cfg, name))
    assert len(outs) == 4 and all(o[0]["image"].shape[1:] == (40, 40) for o in outs)
