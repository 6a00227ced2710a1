"""NVTX ranges for Nsight Systems and an optional torch.profiler trace (``--profile N``)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class NvtxRanges:
    """``ranges("forward")`` opens an NVTX range named ``fastclip/forward`` when CUDA is in use and the
    ``nvtx`` package is installed; otherwise it is a null context (no cost on CPU runs).

    The trainer marks the phases of a step: ``data`` and ``optimizer`` (loop.py), ``forward``, ``loss``
    and ``backward`` (accumulation.py)."""

    def __init__(self, enabled: bool):
        self._annotate = None
        if enabled and torch.cuda.is_available():
            try:
                import nvtx

                self._annotate = nvtx.annotate
            except ImportError:
                self._annotate = None

    def __call__(self, name: str):
        if self._annotate is None:
            return contextlib.nullcontext()
        return self._annotate(f"fastclip/{name}", domain="fastclip")


class StepProfiler:
    """Records ``steps`` training steps (after one warm-up step) with torch.profiler and writes a Chrome
    trace to ``<output-dir>/profile/trace_rank<r>.json`` (open in chrome://tracing or Perfetto)."""

    def __init__(self, steps: int, output_dir: str | Path, rank: int):
        self.steps, self.path = steps, Path(output_dir) / "profile" / f"trace_rank{rank}.json"
        self._profiler = None
        if steps > 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._profiler = torch.profiler.profile(
                activities=activities, record_shapes=True, profile_memory=True,
                schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1),
                on_trace_ready=lambda profiler: profiler.export_chrome_trace(str(self.path)))
            self._profiler.start()
        self._taken = 0

    def step(self) -> None:
        """Call once after every training step; stops by itself after warm-up + ``steps``."""
        if self._profiler is None:
            return
        self._profiler.step()
        self._taken += 1
        if self._taken >= self.steps + 1:
            self.close()

    def close(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
