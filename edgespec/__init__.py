"""edgespec: on-device LLM inference with exact speculative decoding on ONNX Runtime.

The runtime needs only numpy, onnxruntime, tokenizers and jinja2; torch is used by the exporter alone.

The public surface is what ``__all__`` lists (docs/api.md); every other module and name is internal and may change.

>>> import edgespec                                                     # doctest: +SKIP
>>> with edgespec.load("bundles/qwen2.5-coder-1.5b", device="auto") as engine:   # doctest: +SKIP
...     result = engine.generate("def fib(n):", max_new_tokens=64)
...     print(result.text, result.stats.mean_accepted_tokens)
"""

__version__ = "0.1.0"

from .devices.memory import MemoryBudgetError  # noqa: E402
from .devices.profile import DeviceProfile, ProfileError  # noqa: E402
from .chat import ChatTemplateError  # noqa: E402
from .drafters import Drafter, DraftTree, SpeculationConfig, VerifiedStep  # noqa: E402
from .engine import CancelFlag, Engine, GenerationResult, GenerationStats, TextStream, load  # noqa: E402
from .runtimes.manifest import BundleError  # noqa: E402
from .runtimes.runner import ContextOverflow  # noqa: E402
from .sampling import GenerationConfig  # noqa: E402

__all__ = [
    # load a bundle, generate
    "load", "Engine", "TextStream", "GenerationConfig", "SpeculationConfig", "GenerationResult", "GenerationStats",
    "CancelFlag", "DeviceProfile",
    # write your own drafter
    "Drafter", "DraftTree", "VerifiedStep",
    # errors
    "BundleError", "MemoryBudgetError", "ContextOverflow", "ProfileError", "ChatTemplateError",
    "__version__",
]
