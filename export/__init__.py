"""ONNX export, ONNX Runtime / TensorRT runtimes and parity checks (``deepgen_components.export``)."""
