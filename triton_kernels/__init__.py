"""Fused GPU kernels for DeepGen's hot paths, with torch reference implementations.

Imported as ``deepgen_components.triton_kernels``. This package imports nothing else of ours.

Ops (each takes ``backend="auto" | "triton" | "torch"``):

* :func:`stack_project` — ``F.linear(torch.cat(hidden_states, -1), weight, bias)`` without the concat (SCB bridge);
* :func:`attention` — bidirectional attention with a key-padding mask (connector, DiT);
* :func:`rms_norm` — diffusers-exact RMSNorm (MMDiT qk-norm);
* :func:`layer_norm_modulate` — SD3 adaLN ``LayerNorm(x) * (1 + scale) + shift``.

``backend="auto"`` runs the Triton kernel on CUDA tensors when Triton imports, and the torch reference on CPU,
without Triton and while exporting (``torch.onnx.export`` / ``torch.export``). The Triton paths are registered as
``torch.library`` custom ops in the ``deepgen`` namespace (``torch.ops.deepgen.*``) with fake implementations
and autograd, so ``torch.compile(fullgraph=True)`` traces through them.

Model code asks :func:`kernels_enabled` whether to call these ops (switch: :func:`use_kernels`,
:func:`set_kernels_enabled`, or ``DEEPGEN_TRITON_KERNELS=1``).
"""

from deepgen_components.triton_kernels._common import (
    INTERPRET,
    kernels_enabled,
    set_kernels_enabled,
    triton_available,
    use_kernels,
)
from deepgen_components.triton_kernels.attention import SUPPORTED_HEAD_DIMS, attention, attention_reference
from deepgen_components.triton_kernels.norms import (
    layer_norm_modulate,
    layer_norm_modulate_reference,
    rms_norm,
    rms_norm_reference,
)
from deepgen_components.triton_kernels.stack_project import stack_project, stack_project_reference

__all__ = [
    "INTERPRET",
    "SUPPORTED_HEAD_DIMS",
    "attention",
    "attention_reference",
    "kernels_enabled",
    "layer_norm_modulate",
    "layer_norm_modulate_reference",
    "rms_norm",
    "rms_norm_reference",
    "set_kernels_enabled",
    "stack_project",
    "stack_project_reference",
    "triton_available",
    "use_kernels",
]
