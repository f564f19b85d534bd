"""AOTInductor: the ExportedProgram of the tiny Sparse DETR compiled to a shared library with the host's compiler,
loaded back and run on both image sizes against eager."""

import pytest
import torch
from export_cases import SIZES, random_image

from sparse_detr.export import Detections, compare, eager_detections
from sparse_detr.export.torch_export import package_aoti


# one package proves the toolchain (compiling one takes minutes): Sparse DETR, the variant with the most to trace
@pytest.mark.slow
@pytest.mark.parametrize("exported", ["sparse"], indirect=True)
def test_aoti_package_matches_eager(exported, tmp_path):
    _, model, program = exported
    path = package_aoti(program, str(tmp_path / "model_aoti.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for size in SIZES:
        image = random_image(*size, seed=2)
        with torch.no_grad():
            parity = compare(eager_detections(model, image), Detections(*compiled(image)))
        assert parity.within_tolerance, (size, parity)
