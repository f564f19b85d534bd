"""Checkpoint files and conversions: the checkpointer of training and evaluation, torchvision/SCRL ResNets to
detectron2 backbone weights, and checkpoints of the reference implementation to this model (reading local weight
files is :mod:`sparse_detr.weights_io`; the Swin layouts are the Swin backbone's own).

The command lines over them are projects/SparseDETR/convert_scrl.py and convert_reference_checkpoint.py.
"""

from .checkpointer import SparseDetrCheckpointer
from .reference import (
    REFERENCE_NUM_CLASSES,
    check_against_model,
    coco_contiguous_to_id,
    convert_reference_checkpoint,
    convert_state_dict,
    reference_cfg,
)
from .resnet import (
    convert_resnet_file,
    resnet_checkpoint_to_detectron2,
    resnet_depth_from_torchvision,
    scrl_to_torchvision,
    torchvision_resnet_to_detectron2,
    write_detectron2_weights,
)

__all__ = [
    "REFERENCE_NUM_CLASSES",
    "SparseDetrCheckpointer",
    "check_against_model",
    "coco_contiguous_to_id",
    "convert_reference_checkpoint",
    "convert_resnet_file",
    "convert_state_dict",
    "reference_cfg",
    "resnet_checkpoint_to_detectron2",
    "resnet_depth_from_torchvision",
    "scrl_to_torchvision",
    "torchvision_resnet_to_detectron2",
    "write_detectron2_weights",
]
