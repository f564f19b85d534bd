#!/usr/bin/env python
"""Convert an SCRL or a torchvision ResNet checkpoint into detectron2 backbone weights (``MODEL.WEIGHTS``).

Inputs (the format is detected):
- SCRL (github.com/kakaobrain/scrl): ``{"online_network_state_dict": {"encoder.0.*": conv1, "encoder.1.*": bn1,
  "encoder.4..7.*": layer1..layer4, ...}}``; only the online encoder is kept, as the reference's
  ``--scrl_pretrained_path`` does (projector/predictor heads and the target network are dropped).
- torchvision (e.g. ``resnet50-0676ba61.pth``, ImageNet-supervised, the paper's default initialization): a plain
  state dict ``conv1.*, bn1.*, layer1..4.*, fc.*``, optionally under ``"model"`` or ``"state_dict"``.

Output: a detectron2 model-zoo ``.pkl`` (``{"model": {name: ndarray}, "__author__", "matching_heuristics": True}``)
with detectron2 ResNet names (``stem.conv1``, ``res2.0.conv1``, ...). ``DetectionCheckpointer`` matches them onto
the backbone of any model by name suffix, so the same file serves every R50 config; the transformer keeps its init.

    python projects/SparseDETR/convert_scrl.py scrl_r50.pth pretrained/scrl_r50.pkl
    python projects/SparseDETR/convert_scrl.py resnet50-0676ba61.pth pretrained/torchvision_r50.pkl
"""
import argparse
import os
import pickle
import sys
from typing import Any, Dict, Mapping, Tuple

import torch

from sparse_detr.modeling.backbone import (
    load_weights_file,
    resnet_depth_from_torchvision,
    torchvision_resnet_to_detectron2,
)

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


def convert(checkpoint: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """Any supported checkpoint -> (detectron2-named ResNet tensors, detected format, a summary line)."""
    if "online_network_state_dict" in checkpoint:
        fmt = "SCRL"
        state_dict, others = scrl_to_torchvision(checkpoint)
        note = f"{others} non-encoder keys of the online network dropped"
    else:
        fmt = "torchvision"
        state_dict = checkpoint
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), Mapping):
                state_dict = checkpoint[key]
        note = ""
    depth = resnet_depth_from_torchvision(state_dict)
    renamed, dropped = torchvision_resnet_to_detectron2(state_dict)
    summary = f"{fmt} ResNet-{depth}: {len(renamed)} tensors converted, {len(dropped)} dropped (fc, BN counters)"
    return renamed, fmt, summary + (f"; {note}" if note else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="SCRL or torchvision ResNet checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 weights to write (.pkl, used as MODEL.WEIGHTS)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        # DetectionCheckpointer applies its name matching (needed for these backbone-only names) to .pkl files only.
        parser.error(f"output must end with .pkl, got {args.output!r}")

    renamed, fmt, summary = convert(load_weights_file(args.input, what="input checkpoint"))
    model = {k: v.detach().cpu().numpy() for k, v in renamed.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "wb") as f:
        pickle.dump({"model": model, "__author__": fmt, "matching_heuristics": True}, f)
    print(f"{args.input} -> {args.output}: {summary}")


if __name__ == "__main__":
    sys.exit(main())
