"""Swin Transformer weights in the official release's layout renamed to timm's (the layout of this project's
Swin backbone, ``sparse_detr.modeling.backbone.TimmSwinBackbone``)."""

from typing import Dict, Mapping, Tuple

import torch

__all__ = ["swin_state_dict_to_timm"]

# Keys of ImageNet checkpoints that a backbone has no use for: classifier, its final norm, non-persistent buffers.
_IGNORED_PREFIXES = ("head.", "norm.")
_IGNORED_SUFFIXES = ("relative_position_index", "attn_mask")


def swin_state_dict_to_timm(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """Swin weights in timm's or the official layout -> timm's names, without classifier or non-persistent buffers.

    The official layout (``layers.i.downsample`` closing stage ``i``; recognized by ``layers.0.downsample``) has
    its patch merging renamed to ``layers.{i+1}.downsample``, where timm opens the next stage with it.

    Returns:
        ``(renamed, layout)`` with ``layout`` "official" or "timm".
    """
    official = any(k.startswith("layers.0.downsample.") for k in state_dict)
    renamed: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES):
            continue
        if official and key.startswith("layers.") and ".downsample." in key:
            stage, rest = key[len("layers.") :].split(".", 1)
            key = f"layers.{int(stage) + 1}.{rest}"
        renamed[key] = value
    return renamed, "official" if official else "timm"
