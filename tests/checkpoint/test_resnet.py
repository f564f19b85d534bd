"""torchvision and SCRL ResNets converted to detectron2 backbone weights (sparse_detr.checkpoint.resnet)."""

import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import sparse_detr.modeling  # noqa: F401  (registers the meta-architecture)
from sparse_detr import add_sparse_detr_config
from sparse_detr.checkpoint import convert_resnet_file, resnet_checkpoint_to_detectron2, write_detectron2_weights

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def torchvision_r50() -> nn.Module:
    """A torchvision R50 with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def scrl_model() -> nn.Module:
    """The SCRL row's model, full size (its MODEL.WEIGHTS is what the conversion writes)."""
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "scrl" / "sparse_detr_rho_0.1.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _scrl_checkpoint(state_dict):
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    online = {}
    for key, value in state_dict.items():
        module, rest = key.split(".", 1)
        if module in index:
            online[f"encoder.{index[module]}.{rest}"] = value
    online["projector.0.weight"] = torch.zeros(8, 2048)
    online["predictor.0.weight"] = torch.zeros(4, 8)
    return {"online_network_state_dict": online, "target_network_state_dict": {"encoder.0.weight": torch.zeros(1)}}


def _convert(tmp_path, checkpoint, name="r50"):
    """(the written .pkl, the summary line)"""
    src, dst = tmp_path / f"{name}.pth", tmp_path / f"{name}.pkl"
    torch.save(checkpoint, src)
    return dst, convert_resnet_file(str(src), str(dst))


@pytest.mark.parametrize("fmt", ["torchvision", "SCRL"])
def test_converted_weights_load_and_compute_as_torchvision(torchvision_r50, scrl_model, tmp_path, fmt):
    state = torchvision_r50.state_dict()
    checkpoint = state if fmt == "torchvision" else _scrl_checkpoint(state)
    path, summary = _convert(tmp_path, checkpoint)
    assert f"{fmt} ResNet-50: 265 tensors converted" in summary
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == fmt and data["matching_heuristics"] is True

    model = scrl_model  # each load replaces the whole backbone
    others_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    DetectionCheckpointer(model).load(str(path))
    # Every backbone tensor came from the file, matched by name suffix; nothing else was touched.
    loaded = model.backbone.state_dict()
    assert set(data["model"]) == set(loaded)
    for key, value in data["model"].items():
        torch.testing.assert_close(loaded[key], torch.as_tensor(value), rtol=0, atol=0, msg=key)
    for key, value in model.state_dict().items():
        if not key.startswith("backbone."):
            torch.testing.assert_close(value, others_before[key], rtol=0, atol=0, msg=key)

    # Same features as torchvision's network with frozen BatchNorm (what the reference runs).
    reference = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d).eval()
    reference.load_state_dict({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ours = model.backbone(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        y = reference.layer1(y)
        for name, layer in (("res3", reference.layer2), ("res4", reference.layer3), ("res5", reference.layer4)):
            y = layer(y)
            # Random weights let activations grow to ~1e3; compare to float32 rounding at that scale.
            torch.testing.assert_close(ours[name], y, rtol=0, atol=1e-5 * float(y.abs().max()))


def test_checkpoint_wrapped_under_state_dict(torchvision_r50):
    renamed, fmt, _ = resnet_checkpoint_to_detectron2({"state_dict": torchvision_r50.state_dict()})
    assert fmt == "torchvision"
    assert "res5.2.conv3.norm.running_var" in renamed and "res2.0.shortcut.norm.weight" in renamed
    assert not any(k.startswith("fc") or k.endswith("num_batches_tracked") for k in renamed)


def test_unknown_keys_are_errors(torchvision_r50):
    state = dict(torchvision_r50.state_dict())
    state["layer2.0.se.fc1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not torchvision ResNet names.*layer2.0.se.fc1.weight"):
        resnet_checkpoint_to_detectron2(state)
    scrl = _scrl_checkpoint(torchvision_r50.state_dict())
    scrl["online_network_state_dict"]["encoder.8.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.8"):
        resnet_checkpoint_to_detectron2(scrl)


def test_missing_keys_are_errors(torchvision_r50):
    state = dict(torchvision_r50.state_dict())
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match="res4.1.conv2.norm.running_var"):
        resnet_checkpoint_to_detectron2(state)
    state = {k: v for k, v in torchvision_r50.state_dict().items() if not k.startswith("layer3.5.")}
    with pytest.raises(ValueError, match=r"blocks per layer \(3, 4, 5, 3\)"):
        resnet_checkpoint_to_detectron2(state)


def test_output_must_be_pkl_and_input_must_exist(tmp_path):
    # the command line refuses a .pth output before reading anything: tests/projects/test_command_lines.py
    with pytest.raises(ValueError, match=r"\.pkl file, got .*b\.pth"):
        write_detectron2_weights({}, str(tmp_path / "b.pth"), author="torchvision")
    with pytest.raises(FileNotFoundError, match="input checkpoint.*missing.pth"):
        convert_resnet_file(str(tmp_path / "missing.pth"), str(tmp_path / "b.pkl"))
