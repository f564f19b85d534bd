"""The reference checkpoint conversion (sparse_detr.checkpoint.reference) on synthetic reference-named checkpoints
of tiny models.

The reference-named state dict is written here by hand from our own model (inverse renaming, 80 -> 91 class rows
with filler in the unused COCO ids, the reference's alias entries), so the conversion is checked against an
independent statement of the reference's layout. Its numerical agreement with the reference code itself is
described in projects/SparseDETR/CONVERTING.md.
"""

import re
from pathlib import Path

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

import sparse_detr.modeling  # noqa: F401  (registers the meta-architecture)
from sparse_detr.checkpoint import convert_reference_checkpoint, convert_state_dict, reference_cfg

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "MODEL.SPARSE_DETR.HIDDEN_DIM", "32",
    "MODEL.SPARSE_DETR.NHEADS", "2",
    "MODEL.SPARSE_DETR.ENC_LAYERS", "2",
    "MODEL.SPARSE_DETR.DEC_LAYERS", "2",
    "MODEL.SPARSE_DETR.DIM_FEEDFORWARD", "64",
    "MODEL.SPARSE_DETR.NUM_QUERIES", "10",
    # an R50 with every layer and name, 1/8 of the width
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
]  # fmt: skip
FILLER = 1000.0  # value of the reference's rows for COCO ids detectron2 doesn't use


def _coco_ids():
    id_map = MetadataCatalog.get("coco_2017_val").thing_dataset_id_to_contiguous_id
    return [i for i, _ in sorted(id_map.items(), key=lambda item: item[1])]


def _d2_to_torchvision(key: str) -> str:
    key = re.sub(r"^stem\.conv1\.norm\.", "bn1.", key)
    key = re.sub(r"^stem\.conv1\.", "conv1.", key)
    key = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)
    key = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", key)
    key = re.sub(r"\.shortcut\.norm\.", ".downsample.1.", key)
    return re.sub(r"\.shortcut\.", ".downsample.0.", key)


def _timm_to_official(key: str) -> str:
    return re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)


def _reference_state_dict(ours, cfg):
    """Our tiny model's weights as the reference implementation would have saved them (91 COCO-id class rows)."""
    S = cfg.MODEL.SPARSE_DETR
    swin = cfg.MODEL.BACKBONE.NAME == "build_swin_backbone"
    coco_ids = _coco_ids()
    ref = {}
    for key, value in ours.items():
        if key.startswith("backbone."):
            name = key[len("backbone.") :]
            ref["backbone.0.body." + (_timm_to_official(name) if swin else _d2_to_torchvision(name))] = value
        elif m := re.fullmatch(r"class_embed\.(\d+)\.(weight|bias)", key):
            rows = torch.full((91,) + value.shape[1:], FILLER)
            binary = S.TWO_STAGE and not S.EFF_SPECIFIC_HEAD and int(m.group(1)) == S.DEC_LAYERS
            rows[[0] + coco_ids[1:] if binary else coco_ids] = value
            ref[key] = rows
        else:
            ref[key] = value
    if swin:  # a persistent buffer in the reference's Swin
        ref["backbone.0.body.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    num_heads = len({k.split(".")[1] for k in ref if k.startswith("class_embed.")})
    for key in [k for k in ref if k.startswith(("class_embed.", "bbox_embed."))]:
        head, index, rest = key.split(".", 2)
        # both references alias the heads in two-stage mode; Deformable-DETR also aliases the box heads with BBR
        if S.TWO_STAGE or (S.WITH_BOX_REFINE and head == "bbox_embed"):
            ref[f"transformer.decoder.{head}.{index}.{rest}"] = ref[key]
        first_enc_aux = num_heads - (S.ENC_LAYERS - 1)
        if S.USE_ENC_AUX_LOSS and int(index) >= first_enc_aux:
            ref[f"transformer.encoder.{head}.{int(index) - first_enc_aux}.{rest}"] = ref[key]
    return ref


def _build(config, num_classes, opts=()):
    cfg = reference_cfg(str(ROOT / "configs" / config), num_classes, TINY + list(opts))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.copy_(torch.randn_like(p))
    return cfg, {k: v.clone() for k, v in model.state_dict().items()}


CASES = [
    ("r50/deformable_detr.yaml", []),  # one class head shared by every decoder layer
    ("r50/deformable_detr.yaml", ["MODEL.SPARSE_DETR.WITH_BOX_REFINE", "True"]),  # Deformable-DETR's box aliases
    ("r50/deformable_detr_bbr_two_stage.yaml", []),  # binary proposal head, decoder aliases
    ("r50/sparse_detr_rho_0.1.yaml", []),  # scoring network, encoder aux heads and their aliases
    ("swin_t/sparse_detr_rho_0.1.yaml", []),  # official Swin layout
]


@pytest.mark.parametrize("config, opts", CASES)
def test_converts_to_our_exact_weights(tmp_path, config, opts):
    cfg, ours = _build(config, 80, opts)
    src, dst = tmp_path / "reference.pth", tmp_path / "converted.pth"
    torch.save({"model": _reference_state_dict(ours, cfg), "epoch": 49}, src)
    lines = convert_reference_checkpoint(str(src), str(dst), str(ROOT / "configs" / config), 80, [*TINY, *opts])
    assert "fits" in lines[0]

    converted = torch.load(dst, weights_only=True)
    assert converted["num_classes"] == 80
    assert set(converted["model"]) == set(ours)
    for key, value in ours.items():
        assert torch.equal(converted["model"][key], value), key
    assert not any((v == FILLER).any() for k, v in converted["model"].items() if k.startswith("class_embed."))


def test_keeping_91_classes(tmp_path):
    config = "r50/deformable_detr_bbr_two_stage.yaml"
    cfg, ours91 = _build(config, 91)
    src, dst = tmp_path / "reference.pth", tmp_path / "converted.pth"
    # with 91 classes our names and shapes are the reference's once the backbone and the aliases are renamed
    ref = {}
    for key, value in ours91.items():
        if key.startswith("backbone."):
            key = "backbone.0.body." + _d2_to_torchvision(key[len("backbone.") :])
        ref[key] = value
        if key.startswith(("class_embed.", "bbox_embed.")):
            ref["transformer.decoder." + key] = value
    torch.save({"model": ref}, src)
    convert_reference_checkpoint(str(src), str(dst), str(ROOT / "configs" / config), 91, TINY)
    converted = torch.load(dst, weights_only=True)["model"]
    assert all(torch.equal(converted[k], v) for k, v in ours91.items())


def test_class_rows_follow_coco_ids():
    """Row c of a converted head is the reference's row coco_id(c); the binary proposal head keeps row 0."""
    cfg = reference_cfg(str(ROOT / "configs" / "r50/deformable_detr_bbr_two_stage.yaml"), 80, TINY)
    rows = torch.arange(91, dtype=torch.float32)[:, None].expand(91, 3)
    ref = {
        "backbone.0.body.conv1.weight": torch.zeros(1),
        "class_embed.0.weight": rows,
        "class_embed.2.weight": rows,  # cfg.DEC_LAYERS = 2: the proposal head
    }
    converted, _ = convert_state_dict(ref, cfg, 80)
    coco_ids = _coco_ids()
    assert converted["class_embed.0.weight"][:, 0].tolist() == coco_ids
    assert converted["class_embed.0.weight"][:3, 0].tolist() == [1, 2, 3]  # person, bicycle, car
    assert converted["class_embed.0.weight"][-1, 0].item() == 90  # toothbrush
    assert converted["class_embed.2.weight"][:, 0].tolist() == [0] + coco_ids[1:]


def test_errors_name_the_problem(tmp_path):
    config = "r50/sparse_detr_rho_0.1.yaml"
    cfg, ours = _build(config, 80)
    ref = _reference_state_dict(ours, cfg)

    broken = dict(ref)
    broken["transformer.encoder.class_embed.0.bias"] = broken["transformer.encoder.class_embed.0.bias"] + 1
    with pytest.raises(ValueError, match="alias transformer.encoder.class_embed.0.bias does not repeat class_embed"):
        convert_state_dict(broken, cfg, 80)

    # encoder aux aliases, but a config without the encoder aux heads
    no_aux = reference_cfg(str(ROOT / "configs" / config), 80, TINY + ["MODEL.SPARSE_DETR.USE_ENC_AUX_LOSS", "False"])
    with pytest.raises(ValueError, match=r"alias transformer\.(en|de)coder\.class_embed\.\d\..*USE_ENC_AUX_LOSS"):
        convert_state_dict(ref, no_aux, 80)

    # a checkpoint of another row: the model of this config misses its scoring network
    dense = {k: v for k, v in ref.items() if not k.startswith("transformer.enc_mask_predictor.")}
    src = tmp_path / "dense.pth"
    torch.save({"model": dense}, src)
    with pytest.raises(ValueError, match=r"missing \['transformer.enc_mask_predictor"):
        convert_reference_checkpoint(str(src), str(tmp_path / "out.pth"), str(ROOT / "configs" / config), 80, TINY)

    with pytest.raises(ValueError, match="not a checkpoint of the reference"):
        convert_state_dict({"class_embed.0.weight": torch.zeros(91, 2)}, cfg, 80)
    with pytest.raises(FileNotFoundError, match="reference checkpoint"):
        convert_reference_checkpoint(str(tmp_path / "none.pth"), str(src), str(ROOT / "configs" / config))


def test_shared_head_with_binary_proposals_needs_91_classes():
    two_stage = TINY + ["MODEL.SPARSE_DETR.TWO_STAGE", "True"]
    cfg = reference_cfg(str(ROOT / "configs" / "r50/deformable_detr.yaml"), 80, two_stage)
    ref = {"backbone.0.body.conv1.weight": torch.zeros(1), "class_embed.0.weight": torch.zeros(91, 2)}
    with pytest.raises(ValueError, match="--num-classes 91"):
        convert_state_dict(ref, cfg, 80)
