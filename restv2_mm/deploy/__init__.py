"""Taking ResTv2 models out of PyTorch: ONNX export with dynamic sizes (``onnx``)."""
