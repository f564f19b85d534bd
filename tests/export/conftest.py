"""One torch.export per paper variant, shared by all export tests (tracing a tiny model takes seconds)."""
import pytest
import torch
from detectron2.modeling import build_model
from export_cases import SIZES, VARIANTS, random_image

from sparse_detr.export import export_program


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def exported(request, tiny_cfg):
    """(variant, eval model, its ExportedProgram traced on a SIZES[0] image)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**VARIANTS[request.param])).eval()
    return request.param, model, export_program(model, random_image(*SIZES[0]))
