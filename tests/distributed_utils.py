"""Spawned gloo worlds for the distributed-loss tests, and the references they compare against.

``run_in_world(fn, W, **kwargs)`` starts W CPU processes on a free port, runs ``fn(rank, W, **kwargs)``
in each under an initialised gloo group (60 s collective timeout, so a hang becomes an error), and
returns every rank's picklable result. The whole call has a deadline: a stuck world is killed and
reported, never left hanging the test session.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60
# forkserver forks the ranks from a clean server that has imported torch once (seconds per rank saved
# on a busy 2-core CI box). Plain fork is not safe: once this pytest process has run a backward on
# autograd's worker threads (torch.compile's tests do), a forked rank's backward refuses to run.
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
SERVER_PRELOAD = ["torch", "torch.distributed"]


def open_clip_loss_module():
    """open_clip's ``loss.py`` loaded by itself (it imports only torch): the reference, without the
    seconds of importing the whole open_clip package in every spawned rank."""
    package = importlib.util.find_spec("open_clip")
    path = Path(package.submodule_search_locations[0]) / "loss.py"
    spec = importlib.util.spec_from_file_location("open_clip_loss_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, out_dir: str, kwargs: dict,
           collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        result = fn(rank, world_size, **kwargs)
    except BaseException:  # report it to the parent, which names the rank
        result = {"__crash__": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    path = Path(out_dir) / f"rank{rank}.pkl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        pickle.dump(result, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def run_in_world(fn, world_size: int, *, timeout_s: float = 240, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
                 **kwargs) -> list:
    """fn(rank, world_size, **kwargs) on each of ``world_size`` spawned gloo ranks -> [result of rank r]."""
    if START_METHOD == "forkserver":
        mp.set_forkserver_preload(SERVER_PRELOAD)  # read when the server starts (first world only)
    with tempfile.TemporaryDirectory(prefix="fastclip-dist-") as out_dir:
        context = mp.start_processes(_entry, args=(fn, world_size, free_port(), out_dir, kwargs, collective_timeout_s),
                                     nprocs=world_size, join=False, start_method=START_METHOD)
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"world of {world_size} ranks did not finish within {timeout_s} s")
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
    for rank, result in enumerate(results):
        if isinstance(result, dict) and "__crash__" in result:
            raise RuntimeError(f"rank {rank} crashed:\n{result['__crash__']}")
    return results


def global_batch(world_size: int, local_batch: int, dim: int, seed: int, dtype=torch.float32):
    """Unit-norm (B, D) image/text features, identical on every rank (same seed), pairs correlated."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(world_size * local_batch, dim, generator=generator, dtype=torch.float64)
    text = 0.5 * image + torch.randn(image.shape, generator=generator, dtype=torch.float64)
    normalize = torch.nn.functional.normalize
    return normalize(image, dim=-1).to(dtype), normalize(text, dim=-1).to(dtype)


def local_rows(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return tensor.chunk(world_size)[rank]


def loss_and_grads(loss_fn, image, text, logit_scale: float, logit_bias: float | None, upstream):
    """Forward on fresh leaves, backward of (loss * upstream).sum(); returns value and every grad (fp32)."""
    leaves = {"image": image.detach().clone().requires_grad_(), "text": text.detach().clone().requires_grad_(),
              "logit_scale": torch.tensor(logit_scale, dtype=image.dtype, requires_grad=True)}
    args = [leaves["image"], leaves["text"], leaves["logit_scale"]]
    if logit_bias is not None:
        leaves["logit_bias"] = torch.tensor(logit_bias, dtype=image.dtype, requires_grad=True)
        args.append(leaves["logit_bias"])
    loss = loss_fn(*args)
    (loss * upstream).sum().backward()
    result = {"loss": loss.detach()}
    for name, leaf in leaves.items():
        result[name] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return result


def saved_tensor_bytes(fn) -> tuple[object, int]:
    """(fn(), bytes of the distinct tensors autograd saved for backward while running it)."""
    storages: dict[tuple, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn()
    return output, sum(storages.values())


class Checks:
    """Named checks run inside a worker: ``with checks("name"): ...``; failures are recorded, not raised."""

    def __init__(self):
        self.failures: dict[str, str | None] = {}
        self.measurements: dict[str, object] = {}

    def __call__(self, name: str):
        return _Check(self, name)


class _Check:
    def __init__(self, checks: Checks, name: str):
        self.checks, self.name = checks, name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, kind, error, tb):
        self.checks.measurements.setdefault("seconds", {})[self.name] = time.perf_counter() - self.start
        if kind is None:
            self.checks.failures.setdefault(self.name, None)
            return False
        if issubclass(kind, Exception):
            self.checks.failures[self.name] = "".join(traceback.format_exception(kind, error, tb))[-3000:]
            return True
        return False
