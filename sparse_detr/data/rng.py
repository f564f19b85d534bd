"""Random states derived from a run's seed and a position in the run, so that a resumed run draws what the
uninterrupted run drew at the same position, without the states of the processes that ran before."""

import contextlib
import random
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["seed_all_rngs", "seeded_cpu_rngs"]


def seed_all_rngs(key: Sequence[int], cuda: bool = True) -> None:
    """Seed numpy's, Python's and torch's global RNGs (torch's CUDA ones too, with ``cuda``) from ``key``.

    Different keys give independent streams (numpy's ``SeedSequence`` hashes the whole key), so a key that names
    its purpose and position, e.g. ``(seed, stream id, rank, iteration)``, cannot collide with another's.
    """
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(2)  # two uint32
    seed = (int(words[0]) << 32) | int(words[1])
    np.random.seed(words)
    random.seed(seed)
    if cuda:
        torch.manual_seed(seed)
    else:  # data-loader workers must not initialize CUDA
        torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded_cpu_rngs(key: Sequence[int]) -> Iterator[None]:
    """Run the block with numpy's, Python's and torch's CPU RNGs seeded from ``key``; restore them afterwards, so
    the block neither reads nor disturbs what the process draws elsewhere."""
    states = np.random.get_state(), random.getstate(), torch.get_rng_state()
    seed_all_rngs(key, cuda=False)
    try:
        yield
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])
        torch.set_rng_state(states[2])
