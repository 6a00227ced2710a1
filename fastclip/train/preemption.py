"""Stopping a run on a signal: cluster preemption (SIGTERM, SIGUSR1) and Ctrl-C (SIGINT).

- **SIGTERM / SIGUSR1** (SLURM preempts with SIGTERM, or sends SIGUSR1 ahead with ``--signal=USR1@120``):
  the handler only records the signal. The loop finishes the step in flight, the ranks agree to stop
  after the same step (one all-reduce of a flag per step: a rank that got no signal stops too), a
  checkpoint of that step is written, and :class:`Preempted` carries its path out; ``fastclip train``
  prints it with the command that resumes and exits with :data:`PREEMPTED_EXIT`.
- **Ctrl-C**: stops at once (no checkpoint); ``fastclip train`` prints one line with the newest
  checkpoint and the resume command, and exits with :data:`INTERRUPTED_EXIT`.

DataLoader workers ignore all three signals (``fastclip.data.loader``): the main process decides, and
shuts its workers down itself, so a signal sent to the whole process group kills no worker and prints
no worker traceback.
"""
from __future__ import annotations

import os
import shlex
import signal
import threading

PREEMPTED_EXIT = 75    # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 with a checkpoint; requeue and --resume latest
INTERRUPTED_EXIT = 130  # 128 + SIGINT: stopped by Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped after ``step`` on ``signal_name`` and saved ``checkpoint``."""

    def __init__(self, signal_name: str, step: int, checkpoint: str, output_dir: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint, self.output_dir = signal_name, step, checkpoint, output_dir


class StopRequest:
    """Records SIGTERM/SIGUSR1 while installed (main thread only); ``signal_name`` is the first one received."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _record(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def resume_command(argv: list[str], output_dir: str, processes: int = 1) -> str:
    """The command that continues this run: its flags with ``--resume latest`` (and ``--output-dir`` when the
    folder was picked for it), under the same launcher."""
    flags, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--resume":
            skip = True
            continue
        if item.startswith("--resume="):
            continue
        flags.append(item)
    given = {item.split("=", 1)[0] for item in flags}
    if "--logs" in given and "--name" not in given:
        flags += ["--name", os.path.basename(os.path.normpath(output_dir))]
    elif not given & {"--output-dir", "--name"}:
        flags += ["--output-dir", output_dir]
    flags += ["--resume", "latest"]
    launcher = "fastclip train"
    if processes > 1:
        launcher = ("srun <the same srun flags> fastclip train" if "RANK" not in os.environ
                    else "torchrun <the same torchrun flags> -m fastclip.train")
    return f"{launcher} {shlex.join(flags)}"
