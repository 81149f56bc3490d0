"""Speculative decoding on the real models: greedy output with the n-gram drafter (and with garbage drafts) equals
plain greedy output token for token, including where stop strings and EOS fall inside accepted runs."""

from __future__ import annotations

import pytest

import edgespec.engine
from spec_helpers import RandomDrafter, assert_exact_or_near_tie

pytestmark = pytest.mark.real

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
PROMPTS = (
    # copying-heavy prompts (where n-gram drafts are accepted) and free-form ones
    "Repeat this sentence exactly three times: The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "# The same function with memoisation:\n",
    "Summarize: The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after Gustave "
    "Eiffel, whose company designed and built the tower from 1887 to 1889. The Eiffel Tower is 330 metres tall.",
    "List the numbers from 1 to 20, separated by commas:",
)


@pytest.fixture(scope="module")
def engines(real_bundles, tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            bundle = real_bundles(name)
            plain = edgespec.engine.load(bundle, threads=2, max_context=1024, drafter=None)
            spec = edgespec.engine.load(bundle, threads=2, max_context=1024, drafter="ngram",
                                        ngram_cache=tmp_path_factory.mktemp("ngram") / f"{name}.esng")
            cache[name] = plain, spec
        return cache[name]

    return get


def _chat_ids(engine, prompt: str) -> list[int]:
    return engine.encode(engine.render_chat([{"role": "user", "content": prompt}]))


@pytest.mark.parametrize("name", MODELS)
def test_ngram_greedy_equals_plain(name, engines):
    plain, spec = engines(name)
    accepted = 0
    for prompt in PROMPTS:
        ids = _chat_ids(plain, prompt)
        want = plain.generate(ids, max_new_tokens=64, ignore_eos=True)
        got = spec.generate(ids, max_new_tokens=64, ignore_eos=True)
        assert_exact_or_near_tie(plain.entry, ids, want.token_ids, got.token_ids, f"{name} {prompt[:30]!r}")
        accepted += got.stats.accepted_tokens
        assert got.stats.drafter == "ngram"
    assert accepted > 20, "the n-gram drafter should get copy-heavy prompts accepted"


@pytest.mark.parametrize("name", MODELS)
def test_stop_string_and_eos_inside_accepted_runs(name, engines):
    """With natural EOS (chat answers that end) and with a stop string taken from the middle of the plain answer,
    speculative output has the same text, ids and finish reason."""
    plain, spec = engines(name)
    for prompt in PROMPTS:
        ids = _chat_ids(plain, prompt)
        want = plain.generate(ids, max_new_tokens=96)
        got = spec.generate(ids, max_new_tokens=96)
        if got.token_ids != want.token_ids:
            assert_exact_or_near_tie(plain.entry, ids, want.token_ids, got.token_ids, f"{name} eos")
            continue
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
        text = want.text
        stop = text[len(text) // 2: len(text) // 2 + 4]
        if len(stop.strip()) < 2:
            continue
        want = plain.generate(ids, max_new_tokens=96, stop=[stop])
        got = spec.generate(ids, max_new_tokens=96, stop=[stop])
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
        assert want.finish_reason == "stop"


def test_garbage_drafts_stay_exact_on_a_real_model(engines, real_bundles):
    plain, _ = engines("smollm2-135m")
    spec = edgespec.engine.load(real_bundles("smollm2-135m"), threads=2, max_context=1024,
                                drafter=RandomDrafter(plain.entry.vocab_size, shape="random", seed=5), draft_budget=6)
    for prompt in PROMPTS[:2]:
        ids = _chat_ids(plain, prompt)
        want = plain.generate(ids, max_new_tokens=32, ignore_eos=True).token_ids
        got = spec.generate(ids, max_new_tokens=32, ignore_eos=True)
        assert_exact_or_near_tie(plain.entry, ids, want, got.token_ids, "smollm2 garbage")
        assert got.stats.drafted_tokens >= 6 * 20


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    """Qwen2.5-Coder-0.5B exported self-speculative, with itself as a drafter on the fast kernels (int8
    activations: real rounding differences, so the drafter is good but not perfect)."""
    from edgespec.export.bundle import ModelRequest, export_bundle

    bundle = export_bundle("qwen2.5-coder-0.5b", tmp_path_factory.mktemp("pair") / "qwen-pair", log=print,
                           drafters=[ModelRequest("qwen2.5-coder-0.5b", "drafter", name="qwen-0.5b-fast")],
                           self_speculative=True).bundle
    return bundle, edgespec.engine.load(bundle, threads=2, max_context=1024, drafter=None)


@pytest.mark.parametrize("spec", ["draft", "ngram>draft", "self", "self:skip=6-8"])
def test_model_drafters_greedy_equal_plain(spec, qwen_pair):
    """The drafter model, the staged n-gram -> drafter composition and self-speculation leave greedy output
    unchanged on the real model."""
    bundle, plain = qwen_pair
    engine = edgespec.engine.load(bundle, threads=2, max_context=1024, drafter=spec, ngram_cache=False)
    if spec.endswith("draft"):
        # at the int8-activation default the target costs what its fast copy costs: drafting rarely pays on this
        # CPU, so judge acceptance with drafting on regardless of timing
        engine.drafter.target_cost = None
    steps = tokens = 0
    for prompt in PROMPTS[1:3]:
        ids = _chat_ids(plain, prompt)
        want = plain.generate(ids, max_new_tokens=48, ignore_eos=True)
        got = engine.generate(ids, max_new_tokens=48, ignore_eos=True)
        assert_exact_or_near_tie(plain.entry, ids, want.token_ids, got.token_ids, f"{spec} {prompt[:30]!r}")
        steps += got.stats.steps
        tokens += got.stats.new_tokens
    if spec.endswith("draft"):
        assert tokens / steps > 2.0, "the fast-kernel copy of the target should get long runs accepted"
    assert engine.drafter.counters["forwards"] > 0


@pytest.fixture(scope="module")
def cross_pairs(tmp_path_factory):
    """SmolLM2-135M (49k vocabulary) as the cross-vocabulary drafter of Qwen2.5-Coder-0.5B (152k) and of Gemma 3
    270M (262k, SentencePiece with byte fallback)."""
    from edgespec.export.bundle import ModelRequest, export_bundle

    root = tmp_path_factory.mktemp("cross")
    out = {}
    for target in ("qwen2.5-coder-0.5b", "gemma3-270m"):
        bundle = export_bundle(target, root / target, log=print, parity=False,
                               drafters=[ModelRequest("smollm2-135m", "drafter")]).bundle
        out[target] = bundle, edgespec.engine.load(bundle, threads=2, max_context=1024, drafter=None)
    return out


@pytest.mark.parametrize("target,spec", [("qwen2.5-coder-0.5b", "cross"), ("qwen2.5-coder-0.5b", "ngram>cross"),
                                         ("gemma3-270m", "cross")])
def test_cross_vocabulary_drafter_greedy_equals_plain(target, spec, cross_pairs):
    """A drafter with another tokenizer leaves greedy output unchanged on real models, gets drafts accepted, and
    learns mappings between the vocabularies."""
    bundle, plain = cross_pairs[target]
    # judge translation, not this machine's timing: a fixed chain shape (the engine's timed cut shortened chains
    # under load) and no cost-based stop in the drafter
    engine = edgespec.engine.load(bundle, threads=2, max_context=1024, drafter=spec, ngram_cache=False,
                                  tree="chain:16")
    engine.drafter.target_cost = None
    for prompt in PROMPTS[1:4]:
        ids = _chat_ids(plain, prompt)
        want = plain.generate(ids, max_new_tokens=40, ignore_eos=True)
        got = engine.generate(ids, max_new_tokens=40, ignore_eos=True)
        assert_exact_or_near_tie(plain.entry, ids, want.token_ids, got.token_ids, f"{spec} {prompt[:30]!r}")
    stats = engine.drafter.stats()
    assert stats["accepted"] > 0.2 * stats["nodes"] > 5, stats  # long chains here: no cost-based stop
    assert stats["cache"]["direct"] > 10, stats["cache"]


@pytest.mark.parametrize("target", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_cross_vocabulary_sampling_equals_plain_sampling(target, cross_pairs):
    """Sampling with a cross-vocabulary drafter draws the target's token at every position from the same random
    stream as plain sampling (the translated draft is a deterministic proposal), so for one seed the output is the
    plain sampled output, token for token."""
    bundle, plain = cross_pairs[target]
    engine = edgespec.engine.load(bundle, threads=2, max_context=1024, drafter="cross", ngram_cache=False)
    engine.drafter.target_cost = None
    options = dict(max_new_tokens=40, ignore_eos=True, temperature=0.8, top_p=0.95)
    for seed, prompt in enumerate(PROMPTS[1:3]):
        ids = _chat_ids(plain, prompt)
        want = plain.generate(ids, seed=seed, **options).token_ids
        got = engine.generate(ids, seed=seed, **options).token_ids
        assert got == want, f"{target} seed {seed}"
    assert engine.drafter.counters["accepted"] > 0
