"""Rank-0 metrics: ``metrics.jsonl`` (one object per logged step), tensorboard, a tqdm progress bar.

A run that starts at step s (a resume, or a fresh start after a crash before the first checkpoint)
moves the lines of steps after s out of ``metrics.jsonl`` into ``metrics.superseded.jsonl``: the
run logs those steps again, and nothing logged before is lost.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from fastclip.io import atomic_write

METRICS_FILE, SUPERSEDED_FILE = "metrics.jsonl", "metrics.superseded.jsonl"


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLogger:
    """Writes on the main rank only; every method is a no-op elsewhere."""

    def __init__(self, output_dir: str | Path, *, is_main: bool, report_to: str = "", total_steps: int = 0,
                 initial_step: int = 0, progress: bool = True, say=print):
        self.is_main = is_main
        self.path = Path(output_dir) / METRICS_FILE
        self._writer = None
        self._bar = None
        if not is_main:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.superseded_path = Path(output_dir) / SUPERSEDED_FILE
        moved = self._set_aside_after(initial_step)
        if moved:
            say(f"{self.path.name}: {moved} line(s) of steps after {initial_step}, which this run trains again, "
                f"moved to {self.superseded_path}")
        self._handle = open(self.path, "a", encoding="utf-8")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             desc="train")

    def _set_aside_after(self, step: int) -> int:
        """Move the lines of steps after ``step`` (which this run redoes) and lines cut short by a kill
        from metrics.jsonl to the end of metrics.superseded.jsonl. Returns how many lines moved."""
        if not self.path.exists():
            return 0
        text = self.path.read_text(encoding="utf-8", errors="replace")
        kept, moved = [], []
        for line in text.splitlines():
            try:
                record = json.loads(line)
                logged = record.get("step") if isinstance(record, dict) else None
            except ValueError:
                logged = None
            later = not isinstance(logged, int) or logged > step
            (moved if later else kept).append(line)
        if moved:
            previous = self.superseded_path.read_text(encoding="utf-8") if self.superseded_path.exists() else ""
            with atomic_write(self.superseded_path) as handle:  # first: a kill in between duplicates, never loses
                handle.write(previous + "".join(line + "\n" for line in moved))
        if moved or not text.endswith("\n"):
            with atomic_write(self.path) as handle:
                handle.write("".join(line + "\n" for line in kept))
        return len(moved)

    def log(self, step: int, values: dict, *, kind: str = "train") -> None:
        if not self.is_main:
            return
        record = {"kind": kind, "step": step, **{key: _plain(value) for key, value in values.items()}}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def progress(self, steps: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix({key: f"{value:.4g}" if isinstance(value, float) else value
                                   for key, value in postfix.items()}, refresh=False)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
        self._handle.close()
        if self._writer is not None:
            self._writer.close()
