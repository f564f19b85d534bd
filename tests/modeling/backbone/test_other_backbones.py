"""SparseDETR on backbones other than the default ResNet: anything in BACKBONE_REGISTRY whose output_shape() has
the maps named in MODEL.SPARSE_DETR.IN_FEATURES works by config (tiny transformer, small odd-sized images)."""

import pytest
import torch
from detectron2.modeling import build_model

import sparse_detr.modeling  # noqa: F401  (registers the meta-architecture and the Swin backbone)


def _fpn(cfg):
    # detectron2's ResNet-18 FPN: four 32-channel maps p3..p6 (strides 8..64), so no extra stride-2 conv level
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.SPARSE_DETR.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    return {"p3": 8, "p4": 16, "p5": 32, "p6": 64}


def _swin(cfg):
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.0
    cfg.MODEL.SPARSE_DETR.IN_FEATURES = ["stage2", "stage3", "stage4"]
    return {"stage2": 8, "stage3": 16, "stage4": 32}


@pytest.mark.parametrize("setup", [_fpn, _swin], ids=["resnet18_fpn", "swin_t"])
def test_sparse_detr_trains_and_infers_on_other_backbones(tiny_cfg, tiny_inputs, setup):
    cfg = tiny_cfg(WITH_BOX_REFINE=True, TWO_STAGE=True, EFF_QUERY_INIT=True, EFF_SPECIFIC_HEAD=True, RHO=0.5,
                   USE_ENC_AUX_LOSS=True)  # fmt: skip
    strides = setup(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert {k: s.stride for k, s in model.backbone.output_shape().items()} == strides

    inputs = tiny_inputs(sizes=[(65, 97), (48, 70)], num_boxes=(2, 1))
    model.train()
    losses = model(inputs)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)

    model.eval()
    with torch.no_grad():
        outputs = model([{"image": x["image"], "height": 130, "width": 194} for x in inputs[:1]])
    instances = outputs[0]["instances"]
    assert instances.image_size == (130, 194)
    assert 0 < len(instances) <= cfg.MODEL.SPARSE_DETR.NUM_DETECTIONS  # empty boxes are dropped
    assert torch.isfinite(instances.pred_boxes.tensor).all()
