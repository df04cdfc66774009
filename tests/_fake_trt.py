"""Test helper: the fake ``tensorrt`` module (tests/fake_tensorrt) in place of the real one, for one test.

``trt = install(monkeypatch, version="10.14.1")`` puts tests/fake_tensorrt first on ``sys.path``, drops any cached
``tensorrt`` modules, imports the fake afresh (fresh state: its ``fake_log`` is empty) at the emulated version and
returns it; ``import tensorrt`` anywhere (the library's ``_tensorrt()`` included) then gets the fake. At teardown the
monkeypatch puts ``sys.path`` and ``sys.modules`` back as they were. What the fake proves and what it cannot:
tests/fake_tensorrt/README.md.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

FAKE_ROOT = Path(__file__).resolve().parent / "fake_tensorrt"
_PACKAGE = FAKE_ROOT / "tensorrt"


def install(monkeypatch, version: str = "10.15.1"):
    """Import and return the fake ``tensorrt`` emulating ``version`` ("major.minor.patch", e.g. "11.4.0")."""
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise ValueError(f"version must look like '10.15.1' (major.minor.patch), got {version!r}")
    names = ["tensorrt"] + [f"tensorrt.{p.stem}" for p in _PACKAGE.glob("*.py") if p.stem != "__init__"]
    names += [name for name in sys.modules if name.startswith("tensorrt.") and name not in names]
    for name in names:
        # Record the current state (absent, or a real tensorrt) for teardown, then clear the entry for the import.
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(FAKE_ROOT))
    module = importlib.import_module("tensorrt")
    if Path(module.__file__).resolve().parent != _PACKAGE:
        raise RuntimeError(f"imported {module.__file__} instead of the fake tensorrt in {_PACKAGE}")
    monkeypatch.setattr(module, "__version__", version)
    return module
