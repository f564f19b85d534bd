#!/usr/bin/env python
"""What a seeded tiny model of each paper variant computes, in float64: the values `test_pinned_outputs.py` freezes.

Run it to regenerate `pinned_outputs.json` after a deliberate change of what the model computes (and say why in
the commit); a refactoring must leave the file as it is:

    python tests/modeling/pinned_outputs.py            # --stdout: print the values instead (what the test reads)

It computes under MKL's conditional numerical reproducibility (MKL_CBWR=COMPATIBLE, set before torch loads MKL):
MKL picks its GEMM kernels by CPU (AVX-512 on a Xeon, its generic path on an AMD EPYC), and their different
summation orders move float64 results by 1e-16, which a near-tie in a top-k (the DAM target, the two-stage
proposals) turns into 1e-8 .. 1e-3. The compatible path gives every x86-64 CPU the same bits.

Everything is read through the model's public interface, so the pins survive any reorganisation of its insides:
- every (weighted) loss term of a training step;
- the final decoder layer's logits and boxes: inference with NUM_DETECTIONS = queries x classes returns every
  (query, class) score with its box, sorted by score;
- for Sparse DETR, the scoring network's logits and the tokens it keeps (the selected token indices), per level.
"""

import os

os.environ["MKL_CBWR"] = "COMPATIBLE"  # before torch: see the module docstring

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List  # noqa: E402

import torch  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from sparse_detr import add_sparse_detr_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, when run as a script
from paper_variants import PAPER_VARIANTS as VARIANTS  # noqa: E402

FIXTURE = Path(__file__).with_name("pinned_outputs.json")
REPO = Path(__file__).resolve().parents[2]

NUM_CLASSES = 5
NUM_QUERIES = 10
# A ResNet-18, 32-channel, 2+2-layer model: MODEL.SPARSE_DETR keys over the base config. Spelled out here, not
# shared with the test fixtures, because the pinned numbers belong to exactly this configuration.
TINY_MODEL: Dict[str, Any] = dict(
    NUM_CLASSES=NUM_CLASSES,
    HIDDEN_DIM=32,
    NHEADS=2,
    ENC_LAYERS=2,
    DEC_LAYERS=2,
    DIM_FEEDFORWARD=64,
    DROPOUT=0.0,
    NUM_QUERIES=NUM_QUERIES,
    ENC_N_POINTS=2,
    DEC_N_POINTS=2,
    NUM_DETECTIONS=NUM_QUERIES * NUM_CLASSES,
)


def pinned_cfg(variant: str) -> CfgNode:
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-SparseDETR.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    for key, value in {**TINY_MODEL, **VARIANTS[variant]}.items():
        setattr(cfg.MODEL.SPARSE_DETR, key, value)
    return cfg


def pinned_inputs() -> List[Dict[str, Any]]:
    """Two images of different sizes (so one is padded), float64 pixels, with 2 and 3 boxes."""
    g = torch.Generator().manual_seed(1234)
    inputs = []
    for (h, w), n in (((64, 96), 2), ((80, 56), 3)):
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w / 2, h / 2], dtype=torch.float64)
        wh = (0.2 + 0.3 * torch.rand(n, 2, generator=g, dtype=torch.float64)) * torch.tensor([w, h])
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        instances.gt_classes = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        image = torch.rand(3, h, w, generator=g, dtype=torch.float64) * 255
        inputs.append({"image": image, "instances": instances, "height": h, "width": w})
    return inputs


def compute(variant: str) -> Dict[str, Any]:
    """The pinned values of one variant, as plain Python numbers."""
    torch.manual_seed(0)
    model = build_model(pinned_cfg(variant)).double()
    inputs = pinned_inputs()
    model.train()
    losses = model(inputs)
    out: Dict[str, Any] = {"losses": {k: float(v.detach()) for k, v in sorted(losses.items())}}

    model.eval()
    with torch.no_grad():
        if model.rho > 0:
            results, saliency = model.inference_with_saliency(inputs)
            out["token_scores"] = [[s.flatten().tolist() for s in image["scores"]] for image in saliency]
            out["kept_tokens"] = [
                [torch.nonzero(k.flatten()).flatten().tolist() for k in image["kept"]] for image in saliency
            ]
        else:
            results = model(inputs)
    out["detections"] = [
        {
            "scores": r["instances"].scores.tolist(),
            "classes": r["instances"].pred_classes.tolist(),
            "boxes": r["instances"].pred_boxes.tensor.tolist(),
        }
        for r in results
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stdout", action="store_true", help="print the values as JSON instead of writing the file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pins = {variant: compute(variant) for variant in VARIANTS}
    if args.stdout:
        print(json.dumps(pins))
        return
    FIXTURE.write_text(json.dumps(pins, indent=1) + "\n")
    print(f"wrote {FIXTURE.relative_to(REPO)} ({', '.join(pins)})")


if __name__ == "__main__":
    sys.exit(main())
