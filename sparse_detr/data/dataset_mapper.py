"""Dataset mapper of the DETR family: the reference's augmentation and target handling on detectron2's pieces."""

import copy
from typing import Any, Dict

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .image_cache import read_image
from .transforms import build_detr_augmentation

__all__ = ["DetrDatasetMapper"]


class DetrDatasetMapper(DatasetMapper):
    """Map a detectron2 dataset dict to the model's input with the DETR augmentation.

    Output: ``{"image": [C, H, W] uint8 tensor in INPUT.FORMAT, "height", "width", "image_id", ...}`` plus, in
    training, ``"instances"`` with ``gt_boxes`` (XYXY, absolute, in the transformed image) and ``gt_classes``.

    Target handling follows the reference (``ConvertCocoPolysToMask`` and ``crop``): crowd annotations are dropped,
    boxes are clipped to the (cropped) image, and boxes left with zero width or height are removed. An image whose
    boxes were all cropped away stays a training sample with empty ``Instances`` (DETR learns "no object" from it).
    Images cached with :func:`~sparse_detr.data.image_cache.attach_image_bytes` are decoded from memory.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> Dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = build_detr_augmentation(cfg, is_train)
        return ret

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below; cached bytes are immutable, so not copied
        image = read_image(dataset_dict, self.image_format)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            for anno in dataset_dict["annotations"]:
                # detectron2's transforms scale coordinates in place, which truncates integer boxes at every
                # resize (a COCO json may well hold integers).
                anno["bbox"] = [float(v) for v in anno["bbox"]]
            # Drops crowd boxes, clips to the image and removes empty boxes.
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
