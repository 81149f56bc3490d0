"""edgespec: on-device LLM inference with exact speculative decoding on ONNX Runtime.

The runtime needs only numpy, onnxruntime, tokenizers and jinja2; torch is used by the exporter alone.
"""

__version__ = "0.1.0"
