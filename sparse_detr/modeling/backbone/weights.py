"""Backbone weight files: reading them, and renaming torchvision ResNet parameters to detectron2's (for torchvision's
ImageNet models, SCRL, and the reference implementation's backbone).

detectron2 names: ``stem.conv1`` (+ ``.norm``), ``res{2..5}.{block}.conv{1..3}`` (+ ``.norm``) and
``res{N}.0.shortcut`` (+ ``.norm``); with ``RESNETS.STRIDE_IN_1X1: False`` the layers are the same as torchvision's.
"""
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Tuple

import torch

__all__ = ["load_weights_file", "torchvision_resnet_to_detectron2", "resnet_depth_from_torchvision"]

logger = logging.getLogger(__name__)

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
# Blocks in layer1..layer4 of the bottleneck ResNets detectron2 builds.
_BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def load_weights_file(path: str, what: str = "weights file") -> Mapping[str, Any]:
    """Load a local torch checkpoint (a mapping) on the CPU; ``what`` names it in errors (e.g. the config key).

    Plain tensor files load in ``weights_only`` mode; files that also pickle other objects (the official Swin
    releases keep their training config) fall back to a full unpickling, with a warning: only load files you trust.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        logger.warning(f"{path} holds more than tensors ({e.__class__.__name__}); loading it in full pickle mode")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{what} {path!r} does not hold a state dict (got {type(checkpoint).__name__})")
    return checkpoint


def _rename(key: str) -> str:
    """One torchvision name -> detectron2; raises KeyError for a name that is not part of a ResNet trunk."""
    m = re.fullmatch(r"conv1\.weight", key)
    if m:
        return "stem.conv1.weight"
    m = re.fullmatch(r"bn1\.(\w+)", key)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
    if m:
        stage, block, rest = f"res{int(m.group(1)) + 1}", m.group(2), m.group(3)
        for pattern, target in (
            (r"conv(\d)\.weight", r"conv\1.weight"),
            (r"bn(\d)\.(\w+)", r"conv\1.norm.\2"),
            (r"downsample\.0\.weight", "shortcut.weight"),
            (r"downsample\.1\.(\w+)", r"shortcut.norm.\1"),
        ):
            if re.fullmatch(pattern, rest):
                return f"{stage}.{block}.{re.sub(pattern, target, rest)}"
    raise KeyError(key)


def resnet_depth_from_torchvision(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Depth (50/101/152) of a torchvision-named bottleneck ResNet state dict, from its block counts."""
    blocks = tuple(
        len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    )
    for depth, counts in _BLOCKS_PER_DEPTH.items():
        if counts == blocks:
            return depth
    raise ValueError(f"not a bottleneck ResNet-50/101/152: blocks per layer {blocks}")


def torchvision_resnet_to_detectron2(
    state_dict: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename a torchvision-named ResNet trunk to detectron2's names.

    The classifier (``fc.*``) and BatchNorm step counters (``num_batches_tracked``) are dropped: detectron2's
    FrozenBN has no use for them. Every other key must be a trunk parameter or buffer, and every BatchNorm must
    come with its four tensors (``weight, bias, running_mean, running_var``).

    Returns:
        ``(renamed, dropped)``: the detectron2-named tensors and the names that were left out.

    Raises:
        ValueError: naming every key that is neither a ResNet trunk tensor nor droppable, and every incomplete norm.
    """
    renamed: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    unknown: List[str] = []
    for key, value in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        try:
            renamed[_rename(key)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not torchvision ResNet names: {unknown[:10]}{'...' if len(unknown) > 10 else ''}")
    norms = {k.rsplit(".", 1)[0] for k in renamed if ".norm." in k}
    incomplete = sorted(f"{n}.{t}" for n in norms for t in _BN_TENSORS if f"{n}.{t}" not in renamed)
    if incomplete:
        raise ValueError(f"incomplete BatchNorm tensors, missing {incomplete[:10]}")
    return renamed, dropped
