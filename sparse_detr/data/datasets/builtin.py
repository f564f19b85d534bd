"""The synthetic splits registered on import, under ``$SPARSE_DETR_DATASETS`` (default ``./datasets``).

``synthetic_shapes_{train,val}`` are the main job's data (configs/demo/); ``synthetic_shapes_mini_{train,val}``
are a few images for smoke tests; ``synthetic_shapes_coco_size_train`` is a few images of COCO's size (800x1066,
the short side of COCO's training resize) for timing training on a GPU (``make gpu-check``). Names and specs are fixed here so every process of a job (and every run)
sees the same files.
"""
import os

from .synthetic_shapes import SyntheticShapesSpec, register_synthetic_shapes

__all__ = ["SYNTHETIC_SPLITS", "register_all_synthetic_shapes"]

SYNTHETIC_SPLITS = {
    "synthetic_shapes_train": ("train", SyntheticShapesSpec(num_images=2000, seed=1)),
    "synthetic_shapes_val": ("val", SyntheticShapesSpec(num_images=200, seed=2)),
    "synthetic_shapes_mini_train": ("mini_train", SyntheticShapesSpec(num_images=16, seed=3)),
    "synthetic_shapes_mini_val": ("mini_val", SyntheticShapesSpec(num_images=8, seed=4)),
    "synthetic_shapes_coco_size_train": (
        "coco_size_train", SyntheticShapesSpec(num_images=32, height=800, width=1066, seed=5)
    ),
}


def register_all_synthetic_shapes(root: str) -> None:
    for name, (subdir, spec) in SYNTHETIC_SPLITS.items():
        register_synthetic_shapes(name, os.path.join(root, "synthetic_shapes", subdir), spec)


register_all_synthetic_shapes(os.path.abspath(os.environ.get("SPARSE_DETR_DATASETS", "datasets")))
