#!/usr/bin/env python
"""Convert a checkpoint of the reference implementation (kakaobrain/sparse-detr, fundamentalvision/Deformable-DETR)
into weights of this project's SparseDETR model, for ``train_net.py --eval-only MODEL.WEIGHTS <output>``.

    python projects/SparseDETR/convert_reference_checkpoint.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
        sparse_detr_r50_rho_0.1.pth pretrained/sparse_detr_r50_rho_0.1_d2.pth

The config must be the row the checkpoint was trained as (same switches, backbone, sizes): the model is built from
it and every converted tensor must fill one of its parameters, with nothing missing, left over or mis-shaped. What
the conversion changes (backbone names, class rows, aliases): sparse_detr/checkpoint/reference.py and CONVERTING.md.
"""

import argparse
import sys
from typing import Optional, Sequence

from sparse_detr.checkpoint import REFERENCE_NUM_CLASSES, convert_reference_checkpoint


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the config of the row the checkpoint was trained as")
    parser.add_argument("--num-classes", type=int, default=80, choices=(80, REFERENCE_NUM_CLASSES))
    parser.add_argument("input", help="reference checkpoint (.pth with its state_dict under 'model')")
    parser.add_argument("output", help="converted weights to write (.pth, used as MODEL.WEIGHTS)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    lines = convert_reference_checkpoint(args.input, args.output, args.config_file, args.num_classes, args.opts)
    print(lines[0])
    for note in lines[1:]:
        print(f"  {note}")


if __name__ == "__main__":
    sys.exit(main())
