"""The checkpointer: atomic writes, no checkpoint of non-finite weights, fine-tuning with another number of classes,
and no tensor of another shape skipped in silence."""

import logging
import os

import pytest
import torch
from detectron2.modeling import build_model

import sparse_detr.checkpoint.checkpointer as checkpointer_module
from sparse_detr.checkpoint import SparseDetrCheckpointer


def _build(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.fixture
def tiny_model(tiny_cfg):
    return _build(tiny_cfg())


def test_a_failed_save_leaves_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    checkpointer = SparseDetrCheckpointer(tiny_model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    complete = (tmp_path / "model_0000001.pth").read_bytes()

    def disk_full(obj, f):  # writes part of the file, then fails as a full disk or a kill would
        f.write(complete[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_0000003", iteration=3)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")

    # a save killed mid-write (no chance to clean up) leaves its hidden partial file; the next save removes it
    (tmp_path / ".model_0000005.pth.partial").write_bytes(complete[:1000])
    monkeypatch.undo()
    checkpointer.save("model_0000007", iteration=7)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_0000007.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000007.pth"
    assert torch.load(tmp_path / "model_0000007.pth", weights_only=False)["iteration"] == 7


def test_non_finite_weights_are_not_saved(tiny_model, tmp_path):
    checkpointer = SparseDetrCheckpointer(tiny_model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    with torch.no_grad():
        tiny_model.transformer.level_embed[0, 0] = float("nan")
        tiny_model.class_embed[0].bias[1] = float("inf")
    with pytest.raises(
        FloatingPointError,
        match=r"Not saving checkpoint model_0000002 after iteration 2: the "
        r"model's transformer.level_embed, class_embed.0.bias, .* hold NaN "
        r"or infinity .* last_checkpoint still names model_0000001.pth",
    ):
        checkpointer.save("model_0000002", iteration=2)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_fine_tuning_reinitializes_only_the_class_heads(tiny_cfg, tmp_path, caplog):
    """A checkpoint of a 5-class model loaded into a 3-class one: everything loads but the class heads, which are
    a new model's (prior-probability bias), with one log line that says so."""
    variant = dict(WITH_BOX_REFINE=True, TWO_STAGE=True)  # a head per decoder layer and the proposal head
    coco = _build(tiny_cfg(**variant))
    with torch.no_grad():
        for p in coco.parameters():
            p.add_(1.0)  # unlike any initialization
    weights = str(tmp_path / "coco.pth")
    torch.save({"model": coco.state_dict()}, weights)

    torch.manual_seed(1)
    fresh = build_model(tiny_cfg(NUM_CLASSES=3, **variant))
    new_heads = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("class_embed.")}
    caplog.set_level(logging.INFO)
    SparseDetrCheckpointer(fresh, fine_tune=True).resume_or_load(weights, resume=False)

    saved = coco.state_dict()
    for key, value in fresh.state_dict().items():
        if key.startswith("class_embed."):
            assert torch.equal(value, new_heads[key]), key
        else:
            assert torch.equal(value, saved[key]), key
    assert len(new_heads) == 2 * 3  # 2 decoder layers + proposals, weight and bias
    assert torch.equal(fresh.class_embed[2].bias, _build(tiny_cfg(NUM_CLASSES=3, **variant)).class_embed[2].bias)

    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "class_embed" in r.getMessage()]
    assert messages == [
        f"Fine-tuning: class heads class_embed.0, class_embed.1, class_embed.2 not loaded from {weights} "
        "(MODEL.WEIGHTS): they score 5 classes there and MODEL.SPARSE_DETR.NUM_CLASSES is 3; they start as a new "
        "model's (bias at the prior probability 0.01)"
    ]


def test_fine_tuning_reinitializes_the_denoising_label_embedding_too(tiny_cfg, tmp_path, caplog):
    """DINO's label embedding has one row per class: fine-tuned to another number of classes it starts anew as the
    class heads do (a resumed run or an evaluation of other shapes stays an error)."""
    from paper_variants import RECIPE

    weights = str(tmp_path / "coco.pth")
    torch.save({"model": _build(tiny_cfg(**RECIPE)).state_dict()}, weights)
    torch.manual_seed(1)
    fresh = build_model(tiny_cfg(NUM_CLASSES=3, **RECIPE))
    new_embedding = fresh.dn_label_embed.weight.detach().clone()
    caplog.set_level(logging.INFO)
    SparseDetrCheckpointer(fresh, fine_tune=True).resume_or_load(weights, resume=False)
    assert fresh.dn_label_embed.weight.shape == (3, 32) and torch.equal(fresh.dn_label_embed.weight, new_embedding)
    messages = [r.getMessage() for r in caplog.records if "Fine-tuning" in r.getMessage()]
    assert len(messages) == 1
    assert messages[0].startswith("Fine-tuning: class heads class_embed.0, class_embed.1, class_embed.2, ")
    assert " and dn_label_embed (one row per class) not loaded from " in messages[0]
    assert "they score 5 classes there and MODEL.SPARSE_DETR.NUM_CLASSES is 3" in messages[0]

    with pytest.raises(ValueError, match=r"dn_label_embed.weight: \(5, 32\) in the checkpoint, \(3, 32\) in the model"):
        SparseDetrCheckpointer(build_model(tiny_cfg(NUM_CLASSES=3, **RECIPE))).resume_or_load(weights, resume=False)


@pytest.mark.parametrize("fine_tune", [True, False])
def test_other_shapes_are_errors(tiny_cfg, tmp_path, fine_tune):
    weights = str(tmp_path / "w.pth")
    torch.save({"model": _build(tiny_cfg(DIM_FEEDFORWARD=48)).state_dict()}, weights)
    model = _build(tiny_cfg())
    with pytest.raises(
        ValueError,
        match=r"Cannot load .*w.pth \(MODEL.WEIGHTS\): tensors of other shapes than the "
        r"model's: transformer.encoder.layers.0.linear1.weight: \(48, 32\) in the "
        r"checkpoint, \(64, 32\) in the model",
    ):
        SparseDetrCheckpointer(model, fine_tune=fine_tune).resume_or_load(weights, resume=False)


def test_class_heads_of_another_size_are_errors_when_evaluating(tiny_cfg, tmp_path):
    weights = str(tmp_path / "w.pth")
    torch.save({"model": _build(tiny_cfg()).state_dict()}, weights)
    with pytest.raises(
        ValueError,
        match=r"class_embed.0.weight: \(5, 32\) in the checkpoint, \(3, 32\) in the "
        r"model.*trained with another config",
    ):
        SparseDetrCheckpointer(_build(tiny_cfg(NUM_CLASSES=3))).resume_or_load(weights, resume=False)
