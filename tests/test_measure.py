"""The measurement harness (sparse_detr.measure): interleaved timing, the peak memory of a call in a fresh process,
the report every benchmark prints."""

import json
import sys

import pytest
import torch

from sparse_detr.measure import Report, Timings, describe_device, interleaved_times, peak_memory


def test_functions_take_turns_in_rotating_order():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    timings = interleaved_times(fns, warmup=1, iters=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 and min(t) >= 0 for t in timings.seconds.values())
    with pytest.raises(ValueError, match="timed rounds >= 1"):
        interleaved_times(fns, warmup=0, iters=0)


def test_medians_and_per_round_ratios():
    timings = Timings({"slow": [4.0, 9.0, 6.0], "fast": [1.0, 2.0, 3.0]})
    assert timings.median("slow") == 6.0
    assert timings.speedup("slow", "fast") == 4.0  # ratios 4, 4.5, 2: the median of the rounds, not 6 / 2


def allocate_64_mib(touch: bool):
    def call():
        x = torch.ones(64, 2**20 // 4) if touch else None  # 64 MiB, touched, then freed
        return None if x is None else float(x[0, 0])

    return call


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_of_a_call_in_a_fresh_process():
    assert 60 * 2**20 <= peak_memory(allocate_64_mib, True) <= 80 * 2**20
    assert peak_memory(allocate_64_mib, False) < 8 * 2**20


def test_report_prints_its_table_and_saves_everything(tmp_path, capsys):
    report = Report("conditions", ["name", "time"], [{"name": "a", "time": "1.0", "seconds": 1.0}])
    report.emit(str(tmp_path / "r.json"))
    assert capsys.readouterr().out.splitlines() == [
        "conditions",
        "| name   |   time |",
        "|:-------|-------:|",
        "| a      |      1 |",
    ]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rows"] == [{"name": "a", "time": "1.0", "seconds": 1.0}] and saved["header"] == "conditions"
    assert saved["table"] == report.table()


def test_device_description():
    text = describe_device(torch.device("cpu"))
    assert "logical CPUs" in text and f"{torch.get_num_threads()} torch threads" in text and torch.__version__ in text
