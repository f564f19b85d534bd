"""Generation, caching and registration of the synthetic shapes dataset."""

import json
import os
import threading

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from sparse_detr.data.datasets import (
    SHAPE_CLASSES,
    SyntheticShapesSpec,
    ensure_synthetic_shapes,
    register_synthetic_shapes,
    render_synthetic_image,
)
from sparse_detr.data.datasets.builtin import SYNTHETIC_SPLITS

SPEC = SyntheticShapesSpec(num_images=6, height=64, width=80, seed=7)


def test_render_is_deterministic_and_boxes_are_tight():
    for i in range(SPEC.num_images):
        image, objects = render_synthetic_image(SPEC, i)
        again, objects_again = render_synthetic_image(SPEC, i)
        assert image.shape == (64, 80, 3) and image.dtype == np.uint8
        assert np.array_equal(image, again) and objects == objects_again
        assert SPEC.min_objects <= len(objects) <= SPEC.max_objects
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 64
            # At least (1 - max_occlusion) of the shape is visible, and the visible pixels fill the box somewhat.
            assert obj["area"] <= (x1 - x0) * (y1 - y0)
            assert obj["area"] >= 0.2 * (x1 - x0) * (y1 - y0)
            assert 0 <= obj["category"] < len(SHAPE_CLASSES)
    other, _ = render_synthetic_image(SyntheticShapesSpec(num_images=6, height=64, width=80, seed=8), 0)
    assert not np.array_equal(render_synthetic_image(SPEC, 0)[0], other)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="num_images"):
        SyntheticShapesSpec(num_images=0)
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticShapesSpec(num_images=1, min_objects=3, max_objects=2)


def test_ensure_generates_once_and_regenerates_incomplete_splits(tmp_path):
    d = str(tmp_path / "split")
    json_file, image_root = ensure_synthetic_shapes(d, SPEC)
    with open(json_file) as f:
        coco = json.load(f)
    assert len(coco["images"]) == 6 and [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in coco["annotations"])
    assert sorted(os.listdir(image_root)) == [im["file_name"] for im in coco["images"]]
    assert sorted(os.listdir(tmp_path)) == [".split.lock", "split"]  # no temporary directory left

    mtime = os.path.getmtime(json_file)
    ensure_synthetic_shapes(d, SPEC)
    assert os.path.getmtime(json_file) == mtime  # complete: left alone

    os.remove(os.path.join(image_root, "000003.jpg"))
    ensure_synthetic_shapes(d, SPEC)
    assert os.path.isfile(os.path.join(image_root, "000003.jpg"))

    with open(json_file, "w") as f:
        f.write("{ truncated")
    ensure_synthetic_shapes(d, SPEC)
    with open(json_file) as f:
        assert json.load(f)["images"] == coco["images"]

    bigger = SyntheticShapesSpec(num_images=7, height=64, width=80, seed=7)
    ensure_synthetic_shapes(d, bigger)
    assert len(os.listdir(image_root)) == 7


def test_concurrent_generation_is_safe(tmp_path):
    d = str(tmp_path / "split")
    errors = []

    def run():
        try:
            ensure_synthetic_shapes(d, SPEC)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(os.listdir(os.path.join(d, "images"))) == 6


def test_registered_split_loads_as_coco(tmp_path):
    name = "test_synthetic_shapes_registration"
    register_synthetic_shapes(name, str(tmp_path / "s"), SPEC)
    try:
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 6 and os.path.isfile(dicts[0]["file_name"])
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(SHAPE_CLASSES) and meta.evaluator_type == "coco"
        assert os.path.isfile(meta.json_file)
        assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(len(SHAPE_CLASSES)))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_builtin_splits_are_registered():
    for name in SYNTHETIC_SPLITS:
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).thing_classes == list(SHAPE_CLASSES)
