"""edgespec.runtimes: load a bundle and run its ONNX graphs (numpy + onnxruntime only)."""
