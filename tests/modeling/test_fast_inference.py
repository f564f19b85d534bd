"""The fast inference path (folded batch norms, channels_last backbone, the transformer's fast path) computes what
the plain path does, and leaves the model's state and training alone."""

import pickle

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from paper_variants import PAPER_VARIANTS

from sparse_detr.modeling.fast_inference import InferenceBackbone, fold_batch_norms

VARIANTS = PAPER_VARIANTS
RTOL = 1e-5


def _randomize_frozen_bn(module, seed=0):
    """Frozen BN statistics away from the identity, so that folding them is not trivially exact."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _model(tiny_cfg, variant, fast=True):
    cfg = tiny_cfg(**VARIANTS[variant], FAST_INFERENCE=fast)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        _randomize_frozen_bn(model.backbone)
    return model


def _detections(model, inputs):
    with torch.no_grad():
        return [r["instances"] for r in model.eval()(inputs)]


def _assert_same_detections(actual, expected):
    for a, e in zip(actual, expected):
        assert torch.equal(a.pred_classes, e.pred_classes)
        torch.testing.assert_close(a.scores, e.scores, rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(a.pred_boxes.tensor, e.pred_boxes.tensor, rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_folding_keeps_the_convolution(norm):
    torch.manual_seed(0)
    bn = FrozenBatchNorm2d(16) if norm == "FrozenBN" else torch.nn.BatchNorm2d(16)
    conv = Conv2d(8, 16, 3, padding=1, bias=norm == "BN", norm=bn).eval()
    with torch.no_grad():
        if norm == "FrozenBN":
            _randomize_frozen_bn(conv)
        else:  # running statistics as training leaves them
            bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 1.5), bn.weight.normal_(), bn.bias.normal_()
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        expected = conv(x)
        assert fold_batch_norms(conv) == 1
        assert conv.norm is None and conv.bias is not None
        torch.testing.assert_close(conv(x), expected, rtol=RTOL, atol=1e-6)
        assert fold_batch_norms(conv) == 0  # nothing left to fold


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_path_equals_the_plain_path(variant, tiny_cfg, tiny_inputs):
    inputs = tiny_inputs()
    fast = _model(tiny_cfg, variant, fast=True)
    plain = _model(tiny_cfg, variant, fast=False)
    _assert_same_detections(_detections(fast, inputs), _detections(plain, inputs))
    backbone = fast.inference_backbone()
    assert isinstance(backbone, InferenceBackbone) and backbone.num_folded == 20  # every conv of a ResNet-18
    assert plain.inference_backbone() is plain.backbone


def test_state_dict_parameters_and_training_are_untouched(tiny_cfg, tiny_inputs):
    model = _model(tiny_cfg, "sparse_detr_enc_aux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    num_params = len(list(model.parameters()))
    _detections(model, tiny_inputs())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert len(list(model.parameters())) == num_params
    assert not any("inference_backbone" in name for name, _ in model.named_modules())
    assert isinstance(pickle.loads(pickle.dumps(model)), type(model))  # hooks and copy pickle along

    # training after inference computes what a model that never ran inference computes
    model.train()
    assert model._inference_backbone is None  # the copy is dropped
    fresh = _model(tiny_cfg, "sparse_detr_enc_aux").train()
    with EventStorage():
        losses, expected = model(tiny_inputs()), fresh(tiny_inputs())
    assert all(torch.equal(losses[k], expected[k]) for k in expected)


def test_the_copy_follows_new_weights(tiny_cfg, tiny_inputs):
    inputs = tiny_inputs()
    model = _model(tiny_cfg, "deformable_detr_bbr_two_stage")
    _detections(model, inputs)
    first = model.inference_backbone()
    assert model.inference_backbone() is first  # unchanged weights: the same copy

    # new backbone weights, as a checkpoint load writes them (in place)
    other = _model(tiny_cfg, "deformable_detr_bbr_two_stage")
    with torch.no_grad():
        _randomize_frozen_bn(other.backbone, seed=1)
        for p in other.backbone.parameters():
            p.mul_(1.1)
    model.load_state_dict(other.state_dict())
    assert model.inference_backbone() is not first
    other.fast_inference = False
    _assert_same_detections(_detections(model, inputs), _detections(other, inputs))


def test_built_and_loaded_under_inference_mode(tiny_cfg, tiny_inputs):
    """Inference tensors have no version counter: a checkpoint loaded into them still refreshes the copy."""
    inputs = tiny_inputs()
    with torch.inference_mode():
        model = _model(tiny_cfg, "deformable_detr")
        _detections(model, inputs)
        first = model.inference_backbone()
        assert model.inference_backbone() is first
        other = _model(tiny_cfg, "deformable_detr")
        _randomize_frozen_bn(other.backbone, seed=2)
        model.load_state_dict(other.state_dict())
        assert model.inference_backbone() is not first
        other.fast_inference = False
        _assert_same_detections(_detections(model, inputs), _detections(other, inputs))
