"""peft LoRA helpers shared by the pipeline (saving) and the training recipes."""

from __future__ import annotations

from torch import nn

__all__ = ["lora_module_names", "merge_lora"]


def lora_module_names(module: nn.Module) -> list[str]:
    """Names of the peft LoRA (tuner) layers inside ``module``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(module: nn.Module) -> int:
    """Merge every peft LoRA layer of ``module`` into its base weight and put the plain layer back (in place);
    returns how many were merged."""
    names = lora_module_names(module)
    for name in names:
        layer = module.get_submodule(name)
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    return len(names)
