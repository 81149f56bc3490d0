"""Model drafters on tiny random models: a second model of the same vocabulary drafting trees, staged composition
with the n-gram caches, the drafter's KV cache following the accepted text, and exactness (greedy and sampling)."""

from __future__ import annotations

import numpy as np
import pytest

from edgespec import load
from edgespec.drafters.costs import PaysOff
from edgespec.drafters.factory import make_drafter
from edgespec.drafters.model import (LayerSearch, ModelDrafter, candidate_layer_sets, describe_gates, gumbel_top,
                                     parse_layer_option)
from edgespec.engine import Engine
from edgespec.export.bundle import ModelRequest, export_bundle
from edgespec.runtimes.manifest import BundleError
from spec_helpers import assert_exact_or_near_tie
from test_speculative import (PROMPTS, TOKEN2_TV_BOUND, TOKEN3_TV_BOUND, _empirical_marginals, _exact_marginals,
                              _tv)

ARCHS = ("qwen2", "llama", "gemma3")


@pytest.fixture(scope="module")
def pair_bundles(tiny_models, tmp_path_factory) -> dict[tuple[str, str], object]:
    """Bundles with a drafter: ("same", arch) drafts with a copy of the target (every guess right unless the
    drafter's cache went wrong); ("other", arch) with a different random model (mostly wrong guesses)."""
    from conftest import make_tiny_model

    root = tmp_path_factory.mktemp("pair-bundles")
    other = make_tiny_model("llama", root / "drafter-model", seed=11)
    out = {}
    for arch in ARCHS:
        quiet = dict(log=lambda m: None, parity=False)
        out["same", arch] = export_bundle(str(tiny_models[arch]), root / f"same-{arch}", name=f"tiny-{arch}",
                                          drafters=[ModelRequest(str(tiny_models[arch]), "drafter", name="copy")],
                                          **quiet).bundle
        out["other", arch] = export_bundle(str(tiny_models[arch]), root / f"other-{arch}", name=f"tiny-{arch}",
                                           drafters=[ModelRequest(str(other), "drafter", name="other")],
                                           **quiet).bundle
    return out


@pytest.fixture(scope="module")
def plain_outputs(tiny_bundles) -> dict[tuple[str, int], tuple[list[int], list[int]]]:
    out = {}
    for arch in ARCHS:
        engine = load(tiny_bundles[arch], threads=2, drafter=None)
        for i, prompt in enumerate(PROMPTS):
            ids = engine.encode(prompt)
            out[arch, i] = ids, engine.generate(ids, max_new_tokens=48, ignore_eos=True).token_ids
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pair,spec", [("same", "draft"), ("other", "draft"), ("same", "ngram>draft"),
                                       ("other", "ngram>draft")])
def test_model_drafter_greedy_is_exact(arch, pair, spec, pair_bundles, plain_outputs):
    """Greedy output equals plain greedy output for every prompt, with a perfect and with a poor drafter, alone
    and staged behind the n-gram caches; a perfect drafter gets long runs accepted."""
    # a fixed tree shape: how far the tree is cut must not depend on this machine's load (timed costs decide
    # that under "auto"; tests/test_planner.py covers it), and tiny drafters cost more than tiny targets, so the
    # drafter grows trees regardless of timing too
    engine = load(pair_bundles[pair, arch], threads=2, drafter=spec, draft_budget=12, ngram_cache=False,
                  tree="tree:3x4")
    engine.drafter.target_cost = None
    drafted = 0
    for i in range(len(PROMPTS)):
        ids, expected = plain_outputs[arch, i]
        result = engine.generate(ids, max_new_tokens=48, ignore_eos=True)
        assert_exact_or_near_tie(engine.entry, ids, expected, result.token_ids, f"{arch} {pair} {spec} prompt {i}")
        s = result.stats
        assert s.drafter == engine.drafter.name
        drafted += s.drafted_tokens  # a poor drafter, once measured, may rightly be cut to nothing
        if pair == "same" and result.token_ids == expected:
            assert s.mean_accepted_tokens > 2.0, s.to_dict()
    assert engine.drafter.counters["forwards"] > 0 and drafted > 0


def test_drafter_cache_follows_the_accepted_text(pair_bundles, plain_outputs):
    """After each step the drafter's cache holds exactly the accepted context: its logits after the context equal
    a fresh prefill's."""
    engine = load(pair_bundles["other", "qwen2"], threads=2, drafter="draft", draft_budget=8)
    drafter: ModelDrafter = engine.drafter
    ids, _ = plain_outputs["qwen2", 1]
    checks = []

    original = drafter.observe

    def observe(step):
        original(step)
        cached = list(drafter._cached)
        assert drafter.runner.length == len(cached)
        checks.append(len(cached))

    drafter.observe = observe
    engine.generate(ids, max_new_tokens=30, ignore_eos=True)
    assert checks and checks == sorted(checks)
    # the cached K/V reproduce a fresh run of the same tokens
    cached = list(drafter._cached)
    logits = drafter.runner.forward([cached[-1]], logit_positions=[0])[0]
    from edgespec.runtimes.runner import ModelRunner

    fresh = ModelRunner(drafter.runner.entry, threads=2)
    expected = fresh.prefill(cached + [cached[-1]])
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_staged_drafter_uses_the_stage(pair_bundles):
    """On repetitive text the n-gram stage's guesses are scored in the drafter's forwards and used: fewer drafter
    forwards per drafted node than the drafter alone."""
    text = "one two three four five six seven eight nine ten " * 6
    results = {}
    for spec in ("draft", "ngram>draft"):
        engine = load(pair_bundles["same", "llama"], threads=2, drafter=spec, draft_budget=12, ngram_cache=False)
        engine.drafter.target_cost = None
        result = engine.generate(text, max_new_tokens=40, ignore_eos=True)
        counters = engine.drafter.counters
        results[spec] = (result.token_ids, counters["forwards"] / max(1, counters["nodes"]), counters)
    assert results["draft"][0] == results["ngram>draft"][0]
    assert results["ngram>draft"][2]["stage_used"] > 0
    assert results["ngram>draft"][1] < results["draft"][1]


@pytest.fixture(scope="module")
def sampling_reference(tiny_bundles):
    engine = load(tiny_bundles["qwen2"], threads=2, drafter=None)
    ids = engine.encode(PROMPTS[0])
    return ids, _exact_marginals(engine.entry, ids)


@pytest.mark.parametrize("spec", ["draft", "ngram>draft"])
def test_model_drafter_sampling_matches_exact_distribution(spec, pair_bundles, sampling_reference):
    """Sampled tokens 2 and 3 follow the target's exact distribution with the drafter's own probabilities
    (tree rejection sampling), alone and staged. The drafter is the target's copy drafting at temperature 0.5, so
    its q differs from p: drafts are often accepted and often rejected (the residual decides)."""
    ids, (second, third) = sampling_reference
    engine = load(pair_bundles["same", "qwen2"], threads=2, drafter=spec, draft_budget=6, ngram_cache=False)
    engine.drafter.temperature = 0.5
    engine.drafter.target_cost = None
    got_second, got_third = _empirical_marginals(engine, ids, 20_000)
    assert _tv(got_second, second) < TOKEN2_TV_BOUND
    assert _tv(got_third, third) < TOKEN3_TV_BOUND
    counters = engine.drafter.counters
    assert 0 < counters["accepted"] < counters["nodes"]


def test_drafter_specs_and_errors(tiny_bundles, pair_bundles):
    plain_bundle = tiny_bundles["qwen2"]
    with pytest.raises(BundleError, match="no drafter model"):
        load(plain_bundle, drafter="draft")
    with pytest.raises(BundleError, match="no drafter 'nope'"):
        load(pair_bundles["same", "qwen2"], drafter="draft:nope")
    with pytest.raises(ValueError, match="unknown drafter"):
        load(plain_bundle, drafter="bogus")
    with pytest.raises(ValueError, match="first stage"):
        load(pair_bundles["same", "qwen2"], drafter="draft>ngram")
    with pytest.raises(BundleError, match="--self-speculative"):
        load(plain_bundle, drafter="self")
    engine = load(pair_bundles["same", "qwen2"], drafter="draft:copy")
    assert engine.drafter.name == "draft:copy"
    engine._calibration.update(np.array([0.9]), np.array([-1]), [])  # learnt about the previous drafter
    engine.set_drafter("ngram>draft", ngram_cache=False)
    assert engine.drafter.name == "ngram>draft:copy"
    assert engine._calibration.estimated == 0.0  # a new drafter starts uncalibrated


def test_drafter_with_another_tokenizer_is_refused(tiny_models, tmp_path):
    """A drafter whose vocabulary differs is refused with a clear message (cross-vocabulary drafting is a
    separate drafter)."""
    from tokenizers import Tokenizer

    from conftest import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "odd", seed=5)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens(["<odd-token>"])  # same size budget, one id means something else
    tok.save(str(folder / "tokenizer.json"))
    bundle = export_bundle(str(tiny_models["qwen2"]), tmp_path / "b", name="t", parity=False, log=lambda m: None,
                           drafters=[ModelRequest(str(folder), "drafter", name="odd")]).bundle
    with pytest.raises(BundleError, match="does not share the tokenizer"):
        load(bundle, drafter="draft")


def test_gumbel_top_draws_without_replacement():
    rng = np.random.default_rng(0)
    q = np.array([0.5, 0.3, 0.2, 0.0])
    firsts = np.bincount([gumbel_top(q, 2, rng)[0] for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(firsts, q, atol=0.015)
    for _ in range(100):
        drawn = gumbel_top(q, 4, rng)
        assert len(drawn) == 3 and len(set(drawn.tolist())) == 3 and 3 not in drawn


def test_layer_sets_parse_and_describe():
    assert describe_gates(parse_layer_option("exit=3", 8)) == "exit=3"
    assert describe_gates(parse_layer_option("skip=2,4-5", 8)) == "skip=2,4,5"
    assert parse_layer_option("layers=0-3,7", 8).tolist() == [True] * 4 + [False] * 3 + [True]
    for bad in ("exit=9", "skip=", "layers=0-7", "foo=1", "exit=x"):
        with pytest.raises(ValueError):
            parse_layer_option(bad, 8)
    sets = candidate_layer_sets(28)
    assert sets and all(0 < s.sum() < 28 and s[0] for s in sets)
    assert len({s.tobytes() for s in sets}) == len(sets)


def test_layer_search_settles_on_the_fastest_set():
    sets = [np.array([True, False]), np.array([False, True])]
    search = LayerSearch(sets[:2], warmup=2, explore_every=5)
    rate = {0: 10.0, 1: 30.0}
    used = []
    for _ in range(40):
        gates = search.choose()
        i = 0 if gates[0] else 1
        used.append(i)
        search.observe(gates, tokens=int(rate[i]), seconds=1.0)
    assert search.best == 1
    assert used[-10:].count(1) >= 8 and 0 in used[-20:]  # mostly the best, still exploring


# ---- self-speculation: the target with layers skipped -------------------------------------------------------------


@pytest.fixture(scope="module")
def self_bundles(tiny_models, tmp_path_factory) -> dict[str, object]:
    """Tiny targets exported with layer gates; the qwen2 one also with a reduced draft head of 128 tokens."""
    root = tmp_path_factory.mktemp("self-bundles")
    return {arch: export_bundle(str(tiny_models[arch]), root / arch, name=f"tiny-{arch}", parity=False,
                                log=lambda m: None, self_speculative=True,
                                draft_head_size=128 if arch == "qwen2" else 0).bundle
            for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["self", "self:skip=1", "self:skip=1,head=full", "ngram>self"])
def test_self_speculation_greedy_is_exact(arch, spec, self_bundles, plain_outputs):
    """The target drafting for itself with layers skipped (chosen online or pinned, reduced or full draft head,
    alone or behind the n-gram caches) leaves greedy output unchanged, and the target's cache intact."""
    engine = load(self_bundles[arch], threads=2, drafter=spec, draft_budget=8, ngram_cache=False)
    drafter = engine.drafter
    assert drafter.draft_head == (arch == "qwen2" and "head=full" not in spec)
    for i in range(len(PROMPTS)):
        ids, expected = plain_outputs[arch, i]
        result = engine.generate(ids, max_new_tokens=48, ignore_eos=True)
        assert_exact_or_near_tie(engine.entry, ids, expected, result.token_ids, f"{arch} {spec} prompt {i}")
        assert engine._runner.length == len(ids) + 47  # the last token is yielded, not cached
    assert drafter.counters["forwards"] > 0
    if spec.startswith("self:"):
        gates = drafter.layer_search.candidates
        assert len(gates) == 1 and gates[0].tolist() == [True, False] + [True] * (engine.entry.num_layers - 2)


def test_self_speculation_sampling_matches_exact_distribution(self_bundles, sampling_reference):
    """Sampling with the skipped-layer draft (and the reduced head) follows the target's exact distribution."""
    ids, (second, third) = sampling_reference
    engine = load(self_bundles["qwen2"], threads=2, drafter="self:skip=1", draft_budget=6, ngram_cache=False)
    got_second, got_third = _empirical_marginals(engine, ids, 30_000)
    assert _tv(got_second, second) < TOKEN2_TV_BOUND
    assert _tv(got_third, third) < TOKEN3_TV_BOUND
    assert engine.drafter.counters["nodes"] > 0


def test_layer_search_turns_drafting_off_when_plain_is_faster():
    search = LayerSearch([np.array([True, False])], warmup=2, explore_every=10, plain_rate=lambda: 100.0)
    choices = []
    for _ in range(30):
        gates = search.choose()
        choices.append(gates is not None)
        search.observe(gates, tokens=1, seconds=1.0)  # 1 token/s: far slower than plain
    assert choices[:2] == [True, True] and search.off_steps > 20
    assert any(choices[10:])  # still explores now and then


def test_drafting_sits_out_while_it_loses_and_probes_again():
    pays = PaysOff(first_pause=2, max_pause=8, min_steps=4)
    drafted = []
    for step in range(60):
        if pays.should_draft():
            drafted.append(step)
            pays.observe(tokens=1, seconds=3.0, plain_seconds=1.0)  # a third of plain's rate
    assert drafted[:4] == [0, 1, 2, 3]  # no verdict before min_steps drafted steps
    gaps = np.diff(drafted[3:])
    assert gaps[0] == 3 and gaps.max() == 9 and pays.skipped > 40  # pauses double up to the cap, probes continue
    pays.restart()
    assert pays.should_draft()  # a new generation probes at once
    for _ in range(4):
        pays.observe(tokens=5, seconds=2.0, plain_seconds=1.0)  # now it wins: keep drafting
    assert all(pays.should_draft() for _ in range(5))


def test_one_unlucky_step_does_not_stop_drafting():
    pays = PaysOff(min_steps=3, margin=0.9)
    pays.observe(tokens=1, seconds=3.0, plain_seconds=1.0)  # the first step is rejected outright
    for _ in range(3):
        assert pays.should_draft()
        pays.observe(tokens=4, seconds=1.5, plain_seconds=1.0)
    assert all(pays.should_draft() for _ in range(10)) and pays.skipped == 0



@pytest.mark.parametrize("spec", ["draft", "ngram>draft"])
def test_a_drafter_sitting_out_runs_no_forward_and_catches_up_exactly(spec, pair_bundles, plain_outputs):
    """While the drafter sits out (PaysOff says drafting loses) it runs no forward at all; when it drafts again it
    feeds the tokens it missed in one batched forward, and greedy output stays the plain target's."""
    from spec_helpers import DraftEvery, forwards_while_sitting_out

    engine = load(pair_bundles["same", "qwen2"], threads=2, drafter=spec, ngram_cache=False, tree="chain:4")
    drafter = engine.drafter
    schedule = drafter.pays_off = DraftEvery(5)
    idle_forwards = forwards_while_sitting_out(drafter, schedule)
    for i in range(len(PROMPTS)):
        ids, expected = plain_outputs["qwen2", i]
        result = engine.generate(ids, max_new_tokens=48, ignore_eos=True)
        assert result.token_ids == expected, f"prompt {i}"
        assert result.stats.sat_out_steps >= 1 and result.stats.accepted_tokens > 0
        assert result.stats.idle_steps >= result.stats.sat_out_steps
    assert schedule.skipped > 10 and len(idle_forwards) == schedule.skipped and not any(idle_forwards)
