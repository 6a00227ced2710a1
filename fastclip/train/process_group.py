"""Process-group setup for torchrun: NCCL on GPU, gloo on CPU; the :class:`~fastclip.distributed.comm.World`
of this process (rank, size, local rank, device), and the few collectives the trainer's control flow needs
(agree on a flag, share a decision, fail together), and ``say``: print once, on the main rank."""
from __future__ import annotations

import datetime
import os
import pickle
from typing import Callable

import torch
import torch.distributed as dist

from fastclip.distributed.comm import World
from fastclip.train.launch_env import Placement, read_placement


def say(world: World, message: str) -> None:
    """Print ``message`` on the main rank (the trainer's notes and warnings)."""
    if world.is_main:
        print(message, flush=True)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def any_true(world: World, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one tiny all-reduce)."""
    if not world.distributed:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(world: World, value) -> list:
    """``value`` of every rank, in rank order (on every rank)."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(world: World, value):
    """Rank 0's ``value`` on every rank."""
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def decide_on_main(world: World, decide: Callable[[], object]):
    """``decide()`` on rank 0 only; its result reaches every rank, and so does its exception.

    For decisions that touch shared files (which checkpoint to resume, cleaning up): one rank acts,
    and an error there stops every rank at once instead of leaving the others waiting in a collective.
    """
    outcome = None
    if world.is_main:
        try:
            outcome = (True, decide())
        except Exception as error:
            outcome = (False, error)
    if world.distributed:
        shared = broadcast_object(world, _picklable(outcome) if world.is_main else None)
        outcome = outcome if world.is_main else shared  # rank 0 keeps its own error, traceback and all
    passed, value = outcome
    if not passed:
        raise value
    return value


def all_or_none(world: World, action: Callable[[], object]):
    """``action()`` on every rank; if it fails on any rank, every rank raises the first failure."""
    error = None
    try:
        result = action()
    except Exception as caught:
        error = caught
    if world.distributed:
        failures = [item for item in gather_objects(world, _picklable((error is None, error))) if not item[0]]
        if failures and error is None:
            raise failures[0][1]
    if error is not None:
        raise error
    return result


def _picklable(outcome: tuple) -> tuple:
    """``(passed, value)`` with an exception that cannot be pickled replaced by a RuntimeError of its text."""
    passed, value = outcome
    if not passed:
        try:
            pickle.dumps(value)
        except Exception:
            value = RuntimeError(f"{type(value).__name__}: {value}")
    return passed, value


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that timed out or lost its peer (gloo/NCCL messages), rather than a bug."""
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(sign in text for sign in ("Timed out", "timed out", "Timeout", "Connection closed by peer",
                                         "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted"))


def _pick_device(requested: str | None, local_rank: int) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested} asked for CUDA but no GPU is visible; use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


class RendezvousError(RuntimeError):
    """The processes of a run did not all meet within ``--dist-timeout`` (the message says who and where)."""


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout_seconds: float = 1800.0) -> World:
    """Read the launcher's environment (torchrun, or SLURM's srun: ``launch_env``) and start the process group.

    ``timeout_seconds`` (``--dist-timeout``) bounds how long the processes wait to meet under srun
    (:class:`RendezvousError`) and how long any collective waits for the other ranks: gloo then raises on the
    waiting rank; NCCL's watchdog aborts the process. Under torchrun its agent has done the rendezvous
    (its own ``--rdzv-conf join_timeout``). Without a launcher this is one process and no group.
    """
    placement = read_placement()
    torch_device = _pick_device(device, placement.local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    world = World(rank=placement.rank, size=placement.world_size, local_rank=placement.local_rank,
                  device=torch_device)
    if placement.world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
        kwargs = {"device_id": torch_device} if torch_device.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=timeout_seconds)
        store = _attempt_store(timeout) if placement.launcher == "torchrun" else _srun_store(placement, timeout)
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=placement.rank,
                                world_size=placement.world_size, **kwargs)
        if placement.notes:
            say(world, f"{placement.world_size} SLURM tasks without torchrun: " + ", ".join(placement.notes))
    return world


def _srun_store(placement: Placement, timeout: datetime.timedelta):
    """The key-value store the srun tasks meet at: rank 0 serves it at MASTER_ADDR:MASTER_PORT and waits up
    to ``timeout`` for every task; the others connect to it (RendezvousError when that does not happen)."""
    where = f"{placement.master_addr}:{placement.master_port}"
    try:
        return dist.TCPStore(placement.master_addr, placement.master_port, placement.world_size,
                             is_master=placement.rank == 0, timeout=timeout, wait_for_workers=True)
    except (RuntimeError, OSError) as error:
        seconds = timeout.total_seconds()
        if placement.rank == 0:
            reason = (f"rank 0 served {where} but not all {placement.world_size} SLURM tasks joined within "
                      f"--dist-timeout {seconds:g} s")
        else:
            reason = (f"rank {placement.rank} could not reach rank 0 at {where} within --dist-timeout {seconds:g} s")
        raise RendezvousError(f"{reason} ({str(error).splitlines()[0]}). Check that srun started every task "
                              "(SLURM_NTASKS), that MASTER_ADDR is reachable from every node and MASTER_PORT is free, "
                              "or raise --dist-timeout") from None


def _attempt_store(timeout: datetime.timedelta):
    """torchrun's ``env://`` store, with its keys under a prefix of this restart attempt.

    After an elastic restart the workers share the agent's store with the attempt that died, and
    gloo's address exchange could read a dead worker's address from it (connection refused, the
    restart fails); ``TORCHELASTIC_RESTART_COUNT`` keeps each attempt's keys apart.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"fastclip/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
