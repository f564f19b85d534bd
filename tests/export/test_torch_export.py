"""torch.export of the tiny paper variants: the ExportedProgram keeps the compiled op, takes any image size and
computes what the eager model computes."""

import pytest
import torch
from export_cases import SIZES, random_image

from sparse_detr.export import Detections, compare, eager_detections, export_program

OP = torch.ops.sparse_detr.ms_deform_attn.default


def _calls(program, target):
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target == target]


def test_the_compiled_op_stays_one_node(exported):
    _, model, program = exported
    layers = model.transformer.encoder.num_layers + model.transformer.decoder.num_layers
    assert len(_calls(program, OP)) == layers
    # height and width are inputs of the graph, not constants
    image = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "image")
    assert all(isinstance(d, torch.SymInt) for d in image.meta["val"].shape[1:])


@pytest.mark.parametrize("size", SIZES)
def test_exported_program_matches_eager(exported, size):
    _, model, program = exported
    image = random_image(*size, seed=1)
    with torch.no_grad():
        parity = compare(eager_detections(model, image), Detections(*program.module()(image)))
    # the same ops on the same kernels: equal up to reordered float sums
    assert parity.within_tolerance and parity.max_score_diff < 1e-6, parity


@pytest.mark.parametrize("exported", ["sparse"], indirect=True)
def test_kept_token_count_follows_the_image_size(exported):
    """Sparse DETR's K = int(rho * tokens) + 1 is computed in the graph from the image, at TEST_RHO."""
    _, model, program = exported
    counts = []
    interpreter = torch.fx.Interpreter(program.module())
    original = interpreter.run_node

    def record(node):
        out = original(node)
        if node.target is torch.ops.aten.item.default:
            counts.append(int(out))
        return out

    interpreter.run_node = record
    expected = []
    for h, w in SIZES:
        interpreter.run(random_image(h, w))
        tokens = sum(-(-h // s) * -(-w // s) for s in (8, 16, 32, 64))
        expected.append(int(tokens * 0.1) + 1)  # TEST_RHO, not RHO (0.3)
    assert counts == expected and expected[0] != expected[1]


def test_bad_example_image(exported):
    _, model, _ = exported
    with pytest.raises(ValueError, match="image: the example must be"):
        export_program(model, random_image(40, 300))


def _ops(program):
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


# two exports of a model trained with denoising (~25 s): the full tier
@pytest.mark.slow
def test_training_switches_export_and_denoising_leaves_the_graph_unchanged(tiny_cfg):
    """The recipe beyond the paper exports and matches eager at any size; its denoising queries exist only in
    training, so the graph is the one of the same model without them (the same ops, the same outputs)."""
    from detectron2.modeling import build_model
    from export_cases import VARIANTS
    from paper_variants import RECIPE

    programs, models = {}, {}
    for name, dn in (("recipe", True), ("without_dn", False)):
        torch.manual_seed(0)  # the label embedding is built last: the other weights are the same
        variant = dict(VARIANTS["sparse"], **{k: v for k, v in RECIPE.items() if k not in ("RHO", "USE_ENC_AUX_LOSS")})
        variant["DN"] = dict(ENABLED=dn)
        models[name] = build_model(tiny_cfg(**variant)).eval()
        programs[name] = export_program(models[name], random_image(*SIZES[0]))
    assert _ops(programs["recipe"]) == _ops(programs["without_dn"])
    for size in SIZES:
        image = random_image(*size, seed=1)
        with torch.no_grad():
            exported = Detections(*programs["recipe"].module()(image))
            parity = compare(eager_detections(models["recipe"], image), exported)
            assert parity.within_tolerance and parity.max_score_diff < 1e-6, parity
            same = compare(exported, Detections(*programs["without_dn"].module()(image)))
            assert same.classes_equal and same.max_score_diff == 0 and same.max_box_diff == 0, same
