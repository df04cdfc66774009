"""deepgen-components: DeepGen 1.0 as reusable, fast components.

Public API (see README and docs/components.md):

* ``ThinkTokens``, ``ThinkTokenVLM``, ``VLMHiddenStates`` — learnable think tokens around a HF VLM / LLM;
* ``LayerSelection`` — which hidden states to stack;
* ``ConnectorConfig``, ``ConnectorEncoder`` — the SigLIP-style connector;
* ``BridgeConfig``, ``StackedChannelBridge``, ``BridgeOutput`` — Stacked Channel Bridging;
* ``ConditionedDiT`` — SD3 MMDiT with reference latents and padding masks;
* ``DeepGenModel``, ``DeepGenPipeline`` — the composed model and the generation / editing pipeline;
* builders ``deepgen_tiny()``, ``deepgen_small()``, ``deepgen_1_0()``, ``deepgen_from_official()``.
"""

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
from deepgen_components.layers import LayerSelection
from deepgen_components.model import DeepGenConfig, DeepGenModel, FlowMatchingOutput
from deepgen_components.pipeline import DeepGenPipeline, DeepGenPipelineOutput
from deepgen_components.think_tokens import ThinkTokens, ThinkTokenVLM, VLMHiddenStates

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
