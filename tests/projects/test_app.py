"""The web demo's functions, without a browser (projects/SparseDETR/app.py; the page in a real browser:
test_app_browser.py)."""

from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pytest
import torch
from app import (
    DRAW_MIN_SIDE,
    HUGE_SIDE,
    PANEL_SIDE,
    PhotoInput,
    RhoExplorer,
    _on_page,
    build,
    build_page,
    enlarged_for_drawing,
    photo_from_pil,
    write_examples,
)
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from gradio.data_classes import ImageData
from paper_variants import DENSE_OVERRIDES
from PIL import Image

from sparse_detr import setup_cfg
from sparse_detr.engine import build_inference_model
from sparse_detr.modeling.token_selection import num_selected_tokens
from sparse_detr.visualizer import kept_token_counts

ROOT = Path(__file__).resolve().parents[2]
# a tiny Sparse DETR (R18, hidden 64, rho 0.3, 4 levels, test size 64..96)
CONFIG = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")


def _random_weights(directory: Path, opts=()) -> str:
    """Random weights of the smoke config (with ``opts``) in a .pth file: the page needs MODEL.WEIGHTS."""
    path = directory / "weights.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model(setup_cfg(CONFIG, opts)).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return _random_weights(tmp_path_factory.mktemp("sparse"))


def _explorer(weights: str, opts=()) -> RhoExplorer:
    cfg = setup_cfg(CONFIG, ["MODEL.WEIGHTS", weights, *opts])
    return RhoExplorer(cfg, build_inference_model(cfg))


@pytest.fixture(scope="module")
def explorer(weights) -> RhoExplorer:
    return _explorer(weights)


def _shapes(h=80, w=120) -> Image.Image:
    image = np.full((h, w, 3), 90, dtype=np.uint8)
    cv2.rectangle(image, (10, 10), (50, 60), (30, 200, 40), -1)
    cv2.circle(image, (90, 40), 20, (220, 60, 60), -1)
    return Image.fromarray(image)


def _total_kept(analysis) -> int:
    return sum(k for k, _ in kept_token_counts(analysis.saliency))


# ------------------------------------------------------------------------------------------------ uploads
def test_rgb_photo_is_taken_as_it_is():
    image = _shapes()
    photo = photo_from_pil(image)
    np.testing.assert_array_equal(photo.rgb, np.asarray(image))
    assert photo.notes == []


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(80 * 120, dtype=np.uint32).reshape(80, 120) % 256
    photo = photo_from_pil(Image.fromarray(gray.astype(np.uint8), mode="L"))
    assert photo.rgb.shape == (80, 120, 3) and photo.rgb.dtype == np.uint8
    assert (photo.rgb == gray[..., None]).all()
    assert any("grayscale" in n for n in photo.notes)
    # 16-bit: stretched from its own range to 0..255
    deep = photo_from_pil(Image.fromarray(np.array([[1000, 3000]], dtype=np.uint16)))
    assert deep.rgb[0, :, 0].tolist() == [0, 255] and any("stretched" in n for n in deep.notes)


def test_transparency_is_laid_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 10)
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    photo = photo_from_pil(Image.fromarray(rgba, mode="RGBA"))
    assert photo.rgb.shape == (4, 4, 3)
    assert (photo.rgb[:2] == (200, 10, 10)).all() and (photo.rgb[2:] == 255).all()
    assert any("transparent" in n for n in photo.notes)


def test_other_modes_are_converted_and_said():
    photo = photo_from_pil(_shapes().convert("CMYK"))
    assert photo.rgb.shape == (80, 120, 3) and photo.notes == ["converted from mode CMYK to RGB"]


def test_a_file_that_is_no_image_is_a_message_naming_it(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    component = PhotoInput(type="pil", image_mode=None)
    with pytest.raises(gr.Error, match="notes.txt is not an image this page can read") as error:
        component.preprocess(ImageData(path=str(notes), orig_name="notes.txt"))
    assert str(tmp_path) not in error.value.message  # the user's name for the file, not the server's copy
    # the page draws it as Gradio's own image component
    assert component.get_block_name() == "image"


def test_huge_photo_is_resized_to_the_test_size(explorer):
    photo = explorer.prepare(_shapes(h=HUGE_SIDE + 200, w=HUGE_SIDE))
    # INPUT.MIN_SIZE_TEST 64: the shorter side (the width) becomes 64
    assert photo.rgb.shape[:2] == (round(64 * (HUGE_SIDE + 200) / HUGE_SIDE), 64)
    assert any("resized to the model's test size" in n and "INPUT.MIN_SIZE_TEST 64" in n for n in photo.notes)
    assert explorer.run(photo).model_input == photo.rgb.shape[:2]
    small = explorer.prepare(_shapes())
    assert small.rgb.shape == (80, 120, 3) and small.notes == []


# ---------------------------------------------------------------------------------------------- rho and panels
def test_rho_sets_the_kept_tokens(explorer):
    assert explorer.sparse and explorer.default_rho == pytest.approx(0.3)  # the config's RHO (no TEST_RHO)
    photo = explorer.prepare(_shapes())
    analyses = {rho: explorer.run(photo, rho) for rho in (0.1, 0.6, 1.0)}
    total = sum(n for _, n in kept_token_counts(analyses[1.0].saliency))
    for rho, analysis in analyses.items():
        assert analysis.rho == rho and analysis.seconds > 0
        assert _total_kept(analysis) == int(num_selected_tokens(torch.tensor([total]), rho))
    assert _total_kept(analyses[0.1]) < _total_kept(analyses[0.6]) < _total_kept(analyses[1.0]) == total
    assert explorer.run(photo).rho == pytest.approx(0.3)  # default: the model's own
    assert analyses[0.1].model_input == (64, 96)  # resized by the config's test resize
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\], got 0"):
        explorer.run(photo, 0.0)


def test_test_rho_is_the_slider_default(weights):
    assert _explorer(weights, ["MODEL.SPARSE_DETR.TEST_RHO", "0.5"]).default_rho == pytest.approx(0.5)


def test_panels_and_table(explorer):
    photo = explorer.prepare(_shapes())
    analysis = explorer.run(photo, 0.3)
    scores = analysis.instances.scores
    threshold = float(scores.median())
    panels = explorer.render(analysis, threshold)
    # 80 x 120 is drawn enlarged to DRAW_MIN_SIDE on its longer side; the boxes with it
    assert panels.detections.shape == (DRAW_MIN_SIDE * 80 // 120, DRAW_MIN_SIDE, 3)
    # one row of 4 levels, each PANEL_SIDE wide under a 22 px title
    panel_height = round(panels.detections.shape[0] * PANEL_SIDE / DRAW_MIN_SIDE)
    assert panels.kept.shape == panels.saliency.shape == (panel_height + 22, 4 * PANEL_SIDE, 3)
    kept, total = _total_kept(analysis), sum(n for _, n in kept_token_counts(analysis.saliency))
    detected = int((scores >= threshold).sum())
    assert 0 < detected < len(scores)
    share, ms = 100 * kept / total, 1000 * analysis.seconds
    assert f"| 0.30 | {kept} / {total} ({share:.1f} %) | {ms:.1f} ms on cpu | {detected} |" in panels.table
    assert "model input: 96 x 64 px, from the photo's 120 x 80 px" in panels.table
    # the threshold changes what is drawn
    assert not np.array_equal(panels.detections, explorer.render(analysis, 1.0).detections)


def test_small_photos_are_drawn_enlarged_with_their_boxes():
    instances = Instances((80, 120), pred_boxes=Boxes(torch.tensor([[12.0, 8.0, 60.0, 40.0]])))
    rgb, scaled = enlarged_for_drawing(np.asarray(_shapes()), instances)
    assert rgb.shape == (341, 512, 3) and scaled.image_size == (341, 512)  # the longer side to DRAW_MIN_SIDE
    sx, sy = 512 / 120, 341 / 80
    torch.testing.assert_close(scaled.pred_boxes.tensor, torch.tensor([[12.0 * sx, 8.0 * sy, 60.0 * sx, 40.0 * sy]]))
    large = np.zeros((600, 700, 3), np.uint8)
    assert enlarged_for_drawing(large, instances)[0] is large  # drawn as it is


def test_compare_rho(explorer):
    photo = explorer.prepare(_shapes())
    comparison = explorer.compare(photo, 0.0, rhos=(0.1, 0.5, 1.0), warmup=0, rounds=2)
    kept = [p.kept for p in comparison.points]
    assert [p.rho for p in comparison.points] == [0.1, 0.5, 1.0]
    assert kept[0] < kept[1] < kept[2] == comparison.points[2].tokens
    assert all(p.seconds > 0 and p.detections == 10 for p in comparison.points)  # NUM_DETECTIONS 10, threshold 0
    latency_axis, count_axis = comparison.figure.axes
    np.testing.assert_allclose(latency_axis.lines[0].get_ydata(), [1000 * p.seconds for p in comparison.points])
    assert list(count_axis.lines[0].get_ydata()) == [10, 10, 10]
    assert comparison.table.count("\n| ") == 3 and f"| 0.50 | {kept[1]} / {kept[2]} |" in comparison.table
    with pytest.raises(ValueError, match="got 1.5"):
        explorer.compare(photo, 0.0, rhos=(0.5, 1.5))


def test_dense_model_shows_detections_only(tmp_path):
    explorer = _explorer(_random_weights(tmp_path, DENSE_OVERRIDES), DENSE_OVERRIDES)
    assert not explorer.sparse and explorer.default_rho is None
    analysis = explorer.run(explorer.prepare(_shapes()), 0.5)  # rho is ignored
    assert analysis.rho is None and analysis.saliency is None
    panels = explorer.render(analysis, 0.0)
    assert panels.kept is None and panels.saliency is None
    assert "| dense | all (a dense model) |" in panels.table
    with pytest.raises(ValueError, match="dense model"):
        explorer.compare(analysis.photo, 0.0)
    # on the page the rho slider and the compare button are disabled, and the page says why
    page = build_page(explorer, [])
    components = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    assert components["rho"].interactive is False and components["compare"].interactive is False
    assert any(isinstance(b, gr.Markdown) and "This model is dense" in (b.value or "") for b in page.blocks.values())


# ------------------------------------------------------------------------------------------------ the page
def test_page_handlers_turn_errors_into_messages():
    @_on_page
    def fails(x):
        raise ValueError(f"bad {x}")

    with pytest.raises(gr.Error, match="ValueError: bad 3"):
        fails(3)


def test_examples_are_shapes_and_shipped_photos(tmp_path):
    paths = write_examples(str(tmp_path), num_shapes=2)
    assert len(paths) == 4
    shapes = [cv2.imread(p) for p in paths[:2]]
    assert all(s.shape == (128, 128, 3) for s in shapes) and not np.array_equal(*shapes)
    modes = [Image.open(p).mode for p in paths[2:]]
    assert modes == ["RGB", "RGBA"]  # a photo, and one with transparency


def test_start_needs_an_existing_weights_file(tmp_path, weights):
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=f"MODEL.WEIGHTS {missing}: no such file"):
        build(["--config-file", CONFIG, "MODEL.WEIGHTS", missing])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        build(["--config-file", CONFIG])
    with pytest.raises(ValueError, match="confidence-threshold"):
        build(["--config-file", CONFIG, "--confidence-threshold", "2", "MODEL.WEIGHTS", weights])
    page, args = build(["--config-file", CONFIG, "--port", "7999", "MODEL.WEIGHTS", weights])
    assert isinstance(page, gr.Blocks) and args.port == 7999
