"""The modeling tests run on one thread (the tiny configs and inputs are in tests/conftest.py)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded machine the spinning threads make these
    tests ~20x slower; restored afterwards so other test directories keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
