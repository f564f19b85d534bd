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
The conversion is ``sparse_detr.checkpoint.resnet``.

    python projects/SparseDETR/convert_scrl.py scrl_r50.pth pretrained/scrl_r50.pkl
    python projects/SparseDETR/convert_scrl.py resnet50-0676ba61.pth pretrained/torchvision_r50.pkl
"""

import argparse
import sys
from typing import Optional, Sequence

from sparse_detr.checkpoint import convert_resnet_file


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="SCRL or torchvision ResNet checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 weights to write (.pkl, used as MODEL.WEIGHTS)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        # checked before reading the input; DetectionCheckpointer matches backbone-only names in .pkl files only
        parser.error(f"output must end with .pkl, got {args.output!r}")
    summary = convert_resnet_file(args.input, args.output)
    print(f"{args.input} -> {args.output}: {summary}")


if __name__ == "__main__":
    sys.exit(main())
