import pytest
import torch
from detectron2.modeling import build_model

from sparse_detr.modeling.heads import DetectionHeads, HeadLayout


def test_layout_names_the_reference_order():
    layout = HeadLayout(num_decoder_layers=6, two_stage=True, num_encoder_aux=5)
    assert len(layout) == 12
    assert (
        list(layout.decoder) == list(range(6))
        and layout.proposal == 6
        and list(layout.encoder_aux) == [7, 8, 9, 10, 11]
    )
    assert [layout.role(i) for i in (0, 5, 6, 7, 11)] == [
        "decoder",
        "decoder",
        "proposal",
        "encoder_aux",
        "encoder_aux",
    ]
    with pytest.raises(IndexError, match="outside the 12 heads"):
        layout.role(12)
    dense = HeadLayout(num_decoder_layers=2, two_stage=False, num_encoder_aux=1)
    assert dense.proposal is None and list(dense.encoder_aux) == [2]


def test_views_pick_the_heads_of_each_role():
    torch.manual_seed(0)
    heads = DetectionHeads.build(16, 3, HeadLayout(2, True, 1, shared=False))
    assert [h.cls for h in heads.decoder] == [heads.class_embed[0], heads.class_embed[1]]
    assert heads.proposal.box is heads.bbox_embed[2]
    assert [h.cls for h in heads.encoder_aux] == [heads.class_embed[3]]
    assert heads.module_names("encoder_aux") == ["class_embed.3", "bbox_embed.3"]
    # a zero delta on a box reference predicts the reference itself
    reference = torch.tensor([[[0.3, 0.4, 0.2, 0.1]]])
    pred = heads.proposal.predict(torch.randn(1, 1, 16), reference)
    assert pred.logits.shape == (1, 1, 3) and torch.allclose(pred.boxes, reference, atol=1e-6)


def test_shared_heads_are_one_module_named_by_its_first_index():
    heads = DetectionHeads.build(16, 3, HeadLayout(3, True, shared=True))
    assert len({id(m) for m in heads.class_embed}) == 1
    assert heads.module_names("decoder") == ["class_embed.0", "bbox_embed.0"]
    assert heads.module_names("proposal") == ["class_embed.0", "bbox_embed.0"]
    with pytest.raises(ValueError, match="needs 5 class and box heads, got 4"):
        DetectionHeads(heads.class_embed, heads.bbox_embed, HeadLayout(3, True, 1))


def test_model_keeps_the_reference_state_dict_keys(tiny_cfg):
    model = build_model(tiny_cfg(WITH_BOX_REFINE=True, TWO_STAGE=True, RHO=0.3, USE_ENC_AUX_LOSS=True))
    keys = model.state_dict().keys()
    # 2 decoder layers, the proposal head, 1 encoder aux layer
    assert {k.split(".")[1] for k in keys if k.startswith("class_embed.")} == {"0", "1", "2", "3"}
    assert "bbox_embed.3.layers.2.bias" in keys and "transformer.enc_mask_predictor.layer1.0.weight" in keys
    assert not [k for k in keys if k.startswith("heads.")]
    assert model.heads.layout == model.head_layout and model.heads.proposal.cls is model.class_embed[2]


def test_the_layout_rules_of_a_variant():
    assert HeadLayout.of(6, True, 6, encoder_aux_loss=True) == HeadLayout(6, True, 5, shared=False)
    assert HeadLayout.of(6, True, 6, encoder_aux_loss=False, box_refine=True).shared is False
    assert HeadLayout.of(6, False, 6, encoder_aux_loss=False).shared is True
    assert HeadLayout.of(6, True, 6, False, class_specific_proposals=True).binary_proposals is False
    with pytest.raises(ValueError, match="EFF_SPECIFIC_HEAD.*needs two_stage"):
        HeadLayout.of(6, False, 6, False, class_specific_proposals=True)
