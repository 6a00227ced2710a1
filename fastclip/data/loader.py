"""Training batches: per-rank sharding, a resumable data position, workers and pinned memory.

The data position is ``(epoch, batch)``. The order of an epoch depends only on (seed, epoch), so a
run resumed at batch k of epoch e sees exactly the batches the uninterrupted run saw from there.
"""
from __future__ import annotations

import atexit
import functools
import itertools
import multiprocessing
import os
import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from fastclip.data.collate import collate_pairs


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


DEFAULT_WORKERS_CAP = 4  # open_clip's --workers default, as an upper bound


def default_workers(limit: int = DEFAULT_WORKERS_CAP) -> int:
    """DataLoader workers per process when the user gives none: ``min(limit, available_cpus())``."""
    return min(limit, available_cpus())


_MAIN_EXITING = None  # a multiprocessing.Event, set when the main process exits (made with the first loader)


def _main_exiting_event():
    """The Event that tells workers the main process is exiting (its atexit hook sets it; see below)."""
    global _MAIN_EXITING
    if _MAIN_EXITING is None:
        _MAIN_EXITING = multiprocessing.Event()
        # Registered after multiprocessing's own exit hook, so it runs first (atexit is last in, first out).
        atexit.register(_MAIN_EXITING.set)
    return _MAIN_EXITING


def leave_signals_to_the_main_process(worker_id: int, main_exiting=None) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores Ctrl-C and SIGUSR1, and SIGTERM while the main process
    runs. A terminal or a cluster sends these to every process of the job; the main process decides what to
    do (fastclip.train.preemption) and shuts its workers down itself. Without this a worker would die of
    SIGUSR1 or SIGTERM mid-batch (failing the step in flight) and print a traceback on Ctrl-C.

    Once the main process is exiting (``main_exiting`` set), SIGTERM ends the worker: that is how
    multiprocessing's exit hook stops a worker whose loader was never closed (e.g. one kept alive by an
    exception's traceback); ignoring it there would hang the interpreter's exit forever."""
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        if main_exiting is not None and main_exiting.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


class ShardedEpochSampler(Sampler[int]):
    """This rank's indices for one epoch: a (seed, epoch)-seeded permutation, dealt round-robin.

    Each epoch keeps the first ``num_batches * batch_size * world_size`` indices of the permutation, so
    every rank gets the same number of full batches (DDP collectives need equal local batch sizes).
    ``start_batch`` skips the batches a resumed run has already trained on, without loading them.
    """

    def __init__(self, dataset_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, start_batch: int = 0):
        self.num_batches = dataset_size // (batch_size * world_size)
        if self.num_batches < 1:
            raise ValueError(f"the dataset has {dataset_size} samples, fewer than one global batch of "
                             f"{batch_size} x {world_size} ranks; lower --batch-size")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.dataset_size, self.seed, self.epoch, self.start_batch = dataset_size, seed, epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        used = order[: self.num_batches * self.batch_size * self.world_size]
        mine = used[self.rank:: self.world_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size


class TrainBatches:
    """Batches ``(images (B,3,H,W), tokens (B,L), skipped_images)`` of one rank, epoch by epoch.

    ``dataset`` is map-style (CSV, synthetic): sharded by :class:`ShardedEpochSampler`; or an
    ``IterableDataset`` (webdataset) with ``set_epoch`` that shards itself by rank and worker, in
    which case ``num_samples`` (global, per epoch) fixes the epoch length and a resumed run skips
    batches by reading them.
    """

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 workers: int = 0, pin_memory: bool = False, num_samples: int | None = None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.workers, self.pin_memory = workers, pin_memory
        self.iterable = isinstance(dataset, IterableDataset)
        if self.iterable:
            if not num_samples:
                raise ValueError("--train-num-samples is required with --dataset-type webdataset")
            self.num_batches = num_samples // (batch_size * world_size)
        else:
            self.num_batches = ShardedEpochSampler(len(dataset), batch_size, world_size=world_size).num_batches
        if self.num_batches < 1:
            raise ValueError("an epoch holds less than one global batch; lower --batch-size")

    @property
    def samples_per_epoch(self) -> int:
        """Global samples per epoch (all ranks)."""
        return self.num_batches * self.batch_size * self.world_size

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator:
        """Iterate the batches of ``epoch`` from ``start_batch`` on."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        # DataLoader draws its workers' base seed from this generator, not from the global RNG, so
        # creating a loader (at an epoch start or on resume) never shifts the model's dropout stream.
        generator = torch.Generator().manual_seed(self.seed * 7_368_787 + epoch)
        common = dict(batch_size=self.batch_size, num_workers=self.workers, pin_memory=self.pin_memory,
                      collate_fn=collate_pairs, generator=generator, drop_last=True,
                      worker_init_fn=functools.partial(leave_signals_to_the_main_process,
                                                       main_exiting=_main_exiting_event()) if self.workers else None,
                      persistent_workers=False, prefetch_factor=4 if self.workers else None)
        if self.iterable:
            loader = DataLoader(self.dataset, **common)
            return itertools.islice(iter(loader), start_batch, self.num_batches)
        sampler = ShardedEpochSampler(len(self.dataset), self.batch_size, rank=self.rank,
                                      world_size=self.world_size, seed=self.seed, epoch=epoch,
                                      start_batch=start_batch)
        return iter(DataLoader(self.dataset, sampler=sampler, **common))
