"""The stage-1 teacher hook (not in DeepGen's recipe): a frozen model that guides the bridge while it learns.

A teacher gives one or both of: a velocity that replaces the flow-matching target eps - x0 (``target``;
``DeepGenModel.flow_matching_loss`` calls it as ``batch["teacher"]``), and a loss on the bridge's output
(``feature_weight`` > 0; :class:`~deepgen_components.training.trainer.FlowMatchingObjective` adds
``feature_weight * feature_loss(...)``). The config's ``teacher:`` section names a registered kind and its
options; the shapes world registers ``prompt_encoder`` (its base DiT under its own prompt encoder) when
``deepgen_components.shapes`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from deepgen_components.training.config import TeacherConfig
from deepgen_components.training.registry import Registry

__all__ = ["Teacher", "TeacherFactory", "available_teachers", "build_teacher", "register_teacher"]


@runtime_checkable
class Teacher(Protocol):
    target: bool  # its velocity replaces the flow-matching target
    feature_weight: float  # weight of feature_loss (0 = off)

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str],
                 reference_latents=None) -> torch.Tensor:
        """The teacher's velocity at the noisy latents for the raw prompts ("" = its null condition)."""

    def feature_loss(self, condition, input_ids: torch.Tensor, prompts: list[str], whole: bool = False
                     ) -> torch.Tensor:
        """A loss on the bridge's output ``condition`` (``whole``: without DeepGen's loss beside it)."""

    def to(self, device) -> Teacher: ...


TeacherFactory = Callable[[TeacherConfig], Teacher]  # the config's teacher section -> a teacher (on the CPU)
_TEACHERS: Registry[TeacherFactory] = Registry("teacher kind")


def register_teacher(kind: str, factory: TeacherFactory, *, overwrite: bool = False) -> TeacherFactory:
    """Make ``teacher: {kind: KIND, ...}`` usable: ``factory(section)`` builds the teacher from the config's
    :class:`TeacherConfig` (``target``, ``features`` and the kind's own ``options``)."""
    return _TEACHERS.register(kind, factory, overwrite=overwrite)


def available_teachers() -> list[str]:
    """The registered teacher kinds, sorted."""
    return _TEACHERS.kinds()


def build_teacher(spec: TeacherConfig, device: torch.device | str | None = None) -> Teacher:
    """The teacher of the config's ``teacher:`` section, frozen, on ``device``."""
    teacher = _TEACHERS.lookup(spec.kind, "teacher.kind")(spec)
    return teacher.to(device) if device is not None else teacher
