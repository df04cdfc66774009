"""JSON Lines files of objects — training manifests, benchmark prompt sets, RL prompt pools — read one way, with
errors that name the file and the line. Torch-free (floor 0, docs/architecture.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_objects"]


def read_objects(
    path: str | os.PathLike, *, argument: str = "", error: type[Exception] = ValueError
) -> list[tuple[int, str, dict]]:
    """``(line number, line, object)`` for every non-blank line of ``path`` (numbers from 1, the line without its
    newline). A line that is not JSON, or not a JSON object, raises ``error`` with ``"ARGUMENT PATH:N: ..."``
    (``argument``: the flag or config key the file came from, e.g. ``"--prompts"``; empty for none)."""
    path = Path(path)
    where = f"{argument} {path}" if argument else str(path)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{where}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, line, row))
    return rows
