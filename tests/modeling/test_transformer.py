import pytest
import torch
from torch import nn

from sparse_detr.layers.mlp import MLP
from sparse_detr.modeling.deformable_decoder import DeformableDecoder
from sparse_detr.modeling.deformable_encoder import DeformableEncoder
from sparse_detr.modeling.heads import DetectionHeads, HeadLayout
from sparse_detr.modeling.levels import valid_ratio
from sparse_detr.modeling.token_selection import ScoringNetwork
from sparse_detr.modeling.transformer import DeformableTransformer, encoder_output_proposals


def test_proposals_are_token_centred_boxes_of_the_valid_area():
    # one image, level 0: 2 x 4 with the last column padded; level 1: 1 x 2
    padding = torch.tensor([[False, False, False, True, False, False, False, True, False, False]])
    proposals, valid = encoder_output_proposals(padding, [(2, 4), (1, 2)])
    boxes = proposals.sigmoid()[0]
    assert torch.allclose(boxes[1], torch.tensor([1.5 / 3, 0.5 / 2, 0.05, 0.05]), atol=1e-6)
    assert torch.allclose(boxes[9], torch.tensor([1.5 / 2, 0.5, 0.1, 0.1]), atol=1e-6)
    # padded tokens: +inf (a sigmoid makes them (1, 1, 1, 1))
    assert torch.isinf(proposals[0, 3]).all() and torch.isinf(proposals[0, 7]).all()
    # (padded centres lie beyond the valid area, so their anchors are invalid as well)
    assert valid[0, :, 0].tolist() == [True, True, True, False, True, True, True, False, True, True]
    # anchors reaching 0.99 are invalid: level 5 boxes are 1.6 wide
    proposals, valid = encoder_output_proposals(torch.zeros(1, 6, dtype=torch.bool), [(1, 1)] * 6)
    assert valid[0, :, 0].tolist() == [True] * 5 + [False]
    assert torch.isinf(proposals[0, 5]).all()


def test_valid_ratio_is_w_then_h():
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[:, 3:] = True
    mask[:, :, 4:] = True
    assert torch.allclose(valid_ratio(mask), torch.tensor([[0.8, 0.75]]))


def _heads(num_decoder_layers, two_stage=False, d=32, classes=3):
    layout = HeadLayout(num_decoder_layers, two_stage)
    n = len(layout)
    return DetectionHeads(
        nn.ModuleList(nn.Linear(d, classes) for _ in range(n)), nn.ModuleList(MLP(d, d, 4, 3) for _ in range(n)), layout
    )


def _tiny_transformer(
    d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=2, scoring=None, **overrides
) -> DeformableTransformer:
    """32 channels, 2 heads, 2 + 2 layers, 2 levels of 2 points, the parts injected; a scoring network where rho > 0
    (or as `scoring` says); `overrides` are the transformer's other arguments."""
    layer = dict(d_model=d_model, d_ffn=64, dropout=0.0, n_levels=2, n_heads=nhead, n_points=2)
    with_scoring = overrides.get("rho", 0.0) > 0 if scoring is None else scoring
    return DeformableTransformer(
        encoder=DeformableEncoder(num_encoder_layers, **layer),
        decoder=DeformableDecoder(num_decoder_layers, **layer),
        scoring_network=ScoringNetwork(d_model, d_model) if with_scoring else None,
        **overrides,
    )


def _level_inputs(sizes, canvas=None, seed=0):
    """Random srcs of an image with per-level sizes, optionally zero-padded into a larger canvas."""
    from sparse_detr.layers.position_encoding import mask_sine_embedding

    g = torch.Generator().manual_seed(seed)
    srcs, masks, pos = [], [], []
    for lvl, (h, w) in enumerate(sizes):
        H, W = canvas[lvl] if canvas else (h, w)
        src = torch.zeros(1, 32, H, W)
        src[:, :, :h, :w] = torch.randn(1, 32, h, w, generator=g)
        mask = torch.ones(1, H, W, dtype=torch.bool)
        mask[:, :h, :w] = False
        srcs.append(src)
        masks.append(mask)
        pos.append(mask_sine_embedding(mask, 16))
    return srcs, masks, pos


def test_dense_transformer_ignores_padding():
    torch.manual_seed(0)
    t = _tiny_transformer(num_queries=5)
    query_embed = torch.randn(5, 64)
    heads = _heads(2)
    sizes = [(4, 6), (2, 3)]
    alone = t(*_level_inputs(sizes), query_embed, heads)
    padded = t(*_level_inputs(sizes, canvas=[(6, 8), (3, 4)]), query_embed, heads)
    assert alone.selection is None and alone.proposals is None and alone.encoder_aux == []
    assert torch.allclose(alone.decoder.hs, padded.decoder.hs, atol=1e-5)
    assert torch.allclose(alone.decoder.references[0], padded.decoder.references[0], atol=1e-6)


def test_two_stage_with_fewer_tokens_than_queries():
    torch.manual_seed(0)
    t = _tiny_transformer(num_encoder_layers=1, two_stage=True, num_queries=100, eff_query_init=True, rho=0.5)
    out = t(*_level_inputs([(4, 6), (2, 3)]), None, _heads(2, two_stage=True), refine_boxes=True)
    assert out.decoder.hs.shape == (2, 1, 30, 32)
    assert out.selection.indices.shape == (1, 16) and out.selection.num_kept.tolist() == [16]
    assert out.decoder.references[0].shape == (1, 30, 4)
    assert out.proposals.logits.shape == (1, 30, 3) and out.proposals.boxes.shape == (1, 30, 4)
    # test_rho applies in eval mode
    t.test_rho = 0.1
    out = t.eval()(*_level_inputs([(4, 6), (2, 3)]), None, _heads(2, two_stage=True))
    assert out.selection.num_kept.tolist() == [4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=32, nhead=3), "NHEADS"),
        (dict(num_encoder_layers=0), "ENC_LAYERS"),
        (dict(rho=0.3), "RHO > 0"),
        (dict(rho=1.2), "MODEL.SPARSE_DETR.RHO"),
        (dict(test_rho=0.3), "scoring network"),
        (dict(num_queries=0), "NUM_QUERIES"),
        (dict(eff_query_init=True), "EFF_QUERY_INIT"),
        (dict(two_stage=True, scoring=True), "scoring_network: a sparse encoder"),
        (dict(mixed_query_selection=True), "MIXED_QUERY_SELECTION"),
        (dict(two_stage=True, eff_query_init=True, mixed_query_selection=True), "choose one"),
    ],
)
def test_bad_arguments_name_the_config_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _tiny_transformer(**kwargs)


def test_built_from_a_config_or_from_arguments(tiny_cfg):
    cfg = tiny_cfg(TWO_STAGE=True, RHO=0.2, TEST_RHO=0.4, EFF_QUERY_INIT=True)
    torch.manual_seed(0)
    from_cfg = DeformableTransformer(cfg)
    torch.manual_seed(0)
    from_args = DeformableTransformer(**DeformableTransformer.from_config(cfg))
    assert (from_cfg.d_model, from_cfg.rho, from_cfg.inference_rho, from_cfg.eff_query_init) == (32, 0.2, 0.4, True)
    assert from_cfg.has_scoring_network and from_cfg.decoder.num_layers == 2
    for (name, a), (_, b) in zip(from_cfg.state_dict().items(), from_args.state_dict().items()):
        assert torch.equal(a, b), name


def _decoder_inputs(transformer):
    """A list that receives (tgt, query_pos, reference_points) of every decoder call."""
    calls = []
    transformer.decoder.register_forward_pre_hook(lambda module, args: calls.append(args[:3]))
    return calls


def test_mixed_query_selection_learned_content_proposal_positions():
    """DINO's mixed query selection: every image's queries get the learned content (the first k rows with fewer
    tokens than queries), their positions and references from its own top-k proposals."""
    torch.manual_seed(0)
    t = _tiny_transformer(two_stage=True, num_queries=8, mixed_query_selection=True)
    assert t.tgt_embed.weight.shape == (8, 32) and t.pos_trans.out_features == 32
    calls = _decoder_inputs(t)
    srcs, masks, pos = zip(*[_level_inputs([(4, 6), (2, 3)], seed=s) for s in (0, 1)])
    batch = [torch.cat(x) for x in zip(*srcs)], [torch.cat(x) for x in zip(*masks)], [torch.cat(x) for x in zip(*pos)]
    t(*batch, None, _heads(2, two_stage=True), refine_boxes=True)
    tgt, query_pos, references = calls[0]
    assert torch.equal(tgt[0], t.tgt_embed.weight) and torch.equal(tgt[1], t.tgt_embed.weight)
    torch.testing.assert_close(query_pos, t._box_embedding(references))
    assert not torch.equal(references[0], references[1])

    t = _tiny_transformer(two_stage=True, num_queries=100, mixed_query_selection=True)  # 30 tokens: 30 queries
    calls = _decoder_inputs(t)
    t(*_level_inputs([(4, 6), (2, 3)]), None, _heads(2, two_stage=True), refine_boxes=True)
    assert torch.equal(calls[0][0][0], t.tgt_embed.weight[:30])


def test_denoising_queries_are_decoded_in_front_and_returned_apart():
    """The denoising queries' content and references go to the decoder in front of the matching queries, their
    position is the position part of their box embedding; the output splits them off again."""
    from sparse_detr.modeling.denoising import DenoisingInput, build_denoising_queries
    from sparse_detr.modeling.structures import Target

    torch.manual_seed(0)
    t = _tiny_transformer(two_stage=True, num_queries=100)  # 30 tokens: 30 matching queries
    target = Target(torch.tensor([1, 2]), torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1]]))
    dq = build_denoising_queries([target], 3, 4, 0.5, 1.0, 100, torch.Generator().manual_seed(0))
    content = torch.randn(1, dq.num_queries, 32)
    dn = DenoisingInput(content, dq.unactivated_boxes().sigmoid(), dq.attn_mask)
    calls = _decoder_inputs(t)
    out = t(*_level_inputs([(4, 6), (2, 3)]), None, _heads(2, two_stage=True), refine_boxes=True, denoising=dn)
    tgt, query_pos, references = calls[0]
    assert tgt.shape == (1, 8 + 30, 32) and torch.equal(tgt[:, :8], content)
    assert torch.equal(references[:, :8], dn.references)
    torch.testing.assert_close(query_pos[:, :8], t._box_embedding(dn.references)[..., :32])
    assert out.denoising.hs.shape == (2, 1, 8, 32) and out.decoder.hs.shape == (2, 1, 30, 32)
    assert torch.equal(out.denoising.references[0], dn.references)

    with pytest.raises(ValueError, match="build it for num_queries"):
        small = build_denoising_queries([target], 3, 4, 0.5, 1.0, 10, torch.Generator().manual_seed(0))
        t(
            *_level_inputs([(4, 6), (2, 3)]),
            None,
            _heads(2, two_stage=True),
            denoising=dn._replace(self_attn_mask=small.attn_mask),
        )
    dense = _tiny_transformer(num_queries=5)
    with pytest.raises(ValueError, match="TWO_STAGE"):
        dense(*_level_inputs([(4, 6), (2, 3)]), torch.randn(5, 64), _heads(2), denoising=dn)
