"""The training stream is a function of (seed, batches consumed): resumed, it goes on as it would have."""

import itertools
import random

import numpy as np
import pytest
import torch
from detectron2.data.samplers import TrainingSampler

from sparse_detr.data.stream import TrainStream

# 10 images, landscape when the index is even
DICTS = [{"file_name": f"{i}.jpg", "width": 60 if i % 2 == 0 else 40, "height": 50} for i in range(10)]


def draw(d):
    """A mapper whose output depends on every global RNG a mapper may draw from."""
    return (d["file_name"], np.random.randint(1 << 30), random.random(), torch.rand(()).item())


def stream(seed=3, workers=0, grouping=False, batch_size=3):
    def make_sampler(seed):
        return TrainingSampler(len(DICTS), seed=seed)

    return TrainStream(DICTS, draw, make_sampler, batch_size, seed, num_workers=workers, aspect_ratio_grouping=grouping)


def take(s, n):
    return list(itertools.islice(iter(s), n))


@pytest.mark.parametrize("grouping", [False, True])
def test_resumed_stream_continues_the_uninterrupted_one(grouping):
    whole = take(stream(grouping=grouping), 9)  # 27 samples: the third epoch of 10 images is under way
    if grouping:
        assert all(len({int(x[0][0]) % 2 for x in batch}) == 1 for batch in whole)

    first = stream(grouping=grouping)
    assert take(first, 4) == whole[:4]
    assert first.state_dict() == {"seed": 3, "batches": 4}
    resumed = stream(seed=99, grouping=grouping)  # the seed comes from the state
    resumed.load_state_dict(first.state_dict())
    assert take(resumed, 5) == whole[4:]


def test_workers_change_nothing_and_the_main_rngs_are_left_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    before = torch.rand(()).item(), np.random.rand(), random.random()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    in_process = take(stream(workers=0), 4)
    assert (torch.rand(()).item(), np.random.rand(), random.random()) == before
    assert take(stream(workers=1), 4) == in_process
    assert take(stream(seed=4), 4) != in_process


def test_state_is_loaded_before_iterating():
    s = stream()
    take(s, 1)
    with pytest.raises(RuntimeError, match="before the stream is iterated"):
        s.load_state_dict({"seed": 3, "batches": 0})
