"""edgespec.export: turn GGUF files or Hugging Face folders into an edgespec bundle (ONNX graphs + manifest).

Needs the `export` extra (gguf, onnx, torch CPU, transformers). The runtime never imports this package.
"""
