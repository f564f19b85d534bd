"""torchvision-named ResNets (torchvision's ImageNet models, SCRL's encoder, the reference implementation's
backbone) renamed to detectron2's ResNet, and written as detectron2 backbone weights (``MODEL.WEIGHTS``).

detectron2 names: ``stem.conv1`` (+ ``.norm``), ``res{2..5}.{block}.conv{1..3}`` (+ ``.norm``) and
``res{N}.0.shortcut`` (+ ``.norm``); with ``RESNETS.STRIDE_IN_1X1: False`` the layers are the same as torchvision's.

SCRL (github.com/kakaobrain/scrl) checkpoints hold a torchvision ResNet as their online network's encoder.
"""

import os
import pickle
import re
from typing import Any, Dict, List, Mapping, Tuple

import torch

from ..weights_io import load_weights_file, state_dict_of

__all__ = [
    "convert_resnet_file",
    "resnet_checkpoint_to_detectron2",
    "resnet_depth_from_torchvision",
    "scrl_to_torchvision",
    "torchvision_resnet_to_detectron2",
    "write_detectron2_weights",
]

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
# Blocks in layer1..layer4 of the bottleneck ResNets detectron2 builds.
_BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


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
    blocks = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5))
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


# SCRL's encoder is torchvision's ResNet children as an nn.Sequential (relu, maxpool have no weights).
SCRL_ENCODER_TO_TORCHVISION = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def scrl_to_torchvision(checkpoint: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], int]:
    """The online encoder of an SCRL checkpoint with torchvision names; also returns how many other keys were left."""
    online = checkpoint["online_network_state_dict"]
    out: Dict[str, torch.Tensor] = {}
    others = 0
    for key, value in online.items():
        if not key.startswith("encoder."):
            others += 1
            continue
        index, rest = key[len("encoder.") :].split(".", 1)
        if index not in SCRL_ENCODER_TO_TORCHVISION:
            raise ValueError(f"unexpected SCRL encoder key {key!r}: encoder.{index} is not a ResNet trunk module")
        out[f"{SCRL_ENCODER_TO_TORCHVISION[index]}.{rest}"] = value
    if not out:
        raise ValueError("the SCRL checkpoint's online_network_state_dict has no encoder.* keys")
    return out, others


def resnet_checkpoint_to_detectron2(checkpoint: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """An SCRL or torchvision ResNet checkpoint (the format is detected) -> (detectron2-named ResNet tensors, the
    format, a summary line).

    torchvision checkpoints are plain state dicts ``conv1.*, bn1.*, layer1..4.*, fc.*``, optionally under
    ``"model"`` or ``"state_dict"``.
    """
    if "online_network_state_dict" in checkpoint:
        fmt = "SCRL"
        state_dict, others = scrl_to_torchvision(checkpoint)
        note = f"{others} non-encoder keys of the online network dropped"
    else:
        fmt = "torchvision"
        state_dict = state_dict_of(checkpoint)
        note = ""
    depth = resnet_depth_from_torchvision(state_dict)
    renamed, dropped = torchvision_resnet_to_detectron2(state_dict)
    summary = f"{fmt} ResNet-{depth}: {len(renamed)} tensors converted, {len(dropped)} dropped (fc, BN counters)"
    return renamed, fmt, summary + (f"; {note}" if note else "")


def write_detectron2_weights(tensors: Mapping[str, torch.Tensor], path: str, author: str) -> None:
    """Write ``tensors`` as a detectron2 model-zoo ``.pkl``: ``{"model": {name: ndarray}, "__author__",
    "matching_heuristics": True}``.

    ``DetectionCheckpointer`` matches such names onto the backbone of any model by name suffix (for ``.pkl`` files
    only), so one file of detectron2 ResNet names serves every config with that backbone.
    """
    if not path.endswith(".pkl"):
        raise ValueError(f"detectron2 weights must be written to a .pkl file, got {path!r}")
    model = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": author, "matching_heuristics": True}, f)


def convert_resnet_file(input_path: str, output_path: str) -> str:
    """Convert the SCRL or torchvision ResNet checkpoint at ``input_path`` into detectron2 weights at
    ``output_path`` (``.pkl``); returns the summary line."""
    renamed, fmt, summary = resnet_checkpoint_to_detectron2(load_weights_file(input_path, what="input checkpoint"))
    write_detectron2_weights(renamed, output_path, author=fmt)
    return summary
