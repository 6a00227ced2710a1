"""Rank-0 metrics: ``metrics.jsonl`` (one object per logged step), tensorboard, a tqdm progress bar."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLogger:
    """Writes on the main rank only; every method is a no-op elsewhere."""

    def __init__(self, output_dir: str | Path, *, is_main: bool, report_to: str = "", total_steps: int = 0,
                 initial_step: int = 0, progress: bool = True):
        self.is_main = is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self._writer = None
        self._bar = None
        if not is_main:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._truncate_after(initial_step)
        self._handle = open(self.path, "a", encoding="utf-8")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             desc="train")

    def _truncate_after(self, step: int) -> None:
        """On resume from ``step``, drop lines of later steps: the resumed run redoes them (atomic rewrite)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if record.get("step", -1) <= step:
                kept.append(line)
        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".metrics.")
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in kept))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

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
