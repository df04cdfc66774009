"""The reward protocol, the shared image-batch converter and the reward registry.

Every MR-GRPO reward takes a batch of generated images plus their prompts and returns one float32 score per
image (reference §4: "every reward function is evaluated on every image"; the per-category weights enter only
the advantage computation, see :mod:`deepgen_components.rl.rewards.weights`).

The registry maps names to factories so that a training config can say ``rewards: [clip, ocr, judge]`` and so
that other modules can add rewards later (``register_reward("shapes", ShapesReward)``: the shapes world does so when
``deepgen_components.shapes`` is imported).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

__all__ = [
    "ImageBatch",
    "Reward",
    "RewardFactory",
    "available_rewards",
    "build_reward",
    "check_batch",
    "register_reward",
    "to_pil_list",
]

ImageBatch = Sequence[Image.Image] | np.ndarray | torch.Tensor
"""What a reward's ``score`` accepts: PIL images, a uint8 array (N, H, W, 3) or a float tensor (N, 3, H, W)."""


@runtime_checkable
class Reward(Protocol):
    """A reward model: ``score(images, prompts)`` gives one float32 score per image.

    ``name`` is the key under which the reward's weight is looked up in the per-category weight table
    (``"clip"``, ``"ocr"``, ``"judge"`` for the built-in rewards).
    """

    name: str

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        """Score N images against their N prompts; returns a float32 CPU tensor of shape (N,)."""
        ...


def to_pil_list(images: ImageBatch) -> list[Image.Image]:
    """Convert an image batch to a list of RGB PIL images.

    Accepted inputs:

    * a list/tuple of PIL images (any mode; converted to RGB);
    * a single PIL image (a batch of one);
    * a uint8 array or tensor of shape (N, H, W, 3) (or (N, H, W) for grey images);
    * a float tensor or array of shape (N, 3, H, W) in [-1, 1], the VAE output range. It is mapped to uint8
      the way the rollout decodes images (reference §3 "Decode"): ``clamp(127.5·x + 128, 0, 255)`` truncated,
      i.e. ``round(127.5·x + 127.5)``.

    Anything else raises a ``TypeError`` / ``ValueError`` naming the argument.
    """
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        if images.dtype == torch.uint8:
            return _uint8_hwc_to_pil(images.numpy())
        if not images.is_floating_point():
            raise TypeError(
                f"images: a tensor must be uint8 (N,H,W,3) or floating (N,3,H,W), got {images.dtype}"
            )
        return _float_chw_to_pil(images.float())
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return _uint8_hwc_to_pil(images)
        if np.issubdtype(images.dtype, np.floating):
            return _float_chw_to_pil(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        raise TypeError(f"images: an array must be uint8 (N,H,W,3) or floating (N,3,H,W), got {images.dtype}")
    if isinstance(images, (list, tuple)):
        out = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}]: expected a PIL.Image.Image, got {type(im).__name__}")
            out.append(im if im.mode == "RGB" else im.convert("RGB"))
        return out
    raise TypeError(
        "images: expected a list of PIL images, a uint8 array (N,H,W,3) or a float tensor (N,3,H,W); "
        f"got {type(images).__name__}"
    )


def _uint8_hwc_to_pil(arr: np.ndarray) -> list[Image.Image]:
    if arr.ndim == 3:  # (N, H, W) grey
        return [Image.fromarray(np.ascontiguousarray(a)).convert("RGB") for a in arr]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images: a uint8 batch must have shape (N, H, W, 3), got {tuple(arr.shape)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return [Image.fromarray(np.ascontiguousarray(a)).convert("RGB") for a in arr]


def _float_chw_to_pil(x: torch.Tensor) -> list[Image.Image]:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"images: a float batch must have shape (N, 3, H, W) in [-1, 1], got {tuple(x.shape)}"
        )
    u8 = (x * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a) for a in u8]


def check_batch(images: ImageBatch, prompts: Sequence[str]) -> tuple[list[Image.Image], list[str]]:
    """Convert ``images`` with :func:`to_pil_list` and check that there is one prompt string per image."""
    if isinstance(prompts, str):
        raise TypeError("prompts: expected a list of strings (one per image), got a single str")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}]: expected str, got {type(p).__name__}")
    pil = to_pil_list(images)
    if len(pil) != len(prompts):
        raise ValueError(
            f"got {len(pil)} images but {len(prompts)} prompts; score() needs one prompt per image"
        )
    return pil, prompts


# --------------------------------------------------------------------------------------------- registry

RewardFactory = Callable[..., Reward]

_REGISTRY: dict[str, RewardFactory] = {}
_REGISTRY_LOCK = threading.Lock()


def register_reward(
    name: str, factory: RewardFactory | None = None, *, overwrite: bool = False
) -> RewardFactory | Callable[[RewardFactory], RewardFactory]:
    """Register ``factory`` (a class or function returning a :class:`Reward`) under ``name``.

    ``register_reward("shapes", ShapesReward)`` registers directly; without ``factory`` it returns a
    decorator. Re-registering an existing name raises ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_reward: name must be a non-empty str, got {name!r}")

    def _register(f: RewardFactory) -> RewardFactory:
        if not callable(f):
            raise TypeError(f"register_reward({name!r}): factory must be callable, got {type(f).__name__}")
        with _REGISTRY_LOCK:
            if name in _REGISTRY and not overwrite and _REGISTRY[name] is not f:
                raise ValueError(
                    f"register_reward: a reward named {name!r} is already registered; pass overwrite=True"
                )
            _REGISTRY[name] = f
        return f

    return _register if factory is None else _register(factory)


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    with _REGISTRY_LOCK:
        return sorted(_REGISTRY)


def build_reward(name_or_spec: str | Mapping[str, Any], *, argument: str = "build_reward") -> Reward:
    """Build a registered reward from its name or from a spec dict.

    * ``build_reward("ocr")`` calls the factory without arguments;
    * ``build_reward({"name": "clip", "model_path": "/models/clip-vit-large-patch14"})`` passes every other key
      as a keyword argument to the factory.

    Unknown names raise ``ValueError`` naming ``argument`` (e.g. the config key) and listing the registered ones; a
    factory that rejects the arguments raises ``TypeError`` naming the reward and the spec.
    """
    if isinstance(name_or_spec, str):
        name, kwargs = name_or_spec, {}
    elif isinstance(name_or_spec, Mapping):
        if "name" not in name_or_spec:
            raise ValueError(f"build_reward: a spec dict needs a 'name' key, got keys {sorted(name_or_spec)}")
        kwargs = {k: v for k, v in name_or_spec.items() if k != "name"}
        name = name_or_spec["name"]
    else:
        raise TypeError(
            f"build_reward: expected a reward name or a spec dict, got {type(name_or_spec).__name__}"
        )
    with _REGISTRY_LOCK:
        factory = _REGISTRY.get(name)
        known = sorted(_REGISTRY)
    if factory is None:
        raise ValueError(f"{argument}: unknown reward {name!r}; registered rewards: {known} (the shapes world "
                         "registers its kinds when deepgen_components.shapes is imported)")
    try:
        reward = factory(**kwargs)
    except TypeError as e:
        raise TypeError(f"build_reward: could not build reward {name!r} from {dict(kwargs)!r}: {e}") from e
    return reward
