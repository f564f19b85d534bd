import math
import re
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model

import sparse_detr.modeling  # noqa: F401  (registers the meta-architecture)
from sparse_detr import add_sparse_detr_config
from sparse_detr.modeling.backbone import TimmSwinBackbone, load_swin_state_dict
from sparse_detr.modeling.backbone import swin as swin_module

# The reference's Swin-T (official detection layout, out_indices [1, 2, 3], frozen_stages=2): all parameters and
# those with requires_grad, counted on kakaobrain/sparse-detr's models/swin_transformer.
SWIN_T_PARAMS = 27_520_506
SWIN_T_TRAINABLE = 27_216_420


@pytest.fixture(scope="module")
def swin_t() -> TimmSwinBackbone:
    torch.manual_seed(0)
    return TimmSwinBackbone(drop_path_rate=0.0).eval()


def _swin_cfg(**swin):
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    for key, value in swin.items():
        cfg.MODEL.SWIN[key] = value
    return cfg


def _to_official_layout(state_dict):
    """timm names -> the official Swin release's: patch merging closes stage i instead of opening stage i + 1."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key] = value
    return out


def test_built_from_config_registry():
    backbone = build_backbone(_swin_cfg(OUT_FEATURES=["stage3", "stage4"]), ShapeSpec(channels=3))
    assert isinstance(backbone, TimmSwinBackbone)
    assert {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()} == {
        "stage3": (384, 16),
        "stage4": (768, 32),
    }


def test_output_shape_channels_and_strides(swin_t):
    shapes = swin_t.output_shape()
    assert list(shapes) == ["stage2", "stage3", "stage4"]
    assert [(s.channels, s.stride) for s in shapes.values()] == [(192, 8), (384, 16), (768, 32)]
    # the batch is padded only to its largest image, as the reference; Swin pads internally
    assert swin_t.size_divisibility == 0


@pytest.mark.parametrize("size", [(65, 97), (32, 32), (13, 5), (64, 224)])
def test_any_input_size_gives_ceil_sized_maps(swin_t, size):
    h, w = size
    with torch.no_grad():
        out = swin_t(torch.randn(2, 3, h, w))
    for name, spec in swin_t.output_shape().items():
        assert out[name].shape == (2, spec.channels, math.ceil(h / spec.stride), math.ceil(w / spec.stride))
        assert torch.isfinite(out[name]).all()


def test_forward_equals_timm_block_forward_on_window_multiples(swin_t):
    # Where no window padding is needed, pad-then-shift (ours, the detection code's) and shift-then-pad (timm's)
    # coincide: an independent check of the window partition, shift and mask handling.
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = swin_t(x)
        y = swin_t.patch_embed(x)
        for i, stage in enumerate(swin_t.layers):
            y = stage(y)
            name = f"stage{i + 1}"
            if name in ours:
                expected = getattr(swin_t, f"norm{i}")(y).permute(0, 3, 1, 2)
                torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-5)


def test_padding_follows_the_detection_code_not_timm(swin_t, monkeypatch):
    # On sizes that need window padding timm's own block forward gives different features; ours must not use it.
    x = torch.randn(1, 3, 200, 304)
    with torch.no_grad():
        ours = swin_t(x)["stage2"]
        monkeypatch.setattr(swin_module, "_block_forward", lambda block, y: block(y))
        timm_like = swin_t(x)["stage2"]
    assert (ours - timm_like).abs().max() > 1e-3


def test_frozen_stages_as_the_reference(swin_t):
    frozen = {n for n, p in swin_t.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("patch_embed.", "layers.0.blocks.", "layers.1.downsample.")) for n in frozen)
    assert any(n.startswith("layers.1.downsample.") for n in frozen)  # the official layers[0] ends with it
    assert not any(n.startswith("layers.0.") for n, p in swin_t.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in swin_t.parameters()) == SWIN_T_PARAMS
    assert sum(p.numel() for p in swin_t.parameters() if p.requires_grad) == SWIN_T_TRAINABLE

    unfrozen = TimmSwinBackbone(frozen_stages=-1)
    assert all(p.requires_grad for p in unfrozen.parameters())
    embed_only = TimmSwinBackbone(frozen_stages=0)
    assert {n.split(".")[0] for n, p in embed_only.named_parameters() if not p.requires_grad} == {"patch_embed"}


def test_unused_last_stages_are_not_built():
    backbone = TimmSwinBackbone(out_features=["stage2"])
    assert len(backbone.layers) == 2
    assert list(backbone.output_shape()) == ["stage2"]
    assert not hasattr(backbone, "norm2")


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_weights_round_trip(swin_t, tmp_path, layout):
    state = {k: v.clone() for k, v in swin_t.state_dict().items()}
    if layout == "official":
        # As released: {"model": ...} with the classifier, its final norm and a non-persistent buffer; no out norms.
        state = _to_official_layout({k: v for k, v in state.items() if not k.startswith("norm")})
        state.update({"head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000)})
        state.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)})
        state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
        assert "layers.0.downsample.reduction.weight" in state
        payload = {"model": state}
    else:
        payload = state
    path = tmp_path / f"swin_{layout}.pth"
    torch.save(payload, path)

    torch.manual_seed(1)  # MODEL.SWIN.WEIGHTS, read by the builder and handed to the backbone as a state dict
    loaded = build_backbone(_swin_cfg(WEIGHTS=str(path), DROP_PATH_RATE=0.0)).eval()
    reference = swin_t.state_dict()
    for key, value in loaded.state_dict().items():
        if layout == "official" and key.startswith("norm"):
            continue  # not in the file: keeps its init
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
    if layout == "timm":
        x = torch.randn(1, 3, 65, 97)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x)["stage4"], swin_t(x)["stage4"], rtol=0, atol=0)
    assert sum(p.requires_grad for p in loaded.parameters()) == sum(p.requires_grad for p in swin_t.parameters())


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MODEL.SWIN.WEIGHTS.*nope.pth"):
        build_backbone(_swin_cfg(WEIGHTS=str(tmp_path / "nope.pth")))


def test_mismatched_weights_are_a_clear_error(swin_t):
    state = dict(swin_t.state_dict())
    del state["layers.2.blocks.0.mlp.fc1.weight"]
    state["layers.2.blocks.0.mlp.fc3.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['layers.2.blocks.0.mlp.fc1.weight'\].*fc3"):
        load_swin_state_dict(swin_t, state)
    state = dict(swin_t.state_dict())
    state["patch_embed.proj.weight"] = torch.zeros(96, 3, 2, 2)
    with pytest.raises(ValueError, match="shape mismatches.*patch_embed.proj.weight"):
        load_swin_state_dict(swin_t, state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet50"}, "timm Swin Transformer"),
        ({"out_features": ["res5"]}, "not stages"),
        ({"out_features": []}, "non-empty"),
        ({"frozen_stages": 7}, "frozen_stages"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimmSwinBackbone(**kwargs)


def test_rejects_non_image_input(swin_t):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        swin_t(torch.randn(3, 32, 32))


# Trainable parameters of the reference's Swin-T models with 91 classes (the table; efficient_detr counted
# on kakaobrain/sparse-detr with --backbone swin-t). Full size, no forward pass.
@pytest.mark.parametrize(
    "config, trainable",
    [
        ("deformable_detr.yaml", 40_308_613),
        ("deformable_detr_bbr_two_stage.yaml", 41_420_477),
        ("efficient_detr.yaml", 41_288_637),
        ("sparse_detr_rho_0.1.yaml", 42_176_153),
    ],
)
def test_swin_t_model_parameter_counts_equal_the_reference(config, trainable):
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(str(Path(__file__).resolve().parents[3] / "configs" / "swin_t" / config))
    cfg.MODEL.SPARSE_DETR.NUM_CLASSES = 91
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
