"""Run logging: ``metrics.jsonl`` (one JSON object per optimizer step, plus ``"type": "eval"`` objects of the
in-training evaluation), TensorBoard (scalars, and the evaluation's images) and a progress bar.

``trainer.log_to`` chooses the sinks: ``jsonl`` is always written; ``tensorboard`` needs the optional
``tensorboard`` package (``pip install tensorboard``). Left unset, TensorBoard is used when it is importable.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

__all__ = ["MetricsLogger", "read_metrics", "tensorboard_available"]

logger = logging.getLogger(__name__)


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLogger:
    """Appends to ``DIR/metrics.jsonl``; on resume the lines after the resumed step are dropped first, so the
    file always holds exactly one line per completed step (and one per evaluation up to it). TensorBoard events
    of a resumed run from the resumed step on are purged (``SummaryWriter(purge_step=...)``).

    ``log_to``: the sinks (see the module docstring); None = jsonl, and tensorboard if ``tensorboard`` is true and
    the package is importable (the older ``tensorboard`` flag only matters then)."""

    def __init__(self, directory: str | Path, *, enabled: bool = True, resume_step: int = 0,
                 tensorboard: bool = True, total_steps: int | None = None, progress: bool = True,
                 log_to: list[str] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(directory) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if log_to is not None and "tensorboard" in log_to and not tensorboard_available():
            raise ImportError("trainer.log_to: tensorboard needs the tensorboard package (pip install tensorboard); "
                              "or log to [jsonl] only")
        use_tensorboard = "tensorboard" in log_to if log_to is not None else tensorboard and tensorboard_available()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(directory) / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)
        if progress and total_steps:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step, desc="train", dynamic_ncols=True)

    def _write(self, record: dict) -> dict:
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        return clean

    def _scalars(self, record: dict, prefix: str = "") -> None:
        for key, value in record.items():
            if key not in ("step", "type") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(prefix + key, value, record["step"])

    def log(self, metrics: dict) -> None:
        """One optimizer step's record (``step`` and its numbers)."""
        if not self.enabled:
            return
        clean = self._write(metrics)
        if self.writer is not None:
            self._scalars(clean)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in clean.items() if k in ("loss", "lr", "reward")})

    def log_eval(self, step: int, metrics: dict, images: list | None = None) -> None:
        """An evaluation at ``step``: a ``{"type": "eval", "step": ...}`` line, its numbers as ``eval/NAME`` scalars
        and its images (PIL, one size) as the ``eval/samples`` image batch."""
        if not self.enabled:
            return
        clean = self._write({"type": "eval", "step": step, **metrics})
        if self.writer is None:
            return
        self._scalars(clean, prefix="eval/")
        if images:
            import numpy as np
            import torch

            batch = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))  # (N, H, W, 3) uint8
            self.writer.add_images("eval/samples", batch.permute(0, 3, 1, 2), step)  # NCHW
        self.writer.flush()

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


def read_metrics(directory: str | Path, kind: str | None = "train") -> list[dict]:
    """The records of ``DIR/metrics.jsonl``: ``kind`` ``train`` (one per optimizer step), ``eval`` (the in-training
    evaluations) or None (all, in file order)."""
    path = Path(directory) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return rows if kind is None else [row for row in rows if row.get("type", "train") == kind]
