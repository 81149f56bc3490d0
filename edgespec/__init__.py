"""edgespec: on-device LLM inference with exact speculative decoding on ONNX Runtime.

The runtime needs only numpy, onnxruntime, tokenizers and jinja2; torch is used by the exporter alone.
"""

__version__ = "0.1.0"

from .engine import Engine, GenerationResult, GenerationStats, load  # noqa: E402
from .runtimes.manifest import BundleError  # noqa: E402
from .runtimes.runner import ContextOverflow  # noqa: E402
from .sampling import GenerationConfig  # noqa: E402

__all__ = ["load", "Engine", "GenerationConfig", "GenerationResult", "GenerationStats", "BundleError",
           "ContextOverflow", "__version__"]
