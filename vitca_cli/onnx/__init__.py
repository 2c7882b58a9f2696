"""ONNX: the torch-free format, the step graph, the exporters, ONNX Runtime sessions and the backend."""
