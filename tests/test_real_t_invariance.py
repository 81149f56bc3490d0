"""T-invariance on the four real models at the default export (int8 activations): a chain of T = 2..16 tokens
scored in one forward gives bitwise the logits and K/V of decoding it one token at a time, at a short and a long
context (past Gemma 3's 512-token sliding window). This is what keeps speculative output identical to plain output
on the fast kernels."""

from __future__ import annotations

import pytest

from edgespec.runtimes.manifest import load_manifest
from edgespec.runtimes.runner import ModelRunner

from test_t_invariance import chain_mismatches

pytestmark = pytest.mark.real

TEXT = ("def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]\n"
        "    left = [x for x in items[1:] if x < pivot]\n    right = [x for x in items[1:] if x >= pivot]\n"
        "    return quicksort(left) + [pivot] + quicksort(right)\n\n"
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. ") * 12


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m", "qwen2.5-coder-1.5b"])
def test_real_chain_forward_equals_single_steps_bitwise(name, real_bundles):
    # the 1.5B is exported for this test alone: its parity figures are measured by the benchmarks, not here
    bundle = real_bundles(name, parity=name != "qwen2.5-coder-1.5b")
    entry = load_manifest(bundle).target_model
    assert entry.quantization["accuracy_level"] == 4 and entry.quantization["t_invariant"] is True
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(entry.tokenizer_path)).encode(TEXT).ids
    assert len(ids) > 560
    runner = ModelRunner(entry, threads=2, max_context=1024)
    for context in (40, 540):
        assert chain_mismatches(runner, ids[:context], ids[context:context + 16]) == {}, (name, context)
