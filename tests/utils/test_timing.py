import sys

import pytest
import torch

from sparse_detr.utils.timing import interleaved_times, peak_memory_growth


def test_functions_take_turns_in_rotating_order():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleaved_times(fns, warmup=1, iters=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_growth_sees_a_temporary():
    def allocate():
        x = torch.ones(64, 2**20 // 4)  # 64 MiB, touched, then freed
        return float(x[0, 0])

    grown = peak_memory_growth(allocate)
    assert 60 * 2**20 <= grown <= 80 * 2**20
    assert peak_memory_growth(lambda: None) < 8 * 2**20
