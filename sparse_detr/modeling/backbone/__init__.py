"""Backbones beyond detectron2's own; importing this package registers them in ``BACKBONE_REGISTRY``.

detectron2's ResNet (``build_resnet_backbone``) and any other registered backbone work unchanged: the
meta-architecture only needs the feature maps named in ``MODEL.SPARSE_DETR.IN_FEATURES`` and their ``output_shape()``.
"""
from .swin import TimmSwinBackbone, build_swin_backbone, load_swin_state_dict, swin_state_dict_to_timm
from .weights import load_weights_file, resnet_depth_from_torchvision, torchvision_resnet_to_detectron2

__all__ = [
    "TimmSwinBackbone",
    "build_swin_backbone",
    "load_swin_state_dict",
    "load_weights_file",
    "resnet_depth_from_torchvision",
    "swin_state_dict_to_timm",
    "torchvision_resnet_to_detectron2",
]
