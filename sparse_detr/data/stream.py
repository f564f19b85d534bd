"""The training data stream: infinite batches that a checkpoint resumes exactly where the run stopped.

detectron2's training loader cannot be resumed: its sampler starts again from the first index, and the augmentation
draws from the RNGs of data-loader workers, which run ahead of training (prefetching) and die with the run. Here
every random draw of the data pipeline is a function of the run's seed and a position in the stream:

- the order of the samples is the sampler's (detectron2's ``TrainingSampler`` or ``RepeatFactorTrainingSampler``,
  seeded with the run's seed): one infinite index stream, of which process r of W takes positions r, r + W, ...;
- the mapper (decoding, augmentation) of the sample at position p runs with numpy's, Python's and torch's CPU RNGs
  seeded from (seed, p), in whichever process or worker maps it;
- batches are formed in the main process, grouped by aspect ratio as detectron2 does if asked.

The stream is thus fixed by (seed, batches consumed), which is all :meth:`TrainStream.state_dict` holds; a resumed
stream skips the consumed batches without mapping them. ``DATALOADER.NUM_WORKERS`` changes the speed, not the data.
"""

import itertools
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

from .rng import seeded_cpu_rngs

__all__ = ["DATA_STREAM_ID", "TrainStream"]

# first element after the seed of the RNG keys of the data pipeline; the trainer's per-step keys use another
DATA_STREAM_ID = 0

Position = Tuple[int, int]  # (position in the global stream, dataset index)


class _SeededMap(Dataset):
    """``mapper(dataset[index])`` under RNGs seeded from (seed, position)."""

    def __init__(self, dataset: Dataset, mapper: Callable[[Dict[str, Any]], Any], seed: int):
        self.dataset = dataset
        self.mapper = mapper
        self.seed = seed

    def __getitem__(self, key: Position) -> Any:
        position, index = key
        with seeded_cpu_rngs((self.seed, DATA_STREAM_ID, position)):
            return self.mapper(self.dataset[index])


class _Batches(Sampler):
    """Batches of (position, index) of this process, from the ``start``-th on.

    Args:
        sampler: a detectron2 training sampler; iterating it yields this process's share of the global index stream
            (global positions rank, rank + world_size, ...).
        batch_size: per process.
        landscape: per dataset index, whether the image is wider than high; None = no aspect-ratio grouping.
        start: batches to skip (formed, not yielded: nothing is mapped).
    """

    def __init__(self, sampler: Sampler, batch_size: int, landscape: Optional[List[bool]], start: int):
        self.sampler = sampler
        self.batch_size = batch_size
        self.landscape = landscape
        self.start = start

    def __iter__(self) -> Iterator[List[Position]]:
        positions = itertools.count(comm.get_rank(), comm.get_world_size())
        buckets: List[List[Position]] = [[], []]
        formed = 0
        for position, index in zip(positions, self.sampler):
            bucket = buckets[0 if self.landscape is None else int(self.landscape[index])]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                bucket.clear()
                if formed >= self.start:
                    yield batch
                formed += 1


def _as_list(batch: List[Any]) -> List[Any]:
    return batch


class TrainStream:
    """Infinite training batches (lists of mapped dataset dicts), resumable with :meth:`load_state_dict`.

    Args:
        dataset_dicts: the training set (serialized once, shared by the workers as detectron2 does).
        mapper: dataset dict -> model input; its random draws must come from numpy's, Python's or torch's global RNGs.
        make_sampler: ``make_sampler(seed=...)`` is a detectron2 training sampler over ``dataset_dicts``.
        batch_size: images per batch of this process.
        seed: the run's seed; the same in every process.
        num_workers: data-loader worker processes (0: map in the main process).
        aspect_ratio_grouping: batch landscape and portrait images separately (needs "width" and "height").
    """

    def __init__(
        self,
        dataset_dicts: Sequence[Dict[str, Any]],
        mapper: Callable[[Dict[str, Any]], Any],
        make_sampler: Callable[..., Sampler],
        batch_size: int,
        seed: int,
        *,
        num_workers: int = 0,
        aspect_ratio_grouping: bool = False,
    ):
        self.landscape = [d["width"] > d["height"] for d in dataset_dicts] if aspect_ratio_grouping else None
        self.dataset = DatasetFromList(list(dataset_dicts), copy=False)
        self.mapper = mapper
        self.make_sampler = make_sampler
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = int(seed)
        self.batches = 0  # consumed by whoever iterates
        self._started = False

    def state_dict(self) -> Dict[str, int]:
        """The position: the run's seed and the number of batches consumed."""
        return {"seed": self.seed, "batches": self.batches}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if self._started:
            raise RuntimeError("TrainStream.load_state_dict must be called before the stream is iterated")
        self.seed = int(state["seed"])
        self.batches = int(state["batches"])

    def __iter__(self) -> Iterator[List[Any]]:
        self._started = True
        loader = DataLoader(
            _SeededMap(self.dataset, self.mapper, self.seed),
            batch_sampler=_Batches(self.make_sampler(seed=self.seed), self.batch_size, self.landscape, self.batches),
            num_workers=self.num_workers,
            collate_fn=_as_list,
            # workers' base seeds from a generator of their own: creating the iterator must not draw from the
            # global RNG (the model's), which a resumed run would then see at another iteration
            generator=torch.Generator(),
        )
        for batch in loader:
            self.batches += 1
            yield batch
