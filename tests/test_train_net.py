"""train_net.py end to end: config errors, --eval-only, two CPU processes over gloo, and resuming a killed run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "demo", "sparse_detr_shapes_smoke.yaml")


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A private $SPARSE_DETR_DATASETS, so the mini splits are generated (once) outside the checkout."""
    return str(tmp_path_factory.mktemp("datasets"))


def run_train_net(args, datasets_root, **kwargs):
    env = {**os.environ, "SPARSE_DETR_DATASETS": datasets_root, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", SMOKE] + args
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-5000:]
    return out


def parse_args(*argv):
    sys.path.insert(0, REPO)
    try:
        import train_net
    finally:
        sys.path.remove(REPO)
    from detectron2.engine import default_argument_parser

    return train_net, default_argument_parser().parse_args(list(argv))


def test_unknown_config_key_is_an_error(tmp_path):
    train_net, args = parse_args("--config-file", SMOKE, "SOLVER.BASE_LRR", "0.1")
    with pytest.raises(KeyError, match="Non-existent config key: SOLVER.BASE_LRR"):
        train_net.setup(args)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{SMOKE}"\nMODEL:\n  SPARSE_DETR:\n    RHOO: 0.2\n')
    train_net, args = parse_args("--config-file", str(bad))
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.SPARSE_DETR.RHOO"):
        train_net.setup(args)


def test_eval_only_reports_coco_ap(datasets_root, tmp_path, monkeypatch):
    """--eval-only through COCOEvaluator on the synthetic val split (in-process: the same main() as the CLI)."""
    from detectron2.data import DatasetCatalog
    from sparse_detr.data.datasets import SyntheticShapesSpec, register_synthetic_shapes

    name = "test_train_net_val"
    register_synthetic_shapes(name, os.path.join(datasets_root, "eval_only"), SyntheticShapesSpec(num_images=4))
    try:
        from detectron2.modeling import build_model

        train_net, args = parse_args("--config-file", SMOKE, "--eval-only", "DATASETS.TEST", f"('{name}',)",
                                     "OUTPUT_DIR", str(tmp_path))
        cfg = train_net.setup(args)
        torch.manual_seed(0)
        weights = str(tmp_path / "weights.pth")
        torch.save({"model": build_model(cfg).state_dict()}, weights)
        args.opts += ["MODEL.WEIGHTS", weights]
        res = train_net.main(args)
    finally:
        DatasetCatalog.remove(name)
    assert set(res["bbox"]) >= {"AP", "AP50", "AP75", "AP-circle"}
    assert os.path.isfile(tmp_path / "inference" / "coco_instances_results.json")


def test_two_cpu_processes_train_checkpoint_and_evaluate(datasets_root, tmp_path):
    out = finish(run_train_net(["--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", str(tmp_path),
                                "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"], datasets_root))
    assert "Rank of current process: 0. World size: 2" in out
    assert os.path.isfile(tmp_path / "model_0000000.pth") and os.path.isfile(tmp_path / "model_final.pth")
    assert "copypaste: AP,AP50,AP75" in out  # COCO evaluation gathered over both processes
    ckpt = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])


def train_state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    optimizer = ckpt["trainer"]["_trainer"]["optimizer"]
    steps = {float(state["step"]) for state in optimizer["state"].values()}
    assert len(steps) == 1
    return {
        "iteration": ckpt["iteration"],
        "adam_steps": steps.pop(),
        "scheduler_epoch": ckpt["trainer"]["hooks"]["LRScheduler"]["last_epoch"],
        "lr": optimizer["param_groups"][0]["lr"],
    }


def test_killed_run_resumes_from_its_last_checkpoint(datasets_root, tmp_path):
    # lr drops x0.1 at iteration 4: a scheduler restarted from scratch would be back at 2e-4.
    common = ["OUTPUT_DIR", str(tmp_path), "SOLVER.BASE_LR", "2e-4", "SOLVER.STEPS", "(4,)", "TEST.EVAL_PERIOD", "0"]
    proc = run_train_net(common + ["SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "2"], datasets_root,
                         start_new_session=True)
    last = tmp_path / "last_checkpoint"
    deadline = time.time() + 240
    try:
        # Wait for the second checkpoint (after 4 iterations), then kill: no chance to clean up, as a crash.
        while not (last.exists() and last.read_text().strip() not in ("", "model_0000001.pth")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    killed = train_state(tmp_path / last.read_text().strip())
    done = killed["iteration"] + 1
    assert done >= 4 and killed["adam_steps"] == killed["scheduler_epoch"] == done
    assert killed["lr"] == pytest.approx(2e-5)

    out = finish(run_train_net(["--resume"] + common + ["SOLVER.MAX_ITER", str(done + 2)], datasets_root))
    assert f"Starting training from iteration {done}" in out
    final = train_state(tmp_path / "model_final.pth")
    # Two more iterations on top of the restored optimizer (AdamW step count) and scheduler state.
    assert final == {"iteration": done + 1, "adam_steps": done + 2, "scheduler_epoch": done + 2,
                     "lr": pytest.approx(2e-5)}
