"""projects/SparseDETR/benchmark_deploy.py: one table of paths."""

from pathlib import Path

import pytest
import torch
from benchmark_deploy import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")


@pytest.mark.slow
def test_eager_paths_in_one_table(capsys):
    # the export paths take the time of an export each; eager and compile do not need one
    out = main(
        [
            "--config-file",
            SMOKE,
            "--paths",
            "eager-plain",
            "eager-fast",
            "--input-size",
            "64",
            "96",
            "--warmup",
            "0",
            "--iters",
            "2",
            "MODEL.DEVICE",
            "cpu",
        ]
    )
    assert [row["path"] for row in out.rows] == ["eager-plain", "eager-fast"]
    for row in out.rows:
        assert row["seconds"] > 0
        assert row["peak_bytes"] > 0  # measured in a process of its own (tests/test_measure.py: the measurement)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert "speed-up vs eager-plain" in table[0] and "peak MiB" in table[0]
    assert len(table) == 2 + 2 and "| 1.00x" in table[2]


@pytest.mark.parametrize(
    "argv, error, match",
    [
        (["--config-file", SMOKE, "--iters", "0", "MODEL.DEVICE", "cpu"], ValueError, "timed rounds >= 1"),
        (["--config-file", "no_such.yaml"], FileNotFoundError, "--config-file: no such file"),
    ],
)
def test_bad_arguments(argv, error, match):
    with pytest.raises(error, match=match):
        main(argv)


def test_cuda_device_is_refused_where_a_gpu_exists(monkeypatch):
    # without a GPU, MODEL.DEVICE cuda runs on the CPU (every tool's device policy); with one, this CPU benchmark
    # says so instead of timing the CPU under a CUDA config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="MODEL.DEVICE cpu"):
        main(["--config-file", SMOKE, "MODEL.DEVICE", "cuda"])
