"""COCO-format datasets of one's own, registered by the config (DATASETS.REGISTER_COCO_INSTANCES) in setup_cfg,
the config of every tool."""

from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from sparse_detr import setup_cfg
from sparse_detr.data.build import load_dataset_dicts
from sparse_detr.data.datasets import dataset_metadata

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")


@pytest.fixture
def cleanup():
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_registered_by_setup_cfg_with_their_categories(own_coco_dataset, tmp_path, monkeypatch, cleanup):
    json_file, image_root = own_coco_dataset(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)  # relative paths are the working directory's
    entry = "[('own_train', 'mine/annotations.json', 'mine/images')]"
    cleanup.append("own_train")
    setup_cfg(SMOKE, ["DATASETS.REGISTER_COCO_INSTANCES", entry, "DATASETS.TRAIN", "('own_train',)"])
    meta = MetadataCatalog.get("own_train")
    assert (meta.json_file, meta.image_root, meta.evaluator_type) == (json_file, image_root, "coco")
    dicts = load_dataset_dicts(["own_train"], num_classes=3)
    assert len(dicts) == 4 and meta.thing_classes == ["red", "green", "blue"]
    # COCO ids 3, 7, 9 are the contiguous classes 0, 1, 2
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 9: 2}
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= {0, 1, 2}
    setup_cfg(SMOKE, ["DATASETS.REGISTER_COCO_INSTANCES", entry])  # a second tool in the process: nothing new


def test_class_names_without_loading_the_dataset(own_coco_dataset, tmp_path, cleanup):
    """The demo draws class names of a dataset it never loads."""
    json_file, image_root = own_coco_dataset(tmp_path / "mine")
    cleanup.append("own_names")
    setup_cfg(SMOKE, ["DATASETS.REGISTER_COCO_INSTANCES", f"[('own_names', '{json_file}', '{image_root}')]"])
    assert not hasattr(MetadataCatalog.get("own_names"), "thing_classes")  # detectron2 sets them on loading
    assert dataset_metadata("own_names").thing_classes == ["red", "green", "blue"]  # ids 3, 7, 9
    # loading afterwards sets the same names: no conflict
    assert len(load_dataset_dicts(["own_names"], num_classes=3)) == 4


def test_unreadable_categories_name_the_file(tmp_path, cleanup):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    cleanup.append("own_bad")
    setup_cfg(SMOKE, ["DATASETS.REGISTER_COCO_INSTANCES", f"[('own_bad', '{bad}', '{tmp_path}')]"])
    with pytest.raises(ValueError, match=r"dataset 'own_bad': cannot read the category names from .*bad.json"):
        dataset_metadata("own_bad")


@pytest.mark.parametrize(
    "entry, message",
    [
        ("[('only_a_name',)]", r"each entry must be \(name, json_file, image_root\), three non-empty strings"),
        ("[('x', '', 'images')]", r"each entry must be .* got \('x', '', 'images'\)"),
        (
            "[('synthetic_shapes_train', 'a.json', 'images')]",
            r"dataset name 'synthetic_shapes_train' is already "
            r"registered .* give \(a.json, images\) another name",
        ),
    ],
)
def test_bad_entries_name_the_key(entry, message):
    with pytest.raises(ValueError, match=r"DATASETS.REGISTER_COCO_INSTANCES: " + message):
        setup_cfg(SMOKE, ["DATASETS.REGISTER_COCO_INSTANCES", entry])
