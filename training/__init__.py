"""Training recipes for the three DeepGen stages (``deepgen_components.training``)."""
