"""The reference's optimizer: three learning rates by parameter name, and gradient clipping over the whole model."""

import logging
import math
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

__all__ = ["build_optimizer", "check_optimizer_state", "full_model_gradient_clipping", "get_detr_param_groups"]

logger = logging.getLogger(__name__)


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(k in name for k in keywords)


def get_detr_param_groups(
    model: nn.Module,
    base_lr: float,
    backbone_names: Sequence[str] = ("backbone.",),
    backbone_multiplier: float = 0.1,
    linear_proj_names: Sequence[str] = ("reference_points", "sampling_offsets"),
    linear_proj_multiplier: float = 0.1,
) -> List[Dict[str, Any]]:
    """Split the trainable parameters into the reference's three groups (kakaobrain/sparse-detr ``main.py``).

    A name containing one of ``linear_proj_names`` gets ``base_lr * linear_proj_multiplier``, even inside the
    backbone; otherwise a name containing one of ``backbone_names`` gets ``base_lr * backbone_multiplier``; every
    other parameter gets ``base_lr``. Parameters with ``requires_grad=False`` (frozen stages) are left out. Empty
    groups are dropped.

    Returns:
        Param groups for a ``torch.optim.Optimizer``, each ``{"params", "lr", "name"}``.
    """
    groups: Dict[str, List[nn.Parameter]] = {"default": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _matches(name, linear_proj_names):
            groups["linear_proj"].append(p)
        elif _matches(name, backbone_names):
            groups["backbone"].append(p)
        else:
            groups["default"].append(p)
    lrs = {
        "default": base_lr,
        "backbone": base_lr * backbone_multiplier,
        "linear_proj": base_lr * linear_proj_multiplier,
    }
    if not groups["backbone"] and backbone_multiplier != 1.0:
        logger.warning(f"No trainable parameter name contains any of {list(backbone_names)}: no backbone lr group.")
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def full_model_gradient_clipping(optimizer_type: Type[torch.optim.Optimizer], max_norm: float, norm_type: float = 2.0):
    """A subclass of ``optimizer_type`` whose ``step`` first clips the gradient norm over all its parameters.

    One norm over the whole model, as the reference's ``clip_grad_norm_(model.parameters(), 0.1)``; detectron2's
    own ``CLIP_TYPE: "norm"`` clips each parameter separately. Under AMP, detectron2's ``GradScaler.step`` unscales
    the gradients before calling ``step``, so the norm is that of the true gradients.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")

    class FullModelGradientClippingOptimizer(optimizer_type):
        def step(self, closure=None):
            params: Iterable[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClippingOptimizer.__name__ = f"{optimizer_type.__name__}WithFullModelGradientClipping"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` ("ADAMW", the reference's default, or "SGD" with momentum, its ``--sgd``) over
    :func:`get_detr_param_groups`, with one weight decay for every parameter (as the reference) and the gradient
    clipping of ``SOLVER.CLIP_GRADIENTS``: ``CLIP_TYPE`` "full_model" (the reference's) or detectron2's
    "value"/"norm".
    """
    s = cfg.SOLVER
    if not (s.BASE_LR > 0 and math.isfinite(s.BASE_LR)):
        raise ValueError(f"SOLVER.BASE_LR must be a finite number > 0, got {s.BASE_LR}")
    groups = get_detr_param_groups(
        model,
        base_lr=s.BASE_LR,
        backbone_names=s.BACKBONE_NAMES,
        backbone_multiplier=s.BACKBONE_MULTIPLIER,
        linear_proj_names=s.LINEAR_PROJ_NAMES,
        linear_proj_multiplier=s.LINEAR_PROJ_MULTIPLIER,
    )
    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        # The fused kernel is the same update, ~7x faster than the per-tensor loop on the CPU. Not under AMP: a fused
        # optimizer unscales inside its step, so the clipping above it would see scaled gradients.
        optimizer_type = torch.optim.AdamW
        kwargs = {"weight_decay": s.WEIGHT_DECAY, "fused": not cfg.SOLVER.AMP.ENABLED}
    elif name == "SGD":
        optimizer_type = torch.optim.SGD
        kwargs = {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV, "weight_decay": s.WEIGHT_DECAY}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {s.OPTIMIZER!r}")

    clip = s.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_type = full_model_gradient_clipping(optimizer_type, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optimizer_type(groups, lr=s.BASE_LR, **kwargs)
    # detectron2's per-parameter clipping (raises on an unknown CLIP_TYPE).
    return maybe_add_gradient_clipping(cfg, optimizer_type)(groups, lr=s.BASE_LR, **kwargs)


def check_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], model: nn.Module) -> None:
    """Check that the saved ``state_dict`` of ``optimizer`` (from a checkpoint) fits its parameters, before
    ``optimizer.load_state_dict`` takes it.

    torch checks the number of parameters per group, not their shapes: after a config change that alters a
    parameter's shape, AdamW's fused step would consume moments of the old shape (NaN losses, then a segfault).

    Raises:
        ValueError: naming the parameter (its name in ``model``) and both shapes.
    """
    names = {p: n for n, p in model.named_parameters()}
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        for param, index in zip(group["params"], saved["params"]):
            for key, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"Cannot resume: the optimizer's {key} of parameter '{names.get(param, index)}' has shape "
                        f"{tuple(value.shape)} in the checkpoint but the parameter has {tuple(param.shape)}; a "
                        "resumed run must keep the config that shapes the model"
                    )
