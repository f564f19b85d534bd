"""Pictures of detections, saliency and kept tokens (projects/SparseDETR/demo.py)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from demo import Demo, expand_inputs, main, run_images, run_video
from paper_variants import DENSE_OVERRIDES

from sparse_detr import setup_cfg
from sparse_detr.engine import build_inference_model

ROOT = Path(__file__).resolve().parents[2]
# a tiny Sparse DETR (R18, hidden 64, rho 0.3, 4 levels, test size 64..96), random weights
CONFIG = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")
DENSE = DENSE_OVERRIDES
H, W = 80, 120  # resized to 64x96 by the test transform; the picture stays at the input size


def _demo(opts=(), threshold=0.0) -> Demo:
    """The demo of the config's model with random weights (the tool itself asks for MODEL.WEIGHTS)."""
    cfg = setup_cfg(CONFIG, opts)
    return Demo(cfg, threshold, model=build_inference_model(cfg, allow_random_weights=True))


def _image(seed=0):
    rng = np.random.default_rng(seed)
    image = np.full((H, W, 3), 90, dtype=np.uint8)
    cv2.rectangle(image, (10, 10), (50, 60), (30, 200, 40), -1)
    cv2.circle(image, (90, 40), 20, (220, 60, 60), -1)
    return np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)


def _write_images(tmp_path, n):
    paths = []
    for i in range(n):
        path = tmp_path / "in" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), _image(i))
        paths.append(path)
    return paths


def test_sparse_model_picture_has_detections_and_per_level_panels(tmp_path):
    (src,) = _write_images(tmp_path, 1)
    out = tmp_path / "out.png"
    written = run_images(_demo(), [str(src)], str(out))
    assert written == [str(out)]
    figure = cv2.imread(str(out))
    assert figure is not None
    # 2 rows (detections + saliency, input + kept tokens) x (1 + 4 levels), a 22 px title above each panel
    assert figure.shape == (2 * (H + 22), 5 * W, 3)
    panels = [figure[r * (H + 22) + 22 : (r + 1) * (H + 22), c * W : (c + 1) * W] for r in range(2) for c in range(5)]
    source = cv2.imread(str(src))
    np.testing.assert_array_equal(panels[5], source)  # the input, untouched
    assert not np.array_equal(panels[0], source)  # boxes drawn
    for heat in panels[1:5]:
        assert heat.std() > 5 and np.abs(heat.astype(int) - source).mean() > 10  # coloured, not the input
    # rho = 0.3 keeps some tokens and dims the others: every kept-token panel has full-brightness and dimmed pixels
    dimmed = [np.mean(np.all(p == (source * 0.25).astype(np.uint8), axis=-1)) for p in panels[6:]]
    bright = [np.mean(np.all(p == source, axis=-1)) for p in panels[6:]]
    assert sum(bright) > 0 and sum(dimmed) > 0
    assert all(b + d > 0.99 for b, d in zip(bright, dimmed))


def test_dense_model_and_glob_inputs(tmp_path):
    _write_images(tmp_path, 2)
    demo = _demo(DENSE)
    written = run_images(demo, expand_inputs([str(tmp_path / "in" / "*.png")]), str(tmp_path / "out"))
    assert sorted(Path(p).name for p in written) == ["img0.png", "img1.png"]
    for path in written:
        assert cv2.imread(path).shape == (H, W, 3)  # detections only


def test_video(tmp_path):
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (W, H))
    for i in range(3):
        writer.write(_image(i))
    writer.release()
    out = run_video(_demo(threshold=0.5), video, str(tmp_path / "vis"))
    capture = cv2.VideoCapture(out)
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = capture.read()
    capture.release()
    assert frames == 3 and ok and frame.shape == (2 * (H + 22), 5 * W, 3)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        main(["--config-file", CONFIG, "--output", str(tmp_path)])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        main(["--config-file", CONFIG, "--input", str(tmp_path / "a.jpg"), "--output", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_inputs([str(tmp_path / "nothing_here*.jpg")])
    with pytest.raises(ValueError, match="confidence-threshold"):
        Demo(setup_cfg(CONFIG), confidence_threshold=2)
