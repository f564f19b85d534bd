"""Param groups, learning rates and full-model gradient clipping of the reference's optimizer."""

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import (
    build_optimizer,
    check_optimizer_state,
    full_model_gradient_clipping,
    get_detr_param_groups,
)


class Toy(nn.Module):
    """Parameter names like the meta-architecture's: a backbone with a frozen stem, attention projections."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.ModuleDict({"stem": nn.Linear(2, 2), "res3": nn.Linear(2, 2)})
        self.backbone["stem"].requires_grad_(False)
        self.backbone.sampling_offsets = nn.Linear(2, 2)  # a backbone param with a linear-proj name
        self.transformer = nn.ModuleDict(
            {"sampling_offsets": nn.Linear(2, 2), "value_proj": nn.Linear(2, 2), "reference_points": nn.Linear(2, 2)}
        )
        self.class_embed = nn.Linear(2, 3)


def base_cfg():
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    return cfg


def names_by_group(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(ids[id(p)] for p in g["params"]) for g in groups}


def test_groups_follow_the_reference_precedence():
    model = Toy()
    groups = get_detr_param_groups(model, base_lr=2e-4)
    by = names_by_group(model, groups)
    assert by["backbone"] == ["backbone.res3.bias", "backbone.res3.weight"]
    # The reference tests linear-proj names first: they win over the backbone match.
    assert by["linear_proj"] == [
        "backbone.sampling_offsets.bias",
        "backbone.sampling_offsets.weight",
        "transformer.reference_points.bias",
        "transformer.reference_points.weight",
        "transformer.sampling_offsets.bias",
        "transformer.sampling_offsets.weight",
    ]
    assert by["default"] == [
        "class_embed.bias",
        "class_embed.weight",
        "transformer.value_proj.bias",
        "transformer.value_proj.weight",
    ]
    # Frozen parameters are in no group; every trainable one is in exactly one.
    all_names = sum(by.values(), [])
    assert len(all_names) == len(set(all_names)) == sum(p.requires_grad for p in model.parameters())
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(
        {"default": 2e-4, "backbone": 2e-5, "linear_proj": 2e-5}
    )


def test_build_optimizer_from_the_base_config():
    cfg = base_cfg()
    model = Toy()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {"default": 2e-4, "backbone": 2e-5, "linear_proj": 2e-5}
    )
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)  # no exception for norms or biases

    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.5
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.25
    cfg.SOLVER.OPTIMIZER = "SGD"
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == cfg.SOLVER.MOMENTUM
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {"default": 2e-4, "backbone": 5e-5, "linear_proj": 1e-4}
    )
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, model)


def test_scheduler_keeps_the_group_ratios():
    from detectron2.solver import build_lr_scheduler

    cfg = base_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 10, (8,)
    opt = build_optimizer(cfg, Toy())
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([2e-4, 2e-5, 2e-5])  # no warmup in the paper's recipe
    assert lrs[7] == pytest.approx([2e-4, 2e-5, 2e-5]) and lrs[8] == pytest.approx([2e-5, 2e-6, 2e-6])


def grads_for(model, scale):
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale if p.requires_grad else None


def test_full_model_clipping_clips_the_global_norm():
    cfg = base_cfg()
    model = Toy()
    opt = build_optimizer(cfg, model)
    grads_for(model, 10.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.grad.clone() for p in trainable]
    opt.step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainable]))
    assert total == pytest.approx(0.1, rel=1e-4)
    # One factor for all: directions are kept, unlike per-parameter clipping.
    ratios = [(p.grad / g).flatten() for p, g in zip(trainable, before)]
    assert torch.allclose(torch.cat(ratios), ratios[0][0].expand(sum(r.numel() for r in ratios)), rtol=1e-4)

    grads_for(model, 1e-4)  # below the bound: untouched
    small = [p.grad.clone() for p in trainable]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(trainable, small))


def test_detectron2_clip_types_still_work_and_bad_ones_fail():
    cfg = base_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    model = Toy()
    opt = build_optimizer(cfg, model)
    grads_for(model, 1.0)
    opt.step()
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) <= 0.01
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_norm"
    with pytest.raises(ValueError, match="full_norm"):
        build_optimizer(cfg, model)
    with pytest.raises(ValueError, match="max_norm"):
        full_model_gradient_clipping(torch.optim.AdamW, 0.0)


@pytest.mark.parametrize("lr", [0.0, -1e-4, float("nan"), float("inf")])
def test_bad_base_lr_names_the_key(lr):
    cfg = base_cfg()
    cfg.SOLVER.BASE_LR = lr
    with pytest.raises(ValueError, match=r"SOLVER\.BASE_LR must be a finite number > 0"):
        build_optimizer(cfg, Toy())


def test_optimizer_state_of_another_shape_is_named_before_loading():
    """What --resume meets after a config change that reshapes a parameter: torch checks only the counts."""
    cfg = base_cfg()
    old = Toy()
    opt = build_optimizer(cfg, old)
    sum(p.sum() for p in old.parameters() if p.requires_grad).backward()
    opt.step()
    saved = opt.state_dict()

    new = Toy()
    new.class_embed = nn.Linear(2, 4)  # e.g. MODEL.SPARSE_DETR.NUM_CLASSES changed
    new_opt = build_optimizer(cfg, new)
    with pytest.raises(
        ValueError,
        match=r"exp_avg of parameter 'class_embed.weight' has shape \(3, 2\) in the "
        r"checkpoint but the parameter has \(4, 2\)",
    ):
        check_optimizer_state(new_opt, saved, new)
    check_optimizer_state(build_optimizer(cfg, Toy()), saved, Toy())  # same shapes: nothing to say
