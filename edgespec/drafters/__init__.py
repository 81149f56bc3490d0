"""Drafters: what proposes the token trees the target verifies.

| module        | holds                                                                                       |
|---------------|---------------------------------------------------------------------------------------------|
| `base`        | the contract: `Drafter`, `DraftTree`, `VerifiedStep` (and `fast_top_k`)                     |
| `config`      | `SpeculationConfig`, the one carrier of speculation settings, and their defaults            |
| `factory`     | drafter specs ("ngram", "draft", "self", "cross", staged "a>b") -> drafters (`make_drafter`) |
| `costs`       | the acceptance and cost models the model drafters share                                     |
| `cachefile`   | the one versioned `.npz` cache-file format (n-gram and cross-vocabulary caches)             |
| `ngram_table` | the n-gram table and its array form                                                         |
| `ngram`       | `NGramDrafter` and its tiers                                                                |
| `ngram_static`| the static-cache builder (`edgespec ngram build`)                                           |
| `model`       | `ModelDrafter` (drafter models, staged and self-speculation) and `LayerSearch`              |
| `crossvocab`  | `CrossVocabDrafter` (a drafter model with another tokenizer)                                |
"""

from .base import Drafter, DraftTree, VerifiedStep, fast_top_k
from .config import DEFAULT_DRAFT_BUDGET, SpeculationConfig
from .crossvocab import CrossVocabDrafter
from .factory import DrafterContext, make_drafter
from .model import ModelDrafter
from .ngram import NGramDrafter

__all__ = ["Drafter", "DraftTree", "VerifiedStep", "fast_top_k", "SpeculationConfig", "DEFAULT_DRAFT_BUDGET",
           "DrafterContext", "make_drafter", "NGramDrafter", "ModelDrafter", "CrossVocabDrafter"]
