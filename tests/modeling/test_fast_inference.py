"""prepare_for_inference (folded batch norms, channels_last backbone, the transformer's fast path) computes what the
plain path does, and leaves the model it was given alone."""

import pickle

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from paper_variants import PAPER_VARIANTS, RECIPE

from sparse_detr.engine import build_inference_model
from sparse_detr.modeling.fast_inference import InferenceBackbone, fold_batch_norms, prepare_for_inference

# the paper's rows, and the recipe beyond it (mixed query selection changes the inference path's queries)
VARIANTS = dict(PAPER_VARIANTS, recipe=RECIPE)
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


def _model(tiny_cfg, variant):
    cfg = tiny_cfg(**VARIANTS[variant])
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
    plain = _model(tiny_cfg, variant)
    fast = prepare_for_inference(plain)
    _assert_same_detections(_detections(fast, inputs), _detections(plain, inputs))
    assert isinstance(fast.backbone, InferenceBackbone) and fast.backbone.num_folded == 20  # every conv of a ResNet-18
    assert fast.fast_inference and not plain.fast_inference
    assert prepare_for_inference(fast) is fast  # prepared once


def test_the_given_model_is_left_as_it_was(tiny_cfg, tiny_inputs):
    model = _model(tiny_cfg, "sparse_detr_enc_aux").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = prepare_for_inference(model)
    _detections(fast, tiny_inputs())
    after = model.state_dict()
    assert model.training and list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, InferenceBackbone) for m in model.modules())
    assert isinstance(pickle.loads(pickle.dumps(fast)), type(model))

    # training the model computes what a model that was never prepared computes
    fresh = _model(tiny_cfg, "sparse_detr_enc_aux").train()
    with EventStorage():
        losses, expected = model(tiny_inputs()), fresh(tiny_inputs())
    assert all(torch.equal(losses[k], expected[k]) for k in expected)


def test_a_prepared_model_cannot_train(tiny_cfg):
    fast = prepare_for_inference(_model(tiny_cfg, "deformable_detr"), inplace=True)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(RuntimeError, match="cannot train: train the model that prepare_for_inference was given"):
        fast.train()


def test_the_inference_model_of_a_config(tiny_cfg, tiny_inputs, tmp_path):
    """build_inference_model: weights loaded, eval mode, prepared as MODEL.SPARSE_DETR.FAST_INFERENCE says."""
    model = _model(tiny_cfg, "deformable_detr_bbr_two_stage")
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    cfg = tiny_cfg(**VARIANTS["deformable_detr_bbr_two_stage"])
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    torch.manual_seed(1)  # other random weights than the file's
    fast = build_inference_model(cfg)
    assert isinstance(fast.backbone, InferenceBackbone) and not fast.training
    _assert_same_detections(_detections(fast, tiny_inputs()), _detections(model, tiny_inputs()))
    cfg.MODEL.SPARSE_DETR.FAST_INFERENCE = False
    assert not isinstance(build_inference_model(cfg).backbone, InferenceBackbone)
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        build_inference_model(cfg)
    assert not build_inference_model(cfg, allow_random_weights=True).training
