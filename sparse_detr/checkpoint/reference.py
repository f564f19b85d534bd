"""Checkpoints of the reference implementation (kakaobrain/sparse-detr, fundamentalvision/Deformable-DETR) converted
into weights of this project's SparseDETR model, for ``train_net.py --eval-only MODEL.WEIGHTS <output>``; the command
line is projects/SparseDETR/convert_reference_checkpoint.py.

The config must be the row the checkpoint was trained as (same switches, backbone, sizes): the model is built from
it and every converted tensor must fill one of its parameters, with nothing missing, left over or mis-shaped.

What changes:
- the backbone: ``backbone.0.body.*`` holds torchvision ResNet names (renamed to detectron2's ``stem``/``res2..5``)
  or the official Swin layout (patch merging moved to timm's place);
- the heads' class rows: the reference scores 91 columns indexed by COCO category id (ids 0, 12, 26, ... unused);
  detectron2 numbers the 80 COCO classes contiguously. Row ``c`` of every class head becomes the reference's row
  ``coco_id(c)`` (detectron2's ``thing_dataset_id_to_contiguous_id``). The one exception is the two-stage proposal
  head without Efficient DETR's class-specific head: it is a binary head that scores proposals by column 0, so its
  row 0 stays row 0. ``--num-classes 91`` keeps the reference's columns (then set MODEL.SPARSE_DETR.NUM_CLASSES 91);
- aliases are dropped: the reference registers its heads a second time under ``transformer.decoder.*`` and
  ``transformer.encoder.*``; they are checked to be the very same tensors first.
"""

import re
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from ..config import setup_cfg
from ..modeling.backbone.swin import swin_state_dict_to_timm
from ..modeling.heads import HeadLayout
from ..weights_io import load_weights_file, state_dict_of
from .resnet import torchvision_resnet_to_detectron2

__all__ = [
    "REFERENCE_NUM_CLASSES",
    "check_against_model",
    "coco_contiguous_to_id",
    "convert_reference_checkpoint",
    "convert_state_dict",
    "reference_cfg",
]

REFERENCE_NUM_CLASSES = 91
_BACKBONE_PREFIX = "backbone.0.body."
_ALIAS = re.compile(r"^transformer\.(decoder|encoder)\.(class_embed|bbox_embed)\.(\d+)\.(.+)$")
_CLASS_HEAD = re.compile(r"^class_embed\.(\d+)\.(weight|bias)$")


def coco_contiguous_to_id() -> List[int]:
    """COCO category id of each of detectron2's 80 contiguous classes."""
    id_map = MetadataCatalog.get("coco_2017_val").thing_dataset_id_to_contiguous_id
    return [dataset_id for dataset_id, _ in sorted(id_map.items(), key=lambda item: item[1])]


def _drop_aliases(state_dict: Mapping[str, torch.Tensor], layout: HeadLayout) -> Tuple[Dict[str, torch.Tensor], int]:
    """Remove the reference's second registrations of its heads, after checking they equal the originals.

    ``transformer.decoder.{head}.{i}`` is head ``i`` (the reference hands its decoder the whole list, the proposal
    head included); ``transformer.encoder.{head}.{j}`` is encoder aux head ``j``.
    """
    aliases = {k: m for k in state_dict if (m := _ALIAS.match(k))}
    out = {k: v for k, v in state_dict.items() if k not in aliases}
    for key, m in aliases.items():
        part, head, index, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        role = range(len(layout)) if part == "decoder" else layout.encoder_aux
        if index >= len(role):
            raise ValueError(
                f"reference alias {key}: the config has {len(role)} such heads (MODEL.SPARSE_DETR.DEC_LAYERS, "
                "TWO_STAGE, ENC_LAYERS, USE_ENC_AUX_LOSS); is it the row the checkpoint was trained as?"
            )
        original = f"{head}.{role[index]}.{rest}"
        if original not in out or not torch.equal(out[original], state_dict[key]):
            raise ValueError(f"reference alias {key} does not repeat {original}: not a checkpoint of the reference")
    return out, len(aliases)


def _convert_backbone(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    body = {k[len(_BACKBONE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_BACKBONE_PREFIX)}
    if not body:
        raise ValueError(f"no {_BACKBONE_PREFIX}* keys: not a checkpoint of the reference implementation")
    if "conv1.weight" in body:
        renamed, _ = torchvision_resnet_to_detectron2(body)
        kind = "ResNet (torchvision names -> detectron2)"
    elif "patch_embed.proj.weight" in body:
        renamed, layout = swin_state_dict_to_timm(body)
        kind = f"Swin ({layout} layout -> timm)"
    else:
        raise ValueError(f"unknown backbone in the checkpoint, first keys: {sorted(body)[:5]}")
    return {f"backbone.{k}": v for k, v in renamed.items()}, kind


def _class_rows(index: int, layout: HeadLayout, binary_proposals: bool, coco_ids: Sequence[int]) -> List[int]:
    """Reference rows that make our class head ``index`` (80 classes)."""
    if binary_proposals and index == layout.proposal:
        return [0] + list(coco_ids[1:])  # binary proposal head: only column 0 is used and trained positive
    return list(coco_ids)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: CfgNode, num_classes: int
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Reference state_dict -> this project's names and class rows (see the module docstring).

    Returns:
        ``(converted, notes)``: the tensors and human-readable lines on what was done.
    """
    if num_classes not in (80, REFERENCE_NUM_CLASSES):
        raise ValueError(f"num_classes must be 80 (detectron2's COCO) or 91 (the reference's), got {num_classes}")
    num_heads = len({m.group(1) for k in state_dict if (m := _CLASS_HEAD.match(k))})
    if num_heads == 0:
        raise ValueError("no class_embed.* keys: not a checkpoint of the reference implementation")
    layout = HeadLayout.from_config(cfg)
    state_dict, num_aliases = _drop_aliases(state_dict, layout)
    backbone, kind = _convert_backbone(state_dict)
    converted = dict(backbone)
    converted.update({k: v for k, v in state_dict.items() if not k.startswith("backbone.")})
    notes = [f"backbone: {kind}, {len(backbone)} tensors", f"{num_aliases} alias entries of shared heads dropped"]

    if num_classes == REFERENCE_NUM_CLASSES:
        notes.append("class heads: the reference's 91 COCO-id columns kept")
        return converted, notes
    binary_proposals = layout.two_stage and layout.binary_proposals
    if layout.shared and binary_proposals:
        raise ValueError(
            "this config shares one class head between the decoder (COCO classes) and the binary two-stage proposal "
            "scores (column 0); it cannot be remapped to 80 classes: convert with --num-classes 91"
        )
    coco_ids = coco_contiguous_to_id()
    for key in [k for k in converted if _CLASS_HEAD.match(k)]:
        value = converted[key]
        if value.shape[0] != REFERENCE_NUM_CLASSES:
            raise ValueError(f"{key} has {value.shape[0]} rows; the reference's COCO heads have 91")
        rows = _class_rows(int(_CLASS_HEAD.match(key).group(1)), layout, binary_proposals, coco_ids)
        converted[key] = value[rows].clone()
    notes.append(f"class heads: {num_heads} heads, rows of COCO ids {coco_ids[:3]}...{coco_ids[-1]} -> 0..79")
    if binary_proposals:
        notes.append(f"binary proposal head class_embed.{layout.proposal} keeps its column 0")
    return converted, notes


def check_against_model(converted: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every model tensor filled, nothing left over, shapes equal; else a ValueError naming the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    mis_shaped = [
        f"{k}: {tuple(converted[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(converted))
        if converted[k].shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            "the converted checkpoint does not fit the model of this config (is it the row it was trained as?): "
            f"missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), "
            f"shape mismatches {mis_shaped[:10]}"
        )


def reference_cfg(config_file: str, num_classes: int, opts: Sequence[str] = ()) -> CfgNode:
    """The config of the row a reference checkpoint was trained as, with ``num_classes`` classes, built on the CPU.

    The checkpoint holds every backbone weight, so the ImageNet Swin file is neither read nor required.
    """
    forced = ["MODEL.SPARSE_DETR.NUM_CLASSES", num_classes, "MODEL.DEVICE", "cpu", "MODEL.SWIN.WEIGHTS", ""]
    return setup_cfg(config_file, [*opts, *forced])


def convert_reference_checkpoint(
    input_path: str, output_path: str, config_file: str, num_classes: int = 80, opts: Sequence[str] = ()
) -> List[str]:
    """Convert the reference checkpoint at ``input_path`` into this model's weights at ``output_path`` (a ``.pth``
    for ``MODEL.WEIGHTS``), checked against the model of ``config_file`` with the overrides ``opts``.

    Returns:
        what was done, one line each: the first names the files, the others are :func:`convert_state_dict`'s notes.
    """
    state_dict = state_dict_of(load_weights_file(input_path, what="reference checkpoint"))
    cfg = reference_cfg(config_file, num_classes, opts)
    converted, notes = convert_state_dict(state_dict, cfg, num_classes)
    check_against_model(converted, build_model(cfg))
    author = "converted from the reference implementation"
    torch.save({"model": converted, "__author__": author, "num_classes": num_classes}, output_path)
    return [f"{input_path} -> {output_path} ({len(converted)} tensors, fits {config_file}):"] + notes
