"""DeepGenPipeline (deepgen-components), for diffusers' DiffusionPipeline.from_pretrained."""
from deepgen_components.pipeline import DeepGenPipeline  # noqa: F401
