"""Named factories: the seams where a world plugs into the generic trainer (data sources, RL prompt sources,
stage-1 teachers) without the trainer importing it.

A registry maps a kind (the ``kind:`` of a config entry) to a factory. The trainer looks a kind up when it builds
the run; the shapes world registers its kinds when ``deepgen_components.shapes`` is imported (the ``deepgen``
command imports it), so a script that builds a shapes run without the command imports that package first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

__all__ = ["REGISTRATION_HINT", "Registry", "check_options"]

REGISTRATION_HINT = "the shapes world registers its kinds when deepgen_components.shapes is imported"

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Kind -> factory, for one kind of thing (``what``: "source kind", "teacher kind", ...)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._factories: dict[str, F] = {}
        self._lock = threading.Lock()

    def register(self, kind: str, factory: F, *, overwrite: bool = False) -> F:
        """Register ``factory`` under ``kind``; registering the same factory again is a no-op, another one under a
        taken kind needs ``overwrite=True``."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"register: a {self.what} must be a non-empty str, got {kind!r}")
        if not callable(factory):
            raise TypeError(f"register({kind!r}): the factory must be callable, got {type(factory).__name__}")
        with self._lock:
            if kind in self._factories and self._factories[kind] is not factory and not overwrite:
                raise ValueError(f"register: {self.what} {kind!r} is already registered; pass overwrite=True")
            self._factories[kind] = factory
        return factory

    def kinds(self) -> list[str]:
        """The registered kinds, sorted."""
        with self._lock:
            return sorted(self._factories)

    def lookup(self, kind: str, argument: str) -> F:
        """The factory of ``kind``; an unknown kind is a ValueError naming ``argument`` (the config key) and the
        known kinds."""
        with self._lock:
            factory = self._factories.get(kind)
        if factory is None:
            known = ", ".join(self.kinds()) or "none"
            raise ValueError(f"{argument}: unknown {self.what} {kind!r}; known: {known} ({REGISTRATION_HINT})")
        return factory


def check_options(argument: str, options: Mapping, accepted: Sequence[str], required: Sequence[str] = ()) -> None:
    """The kind-specific ``options`` of a config entry hold only ``accepted`` keys and every ``required`` one; the
    error names ``argument`` (e.g. ``data.sources[edit].options``)."""
    if not isinstance(options, Mapping):
        raise ValueError(f"{argument}: expected a mapping, got {options!r}")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{argument}: unknown keys {unknown}; accepted: {', '.join(accepted) or 'none'}")
    missing = [key for key in required if key not in options]
    if missing:
        raise ValueError(f"{argument}: missing {', '.join(repr(k) for k in missing)}")
