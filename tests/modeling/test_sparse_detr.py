"""The SparseDETR meta-architecture end to end on tiny configs (CPU)."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage
from paper_variants import BBR_TWO_STAGE, DAM_DN, EFFICIENT_DETR, FOREGROUND, RECIPE, SALIENCE, SPARSE_DETR
from torch import nn

from sparse_detr import add_sparse_detr_config
from sparse_detr.modeling import Prediction, SparseDETR

# the paper's variants and their parts, as MODEL.SPARSE_DETR switches
VARIANTS = {
    "deformable": {},
    "box_refine": dict(WITH_BOX_REFINE=True),
    "two_stage": dict(TWO_STAGE=True),
    "box_refine_two_stage": BBR_TWO_STAGE,
    "efficient": EFFICIENT_DETR,
    "sparse": SPARSE_DETR,
    "sparse_no_enc_aux": dict(SPARSE_DETR, USE_ENC_AUX_LOSS=False),
    "dense_enc_aux": dict(USE_ENC_AUX_LOSS=True),
    # beyond the paper
    "foreground": FOREGROUND,
    "salience": SALIENCE,
    "dam_dn": DAM_DN,
    "recipe": RECIPE,
    "two_stage_dn_mixed_lft": dict(
        BBR_TWO_STAGE, MIXED_QUERY_SELECTION=True, LOOK_FORWARD_TWICE=True, DN=dict(ENABLED=True)
    ),
}


def _build(cfg) -> SparseDETR:
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_and_infers(variant, tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg(**VARIANTS[variant]))
    inputs = tiny_inputs()
    with EventStorage() as storage:
        losses = model(inputs)
        logged = storage.latest()
    assert sorted(losses) == sorted(model.criterion.weight_dict)
    assert all(k.startswith("loss_") and torch.isfinite(v) for k, v in losses.items())
    assert {"class_error", "cardinality_error"} <= set(logged)
    if "RHO" in VARIANTS[variant]:
        assert "loss_mask_prediction" in losses
        if VARIANTS[variant].get("SCORE_TARGET", "dam") == "dam":
            assert {"corr_mask_attn_map_dec_all", "corr_mask_attn_map_dec_3"} <= set(logged)
        else:  # the DAM is not built
            assert "kept_score_target" in logged and not any(k.startswith("corr_mask") for k in logged)
    if "DN" in VARIANTS[variant]:
        assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"} <= set(losses)
    sum(losses.values()).backward()
    # every trainable parameter takes part (DDP runs without find_unused_parameters)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []

    model.eval()
    with torch.no_grad():
        results = model(inputs)
    assert len(results) == 2
    for result, x in zip(results, inputs):
        instances = result["instances"]
        assert instances.image_size == (x["height"], x["width"])
        assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        assert 0 < len(instances) <= 20
        assert ((instances.scores >= 0) & (instances.scores <= 1)).all()
        assert (instances.pred_classes < 5).all()


def test_overfits_one_batch(tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg(**VARIANTS["sparse"]))
    inputs = tiny_inputs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(30):
        loss = sum(model(inputs).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert all(math.isfinite(t) for t in totals)
    assert sum(totals[-5:]) / 5 < 0.6 * totals[0], totals


def test_images_without_annotations(tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg(**VARIANTS["sparse"]))
    for num_boxes in [(0, 2), (0, 0)]:
        losses = model(tiny_inputs(num_boxes=num_boxes))
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
    assert losses["loss_bbox"] == 0 and losses["loss_ce"] > 0


def test_pixel_std_with_a_zero_stops_at_the_first_step(tiny_cfg, tiny_inputs):
    cfg = tiny_cfg(**VARIANTS["sparse"])
    cfg.MODEL.PIXEL_STD = [58.395, 0.0, 57.375]
    model = _build(cfg)
    with EventStorage(start_iter=0):
        with pytest.raises(
            FloatingPointError,
            match=r"Non-finite predictions at iteration 0: logits \(loss_ce\), "
            r"boxes \(loss_bbox\), .*MODEL.PIXEL_STD with a zero",
        ):
            model(tiny_inputs())


def test_boxes_given_from_python_must_be_xyxy(tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg())
    inputs = tiny_inputs()
    boxes = inputs[1]["instances"].gt_boxes.tensor
    boxes[0] = torch.tensor([40.0, 10.0, 20.0, 30.0])  # x1 < x0: the loss would go negative
    with pytest.raises(
        ValueError,
        match=r"batched_inputs\[1\]\['instances'\].gt_boxes\[0\] is \[40.0, 10.0, 20.0, "
        r"30.0\]: boxes must be finite XYXY pixels with x1 >= x0 and y1 >= y0",
    ):
        model(inputs)
    boxes[0] = torch.tensor([10.0, float("nan"), 20.0, 30.0])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\] is \[10.0, nan, 20.0, 30.0\]"):
        model(inputs)


def _transformer_outputs(model, inputs):
    images = model.preprocess_image(inputs)
    with torch.no_grad():
        return images, model._run_transformer(images, model.backbone(images.tensor))


def test_padding_masks_and_per_image_token_counts(tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg(**VARIANTS["sparse"])).eval()
    inputs = tiny_inputs(sizes=[(64, 96), (40, 56), (96, 32)], num_boxes=(1, 1, 1))
    images, out = _transformer_outputs(model, inputs)
    mask = model.padding_mask(images)
    assert mask.shape == (3, 96, 96)
    for i, (h, w) in enumerate([(64, 96), (40, 56), (96, 32)]):
        assert not mask[i, :h, :w].any() and mask[i, h:].all() and mask[i, :, w:].all()
    padding = out.levels.padding_mask
    valid = (~padding).sum(1)
    # levels of the 96 x 96 batch: 12 x 12, 6 x 6, 3 x 3, 2 x 2; each level's mask is the pixel mask sampled at
    # (nearest) pixel 96 / size * i, so e.g. the 64-row image keeps rows 0, 48 of the 2 x 2 level
    assert valid.tolist() == [8 * 12 + 4 * 6 + 2 * 3 + 2 * 2, 5 * 7 + 3 * 4 + 2 * 2 + 1 * 2, 12 * 4 + 6 * 2 + 3 + 2]
    assert out.selection.num_kept.tolist() == [int(v * 0.3) + 1 for v in valid.tolist()]
    kept = out.selection.kept()
    assert not (padding.gather(1, out.selection.indices) & kept).any()


@pytest.mark.parametrize("variant", ["sparse", "recipe"])
def test_test_time_rho(variant, tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg(**dict(VARIANTS[variant], RHO=0.2, TEST_RHO=0.5)))
    inputs = tiny_inputs()
    images, out = _transformer_outputs(model.eval(), inputs)
    valid = (~out.levels.padding_mask).sum(1)
    assert out.selection.num_kept.tolist() == [int(v * 0.5) + 1 for v in valid.tolist()]
    model.transformer.test_rho = -1.0
    assert model.inference_rho == 0.2
    with torch.no_grad():
        _, saliency = model.inference_with_saliency(inputs)
    kept = [sum(int(k.sum()) for k in s["kept"]) for s in saliency]
    assert kept == [int(v * 0.2) + 1 for v in valid.tolist()]


def test_known_box_maps_back_to_the_original_image(tiny_cfg, tiny_inputs, monkeypatch):
    model = _build(tiny_cfg()).eval()
    inputs = tiny_inputs(sizes=[(64, 96)], num_boxes=(1,))
    inputs[0]["height"], inputs[0]["width"] = 128, 192  # the image was resized by 1/2 for the model
    logits = torch.full((1, 10, 5), -10.0)
    logits[0, 7, 3] = 4.0
    boxes = torch.full((1, 10, 4), 0.5)
    boxes[0, 7] = torch.tensor([0.5, 0.25, 0.25, 0.5])  # cxcywh in the 96 x 64 image: x 36..60, y 0..32
    monkeypatch.setattr(model, "_decoder_predictions", lambda out, layers: [Prediction(logits, boxes)])
    with torch.no_grad():
        instances = model(inputs)[0]["instances"]
    assert instances.image_size == (128, 192)
    assert instances.pred_classes[0] == 3
    assert torch.isclose(instances.scores[0], torch.sigmoid(torch.tensor(4.0)))
    assert torch.allclose(instances.pred_boxes.tensor[0], torch.tensor([72.0, 0.0, 120.0, 64.0]))
    assert len(instances) == 20


@pytest.mark.parametrize("variant", ["sparse", "foreground"])
def test_saliency_maps(variant, tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg(**VARIANTS[variant])).eval()
    inputs = tiny_inputs(sizes=[(64, 96), (40, 56)], num_boxes=(1, 1))
    results, saliency = model.inference_with_saliency(inputs)
    assert len(results) == len(saliency) == 2
    expected_shapes = [[(8, 12), (4, 6), (2, 3), (1, 2)], [(5, 7), (3, 4), (2, 2), (1, 2)]]
    _, out = _transformer_outputs(model, inputs)
    for s, shapes, n in zip(saliency, expected_shapes, out.selection.num_kept.tolist()):
        assert [tuple(t.shape) for t in s["scores"]] == shapes
        assert [tuple(t.shape) for t in s["kept"]] == shapes
        assert all(t.dtype == torch.bool for t in s["kept"])
        assert sum(int(t.sum()) for t in s["kept"]) == n
    # the kept tokens are the best-scoring ones of the image
    flat_scores = torch.cat([t.flatten() for t in saliency[0]["scores"]])
    flat_kept = torch.cat([t.flatten() for t in saliency[0]["kept"]])
    assert flat_scores[flat_kept].min() >= flat_scores[~flat_kept].max()

    with pytest.raises(ValueError, match="RHO > 0"):
        _build(tiny_cfg()).eval().inference_with_saliency(inputs)
    with pytest.raises(RuntimeError, match="eval"):
        model.train().inference_with_saliency(inputs)


def test_heads_and_their_initialization(tiny_cfg):
    shared = _build(tiny_cfg())
    assert len(shared.class_embed) == 2 and shared.class_embed[0] is shared.class_embed[1]
    assert torch.allclose(shared.class_embed[0].bias, torch.full((5,), -math.log(99)))
    assert shared.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert shared.bbox_embed[0].layers[-1].weight.abs().sum() == 0

    refine = _build(tiny_cfg(WITH_BOX_REFINE=True))
    assert refine.class_embed[0] is not refine.class_embed[1]
    assert refine.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert refine.bbox_embed[1].layers[-1].bias.tolist() == [0, 0, 0, 0]

    sparse = _build(tiny_cfg(**VARIANTS["sparse"]))
    # 2 decoder layers + the two-stage proposals + 1 encoder aux layer
    assert len(sparse.bbox_embed) == 4
    assert all(h.layers[-1].bias.abs().sum() == 0 for h in sparse.bbox_embed)
    assert len({id(h) for h in sparse.bbox_embed}) == 4


def test_encoder_aux_heads_only_run_in_training(tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg(**VARIANTS["sparse"]))
    calls = []
    model.class_embed[-1].register_forward_hook(lambda *args: calls.append(1))
    model.eval()
    with torch.no_grad():
        model(tiny_inputs())
    assert calls == []
    model.train()
    model(tiny_inputs())
    assert calls == [1]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(RHO=1.5), "MODEL.SPARSE_DETR.RHO"),
        (dict(RHO=-0.1), "MODEL.SPARSE_DETR.RHO"),
        (dict(SPARSE_DETR, TEST_RHO=1.2), "MODEL.SPARSE_DETR.TEST_RHO"),
        (dict(TEST_RHO=0.3), "MODEL.SPARSE_DETR.TEST_RHO"),
        (dict(RHO=0.1), "MODEL.SPARSE_DETR.TWO_STAGE"),
        (dict(EFF_QUERY_INIT=True), "MODEL.SPARSE_DETR.EFF_QUERY_INIT"),
        (dict(EFF_SPECIFIC_HEAD=True), "MODEL.SPARSE_DETR.EFF_SPECIFIC_HEAD"),
        (dict(IN_FEATURES=["res3", "res6"]), "MODEL.SPARSE_DETR.IN_FEATURES"),
        (dict(NUM_FEATURE_LEVELS=2), "MODEL.SPARSE_DETR.NUM_FEATURE_LEVELS"),
        (dict(HIDDEN_DIM=48, NHEADS=2), "MODEL.SPARSE_DETR.HIDDEN_DIM"),
        (dict(NHEADS=3), "MODEL.SPARSE_DETR.NHEADS"),
        (dict(NUM_CLASSES=0), "MODEL.SPARSE_DETR.NUM_CLASSES"),
        (dict(SET_COST_CLASS=0.0, SET_COST_BBOX=0.0, SET_COST_GIOU=0.0), "MODEL.SPARSE_DETR.SET_COST_CLASS"),
        (dict(DN=dict(ENABLED=True)), "MODEL.SPARSE_DETR.DN.ENABLED"),
        (dict(BBR_TWO_STAGE, DN=dict(ENABLED=True, NUMBER=0)), "MODEL.SPARSE_DETR.DN.NUMBER"),
        (dict(BBR_TWO_STAGE, DN=dict(ENABLED=True, LABEL_NOISE_RATIO=1.5)), "MODEL.SPARSE_DETR.DN.LABEL_NOISE_RATIO"),
        (dict(BBR_TWO_STAGE, DN=dict(ENABLED=True, BOX_NOISE_SCALE=-1.0)), "MODEL.SPARSE_DETR.DN.BOX_NOISE_SCALE"),
        (dict(LOOK_FORWARD_TWICE=True), "MODEL.SPARSE_DETR.LOOK_FORWARD_TWICE"),
        (dict(MIXED_QUERY_SELECTION=True), "MODEL.SPARSE_DETR.MIXED_QUERY_SELECTION"),
        (dict(SPARSE_DETR, MIXED_QUERY_SELECTION=True), "MODEL.SPARSE_DETR.MIXED_QUERY_SELECTION"),
        (dict(SCORE_TARGET="foreground"), "MODEL.SPARSE_DETR.SCORE_TARGET"),
        (dict(SPARSE_DETR, SCORE_TARGET="focus"), "MODEL.SPARSE_DETR.SCORE_TARGET"),
        (dict(FOREGROUND, SCORE_LEVEL_BOUNDS=[64.0, 128.0]), "MODEL.SPARSE_DETR.SCORE_LEVEL_BOUNDS"),
    ],
)
def test_bad_configs_name_the_key(overrides, key, tiny_cfg):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(tiny_cfg(**overrides))


def test_switches_beyond_the_paper_add_only_their_own_parameters(tiny_cfg):
    """The paper's models keep their state-dict keys; the recipe adds exactly its two new tables."""
    sparse = _build(tiny_cfg(**SPARSE_DETR)).state_dict()
    for variant in ("foreground", "salience"):
        assert list(_build(tiny_cfg(**VARIANTS[variant])).state_dict()) == list(sparse)
    recipe = _build(tiny_cfg(**RECIPE)).state_dict()
    assert set(recipe) - set(sparse) == {"transformer.tgt_embed.weight", "dn_label_embed.weight"}
    assert set(sparse) <= set(recipe)
    assert recipe["transformer.tgt_embed.weight"].shape == (10, 32) and recipe["dn_label_embed.weight"].shape == (5, 32)
    assert all(recipe[k].shape == v.shape for k, v in sparse.items())


def test_denoising_is_training_only_and_drawn_from_the_global_generator(tiny_cfg, tiny_inputs):
    """Inference of a model trained with denoising is the same model's without it (the fast path included); the
    noise of a training forward comes from torch's global generator alone (which the trainer seeds every step)."""
    from sparse_detr.modeling import prepare_for_inference

    dn = _build(tiny_cfg(**DAM_DN))
    plain = _build(tiny_cfg(**SPARSE_DETR))
    plain.load_state_dict({k: v for k, v in dn.state_dict().items() if k != "dn_label_embed.weight"})
    inputs = tiny_inputs()
    with torch.no_grad():
        for a, b in zip(dn.eval()(inputs), plain.eval()(inputs)):
            assert torch.equal(a["instances"].scores, b["instances"].scores)
            assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        for a, b in zip(prepare_for_inference(dn)(inputs), prepare_for_inference(plain)(inputs)):
            assert torch.equal(a["instances"].scores, b["instances"].scores)

    dn.train()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(dn(inputs))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["loss_bbox_dn"], runs[2]["loss_bbox_dn"])
    assert torch.equal(runs[0]["loss_bbox"], runs[2]["loss_bbox"])  # the matching queries never see the noise


def test_built_from_arguments_names_the_argument(tiny_cfg):
    kwargs = SparseDETR.from_config(tiny_cfg())
    kwargs["num_classes"] = 7
    with pytest.raises(ValueError, match=r"num_classes \(7\) and the criterion's num_classes \(5\)"):
        SparseDETR(**kwargs)
    kwargs = SparseDETR.from_config(tiny_cfg())
    kwargs["in_features"] = ["res3", "p9"]
    with pytest.raises(ValueError, match=r"in_features .* does not produce \['p9'\]"):
        SparseDETR(**kwargs)


def test_unknown_config_key_is_an_error(tiny_cfg):
    with pytest.raises(AssertionError, match="Non-existent key"):  # how YACS reports it
        tiny_cfg().merge_from_list(["MODEL.SPARSE_DETR.RHOO", "0.1"])


class _TinyBackbone(Backbone):
    """Two strided convs with non-ResNet feature names."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv2d(3, 16, 3, stride=8, padding=1)
        self.c4 = nn.Conv2d(16, 24, 3, stride=2, padding=1)

    def forward(self, x):
        c3 = self.c3(x)
        return {"c3": c3, "c4": self.c4(c3)}

    def output_shape(self):
        return {"c3": ShapeSpec(channels=16, stride=8), "c4": ShapeSpec(channels=24, stride=16)}


if "build_sparse_detr_test_backbone" not in BACKBONE_REGISTRY:

    @BACKBONE_REGISTRY.register()
    def build_sparse_detr_test_backbone(cfg, input_shape):
        return _TinyBackbone()


def test_any_backbone_with_the_named_features(tiny_cfg, tiny_inputs):
    cfg = tiny_cfg(**dict(VARIANTS["sparse"], IN_FEATURES=["c3", "c4"], NUM_FEATURE_LEVELS=3))
    cfg.MODEL.BACKBONE.NAME = "build_sparse_detr_test_backbone"
    model = _build(cfg)
    assert [p[0].in_channels for p in model.input_proj] == [16, 24, 24]
    assert sum(model(tiny_inputs()).values()).isfinite()


def test_inference_is_traceable(tiny_cfg, tiny_inputs):
    model = _build(tiny_cfg(**VARIANTS["sparse"])).eval()
    inputs = [{"image": x["image"]} for x in tiny_inputs(sizes=[(64, 96)], num_boxes=(1,))]
    flops = FlopCountAnalysis(model, inputs)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    assert flops.total() > 0
    # (detectron2's tracing adapter puts the model under "model")
    assert flops.by_module()["model.transformer.encoder"] > 0


@pytest.mark.parametrize(
    "config, enc_aux, expected",
    [
        ("deformable_detr", None, 39_847_265),
        ("deformable_detr_bbr_two_stage", None, 40_959_129),
        ("efficient_detr", None, 40_827_289),
        ("sparse_detr_rho_0.1", True, 41_714_805),
        ("sparse_detr_rho_0.1", False, 40_934_810),
    ],
)
def test_parameter_counts_equal_the_reference(config, enc_aux, expected):
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(f"configs/r50/{config}.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SPARSE_DETR.NUM_CLASSES = 91  # the reference's COCO head
    if enc_aux is not None:
        cfg.MODEL.SPARSE_DETR.USE_ENC_AUX_LOSS = enc_aux
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
