"""The convergence table of the switches beyond the paper (projects/SparseDETR/convergence.py)."""

import json
from pathlib import Path

import pytest
from convergence import VARIANTS, main, read_run, schedule

from sparse_detr import setup_cfg

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo" / "sparse_detr_shapes.yaml")
SMOKE = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")


def test_the_recipe_variant_is_the_demo_recipe_config():
    """The table's "recipe" row trains exactly configs/demo/sparse_detr_fg_dn_shapes.yaml."""
    switched = setup_cfg(DEMO, VARIANTS["recipe"][1])
    recipe = setup_cfg(str(ROOT / "configs" / "demo" / "sparse_detr_fg_dn_shapes.yaml"))
    assert recipe.OUTPUT_DIR != switched.OUTPUT_DIR
    switched.defrost()
    switched.OUTPUT_DIR = recipe.OUTPUT_DIR
    assert switched == recipe


def test_schedule_scales_the_lr_steps_and_evaluates_periodically():
    cfg = setup_cfg(DEMO)  # 1,500 iterations, lr step at 1,200
    assert schedule(cfg, 1500, 600) == [
        *("SOLVER.MAX_ITER", "1500", "SOLVER.STEPS", "(1200,)"),
        *("SOLVER.CHECKPOINT_PERIOD", "1500", "TEST.EVAL_PERIOD", "600"),
    ]
    assert schedule(cfg, 40, 20)[:4] == ["SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(32,)"]
    with pytest.raises(ValueError, match="eval_period <= max_iter"):
        schedule(cfg, 40, 50)


def test_a_run_is_read_from_its_metrics_once_it_reached_its_last_evaluation(tmp_path):
    """detectron2 logs a periodic evaluation at its 0-based iteration and the final one at max_iter; the step time
    is the median of the logged (smoothed) iteration times without the first window."""
    lines = [
        {"iteration": 19, "time": 9.0, "loss_ce": 1.0},
        {"iteration": 39, "time": 0.5},
        {"iteration": 39, "bbox/AP": 10.0, "bbox/AP50": 20.0},  # after 40 iterations
        {"iteration": 59, "time": 0.7},
        {"iteration": 79, "time": 0.6},
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines))
    assert read_run(tmp_path, 80) is None  # not finished
    lines.append({"iteration": 80, "bbox/AP": 30.0, "bbox/AP50": float("nan")})
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines))
    run = read_run(tmp_path, 80)
    assert run["evaluations"][40] == {"AP": 10.0, "AP50": 20.0} and run["evaluations"][80]["AP"] == 30.0
    assert run["seconds_per_iter"] == 0.6
    assert read_run(tmp_path / "missing", 80) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="--variants"):
        main(["--variants", "dino", "--skip-training"])
    with pytest.raises(ValueError, match="warm-up rounds"):
        main(["--skip-training", "--step-rounds", "1", "--step-warmup", "-1"])


@pytest.mark.slow
def test_the_whole_table_on_a_tiny_schedule(tmp_path, monkeypatch):
    """Two variants, one seed, 4 iterations of the smoke config: trained, evaluated twice, read back, timed; a
    second call reads the finished runs instead of training them again."""
    monkeypatch.setenv("SPARSE_DETR_DATASETS", str(tmp_path / "datasets"))
    argv = ["--config-file", SMOKE, "--variants", "dam", "recipe", "--seeds", "1", "--max-iter", "4"]
    argv += ["--eval-period", "2", "--output-dir", str(tmp_path / "runs"), "--step-rounds", "1", "--step-warmup", "0"]
    report = main([*argv, "--json", str(tmp_path / "table.json")])
    assert [r["variant"] for r in report.rows] == ["dam", "recipe"]
    for row in report.rows:
        assert set(row["runs"][1]["evaluations"]) == {2, 4}
        assert row["runs"][1]["seconds_per_iter"] > 0 and len(row["step_seconds"]) == 1
    assert report.rows[0]["step time / dam's"] == "1.000"
    assert "AP @2" in report.columns and "AP50 @4" in report.columns
    assert json.loads((tmp_path / "table.json").read_text())["rows"][1]["variant"] == "recipe"
    log = (tmp_path / "runs" / "recipe_seed1" / "stdout.log").read_text()
    assert "loss_ce_dn" in (tmp_path / "runs" / "recipe_seed1" / "metrics.json").read_text() and "copypaste" in log

    mtime = (tmp_path / "runs" / "dam_seed1" / "metrics.json").stat().st_mtime
    again = main([*argv, "--step-rounds", "0"])
    assert (tmp_path / "runs" / "dam_seed1" / "metrics.json").stat().st_mtime == mtime
    assert again.rows[1]["AP @4"] == report.rows[1]["AP @4"]
