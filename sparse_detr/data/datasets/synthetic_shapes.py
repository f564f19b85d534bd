"""A synthetic detection dataset that is generated on first use: coloured shapes on textured backgrounds.

Each split is a directory with ``images/*.jpg`` and a COCO-format ``annotations.json``, written by
:func:`ensure_synthetic_shapes`: deterministic from the split's :class:`SyntheticShapesSpec` (seed included),
generated in a temporary directory and renamed into place under a file lock, so a killed generation or two
processes generating at once never leave a half-written split; a split that is incomplete or was generated from
another spec is generated again.

Shapes are saturated colours on low-saturation textures, so finding them is easy and telling the classes apart
(by outline, as colours are random) is what a detector has to learn. Shapes overlap, but none is hidden by more
than ``max_occlusion`` of its area; boxes are tight around the visible pixels, as COCO's.
"""
import colorsys
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "SHAPE_CLASSES",
    "SyntheticShapesSpec",
    "render_synthetic_image",
    "ensure_synthetic_shapes",
    "register_synthetic_shapes",
]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
# Bump when the rendering changes, so splits on disk from an older generator are regenerated.
_GENERATOR_VERSION = 1
_ANNOTATIONS = "annotations.json"
_IMAGES = "images"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SyntheticShapesSpec:
    """What a split contains. Sizes of objects are fractions of the image's shorter side (log-uniform)."""

    num_images: int
    height: int = 128
    width: int = 128
    min_objects: int = 1
    max_objects: int = 6
    min_object_size: float = 0.12
    max_object_size: float = 0.5
    # Largest fraction of a shape that shapes drawn later may cover.
    max_occlusion: float = 0.4
    seed: int = 0

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if min(self.height, self.width) < 16:
            raise ValueError(f"height and width must be >= 16, got {self.height}x{self.width}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_object_size <= self.max_object_size <= 1:
            raise ValueError(
                f"need 0 < min_object_size <= max_object_size <= 1, got "
                f"{self.min_object_size}, {self.max_object_size}"
            )
        if not 0 <= self.max_occlusion < 1:
            raise ValueError(f"max_occlusion must be in [0, 1), got {self.max_occlusion}")


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W, 3] float32 in [0, 255]: a muted base colour, smooth blotches, and stripes or a checkerboard."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.8))) * 255
    grid = rng.normal(0.0, 25.0, size=(rng.integers(3, 8), rng.integers(3, 8), 3)).astype(np.float32)
    image = base.astype(np.float32) + cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = rng.uniform(6.0, 24.0)
    if rng.random() < 0.5:
        angle = rng.uniform(0.0, np.pi)
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))
    else:
        pattern = ((xx // period + yy // period) % 2) * 2.0 - 1.0
    image += pattern[..., None] * rng.uniform(4.0, 14.0)
    image += rng.normal(0.0, 4.0, size=image.shape)
    return image


def _shape_polygon(cls: int, size: float, angle: float) -> Optional[np.ndarray]:
    """Vertices [K, 2] of a shape of diameter ``size`` centred at 0, or None for the circle."""
    name = SHAPE_CLASSES[cls]
    if name == "circle":
        return None
    if name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * (size / 2 / np.sqrt(2))
    elif name == "triangle":
        t = np.deg2rad([90.0, 210.0, 330.0])
        pts = np.stack([np.cos(t), -np.sin(t)], axis=1) * (size / 2)
    else:  # cross: a plus sign whose arms are a third of its extent wide
        a, b = size / 2 / np.sqrt(2), size / 6 / np.sqrt(2)
        pts = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]
        )
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T


def _shape_mask(cls: int, center: Tuple[float, float], size: float, angle: float, shape: Tuple[int, int]) -> np.ndarray:
    """Binary [H, W] uint8 mask of one shape (drawn with 4 fractional bits for sub-pixel placement)."""
    mask = np.zeros(shape, dtype=np.uint8)
    poly = _shape_polygon(cls, size, angle)
    if poly is None:
        c = tuple(int(round(v * 16)) for v in center)
        cv2.circle(mask, c, int(round(size / 2 * 16)), 1, thickness=-1, lineType=cv2.LINE_8, shift=4)
    else:
        pts = np.round((poly + np.asarray(center)) * 16).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return mask


def render_synthetic_image(spec: SyntheticShapesSpec, index: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Render image ``index`` of ``spec`` (a pure function of both).

    Returns:
        image: [H, W, 3] uint8 RGB.
        objects: ``{"category": class index, "bbox": [x0, y0, x1, y1] pixel edges of the visible part,
        "area": visible pixels}`` per shape.
    """
    rng = np.random.default_rng([spec.seed, index])
    h, w = spec.height, spec.width
    image = _textured_background(rng, h, w)
    wanted = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    placed: List[Tuple[int, np.ndarray, np.ndarray]] = []  # (class, full mask, visible mask)
    short = min(h, w)
    for _ in range(wanted * 20):
        if len(placed) == wanted:
            break
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        size = short * np.exp(rng.uniform(np.log(spec.min_object_size), np.log(spec.max_object_size)))
        center = (rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2))
        mask = _shape_mask(cls, center, size, rng.uniform(-np.pi / 7, np.pi / 7), (h, w)).astype(bool)
        if not mask.any():
            continue
        if any((vis & ~mask).sum() < (1 - spec.max_occlusion) * full.sum() for _, full, vis in placed):
            continue
        placed = [(c, full, vis & ~mask) for c, full, vis in placed] + [(cls, mask, mask)]

    objects = []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for cls, full, vis in placed:
        colour = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))) * 255
        # A soft linear shading, so a shape is not one flat colour.
        gx, gy = rng.normal(0.0, 0.4, size=2) / short
        shade = 1.0 + (xx - xx[full].mean()) * gx + (yy - yy[full].mean()) * gy
        image[full] = colour[None, :] * np.clip(shade[full], 0.6, 1.4)[:, None]
        ys, xs = np.nonzero(vis)
        objects.append(
            {
                "category": cls,
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                "area": float(vis.sum()),
            }
        )
    image += rng.normal(0.0, 3.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _write_split(directory: str, spec: SyntheticShapesSpec) -> None:
    os.makedirs(os.path.join(directory, _IMAGES))
    images, annotations = [], []
    for i in range(spec.num_images):
        image, objects = render_synthetic_image(spec, i)
        file_name = f"{i:06d}.jpg"
        if not cv2.imwrite(os.path.join(directory, _IMAGES, file_name), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"could not write {file_name} into {directory}")
        images.append({"id": i + 1, "file_name": file_name, "height": spec.height, "width": spec.width})
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": obj["category"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": "sparse_detr synthetic shapes", "version": _GENERATOR_VERSION,
                 "spec": dataclasses.asdict(spec)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SHAPE_CLASSES)],
    }
    with open(os.path.join(directory, _ANNOTATIONS), "w") as f:
        json.dump(coco, f)


def _is_complete(directory: str, spec: SyntheticShapesSpec) -> bool:
    try:
        with open(os.path.join(directory, _ANNOTATIONS)) as f:
            coco = json.load(f)
        info = coco["info"]
        if info["version"] != _GENERATOR_VERSION or info["spec"] != dataclasses.asdict(spec):
            return False
        if len(coco["images"]) != spec.num_images:
            return False
        return all(os.path.isfile(os.path.join(directory, _IMAGES, im["file_name"])) for im in coco["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_synthetic_shapes(directory: str, spec: SyntheticShapesSpec) -> Tuple[str, str]:
    """Generate the split into ``directory`` unless it is already there, complete and from ``spec``.

    Returns:
        (json_file, image_root) of the split.
    """
    directory = os.path.abspath(directory)
    paths = (os.path.join(directory, _ANNOTATIONS), os.path.join(directory, _IMAGES))
    if _is_complete(directory, spec):
        return paths
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if _is_complete(directory, spec):  # another process generated it while we waited
            return paths
        for stale in os.listdir(parent):  # left by a killed generation; nobody else writes them under the lock
            if stale.startswith(f".{name}.tmp-"):
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
        logger.info(f"Generating {spec.num_images} synthetic images into {directory} ...")
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            _write_split(os.path.join(tmp, "split"), spec)
            if os.path.exists(directory):
                shutil.rmtree(directory)
            os.rename(os.path.join(tmp, "split"), directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def register_synthetic_shapes(name: str, directory: str, spec: SyntheticShapesSpec) -> None:
    """Register a synthetic split as a COCO-format dataset, generated when first loaded.

    Like :func:`detectron2.data.datasets.register_coco_instances`, whose loader cannot generate the files first.
    ``COCOEvaluator`` reads ``json_file``, which exists once the dataset has been loaded (the test loader is built
    before the evaluator).
    """
    json_file, image_root = os.path.join(directory, _ANNOTATIONS), os.path.join(directory, _IMAGES)

    def load() -> List[Dict[str, Any]]:
        ensure_synthetic_shapes(directory, spec)
        return load_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", thing_classes=list(SHAPE_CLASSES)
    )
