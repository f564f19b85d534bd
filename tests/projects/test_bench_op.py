"""The deformable attention benchmark (projects/SparseDETR/bench_op.py): its inputs at the paper's size and one
short run (times only: the memory measurement is the harness's, tests/test_measure.py)."""

import json

import pytest
import torch
from bench_op import CALLS, main, make_call

TOKENS = 107 * 130 + 54 * 65 + 27 * 33 + 14 * 17


@pytest.mark.parametrize("call, num_queries", [("encoder", TOKENS), ("sparse_encoder", TOKENS // 10), ("decoder", 300)])
def test_calls_at_the_paper_size(call, num_queries):
    value, shapes, starts, loc, weights, grad_out = make_call(call, "cpu", torch.float32)
    assert TOKENS == 18_549 and value.shape == (1, TOKENS, 8, 32)
    assert shapes.tolist() == [[107, 130], [54, 65], [27, 33], [14, 17]] and starts.tolist() == [0, 13910, 17420, 18311]
    assert loc.shape == (1, num_queries, 8, 4, 4, 2) and weights.shape == (1, num_queries, 8, 4, 4)
    assert grad_out.shape == (1, num_queries, 256)
    torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(1, num_queries, 8))
    if call == "encoder":  # every token queries within 4 pixels of its own position; here: the finest level's
        y, x = torch.meshgrid((torch.arange(107) + 0.5) / 107, (torch.arange(130) + 0.5) / 130, indexing="ij")
        offsets = loc[0, :13910, :, 0] - torch.stack([x.flatten(), y.flatten()], -1)[:, None, None]
        assert (offsets.abs() <= torch.tensor([4 / 130, 4 / 107]) + 1e-6).all()


def test_bad_calls():
    with pytest.raises(ValueError, match="unknown call 'neck'"):
        make_call("neck", "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"--calls: unknown \['neck'\]"):
        main(["--calls", "decoder,neck", "--targets", "cpu:float32"])
    assert set(CALLS) == {"encoder", "sparse_encoder", "decoder"}


def test_one_short_run(tmp_path, capsys):
    path = tmp_path / "op.json"
    argv = ["--calls", "decoder", "--repeats", "2", "--warmup", "0", "--no-memory", "--targets", "cpu:float32"]
    report = main([*argv, "--json", str(path)])
    (row,) = report.rows
    assert row["call"] == "decoder" and row["Lq"] == 300 and row["device, dtype"] == "cpu, float32"
    assert row["kernels"] in ("x86-64-v4", "x86-64-v3", "default")  # the CPU kernels' instruction-set level
    for phase in ("forward", "forward_backward"):
        assert set(row[f"{phase}_ms"]) == {"reference", "op"} and min(row[f"{phase}_ms"].values()) > 0
    assert row["fwd speed-up"].endswith("x")
    printed = capsys.readouterr().out.splitlines()
    assert "torch threads" in printed[0] and printed[1].startswith("| call ")
    assert json.loads(path.read_text())["rows"][0]["Lq"] == 300
