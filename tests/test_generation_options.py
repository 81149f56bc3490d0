"""Generation options (issue 20): repetition_penalty, min_p and min_new_tokens on the plain and the speculative
paths (greedy output token for token the same with every drafter kind, sampled output distributed as the target's
processed distribution, checked against transformers' own logits processors), their bounds, the CLI flags,
`generation_config=` (a transformers GenerationConfig, a dict, an object) and the refusal of a batch of prompts."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from edgespec import cli
from edgespec import engine as engine_module
from edgespec.engine import load
from edgespec.runtimes.runner import ModelRunner
from edgespec.sampling import (MAX_REPETITION_PENALTY, GenerationConfig, HistoryRules, apply_repetition_penalty,
                               generation_options, process_logits, sample)
from edgespec.verify import apply_history_rules, node_paths
from edgespec.drafters.base import DraftTree

from spec_helpers import ModelSampleDrafter, OracleDrafter, RandomDrafter

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")

PROMPTS = ("The quick brown fox jumps over", "def add(a, b):\n    return")
TOKENS = 40
PENALTIES = (1.3, 0.8, MAX_REPETITION_PENALTY)


# ---- references: transformers' own processors ---------------------------------------------------------------------
def hf_scores(logits: np.ndarray, history: list[int], penalty: float = 1.0, min_new: int = 0, new: int = 0,
              eos: tuple[int, ...] = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              min_p: float = 0.0) -> np.ndarray:
    """transformers' processing of one row of logits after `history` (prompt + `new` generated tokens): repetition
    penalty, min-new-tokens EOS mask, then temperature, top-k, top-p and min-p; probabilities (or the processed
    scores under greedy, temperature 0)."""
    lp = logits_process
    ids = torch.tensor([history])
    scores = torch.tensor(np.asarray(logits, dtype=np.float32)[None])
    if penalty != 1.0:
        scores = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    if min_new and eos:
        prompt_len = len(history) - new
        scores = lp.MinNewTokensLengthLogitsProcessor(prompt_len, min_new, list(eos))(ids, scores)
    if temperature == 0:
        return scores[0].numpy()
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    warpers += [lp.TopKLogitsWarper(top_k)] if top_k else []
    warpers += [lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [lp.MinPLogitsWarper(min_p)] if min_p else []
    for warper in warpers:
        scores = warper(ids, scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


def hf_greedy(entry, prompt_ids: list[int], n: int, **rules) -> list[int]:
    """Greedy decoding of the bundle's model, one token at a time, each choice made on transformers' processed
    scores (the reference the engine's plain and speculative output must both equal)."""
    runner = ModelRunner(entry, threads=2)
    logits = runner.prefill(prompt_ids)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(hf_scores(logits, prompt_ids + out, new=len(out), **rules)))
        out.append(token)
        logits = runner.forward([token])[0]
        runner.commit()
    return out


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles["qwen2"]


@pytest.fixture(scope="module")
def plain(bundle):
    return load(bundle, threads=2, drafter=None, history=False)


def speculative_engines(bundle, copy_drafter_bundle, plain, prompt_ids: list[int], expected: list[int]) -> dict:
    """One engine per drafter kind: n-gram, garbage trees, an oracle that knows `expected`, a sampling drafter with
    draft probabilities (another model), and the bundle's own drafter model."""
    vocab = plain.entry.vocab_size
    return {
        "ngram": load(bundle, threads=2, drafter="ngram", ngram_cache=False, history=False),
        "random": load(bundle, threads=2, drafter=RandomDrafter(vocab, shape="binary", seed=4), draft_budget=8,
                       history=False),
        "oracle": load(bundle, threads=2, drafter=OracleDrafter(prompt_ids + expected, len(prompt_ids), vocab,
                                                                depth=8, distractors=2), draft_budget=24,
                       history=False),
        "model-sample": load(bundle, threads=2, drafter=ModelSampleDrafter(plain.entry, width=3, depth=3, top_k=4),
                             draft_budget=6, history=False),
        "draft": load(copy_drafter_bundle, threads=2, drafter="draft", draft_budget=12, ngram_cache=False,
                      tree="tree:3x4", history=False),
    }


# ---- greedy: plain == transformers' processors == speculative, with each option ----------------------------------
@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_repetition_penalty_greedy_is_exact_with_every_drafter(penalty, prompt, bundle, copy_drafter_bundle, plain):
    ids = plain.encode(PROMPTS[prompt])
    options = dict(max_new_tokens=TOKENS, ignore_eos=True, repetition_penalty=penalty)
    expected = plain.generate(ids, **options).token_ids
    assert expected == hf_greedy(plain.entry, ids, TOKENS, penalty=penalty)
    assert expected != plain.generate(ids, max_new_tokens=TOKENS, ignore_eos=True).token_ids  # the option matters
    for kind, engine in speculative_engines(bundle, copy_drafter_bundle, plain, ids, expected).items():
        result = engine.generate(ids, **options)
        assert result.token_ids == expected, f"{kind} penalty {penalty}"
        assert result.stats.drafted_tokens > 0 or kind == "ngram", kind  # a penalized text may never repeat
        if kind == "oracle":  # long runs through repeated tokens were accepted
            assert result.stats.accepted_tokens > TOKENS // 3, result.stats.to_dict()


def test_a_verifier_that_penalizes_only_the_step_context_is_caught(bundle, plain, monkeypatch):
    """The exactness test has teeth: penalizing every tree row with the context before the step (not each node's
    own path) changes the speculative output."""
    ids = plain.encode(PROMPTS[0])
    options = dict(max_new_tokens=TOKENS, ignore_eos=True, repetition_penalty=MAX_REPETITION_PENALTY)
    expected = plain.generate(ids, **options).token_ids
    monkeypatch.setattr(engine_module, "apply_history_rules",
                        lambda tree, logits, rules: rules.rows(logits, [()] * (len(tree) + 1)))
    oracle = OracleDrafter(ids + expected, len(ids), plain.entry.vocab_size, depth=8, distractors=2)
    got = load(bundle, threads=2, drafter=oracle, draft_budget=24, history=False).generate(ids, **options)
    assert got.token_ids != expected


def test_min_new_tokens_greedy_is_exact_and_holds_at_the_limit(bundle, copy_drafter_bundle, plain):
    """An EOS id the model emits early is masked until min_new_tokens: plain and every drafter give transformers'
    output; the output is never shorter than min_new_tokens, and exactly max_new_tokens at min == max."""
    ids = plain.encode(PROMPTS[1])
    free = plain.generate(ids, max_new_tokens=TOKENS, ignore_eos=True).token_ids
    eos = free[2]  # a token the model produces as its third: as EOS it would end the answer there
    assert plain.generate(ids, max_new_tokens=TOKENS, eos_token_ids=(eos,)).token_ids == free[:2]
    for minimum in (5, 17, TOKENS):
        options = dict(max_new_tokens=TOKENS, eos_token_ids=(eos,), min_new_tokens=minimum)
        expected = plain.generate(ids, **options)
        reference = hf_greedy(plain.entry, ids, TOKENS, min_new=minimum, eos=(eos,))
        cut = reference.index(eos) if eos in reference else TOKENS
        assert expected.token_ids == reference[:cut] and len(expected.token_ids) >= minimum
        assert eos not in expected.token_ids[:minimum]
        if minimum == TOKENS:
            assert len(expected.token_ids) == TOKENS and expected.finish_reason == "length"
        for kind, engine in speculative_engines(bundle, copy_drafter_bundle, plain, ids, expected.token_ids).items():
            got = engine.generate(ids, **options)
            assert (got.token_ids, got.finish_reason) == (expected.token_ids, expected.finish_reason), \
                f"{kind} min_new_tokens {minimum}"


def test_min_new_tokens_defers_stop_strings(plain):
    """A stop string in the first min_new_tokens tokens' text does not end the answer; one after it does."""
    ids = plain.encode(PROMPTS[0])
    full = plain.generate(ids, max_new_tokens=TOKENS, ignore_eos=True)
    early = plain.tokenizer.decode(full.token_ids[:3])[-2:]
    assert early.strip(), "the test needs visible text in the first tokens"
    stopped = plain.generate(ids, max_new_tokens=TOKENS, ignore_eos=True, stop=[early])
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 3
    minimum = 10
    held = plain.generate(ids, max_new_tokens=TOKENS, ignore_eos=True, stop=[early], min_new_tokens=minimum)
    assert len(held.token_ids) >= minimum
    assert held.text.startswith(plain.tokenizer.decode(full.token_ids[:minimum]))
    later = plain.tokenizer.decode(full.token_ids[minimum:])
    if early in later:  # the stop string comes again after the minimum: it ends the answer there
        assert held.finish_reason == "stop" and early not in held.text[len(plain.tokenizer.decode(
            full.token_ids[:minimum])):]


# ---- sampling: the target's processed distribution, with and without speculation ---------------------------------
SAMPLED = dict(temperature=1.0, top_k=4, min_p=0.15, repetition_penalty=2.0, max_new_tokens=3, ignore_eos=True)
RUNS = 3000
# measured: plain and garbage drafts 0.008 / 0.029, rejection sampling 0.021 / 0.025 (9 and 22 outcomes); the
# verifier that penalizes from the step's context only: 0.119 on token 3
TOKEN2_TV_BOUND = 0.035
TOKEN3_TV_BOUND = 0.05


def exact_marginals(entry, ids: list[int]) -> tuple[Counter, Counter]:
    """Exact distributions of tokens 2 and 3 under SAMPLED, enumerated with transformers' processors."""
    runner = ModelRunner(entry, threads=1)
    keys = ("temperature", "top_k", "min_p")

    def probs(context: list[int]) -> np.ndarray:
        runner.reset()
        return hf_scores(runner.prefill(context), context, penalty=SAMPLED["repetition_penalty"],
                         **{k: SAMPLED[k] for k in keys})

    second, third = Counter(), Counter()
    p1 = probs(ids)
    for a in np.flatnonzero(p1):
        p2 = probs(ids + [int(a)])
        for b in np.flatnonzero(p2):
            second[int(b)] += p1[a] * p2[b]
            p3 = probs(ids + [int(a), int(b)])
            for c in np.flatnonzero(p3):
                third[int(c)] += p1[a] * p2[b] * p3[c]
    return second, third


def empirical_marginals(engine, ids: list[int]) -> tuple[Counter, Counter]:
    second, third = Counter(), Counter()
    for seed in range(RUNS):
        out = engine.generate(ids, seed=seed, **SAMPLED).token_ids
        second[out[1]] += 1 / RUNS
        third[out[2]] += 1 / RUNS
    return second, third


def total_variation(a: Counter, b: Counter) -> float:
    return 0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b))


@pytest.fixture(scope="module")
def sampled_reference(plain):
    ids = plain.encode(PROMPTS[0])
    second, third = exact_marginals(plain.entry, ids)
    assert max(len(second), len(third)) > 2, "min_p must leave a real choice for this test to mean anything"
    return ids, second, third


def _reversed_q(plain) -> ModelSampleDrafter:
    return ModelSampleDrafter(plain.entry, width=2, depth=2, top_k=4, seed=3, scramble=True)


@pytest.mark.parametrize("kind", ["plain", "reversed-q", "random"])
def test_sampling_with_min_p_and_penalty_follows_the_processed_distribution(kind, bundle, plain, sampled_reference):
    """Tokens 2 and 3 follow transformers' processed distribution (penalty over each draw's own history, top-k,
    min-p), plainly and speculatively (rejection sampling against a scrambled q; deterministic garbage drafts)."""
    ids, second, third = sampled_reference
    engine = plain if kind == "plain" else load(
        bundle, threads=1, draft_budget=4, history=False,
        drafter=_reversed_q(plain) if kind == "reversed-q" else RandomDrafter(plain.entry.vocab_size, "binary", 3))
    got_second, got_third = empirical_marginals(engine, ids)
    assert total_variation(got_second, second) < TOKEN2_TV_BOUND
    assert total_variation(got_third, third) < TOKEN3_TV_BOUND


def test_sampling_test_catches_a_verifier_that_ignores_the_node_path(bundle, plain, sampled_reference, monkeypatch):
    """With the penalty applied from the step's context only (the bug exactness rules out), token 3 (drawn below
    an accepted draft) is off the target's distribution and the same bound fails."""
    ids, _, third = sampled_reference
    monkeypatch.setattr(engine_module, "apply_history_rules",
                        lambda tree, logits, rules: rules.rows(logits, [()] * (len(tree) + 1)))
    engine = load(bundle, threads=1, draft_budget=4, history=False, drafter=_reversed_q(plain))
    _, got_third = empirical_marginals(engine, ids)
    assert total_variation(got_third, third) > TOKEN3_TV_BOUND


def test_min_p_sampling_matches_its_distribution():
    """process_logits with min_p equals transformers' warpers, and sample() draws from it (chi-square, 20,000
    draws; a distribution off by a little is caught)."""
    logits = np.array([3.0, 2.6, 2.2, 1.0, 0.4, -0.5, 2.9, 1.7])
    probs = process_logits(logits, temperature=0.8, top_k=6, top_p=0.95, min_p=0.3)
    reference = hf_scores(logits, [0], temperature=0.8, top_k=6, top_p=0.95, min_p=0.3)
    np.testing.assert_allclose(probs, reference, atol=1e-6)
    support = np.flatnonzero(probs > 0)
    assert 1 < support.size < 6 and (probs[support] >= 0.3 * probs.max()).all()
    rng = np.random.default_rng(11)
    draws = np.array([sample(probs, rng) for _ in range(20_000)])
    assert set(np.unique(draws)) <= set(support.tolist())
    counts = np.bincount(draws, minlength=probs.size)[support].astype(np.float64)

    def chi_square(p):
        expected = p / p.sum() * counts.sum()
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi_square(probs[support]) < 25.0
    skewed = probs[support].copy()
    skewed[0] *= 1.2
    assert chi_square(skewed) > 25.0


# ---- the rules themselves ---------------------------------------------------------------------------------------
def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=64) * 3).astype(np.float32)
    history = [1, 5, 5, 7, 30, 63]
    for penalty in (0.5, 1.0, 1.3, MAX_REPETITION_PENALTY):
        np.testing.assert_array_equal(apply_repetition_penalty(logits, history, penalty),
                                      hf_scores(logits, history, penalty=penalty))


def test_tree_rows_equal_rows_computed_one_path_at_a_time():
    """apply_history_rules gives each node the rules of its own path: the same as HistoryRules.row on that path,
    and as transformers' processors on the prompt + output + path."""
    rng = np.random.default_rng(1)
    vocab = 40
    tree = DraftTree(np.array([3, 9, 3, 4, 9, 2]), np.array([-1, -1, 0, 2, 1, 3]))
    logits = rng.normal(size=(len(tree) + 1, vocab)).astype(np.float32) * 2
    prompt, output = [1, 2, 3], [7, 2]
    config = GenerationConfig(repetition_penalty=1.7, min_new_tokens=5, max_new_tokens=9)
    rules = HistoryRules(config, prompt, stop_ids=[2, 39])
    for token in output:
        rules.push(token)
    rows = apply_history_rules(tree, logits, rules)
    paths = [()] + node_paths(tree)
    assert paths[4] == (3, 3, 4) and paths[6] == (3, 3, 4, 2)
    for r, path in enumerate(paths):
        np.testing.assert_array_equal(rows[r], rules.row(logits[r], path))
        history = prompt + output + list(path)
        expected = hf_scores(logits[r], history, penalty=1.7, min_new=5, new=len(output) + len(path), eos=(2, 39))
        np.testing.assert_array_equal(rows[r], expected)
    assert np.isneginf(rows[0][[2, 39]]).all() and np.isfinite(rows[4][[2, 39]]).all()  # 2 + 3 new tokens: free
    untouched = HistoryRules(GenerationConfig(), prompt, stop_ids=[2])
    assert apply_history_rules(tree, logits, untouched) is logits


# ---- bounds, errors, CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a number in \(0, 10\]"),
    (dict(repetition_penalty=10.000001), r"repetition_penalty must be a number in \(0, 10\]"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(min_p=-1e-9), r"min_p must be a number in \[0, 1\]"),
    (dict(min_p=1.0000001), r"min_p must be a number in \[0, 1\]"),
    (dict(min_p="0.1"), "min_p"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an int >= 0"),
    (dict(min_new_tokens=2.0), "min_new_tokens must be an int"),
    (dict(min_new_tokens=9, max_new_tokens=8), r"min_new_tokens \(9\) must be at most max_new_tokens \(8\)"),
])
def test_bounds_are_checked_with_clear_errors(kwargs, match, plain):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=match):
        plain.generate("Hi", **kwargs)


def test_bounds_accept_their_limits(plain):
    for kwargs in (dict(repetition_penalty=MAX_REPETITION_PENALTY), dict(repetition_penalty=1e-6), dict(min_p=0.0),
                   dict(min_p=1.0, temperature=1.0, seed=0), dict(min_new_tokens=4, max_new_tokens=4)):
        result = plain.generate("Hi", **{"max_new_tokens": 4, "ignore_eos": True, **kwargs})
        assert len(result.token_ids) == 4, kwargs
    # min_p=1 keeps only the most likely token: sampling becomes greedy
    greedy = plain.generate("Hi", max_new_tokens=6, ignore_eos=True).token_ids
    assert plain.generate("Hi", max_new_tokens=6, ignore_eos=True, temperature=1.5, min_p=1.0, seed=3).token_ids \
        == greedy


def test_cli_flags(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "-b", "B", "--repetition-penalty", "10", "--min-p", "1",
                              "--min-new-tokens", "7", "--max-new-tokens", "9"])
    config = cli._gen_config(args)
    assert (config["repetition_penalty"], config["min_p"], config["min_new_tokens"]) == (10.0, 1.0, 7)
    defaults = cli._gen_config(parser.parse_args(["generate", "-b", "B"]))
    assert (defaults["repetition_penalty"], defaults["min_p"], defaults["min_new_tokens"]) == (1.0, 0.0, 0)
    GenerationConfig(**defaults).validate()
    for option, value in (("--repetition-penalty", "0"), ("--repetition-penalty", "10.5"), ("--min-p", "1.01"),
                          ("--min-p", "-0.1"), ("--min-new-tokens", "-1")):
        with pytest.raises(SystemExit):
            parser.parse_args(["generate", "-b", "B", option, value])
        assert option in capsys.readouterr().err


# ---- generation_config= -----------------------------------------------------------------------------------------
def test_generation_config_from_transformers(plain):
    from transformers import GenerationConfig as HFConfig

    ids = plain.encode(PROMPTS[0])
    hf = HFConfig(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
                  repetition_penalty=1.2, pad_token_id=0, bos_token_id=0, num_beams=1)
    want = dict(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                do_sample=True, seed=5)
    assert plain.generate(ids, generation_config=hf, seed=5).token_ids == plain.generate(ids, **want).token_ids
    # explicit keyword arguments win
    assert plain.generate(ids, generation_config=hf, seed=5, max_new_tokens=3).stats.new_tokens <= 3
    greedy = plain.generate(ids, max_new_tokens=12, repetition_penalty=1.2).token_ids
    assert plain.generate(ids, generation_config=hf, do_sample=False).token_ids == greedy
    # do_sample unset or False: greedy, whatever the temperature (as transformers)
    assert plain.generate(ids, generation_config=HFConfig(max_new_tokens=12, temperature=0.7,
                                                          repetition_penalty=1.2)).token_ids == greedy
    # a model's generation_config.json as a dict, with its eos ids and stop strings
    eos = greedy[5]
    got = plain.generate(ids, generation_config={"max_new_tokens": 12, "eos_token_id": [eos],
                                                 "repetition_penalty": 1.2, "transformers_version": "4.51.0"})
    assert got.token_ids == greedy[:5] and got.finish_reason == "stop"
    text = plain.tokenizer.decode(greedy)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    by_dict = plain.generate(ids, generation_config={"max_new_tokens": 12, "stop_strings": [stop],
                                                     "repetition_penalty": 1.2})
    assert by_dict.text == plain.generate(ids, max_new_tokens=12, stop=[stop], repetition_penalty=1.2).text


def test_generation_config_objects_and_errors(plain):
    config = GenerationConfig(max_new_tokens=5, temperature=0.9, seed=2, ignore_eos=True)
    ids = plain.encode(PROMPTS[1])
    assert plain.generate(ids, generation_config=config).token_ids == plain.generate(
        ids, max_new_tokens=5, temperature=0.9, seed=2, ignore_eos=True).token_ids
    namespace = SimpleNamespace(max_new_tokens=4, do_sample=False, min_new_tokens=4, _private=1, output_scores=True)
    assert len(plain.generate(ids, generation_config=namespace).token_ids) == 4
    # a temperature given explicitly samples even though the config says nothing of do_sample
    assert generation_options({"top_k": 5}, {"temperature": 0.8}) == {"top_k": 5, "temperature": 0.8}
    assert generation_options({"do_sample": True}) == {"do_sample": True, "temperature": 1.0}
    with pytest.raises(ValueError, match=r"num_beams=4.*typical_p=0.5"):
        plain.generate(ids, generation_config={"num_beams": 4, "typical_p": 0.5})
    with pytest.raises(ValueError, match="max_length=30"):
        plain.generate(ids, generation_config={"max_length": 30})
    plain.generate(ids, generation_config={"max_length": 30, "num_beams": 1, "max_new_tokens": 2})  # as transformers
    plain.generate(ids, generation_config={"max_length": 30}, max_new_tokens=2)
    with pytest.raises(ValueError, match="temprature"):
        plain.generate(ids, generation_config={"temprature": 0.5})
    with pytest.raises(ValueError, match="stop twice"):
        plain.generate(ids, generation_config={"stop": ["a"], "stop_strings": ["b"]})
    with pytest.raises(ValueError, match="min_p must be"):
        plain.generate(ids, generation_config={"min_p": 3})
    with pytest.raises(TypeError, match="generation_config must be a dict"):
        plain.generate(ids, generation_config=42)
    with pytest.raises(TypeError, match="unknown generation option"):
        plain.generate(ids, generation_config={}, beams=2)


def test_chat_takes_a_generation_config(plain):
    messages = [{"role": "user", "content": "Hi"}]
    assert plain.chat(messages, generation_config={"max_new_tokens": 3, "min_new_tokens": 3}).stats.new_tokens == 3
    pieces = list(plain.chat_stream(messages, generation_config={"max_new_tokens": 3, "min_new_tokens": 3}))
    assert "".join(pieces) == plain.chat(messages, max_new_tokens=3, min_new_tokens=3).text


# ---- no batching ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [["Hello", "World"], [[1, 2, 3], [4, 5]], (("a",),), np.ones((2, 3), dtype=int)])
def test_a_batch_of_prompts_is_refused(batch, plain):
    for call in (plain.generate, plain.stream):
        with pytest.raises(TypeError, match="batching is not supported.*loop"):
            call(batch, max_new_tokens=2)
    assert plain.generate([1, 2, 3], max_new_tokens=2).stats.new_tokens <= 2  # one token-id prompt is fine
    assert plain.generate(np.array([1, 2, 3]), max_new_tokens=2).stats.new_tokens <= 2
