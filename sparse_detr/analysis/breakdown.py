"""Parameter and FLOP accounting of a `SparseDETR` model, by part (backbone, input projection, encoder, ...).

The groups follow the model's own layout; its heads are grouped by their roles (`SparseDETR.heads`).

The reference implementation runs, at inference too, heads whose outputs only its training losses use (the
encoder aux heads on the selected tokens, and the heads of the intermediate decoder layers); this model skips them
at inference. :func:`training_only_head_flops` counts them, so that both figures can be shown side by side.
"""

from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .flops import FlopCountAnalysis

__all__ = [
    "module_groups",
    "parameter_breakdown",
    "flop_breakdown",
    "training_only_head_flops",
    "num_kept_tokens",
    "random_input",
]

# fvcore's module names under detectron2's TracingAdapter, which holds the model as `.model`.
_TRACED_PREFIX = "model."


def module_groups(model: nn.Module) -> "OrderedDict[str, List[str]]":
    """Model parts -> names of the (non-nested) submodules that make them up.

    Parts: backbone, input projection, scoring network (Sparse DETR), encoder, two-stage
    proposals (encoder-output projection, shared with the scoring network's input, and the proposal head), decoder
    (with the query initialisation), prediction heads (of every decoder layer, including those the decoder uses to
    refine boxes), encoder aux heads (training only). Parts a variant lacks are left out.
    """
    heads = model.heads
    present = {name for name, _ in model.named_modules()}
    groups = OrderedDict(
        [
            ("backbone", ["backbone"]),
            ("input projection", ["input_proj"]),
            ("scoring network", ["transformer.enc_mask_predictor"]),
            ("encoder", ["transformer.encoder"]),
            (
                "two-stage proposals",
                ["transformer.enc_output", "transformer.enc_output_norm"] + heads.module_names("proposal"),
            ),
            (
                "decoder",
                [
                    "transformer.decoder",
                    "transformer.reference_points",
                    "transformer.pos_trans",
                    "transformer.pos_trans_norm",
                    "query_embed",
                ],
            ),
            ("prediction heads", heads.module_names("decoder")),
            ("encoder aux heads", heads.module_names("encoder_aux")),
        ]
    )
    # a head shared by decoder layers and proposals (two-stage without box refinement) counts as prediction head
    claimed = set(groups["prediction heads"])
    groups["two-stage proposals"] = [n for n in groups["two-stage proposals"] if n not in claimed]
    out = OrderedDict()
    for part, names in groups.items():
        names = [n for n in names if n in present]
        if names:
            out[part] = names
    return out


def _part_of(name: str, groups: Dict[str, List[str]]) -> Optional[str]:
    for part, prefixes in groups.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return part
    return None


def parameter_breakdown(model: nn.Module, trainable_only: bool = True) -> "OrderedDict[str, int]":
    """Parameters per part of :func:`module_groups` (plus "other" for any outside them, and "total").

    trainable_only: count only parameters with requires_grad (the paper's convention: the frozen ResNet stem and
    res2 are not counted).
    """
    groups = module_groups(model)
    counts = OrderedDict((part, 0) for part in list(groups) + ["other"])
    for name, p in model.named_parameters():  # shared parameters appear once
        if trainable_only and not p.requires_grad:
            continue
        counts[_part_of(name, groups) or "other"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def flop_breakdown(model: nn.Module, flops: FlopCountAnalysis) -> "OrderedDict[str, int]":
    """FLOPs per part of :func:`module_groups` from an analysis of `model` (plus "other": ops outside every part,
    e.g. in the meta-architecture's own forward; and "total")."""
    by_module = flops.by_module()
    counts = OrderedDict()
    for part, names in module_groups(model).items():
        counts[part] = sum(by_module.get(_TRACED_PREFIX + n, 0) for n in names)
    total = flops.total()
    counts["other"] = total - sum(counts.values())
    counts["total"] = total
    return counts


def _head_flops(head: nn.Module, num_tokens: int, dim: int) -> int:
    if num_tokens == 0:
        return 0
    x = torch.zeros(1, num_tokens, dim, device=next(head.parameters()).device)
    analysis = FlopCountAnalysis(head, (x,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


def training_only_head_flops(model: nn.Module, num_kept: int) -> "OrderedDict[str, int]":
    """FLOPs of the heads this model runs only in training, for one image.

    "encoder aux heads": the class and box heads on the `num_kept` selected tokens of every encoder layer but the
    last (Sparse DETR with USE_ENC_AUX_LOSS). "intermediate decoder heads": the class and box heads on the
    queries of every decoder layer but the last (aux losses). With box refinement the decoder computes the box
    deltas of those layers anyway, but the reference evaluates its heads again on every layer's output.

    Args:
        model: a `SparseDETR`.
        num_kept: tokens the encoder updates (0 for a dense encoder), see :func:`num_kept_tokens`.
    """
    dim = model.transformer.d_model
    heads = model.heads
    out = OrderedDict([("encoder aux heads", 0), ("intermediate decoder heads", 0)])
    for head in heads.encoder_aux:
        out["encoder aux heads"] += _head_flops(head.cls, num_kept, dim) + _head_flops(head.box, num_kept, dim)
    if model.aux_loss:
        for head in heads.decoder[:-1]:
            out["intermediate decoder heads"] += _head_flops(head.cls, model.num_queries, dim)
            out["intermediate decoder heads"] += _head_flops(head.box, model.num_queries, dim)
    return out


@torch.no_grad()
def num_kept_tokens(model: nn.Module, inputs: List[Dict[str, Any]]) -> int:
    """Encoder tokens the model updates (as queries) for one image; 0 for a dense encoder.

    Runs the model's `inference_with_saliency` on `inputs` (one detectron2 input dict in a list).
    """
    if len(inputs) != 1:
        raise ValueError(f"num_kept_tokens takes one image, got {len(inputs)}")
    if not model.transformer.has_scoring_network:
        return 0
    _, saliency = model.inference_with_saliency(inputs)
    return int(sum(k.sum() for k in saliency[0]["kept"]))


def random_input(height: int, width: int, seed: int = 0) -> Dict[str, Any]:
    """One detectron2 input: random pixels in [0, 255), [3, height, width] float32, with its output size."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(3, height, width, generator=g) * 255, "height": height, "width": width}
