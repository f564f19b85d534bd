"""The model computes today what it computed when `pinned_outputs.json` was written (float64, four variants).

A refactoring must pass this unchanged. A deliberate change of the numbers regenerates the file with
`python tests/modeling/pinned_outputs.py`. The values are computed by that script in a process of its own, where
MKL runs its CPU-independent path (the script's docstring says why).
"""

import json
import subprocess
import sys

import pytest
import torch
from pinned_outputs import FIXTURE, VARIANTS

# float64 through a few layers: differences from reordered arithmetic or another CPU's kernels stay near 1e-14
RTOL, ATOL = 1e-9, 1e-11


@pytest.fixture(scope="module")
def pinned():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def computed():
    script = FIXTURE.with_name("pinned_outputs.py")
    done = subprocess.run([sys.executable, str(script), "--stdout"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _close(actual, expected, what):
    actual, expected = torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def test_every_variant_is_pinned(pinned):
    assert sorted(pinned) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_match_the_pins(variant, pinned, computed):
    expected = pinned[variant]
    actual = computed[variant]
    assert sorted(actual["losses"]) == sorted(expected["losses"])
    for name, value in expected["losses"].items():
        _close(actual["losses"][name], value, f"{variant} {name}")
    assert len(actual["detections"]) == len(expected["detections"])
    for i, (a, e) in enumerate(zip(actual["detections"], expected["detections"])):
        assert a["classes"] == e["classes"], f"{variant} image {i} classes"
        _close(a["scores"], e["scores"], f"{variant} image {i} scores")
        _close(a["boxes"], e["boxes"], f"{variant} image {i} boxes")
    assert ("kept_tokens" in actual) == ("kept_tokens" in expected)
    if "kept_tokens" in expected:
        assert actual["kept_tokens"] == expected["kept_tokens"], f"{variant} selected tokens"
        for i, (a, e) in enumerate(zip(actual["token_scores"], expected["token_scores"])):
            for lvl, (a_l, e_l) in enumerate(zip(a, e)):
                _close(a_l, e_l, f"{variant} image {i} level {lvl} token scores")
