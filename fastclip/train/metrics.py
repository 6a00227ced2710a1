"""Rank-0 metrics: ``metrics.jsonl`` (one object per logged step), tensorboard, wandb, and progress on the console:
a tqdm bar on a terminal, or, when the output is a pipe or a cluster log, a plain line every N steps.

A run that starts at step s (a resume, or a fresh start after a crash before the first checkpoint)
moves the lines of steps after s out of ``metrics.jsonl`` into ``metrics.superseded.jsonl``: the
run logs those steps again, and nothing logged before is lost.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fastclip.io import atomic_write

METRICS_FILE, SUPERSEDED_FILE = "metrics.jsonl", "metrics.superseded.jsonl"


PLAIN_PROGRESS_LINES = 20  # plain progress lines a run prints when --progress-every-n-steps is not given


def plain_progress_interval(total_steps: int, lines: int = PLAIN_PROGRESS_LINES) -> int:
    """Steps between plain progress lines when none was asked for: about ``lines`` lines a run."""
    return max(1, math.ceil(total_steps / lines))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLogger:
    """Writes on the main rank only; every method is a no-op elsewhere."""

    def __init__(self, output_dir: str | Path, *, is_main: bool, report_to: str = "", total_steps: int = 0,
                 initial_step: int = 0, progress: bool = True, plain_every: int = 0, say=print,
                 wandb: dict | None = None):
        """``progress``: a tqdm bar (on stderr). ``plain_every``: a line ``step s/total (p%) loss ... samples/s ...
        elapsed ... left ...`` through ``say`` every that many steps (0: none). ``wandb``: ``wandb.init``'s
        project, notes, id, name and config, used when ``report_to`` names wandb (or all); the run files go to
        ``<output_dir>/wandb``, and WANDB_MODE=offline logs there without a network."""
        self.is_main = is_main
        self.path = Path(output_dir) / METRICS_FILE
        self._writer = None
        self._wandb = None
        self._bar = None
        self._say = say
        self._step, self._total, self._first_step = initial_step, total_steps, initial_step
        self._plain_every = plain_every
        self._started = time.perf_counter()
        if not is_main:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.superseded_path = Path(output_dir) / SUPERSEDED_FILE
        moved = self._set_aside_after(initial_step)
        if moved:
            say(f"{self.path.name}: {moved} line(s) of steps after {initial_step}, which this run trains again, "
                f"moved to {self.superseded_path}")
        self._handle = open(self.path, "a", encoding="utf-8")
        reporters = {item.strip() for item in report_to.split(",")}
        if reporters & {"tensorboard", "all"}:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if reporters & {"wandb", "all"}:
            import wandb as wandb_module

            options = dict(wandb or {})
            self._wandb = wandb_module.init(project=options.get("project"), notes=options.get("notes"),
                                            id=options.get("id"), name=options.get("name"),
                                            config=options.get("config"), dir=str(Path(output_dir)), resume="allow")
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
        scalars = {f"{kind}/{key}": value for key, value in record.items()
                   if isinstance(value, (int, float)) and key != "step"}
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def progress(self, steps: int, **postfix) -> None:
        """``steps`` more steps done; ``postfix`` (e.g. loss=..., samples_s=...) shown beside the count."""
        self._step += steps
        shown = {key: f"{value:.4g}" if isinstance(value, float) else value for key, value in postfix.items()}
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(shown, refresh=False)
        if self.is_main and self._plain_every and (self._step % self._plain_every == 0 or self._step == self._total):
            elapsed = time.perf_counter() - self._started
            done = self._step - self._first_step
            left = elapsed / done * (self._total - self._step) if done else 0.0
            percent = 100 * self._step / self._total if self._total else 100.0
            values = " ".join(f"{key.replace('samples_s', 'samples/s')} {value}" for key, value in shown.items())
            self._say(f"step {self._step}/{self._total} ({percent:.0f}%) {values} elapsed {_duration(elapsed)} "
                      f"left {_duration(left)}")

    def announce(self, message: str) -> None:
        """Print ``message`` on the main rank (above the bar when there is one)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            self._say(message)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
        self._handle.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
