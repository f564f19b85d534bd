"""One torch.export per paper variant, shared by all export tests (tracing a tiny model takes seconds)."""

from typing import Dict, Tuple

import pytest
import torch
from detectron2.modeling import build_model
from export_cases import SIZES, VARIANTS, random_image
from torch.export import ExportedProgram

from sparse_detr.export import export_program
from sparse_detr.modeling import SparseDETR


@pytest.fixture(scope="session")
def export_cache() -> Dict[str, Tuple[str, SparseDETR, ExportedProgram]]:
    """The exports made so far in this test session, by variant."""
    return {}


@pytest.fixture(params=sorted(VARIANTS))
def exported(request, tiny_cfg, export_cache):
    """(variant, eval model, its ExportedProgram traced on a SIZES[0] image), made once per session."""
    if request.param not in export_cache:
        torch.manual_seed(0)
        model = build_model(tiny_cfg(**VARIANTS[request.param])).eval()
        export_cache[request.param] = request.param, model, export_program(model, random_image(*SIZES[0]))
    return export_cache[request.param]
