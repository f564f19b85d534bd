"""Checkpoint files and conversions: the checkpointer of training and evaluation, reading local weight files,
torchvision/SCRL ResNets to detectron2 backbone weights, the official Swin layout to timm's, and checkpoints of the
reference implementation to this model.

The command lines over them are projects/SparseDETR/convert_scrl.py and convert_reference_checkpoint.py.
"""

from .checkpointer import SparseDetrCheckpointer
from .io import load_weights_file, state_dict_of
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
from .swin import swin_state_dict_to_timm

__all__ = [
    "REFERENCE_NUM_CLASSES",
    "SparseDetrCheckpointer",
    "check_against_model",
    "coco_contiguous_to_id",
    "convert_reference_checkpoint",
    "convert_resnet_file",
    "convert_state_dict",
    "load_weights_file",
    "reference_cfg",
    "resnet_checkpoint_to_detectron2",
    "resnet_depth_from_torchvision",
    "scrl_to_torchvision",
    "state_dict_of",
    "swin_state_dict_to_timm",
    "torchvision_resnet_to_detectron2",
    "write_detectron2_weights",
]
