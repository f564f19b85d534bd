"""Throughput of several configs in one run (projects/SparseDETR/benchmark.py)."""

import json
from pathlib import Path

import pytest
from benchmark import main, model_name, run

from sparse_detr import setup_cfg

ROOT = Path(__file__).resolve().parents[2]
# a tiny Sparse DETR (R18, hidden 64), random weights
SPARSE = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")


@pytest.fixture
def dense_config(tmp_path):
    path = tmp_path / "dense.yaml"
    path.write_text(
        f'_BASE_: "{SPARSE}"\n'
        "MODEL:\n  SPARSE_DETR:\n    RHO: 0.0\n    USE_ENC_AUX_LOSS: False\n"
        "    EFF_QUERY_INIT: False\n    EFF_SPECIFIC_HEAD: False\n"
    )
    return str(path)


def test_one_table_against_the_baseline(dense_config, tmp_path):
    argv = ["--configs", SPARSE, "--baseline", dense_config, "--batch-sizes", "1", "2", "--warmup", "1", "--iters", "2"]
    out = main([*argv, "--input-size", "64", "96", "--json", str(tmp_path / "out.json")])
    # the baseline is added to the rows when --configs lacks it
    assert [r["model"] for r in out.rows] == ["Deformable DETR + BBR + two-stage", "Sparse DETR (rho=0.3)"]
    for row in out.rows:
        assert set(row["seconds_per_batch"]) == {1, 2}
        assert all(t > 0 for t in row["seconds_per_batch"].values())
    assert json.loads((tmp_path / "out.json").read_text())["rows"][1]["model"] == "Sparse DETR (rho=0.3)"
    printed = out.header + "\n" + out.table()
    assert "random weights" in printed and "input 64x96" in printed and "fp32" in printed
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert "B1 s/img" in table[0] and "B2 speed-up" in table[0]
    assert len(table) == 2 + 2  # header, rule, two models
    assert "| 1.00x" in table[2]  # the baseline against itself


def test_model_names():
    names = {
        c: model_name(setup_cfg(str(ROOT / f"configs/r50/{c}.yaml")))
        for c in ("deformable_detr", "deformable_detr_bbr_two_stage", "efficient_detr", "sparse_detr_rho_0.1")
    }
    assert names == {
        "deformable_detr": "Deformable DETR",
        "deformable_detr_bbr_two_stage": "Deformable DETR + BBR + two-stage",
        "efficient_detr": "Efficient DETR",
        "sparse_detr_rho_0.1": "Sparse DETR (rho=0.1)",
    }
    cfg = setup_cfg(str(ROOT / "configs/r50/sparse_detr_rho_0.1.yaml"), ["MODEL.SPARSE_DETR.TEST_RHO", "0.3"])
    assert model_name(cfg) == "Sparse DETR (rho=0.3)"


def test_bad_arguments():
    with pytest.raises(ValueError, match="timed rounds >= 1"):
        run([SPARSE], SPARSE, iters=0, input_size=[64, 96])
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        run(["no_such.yaml"], SPARSE)
