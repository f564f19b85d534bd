"""train_net.py end to end: config errors, --eval-only, two CPU processes over gloo, resuming a killed run exactly,
and fine-tuning on a COCO-format dataset of one's own given by config keys."""

import json
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


def run_train_net(args, datasets_root, loss_log=None, **kwargs):
    """train_net.py on the smoke config; with ``loss_log``, every iteration's losses are appended to that file."""
    env = {**os.environ, "SPARSE_DETR_DATASETS": datasets_root, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", SMOKE] + args
    if loss_log is not None:
        env["LOSS_LOG"] = str(loss_log)
        cmd.insert(1, os.path.join(REPO, "tests", "run_with_loss_log.py"))
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


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

        train_net, args = parse_args(
            "--config-file", SMOKE, "--eval-only", "DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path)
        )
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


@pytest.mark.slow
def test_two_cpu_processes_train_checkpoint_and_evaluate(datasets_root, tmp_path):
    out = finish(
        run_train_net(
            [
                "--num-gpus",
                "2",
                "--dist-url",
                "auto",
                "OUTPUT_DIR",
                str(tmp_path),
                "SOLVER.MAX_ITER",
                "2",
                "SOLVER.STEPS",
                "()",
                "SOLVER.CHECKPOINT_PERIOD",
                "1",
            ],
            datasets_root,
        )
    )
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
        "data": ckpt["trainer"]["data"],
    }


def logged_losses(path):
    """[(iteration, {loss: value})] in the order logged."""
    with open(path) as f:
        return [(r.pop("iteration"), r) for r in map(json.loads, f)]


@pytest.mark.slow
@pytest.mark.parametrize("switches", ["paper", "recipe"])
def test_killed_runs_resume_exactly(switches, datasets_root, tmp_path):
    """SIGKILL after a checkpoint, then --resume: every iteration logs the losses of the uninterrupted run, bit for
    bit, whether the data is read in the main process or in a worker (the CPU, one thread: deterministic). The
    optimizer, the scheduler and the data position come back from the checkpoint. "recipe": the switches beyond the
    paper, whose denoising queries draw their noise at every step."""
    from convergence import VARIANTS

    max_iter = 12
    # lr drops x0.1 at iteration 4: a scheduler restarted from scratch would be back at 2e-4.
    common = [
        "SOLVER.BASE_LR",
        "2e-4",
        "SOLVER.STEPS",
        "(4,)",
        "TEST.EVAL_PERIOD",
        "0",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "SOLVER.MAX_ITER",
        str(max_iter),
    ]
    if switches == "recipe":
        common += VARIANTS["recipe"][1]
    runs = {"uninterrupted": 0, "killed_w0": 0, "killed_w1": 1}  # name: DATALOADER.NUM_WORKERS

    def start(name, *extra):
        args = list(extra) + common + ["OUTPUT_DIR", str(tmp_path / name), "DATALOADER.NUM_WORKERS", str(runs[name])]
        return run_train_net(args, datasets_root, loss_log=tmp_path / f"{name}.jsonl", start_new_session=True)

    procs = {name: start(name) for name in runs}  # all at once: each waits mostly on its own imports
    try:
        # Kill once iteration 4 is logged (the checkpoint after iteration 3 is written before): no chance to clean
        # up, as a crash; the worker goes with its process group.
        deadline = time.time() + 300
        to_kill = ["killed_w0", "killed_w1"]
        while to_kill:
            for name in to_kill:
                log = tmp_path / f"{name}.jsonl"
                text = log.read_text() if log.exists() else ""
                if '"iteration": 4,' in text[: text.rfind("\n") + 1]:  # complete lines only: one may be half-written
                    os.killpg(procs[name].pid, signal.SIGKILL)
                    procs[name].communicate()
                    to_kill.remove(name)
                    break
                assert procs[name].poll() is None, procs[name].stdout.read()[-3000:]
            assert time.time() < deadline, f"{to_kill}: iteration 4 not reached within 300 s"
            time.sleep(0.1)
        finish(procs.pop("uninterrupted"))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    reference = dict(logged_losses(tmp_path / "uninterrupted.jsonl"))
    assert sorted(reference) == list(range(max_iter))
    assert ("loss_ce_dn" in reference[0]) == (switches == "recipe")

    resumed = {}
    for name in ["killed_w0", "killed_w1"]:
        last = (tmp_path / name / "last_checkpoint").read_text()
        killed = train_state(tmp_path / name / last)
        done = killed["iteration"] + 1
        assert 4 <= done < max_iter and killed["adam_steps"] == killed["scheduler_epoch"] == done
        assert killed["lr"] == pytest.approx(2e-5) and killed["data"] == {"seed": 42, "batches": done}
        resumed[name] = (done, start(name, "--resume"))
    for name, (done, proc) in resumed.items():
        assert f"Starting training from iteration {done}" in finish(proc)
        assert train_state(tmp_path / name / "model_final.pth") == {
            "iteration": max_iter - 1,
            "adam_steps": max_iter,
            "scheduler_epoch": max_iter,
            "lr": pytest.approx(2e-5),
            "data": {"seed": 42, "batches": max_iter},
        }
        logged = logged_losses(tmp_path / f"{name}.jsonl")
        assert {i for i, _ in logged} == set(range(max_iter))  # killed before max_iter, resumed to the end
        for iteration, losses in logged:  # iterations the killed run logged after its checkpoint appear twice
            assert losses == reference[iteration], f"{name}, iteration {iteration}"


@pytest.mark.slow
def test_own_coco_data_fine_tuned_from_a_checkpoint_of_other_classes(datasets_root, tmp_path, own_coco_dataset):
    """README, "Train on your own data": a COCO json and images registered by config keys alone, fine-tuned from
    the weights of a 4-class model (standing in for a converted COCO checkpoint) at 3 classes, then evaluated."""
    from detectron2.modeling import build_model

    from sparse_detr import setup_cfg

    json_file, image_root = own_coco_dataset(tmp_path / "mine")
    torch.manual_seed(0)
    weights = str(tmp_path / "shapes.pth")
    torch.save({"model": build_model(setup_cfg(SMOKE)).state_dict()}, weights)
    out = finish(
        run_train_net(
            [
                "DATASETS.REGISTER_COCO_INSTANCES",
                f"[('mine_train', '{json_file}', '{image_root}'), ('mine_val', '{json_file}', '{image_root}')]",
                "DATASETS.TRAIN",
                "('mine_train',)",
                "DATASETS.TEST",
                "('mine_val',)",
                "MODEL.SPARSE_DETR.NUM_CLASSES",
                "3",
                "MODEL.WEIGHTS",
                weights,
                "SOLVER.MAX_ITER",
                "2",
                "SOLVER.STEPS",
                "()",
                "OUTPUT_DIR",
                str(tmp_path / "out"),
            ],
            datasets_root,
        )
    )
    assert (
        f"Fine-tuning: class heads class_embed.0, class_embed.1, class_embed.2 not loaded from {weights} "
        "(MODEL.WEIGHTS): they score 4 classes there and MODEL.SPARSE_DETR.NUM_CLASSES is 3"
    ) in out
    assert "not found in the checkpoint" not in out and "Skip loading parameter" not in out  # nothing else dropped
    assert "copypaste: AP,AP50,AP75" in out and "| red " in out and "| blue " in out  # COCO AP per own category
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
