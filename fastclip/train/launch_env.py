"""Where this process sits, read from the launcher's environment: torchrun, SLURM's ``srun``, or nothing.

- torchrun (``RANK`` is set): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; torchrun's agent did the rendezvous
  (``--rdzv-backend c10d`` across nodes) and serves the store at ``MASTER_ADDR:MASTER_PORT``.
- ``srun python -m fastclip.train ...`` without torchrun (``SLURM_PROCID`` set, ``SLURM_NTASKS`` > 1), as
  open_clip reads it: rank ``SLURM_PROCID``, world size ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``.
  ``MASTER_ADDR`` / ``MASTER_PORT`` come from the environment when set; otherwise the address is the first
  host of ``SLURM_JOB_NODELIST`` and the port ``20000 + SLURM_JOB_ID % 20000`` (so the tasks of one job agree
  and two jobs on one node rarely collide), and the run says so.
- neither: one process.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_PORT = 29500  # torch's usual MASTER_PORT, when SLURM gives no job id either
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class Placement:
    """This process's rank among ``world_size`` (local rank on its node), who launched it, and where rank 0
    listens when fastclip itself must meet the others (``srun``; None under torchrun or alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"                # "torchrun" | "slurm" | "none"
    master_addr: str | None = None
    master_port: int | None = None
    notes: list[str] = field(default_factory=list)  # what was derived rather than read


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``gpu-[003-005,9],cpu1`` -> ``gpu-003``, ``a,b`` -> ``a``."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    entry = nodelist[:end].strip()
    match = re.fullmatch(r"(?P<prefix>[^\[]*)\[(?P<ranges>[^\]]+)\](?P<suffix>.*)", entry)
    if match is None:
        return entry
    first = match.group("ranges").split(",")[0].split("-")[0]
    return f"{match.group('prefix')}{first}{match.group('suffix')}"


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    if not value.strip().lstrip("-").isdigit():
        raise ValueError(f"the launcher set {name}={value!r}, which is not an integer; check the srun/torchrun command")
    return int(value)


def read_placement(environ: Mapping[str, str] | None = None) -> Placement:
    """The :class:`Placement` the environment describes (``os.environ`` by default)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return Placement(_integer(environ, "RANK"), int(environ.get("WORLD_SIZE", "1")),
                         int(environ.get("LOCAL_RANK", "0")), "torchrun")
    if "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return Placement()
    notes = []
    address = environ.get("MASTER_ADDR")
    if not address:
        if not environ.get("SLURM_JOB_NODELIST"):
            raise ValueError("srun started several tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: "
                             "export MASTER_ADDR=<the first node's address> (and MASTER_PORT) in the job script")
        address = first_host(environ["SLURM_JOB_NODELIST"])
        notes.append(f"MASTER_ADDR={address} (the first host of SLURM_JOB_NODELIST={environ['SLURM_JOB_NODELIST']})")
    if environ.get("MASTER_PORT"):
        port = _integer(environ, "MASTER_PORT")
    elif environ.get("SLURM_JOB_ID", "").isdigit():
        port = PORT_BASE + int(environ["SLURM_JOB_ID"]) % PORT_SPAN
        notes.append(f"MASTER_PORT={port} (from SLURM_JOB_ID={environ['SLURM_JOB_ID']})")
    else:
        port = DEFAULT_PORT
        notes.append(f"MASTER_PORT={port} (torch's default: no SLURM_JOB_ID)")
    return Placement(_integer(environ, "SLURM_PROCID"), _integer(environ, "SLURM_NTASKS"),
                     int(environ.get("SLURM_LOCALID", "0")), "slurm", address, port, notes)
