"""COCO-format datasets of your own, registered from the config (``DATASETS.REGISTER_COCO_INSTANCES``)."""
import json
import os
from typing import List

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["dataset_metadata", "register_coco_instances_from_config"]

_KEY = "DATASETS.REGISTER_COCO_INSTANCES"


def register_coco_instances_from_config(cfg: CfgNode) -> List[str]:
    """Register each ``(name, json_file, image_root)`` of ``DATASETS.REGISTER_COCO_INSTANCES`` with detectron2's
    ``register_coco_instances`` (paths made absolute against the working directory).

    An entry already registered with the same files is left as it is (a process may set up several configs);
    a name registered for other files (a built-in dataset, another entry) is an error. The files are read when
    the dataset is first loaded, where :func:`sparse_detr.data.build.load_dataset_dicts` reports missing ones.

    Returns:
        the names of the entries.
    Raises:
        ValueError: naming the key and the entry.
    """
    names = []
    for entry in cfg.DATASETS.REGISTER_COCO_INSTANCES:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(x, str) and x for x in entry)):
            raise ValueError(
                f"{_KEY}: each entry must be (name, json_file, image_root), three non-empty strings; got {entry!r}"
            )
        name, json_file, image_root = entry[0], os.path.abspath(entry[1]), os.path.abspath(entry[2])
        if name in DatasetCatalog:
            meta = MetadataCatalog.get(name)
            registered = (getattr(meta, "json_file", None), getattr(meta, "image_root", None))
            if registered != (json_file, image_root):
                raise ValueError(
                    f"{_KEY}: dataset name '{name}' is already registered (json_file={registered[0]}, "
                    f"image_root={registered[1]}); give ({entry[1]}, {entry[2]}) another name"
                )
        else:
            register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names


def dataset_metadata(name: str) -> Metadata:
    """The metadata of a registered dataset, with ``thing_classes`` even before the dataset is loaded.

    detectron2's COCO-format datasets learn their class names only when their json is loaded for the annotations;
    a tool that draws predictions without loading the dataset (the demo) would show class numbers. For such a
    dataset the names are read from the json's categories, ordered by id as detectron2 numbers them.
    """
    meta = MetadataCatalog.get(name)
    json_file = getattr(meta, "json_file", None)
    if json_file and not hasattr(meta, "thing_classes"):
        try:
            with open(json_file) as f:
                categories = json.load(f)["categories"]
            names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"dataset '{name}': cannot read the category names from {json_file}: {type(e).__name__}: {e}"
            ) from e
        meta.thing_classes = names
    return meta
