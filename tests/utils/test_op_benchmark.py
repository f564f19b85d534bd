"""The inputs and the table of the deformable attention benchmark (sparse_detr.utils.op_benchmark); a whole run
spawns subprocesses at the paper's size and is left to projects/SparseDETR/bench_op.py."""

import pytest
import torch

from sparse_detr.utils.op_benchmark import CALLS, format_results, make_call, run_op_benchmark

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
    with pytest.raises(ValueError, match=r"unknown calls \['neck'\]"):
        run_op_benchmark(["decoder", "neck"])
    assert set(CALLS) == {"encoder", "sparse_encoder", "decoder"}


def test_table():
    result = {"call": "decoder", "device": "cpu", "dtype": "float32", "Lq": 300}
    for impl, scale in (("reference", 4.0), ("op", 1.0)):
        for phase in ("forward", "forward_backward"):
            result[f"{impl}_{phase}_ms"] = 10 * scale
            result[f"{impl}_{phase}_peak_mib"] = 2 * scale
    result.update(forward_speedup=4.0, forward_backward_speedup=4.0)
    header, rule, row = format_results([result]).splitlines()
    assert header.startswith("| call |") and rule.startswith("|---|")
    assert row == "| decoder | cpu, float32 | 300 | 40.0 / 10.0 | 4.0x | 40.0 / 10.0 | 4.0x | 8 / 2.0 | 8 / 2 |"
