"""projects/SparseDETR/export_model.py: files written, verified, bad input named, and a clear message where the
ONNX packages are missing."""

import subprocess
import sys
from pathlib import Path

import pytest
from export_cases import VARIANTS
from export_model import main

ROOT = Path(__file__).resolve().parents[2]
# a tiny Sparse DETR (R18, hidden 64, 2 encoder / 1 decoder layers), random weights
SMOKE = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")


@pytest.mark.slow
def test_onnx_written_and_verified_with_onnxruntime(tiny_cfg, tmp_path, capsys):
    """Sparse DETR at TEST_RHO 0.1 (trained at 0.3) on the tiny config, exported and checked by the tool itself on
    two image sizes: the onnxruntime parity of this row (test_onnx_export.py checks the other one)."""
    pytest.importorskip("onnxruntime")
    config = tmp_path / "tiny_sparse.yaml"
    config.write_text(tiny_cfg(**VARIANTS["sparse"]).dump())
    out = main(
        [
            "--config-file",
            str(config),
            "--format",
            "onnx",
            "--no-optimize",
            "--output",
            str(tmp_path / "out"),
            "--verify",
        ]
    )
    assert out["path"] == str(tmp_path / "out" / "model.onnx") and Path(out["path"]).is_file()
    assert set(out["parity"]) == {"sample image", "second size"}
    assert all(p.within_tolerance for p in out["parity"].values()), out["parity"]
    printed = capsys.readouterr().out
    assert "wrote" in printed and printed.count("classes identical") == 2


@pytest.mark.parametrize(
    "argv, error, match",
    [
        (["--config-file", "no_such.yaml", "--output", "x"], FileNotFoundError, "--config-file: no such file"),
        (
            ["--config-file", SMOKE, "--output", "x", "--format", "torch_export", "--trt-plugin"],
            ValueError,
            "--trt-plugin applies to --format onnx",
        ),
        (
            ["--config-file", SMOKE, "--output", "x", "--trt-plugin", "--verify"],
            ValueError,
            "cannot run the TensorRT plugin",
        ),
        (
            [
                "--config-file",
                SMOKE,
                "--output",
                "x",
                "--format",
                "torch_export",
                "--sample-image",
                "no_such.jpg",
                "MODEL.DEVICE",
                "cpu",
            ],
            FileNotFoundError,
            "--sample-image: no such file",
        ),
    ],
)
def test_bad_arguments_are_named(argv, error, match):
    with pytest.raises(error, match=match):
        main(argv)


def test_without_the_onnx_packages(tmp_path):
    """A user without onnx/onnxscript/onnxruntime: the package, the model and torch.export work; the ONNX export
    says what to install, before building anything."""
    script = f"""
import sys
for name in ("onnx", "onnxscript", "onnxruntime"):
    sys.modules[name] = None  # import fails as if not installed
import sparse_detr, sparse_detr.export
sys.path.insert(0, {str(ROOT / "projects" / "SparseDETR")!r})
from export_model import main
try:
    main(["--config-file", {SMOKE!r}, "--output", {str(tmp_path)!r}, "MODEL.DEVICE", "cpu"])
except ImportError as e:
    print("MESSAGE:", e)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    message = result.stdout.split("MESSAGE:", 1)[1]
    assert "onnx and onnxscript" in message and "requirements/export.txt" in message
    assert not list(tmp_path.iterdir())
