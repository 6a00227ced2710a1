"""Communication primitives of the distributed losses, and a counter of the bytes they move.

Every call goes through ``torch.distributed`` by attribute (``dist.all_reduce(...)``), on the group
the user passed (``None``: the world group), with tensors on the features' device: NCCL for CUDA
tensors, gloo for CPU ones. ``check_consistent`` runs first on every call: one all-gather of a few
int64 per rank, so a rank whose batch, dimension, dtype or options differ makes *every* rank raise
the same ``ValueError`` instead of leaving the others blocked in a collective of the wrong size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fastclip.devices import FLOAT_DTYPES, dtype_name

DTYPE_CODES = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES, start=1)}


@dataclass(frozen=True)
class World:
    """A process group as one process sees it: ``group`` (None = the world group), this process's ``rank`` in it
    and its ``size``. The trainer's world (``fastclip.train.process_group``) also names the ``local_rank`` on
    this node and the ``device``; the losses build one per call from their ``process_group``."""

    group: object = None
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def global_rank(self, group_rank: int) -> int:
        """The world rank of ``group_rank`` (P2P ops address peers by world rank)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


def _describe(code: int, name: str) -> str:
    if name == "dtype":
        return next((dtype_name(d) for d, c in DTYPE_CODES.items() if c == code), str(code))
    return str(code)


def check_consistent(world: World, features: torch.Tensor, options: dict[str, int]) -> None:
    """Raise the same ValueError on every rank unless all ranks pass (b, D, dtype) and ``options`` alike.

    One all-gather of ``3 + len(options)`` int64 per rank: cheap, and it must come before any
    collective whose size depends on these values (an uneven all-gather would hang or corrupt).
    """
    names = ["local batch size", "feature dimension", "dtype", *options]
    values = [features.shape[0], features.shape[1], DTYPE_CODES.get(features.dtype, 0), *options.values()]
    local = torch.tensor(values, dtype=torch.int64, device=features.device)
    table = torch.empty(world.size * len(values), dtype=torch.int64, device=features.device)
    _collective("all_gather_single", "all_gather_into_tensor")(table, local, group=world.group)
    rows = table.view(world.size, len(values)).cpu().tolist()
    problems = []
    for column, name in enumerate(names):
        seen = [row[column] for row in rows]
        if len(set(seen)) > 1:
            per_rank = ", ".join(f"rank {r}: {_describe(v, name)}" for r, v in enumerate(seen))
            problems.append(f"{name} differs across ranks ({per_rank})")
    if problems:
        hint = ("Every rank must pass features of one shape (b, D) and dtype, with the same loss options: "
                "uneven local batches are not supported (open_clip's gather assumes them too), so use "
                "drop_last=True in the DataLoader or pad the last batch.")
        raise ValueError("fastclip distributed loss: " + "; ".join(problems) + ". " + hint)


def _collective(name: str, older_name: str):
    """``torch.distributed.<name>``, or its older spelling on a torch that lacks it. torch 2.14 renamed
    ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to ``all_gather_single`` / ``reduce_scatter_single``
    and warns (FutureWarning, every rank, every call) on the old names. Looked up per call, so
    :func:`count_communication`'s wrappers see it."""
    return getattr(dist, name, None) or getattr(dist, older_name)


def all_gather_rows(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """(b, ...) on every rank -> (W * b, ...) in rank order, in the tensor's dtype."""
    out = torch.empty((world.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _collective("all_gather_single", "all_gather_into_tensor")(out, tensor.contiguous(), group=world.group)
    return out


def reduce_scatter_rows(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """(W * b, ...) partial sums on every rank -> this rank's (b, ...) block of their sum over ranks."""
    out = torch.empty((tensor.shape[0] // world.size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, tensor.contiguous(), op=dist.ReduceOp.SUM,
                                                                group=world.group)
    return out


def all_reduce_(world: World, tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (SUM unless ``op``); returns the tensor."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=world.group)
    return tensor


# --- counting -----------------------------------------------------------------------------------------

def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def _list_bytes(tensors) -> int:
    return sum(_nbytes(t) for t in tensors) if tensors is not None else 0


def _p2p_send_bytes(p2p_ops) -> int:
    return sum(_nbytes(op.tensor) for op in p2p_ops if getattr(op.op, "__name__", "") == "isend")


# Logical payload of one call on this rank: what an all-gather returns, what a reduce-scatter or an
# all-reduce reduces, what a scatter root or a P2P batch sends.
_PAYLOAD = {
    "all_gather_single": lambda a, k: _nbytes(a[0] if a else k.get("output_tensor")),
    "all_gather_into_tensor": lambda a, k: _nbytes(a[0] if a else k.get("output_tensor")),
    "all_gather": lambda a, k: _list_bytes(a[0] if a else k.get("tensor_list")),
    "reduce_scatter_single": lambda a, k: _nbytes(a[1] if len(a) > 1 else k.get("input")),
    "reduce_scatter_tensor": lambda a, k: _nbytes(a[1] if len(a) > 1 else k.get("input")),
    "reduce_scatter": lambda a, k: _list_bytes(a[1] if len(a) > 1 else k.get("input_list")),
    "all_reduce": lambda a, k: _nbytes(a[0] if a else k.get("tensor")),
    "all_to_all": lambda a, k: _list_bytes(a[1] if len(a) > 1 else k.get("input_tensor_list")),
    "all_to_all_single": lambda a, k: _nbytes(a[1] if len(a) > 1 else k.get("input")),
    "scatter": lambda a, k: _list_bytes(a[1] if len(a) > 1 else k.get("scatter_list")),
    "broadcast": lambda a, k: _nbytes(a[0] if a else k.get("tensor")),
    "batch_isend_irecv": lambda a, k: _p2p_send_bytes(a[0] if a else k.get("p2p_op_list")),
}


@dataclass
class CommunicationCounter:
    """Calls and payload bytes of the torch.distributed calls made on this rank while counting."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.calls)

    def bytes_by_name(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for name, size in self.calls:
            totals[name] = totals.get(name, 0) + size
        return totals


@contextlib.contextmanager
def count_communication():
    """Count every torch.distributed collective / P2P batch made in the block (any caller, any library).

        with count_communication() as counter:
            loss = ClipLoss(...)(image, text, scale); loss.backward()
        print(counter.total_bytes, counter.bytes_by_name())

    It wraps the functions of the ``torch.distributed`` module (``isend``/``irecv`` are counted
    through ``batch_isend_irecv``), so it counts open_clip's traffic the same way as fastclip's.
    Not thread-safe; meant for tests and benchmarks.
    """
    counter = CommunicationCounter()
    originals = {name: getattr(dist, name) for name in _PAYLOAD if hasattr(dist, name)}

    def wrap(name, function):
        def counted(*args, **kwargs):
            counter.calls.append((name, _PAYLOAD[name](args, kwargs)))
            return function(*args, **kwargs)
        return counted

    for name, function in originals.items():
        setattr(dist, name, wrap(name, function))
    try:
        yield counter
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
