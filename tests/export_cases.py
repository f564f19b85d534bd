"""The cases the export tests share: the paper variants to export, the image sizes, random images."""

from typing import Dict

import torch
from paper_variants import BBR_TWO_STAGE, EFFICIENT_DETR

# The rows the issue asks export parity for: Deformable DETR + box refinement + two-stage, and Sparse DETR at
# rho = 0.1 at inference (TEST_RHO, trained at 0.3: the export must take TEST_RHO). One encoder layer (the tiny
# config has two): translating the graph to ONNX takes time in proportion to its nodes.
VARIANTS: Dict[str, dict] = {
    "bbr_two_stage": dict(BBR_TWO_STAGE, ENC_LAYERS=1),
    "sparse": dict(EFFICIENT_DETR, RHO=0.3, TEST_RHO=0.1, ENC_LAYERS=1),
}
# two sizes: the traced one and another (other token counts, other kept-token counts)
SIZES = ((192, 256), (137, 203))


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=g) * 255
