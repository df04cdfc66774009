"""Run logging: ``metrics.jsonl`` (one JSON object per optimizer step), TensorBoard if installed, a progress bar."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

__all__ = ["MetricsLogger", "read_metrics"]

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Appends to ``DIR/metrics.jsonl``; on resume the lines after the resumed step are dropped first, so the
    file always holds exactly one line per completed step."""

    def __init__(self, directory: str | Path, *, enabled: bool = True, resume_step: int = 0,
                 tensorboard: bool = True, total_steps: int | None = None, progress: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(directory) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(directory) / "tensorboard"))
            except ImportError:
                self.writer = None
        if progress and total_steps:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step, desc="train", dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, clean["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in clean.items() if k in ("loss", "lr", "reward")})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _step(line: str) -> float:
    """The step of a metrics line; a blank or torn line (a run killed mid-write) counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_metrics(directory: str | Path) -> list[dict]:
    path = Path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
