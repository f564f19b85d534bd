"""Parameter and FLOP accounting (sparse_detr.analysis) and the reports of analyze_model.py built on it
(projects/SparseDETR/analyze_model.py)."""

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from analyze_model import analyze_flops, analyze_parameters
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from paper_variants import DENSE_OVERRIDES

from sparse_detr import setup_cfg
from sparse_detr.analysis import (
    flop_breakdown,
    num_kept_tokens,
    parameter_breakdown,
    random_input,
    training_only_head_flops,
)
from sparse_detr.analysis.flops import MS_DEFORM_ATTN_OP, FlopCountAnalysis
from sparse_detr.layers import ms_deform_attn_available
from sparse_detr.layers.multi_scale_deform_attn import MSDeformAttn

ROOT = Path(__file__).resolve().parents[2]
# a tiny Sparse DETR (R18, hidden 64, 2 encoder / 1 decoder layers, encoder aux heads), random weights
CONFIG = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")
DENSE = DENSE_OVERRIDES
H, W = 64, 96


def _model(opts=()):
    cfg = setup_cfg(CONFIG, opts)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _deform_attn_queries(model, inputs):
    """(N, Lq) of every MSDeformAttn call, recorded by hooks: an independent count of the op's work."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0].shape[0], args[0].shape[1])))
        for m in model.modules()
        if isinstance(m, MSDeformAttn)
    ]
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    return sum(4 * n * lq * m.n_heads * m.n_levels * m.n_points * (m.d_model // m.n_heads) for m, n, lq in calls)


@pytest.mark.parametrize("opts", [[], DENSE], ids=["sparse", "dense"])
def test_flops_count_the_deformable_attention_op(opts, caplog):
    model = _model(opts)
    inputs = [random_input(H, W)]
    caplog.set_level(logging.WARNING)
    with torch.no_grad():
        flops = FlopCountAnalysis(model, inputs)
        by_op = flops.by_operator()
    op = "ms_deform_attn" if ms_deform_attn_available() else "grid_sampler"
    assert by_op[op] == _deform_attn_queries(model, inputs) > 0
    assert MS_DEFORM_ATTN_OP not in flops.unsupported_ops()
    assert "ms_deform_attn" not in caplog.text
    assert "batch_norm" not in by_op  # folded into the convolutions, as the reference counts

    parts = flop_breakdown(model, flops)
    assert parts["total"] == flops.total()
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"]
    assert parts["backbone"] > 0 and parts["encoder"] > 0 and parts["decoder"] > 0
    assert parts.get("encoder aux heads", 0) == 0  # not run at inference
    assert 0 <= parts["other"] < 0.01 * parts["total"]
    assert ("scoring network" in parts) == (opts == [])


def test_training_only_heads():
    model = _model()
    inputs = [random_input(H, W)]
    kept = num_kept_tokens(model, inputs)
    # 64x96 -> levels 8x12, 4x6, 2x3, 1x2 = 128 tokens; rho 0.3 keeps int(128 * 0.3) + 1
    assert kept == int(128 * 0.3) + 1
    extra = training_only_head_flops(model, kept)
    d, c = model.transformer.d_model, model.num_classes
    head = d * c + (d * d * 2 + d * 4)  # class Linear + 3-layer box MLP, per token
    assert extra["encoder aux heads"] == (model.transformer.encoder.num_layers - 1) * kept * head
    assert extra["intermediate decoder heads"] == (model.transformer.decoder.num_layers - 1) * model.num_queries * head


def test_parameter_task_counts_trainable_parameters():
    result = analyze_parameters(setup_cfg(CONFIG))
    model = _model()
    assert result["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result["all"] == sum(p.numel() for p in model.parameters())
    parts = parameter_breakdown(model)
    assert parts["encoder aux heads"] > 0 and parts["other"] == model.transformer.level_embed.numel()


def test_flop_task_approximate_adds_training_heads():
    out = analyze_flops(setup_cfg(CONFIG), approximate=True, input_size=(H, W))
    model = _model()
    with torch.no_grad():
        total = FlopCountAnalysis(model, [random_input(H, W)]).total()
    extra = training_only_head_flops(model, num_kept_tokens(model, [random_input(H, W)]))
    assert out["gflops"] == pytest.approx(total / 1e9)
    assert out["gflops_with_training_heads"] == pytest.approx((total + sum(extra.values())) / 1e9)


def test_flop_task_dataset_mean(tmp_path):
    # two images already at the test size (shorter side 64, longer <= 96), so the mapper does not resize them
    sizes = [(64, 96), (64, 64)]
    dicts = []
    for i, (h, w) in enumerate(sizes):
        path = str(tmp_path / f"{i}.png")
        cv2.imwrite(path, np.full((h, w, 3), 100 * i, dtype=np.uint8))
        dicts.append({"file_name": path, "image_id": i, "height": h, "width": w})
    DatasetCatalog.register("analyze_model_tiny", lambda: dicts)
    try:
        cfg = setup_cfg(CONFIG, ["DATASETS.TEST", "('analyze_model_tiny',)"])
        out = analyze_flops(cfg, approximate=False, num_inputs=5)
    finally:
        DatasetCatalog.remove("analyze_model_tiny")
    model = _model()
    with torch.no_grad():
        expected = np.mean([FlopCountAnalysis(model, [random_input(h, w)]).total() for h, w in sizes])
    assert out["gflops"] == pytest.approx(expected / 1e9)


def test_bad_arguments():
    # analyze_model.py's own arguments (--eval-only, --num-gpus): tests/projects/test_command_lines.py
    with pytest.raises(ValueError, match="height and width"):
        random_input(0, 10)


@pytest.mark.parametrize(
    "config, trainable, without_aux",
    [
        ("configs/r50/sparse_detr_rho_0.1.yaml", 41_714_805, 40_934_810),
        ("configs/swin_t/sparse_detr_rho_0.1.yaml", 42_176_153, 41_396_158),
    ],
)
def test_parameter_counts_of_the_paper_rows(config, trainable, without_aux):
    # the reference's counts with 91 classes; the paper's 40.9M / 41.4M leave out the encoder aux heads
    cfg = setup_cfg(str(ROOT / config), ["MODEL.SPARSE_DETR.NUM_CLASSES", "91"])
    assert analyze_parameters(cfg)["trainable"] == trainable
    parts = parameter_breakdown(build_model(cfg))
    assert parts["total"] - parts["encoder aux heads"] == without_aux
