"""Fused GPU kernels for DeepGen's hot paths, with torch reference implementations.

Imported as ``deepgen_components.triton_kernels``. This package imports nothing else of ours.
"""
