"""deepgen-components: DeepGen 1.0 as reusable, fast components.

Public API (see README and docs/components.md):

* ``ThinkTokens``, ``ThinkTokenVLM``, ``VLMHiddenStates`` — learnable think tokens around a HF VLM / LLM;
* ``LayerSelection`` — which hidden states to stack;
* ``ConnectorConfig``, ``ConnectorEncoder`` — the SigLIP-style connector;
* ``BridgeConfig``, ``StackedChannelBridge``, ``BridgeOutput`` — Stacked Channel Bridging;
* ``ConditionedDiT`` — SD3 MMDiT with reference latents and padding masks;
* ``DeepGenModel``, ``DeepGenPipeline`` — the composed model and the generation / editing pipeline;
* builders ``deepgen_tiny()``, ``deepgen_small()``, ``deepgen_1_0()``, ``deepgen_from_official()``.

MR-GRPO lives in :mod:`deepgen_components.rl`, the shapes world in :mod:`deepgen_components.shapes`, ONNX /
TensorRT in :mod:`deepgen_components.export`, the recipes in :mod:`deepgen_components.training`, the ``deepgen``
command in :mod:`deepgen_components.cli`. docs/architecture.md draws the floors.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

# Public names resolve lazily (PEP 562): importing the package, or a torch-free part of it such as the ONNX
# Runtime pipeline (deepgen_components.export.onnx_pipeline), does not import torch, transformers or diffusers.
_EXPORTS = {
    "BridgeConfig": "bridge",
    "BridgeOutput": "bridge",
    "StackedChannelBridge": "bridge",
    "build_preset": "builders",
    "deepgen_1_0": "builders",
    "deepgen_from_official": "builders",
    "deepgen_small": "builders",
    "deepgen_tiny": "builders",
    "ConnectorConfig": "connector",
    "ConnectorEncoder": "connector",
    "ConditionedDiT": "dit",
    "MaskedJointAttnProcessor": "dit",
    "LayerSelection": "layer_selection",
    "DeepGenConfig": "model",
    "DeepGenModel": "model",
    "FlowMatchingOutput": "model",
    "DeepGenPipeline": "pipeline",
    "DeepGenPipelineOutput": "pipeline",
    "ThinkTokens": "think_tokens",
    "ThinkTokenVLM": "think_tokens",
    "VLMHiddenStates": "think_tokens",
}

# Names that moved in 0.2 (MR-GRPO to deepgen_components.rl, the shapes world to deepgen_components.shapes):
# still importable from the top level for one release, with a DeprecationWarning naming the new home.
_MOVED = {
    "cps_step": "rl",
    "flow_grpo_step": "rl",
    "MRGRPOLoss": "rl",
    "gdpo_advantages": "rl",
    "grpo_advantages": "rl",
    "rollout": "rl",
    "ShapesWorld": "shapes",
    "ShapesEval": "shapes",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from deepgen_components.bridge import BridgeConfig, BridgeOutput, StackedChannelBridge
    from deepgen_components.builders import (
        build_preset,
        deepgen_1_0,
        deepgen_from_official,
        deepgen_small,
        deepgen_tiny,
    )
    from deepgen_components.connector import ConnectorConfig, ConnectorEncoder
    from deepgen_components.dit import ConditionedDiT, MaskedJointAttnProcessor
    from deepgen_components.layer_selection import LayerSelection
    from deepgen_components.model import DeepGenConfig, DeepGenModel, FlowMatchingOutput
    from deepgen_components.pipeline import DeepGenPipeline, DeepGenPipelineOutput
    from deepgen_components.think_tokens import ThinkTokens, ThinkTokenVLM, VLMHiddenStates


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None and name in _MOVED:
        new = f"deepgen_components.{_MOVED[name]}"
        warnings.warn(
            f"deepgen_components.{name} moved to {new}.{name}; the top-level name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), name)
    if module is None:
        raise AttributeError(f"module 'deepgen_components' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deepgen_components.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})  # the moved names are left out: they are on their way out


__version__ = "0.1.0"

__all__ = [
    "build_preset",
    "deepgen_1_0",
    "deepgen_from_official",
    "deepgen_small",
    "deepgen_tiny",
    "DeepGenConfig",
    "DeepGenModel",
    "DeepGenPipeline",
    "DeepGenPipelineOutput",
    "FlowMatchingOutput",
    "BridgeConfig",
    "BridgeOutput",
    "ConditionedDiT",
    "ConnectorConfig",
    "ConnectorEncoder",
    "LayerSelection",
    "MaskedJointAttnProcessor",
    "StackedChannelBridge",
    "ThinkTokenVLM",
    "ThinkTokens",
    "VLMHiddenStates",
]
