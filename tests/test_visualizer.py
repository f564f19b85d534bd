import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from sparse_detr.visualizer import draw_token_selection, kept_token_counts, render_saliency_figure


def _image(h=40, w=60):
    rng = np.random.default_rng(0)
    return rng.integers(60, 200, size=(h, w, 3), dtype=np.uint8)


def _saliency():
    # two levels: 4x6 and 2x3 tokens; left half of level 0 kept, level 1 nothing kept
    scores = [torch.arange(24, dtype=torch.float32).view(4, 6), torch.full((2, 3), -5.0)]
    kept = [torch.zeros(4, 6, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)]
    kept[0][:, :3] = True
    return {"scores": scores, "kept": kept}


def _instances(h=40, w=60):
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.tensor([[5.0, 5.0, 30.0, 30.0], [10.0, 10.0, 50.0, 35.0]]))
    inst.scores = torch.tensor([0.9, 0.1])
    inst.pred_classes = torch.tensor([0, 1])
    return inst


def test_kept_tokens_stay_bright_dropped_are_dimmed():
    image = _image()
    heat, kept = draw_token_selection(image, _saliency())
    assert len(heat) == len(kept) == 2
    assert all(p.shape == image.shape and p.dtype == np.uint8 for p in heat + kept)
    # level 0: left half kept, right half dimmed to a quarter
    np.testing.assert_array_equal(kept[0][:, :30], image[:, :30])
    np.testing.assert_array_equal(kept[0][:, 30:], (image[:, 30:] * 0.25).astype(np.uint8))
    assert kept[1].max() < image.max()
    # joint normalisation: the highest score (level 0, bottom right) is red, level 1 (lowest) is blue
    assert heat[0][-1, -1, 0] > heat[0][-1, -1, 2]
    assert heat[1][0, 0, 2] > heat[1][0, 0, 0]


def test_kept_token_counts_per_level():
    # level 0: 12 of 24 kept, level 1: none of 6
    assert kept_token_counts(_saliency()) == [(12, 24), (0, 6)]
    with pytest.raises(ValueError, match="'kept'"):
        kept_token_counts({"scores": _saliency()["scores"]})


def test_figure_layout():
    fig = render_saliency_figure(_image(), _instances(), _saliency(), score_threshold=0.5, max_panel_side=30)
    # panels shrunk to 20x30, a 22 px title strip on each, 2 rows x (1 + 2 levels)
    assert fig.shape == (2 * (20 + 22), 3 * 30, 3)


def test_dense_model_draws_detections_only():
    image = _image()
    fig = render_saliency_figure(image, _instances(), None, score_threshold=0.5)
    assert fig.shape == image.shape
    assert not np.array_equal(fig, image)  # a box was drawn


def test_bad_inputs():
    with pytest.raises(ValueError, match="RGB uint8"):
        draw_token_selection(_image().astype(np.float32), _saliency())
    with pytest.raises(ValueError, match="kept"):
        draw_token_selection(_image(), {"scores": _saliency()["scores"]})
    bad = _saliency()
    bad["kept"] = bad["kept"][:1]
    with pytest.raises(ValueError, match="equal shapes"):
        draw_token_selection(_image(), bad)
