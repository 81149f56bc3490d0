"""Speculative decoding on the tiny bundles: exactness against plain decoding for every drafter and tree shape,
stop rules inside accepted runs, stats, and lossless sampling (distribution tests that a broken residual fails)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from edgespec import verify as verify_module
from edgespec.drafters.base import DraftTree, Drafter, VerifiedStep
from edgespec.engine import Engine, load
from edgespec.runtimes.runner import ModelRunner
from edgespec.sampling import GenerationConfig, process_logits
from edgespec.verify import verify_greedy, verify_rejection, verify_sampled, verify_tree

from spec_helpers import (ModelSampleDrafter, OracleDrafter, RandomDrafter, assert_exact_or_near_tie,
                          first_difference, random_tree)

ARCHS = ("qwen2", "llama", "gemma3")
PROMPTS = (
    "The quick brown fox jumps over",
    "def add(a, b):\n    return",
    "Speculative decoding drafts tokens. Caf\u00e9 \u65e5\u672c\u8a9e \U0001F600",
)
SHAPES = ("chain", "wide", "binary", "random")


@pytest.fixture(scope="module")
def plain(tiny_bundles) -> dict[str, Engine]:
    """Plain-decoding engines, the reference of every test here."""
    return {arch: load(tiny_bundles[arch], threads=2, drafter=None) for arch in ARCHS}


@pytest.fixture(scope="module")
def plain_outputs(plain) -> dict[tuple[str, int], tuple[list[int], list[int]]]:
    """(prompt ids, 48 plain greedy tokens) per architecture and prompt."""
    out = {}
    for arch, engine in plain.items():
        for i, prompt in enumerate(PROMPTS):
            ids = engine.encode(prompt)
            out[arch, i] = ids, engine.generate(ids, max_new_tokens=48, ignore_eos=True).token_ids
    return out


def _spec_engine(bundle, drafter: Drafter, budget: int = 16) -> Engine:
    return load(bundle, threads=2, drafter=drafter, draft_budget=budget)


# ---- verification rules on synthetic logits ---------------------------------------------------------------------


def test_verify_greedy_follows_argmax_through_tree():
    tree = DraftTree(np.array([5, 3, 7, 2]), np.array([-1, -1, 1, 1]))  # root kids 5, 3; node 1 kids 7, 2
    logits = np.full((5, 10), -1.0)
    logits[0, 3] = 1  # after the context: 3 (node 1)
    logits[2, 2] = 1  # after node 1: 2 (node 3)
    logits[4, 9] = 1  # after node 3: 9, the bonus
    assert verify_greedy(tree, logits) == ([1, 3], 9)
    logits[0, 3], logits[0, 4] = -1, 1  # no child matches at the root
    assert verify_greedy(tree, logits) == ([], 4)
    assert verify_greedy(DraftTree.empty(), logits[:1]) == ([], 4)


def test_draft_tree_validation_and_pruning():
    with pytest.raises(ValueError, match="parents"):
        DraftTree(np.array([1, 2]), np.array([1, -1])).validate(10)
    with pytest.raises(ValueError, match="vocabulary"):
        DraftTree.chain([1, 12]).validate(10)
    with pytest.raises(ValueError, match="repeats"):
        DraftTree(np.array([4, 4]), np.array([-1, -1])).validate(10)
    with pytest.raises(ValueError, match="zero draft probability"):
        DraftTree.chain([1], probs=np.eye(10)[[2]]).validate(10)
    tree = DraftTree(np.array([1, 2, 3, 4, 5]), np.array([-1, 0, 1, -1, 3]))
    cut = tree.prune(max_nodes=10, max_depth=2)
    assert cut.tokens.tolist() == [1, 2, 4, 5] and cut.parents.tolist() == [-1, 0, -1, 2]
    assert tree.prune(max_nodes=2, max_depth=9).tokens.tolist() == [1, 2]


def _exact_two_token_distribution(p_root: np.ndarray, p_next: np.ndarray) -> np.ndarray:
    return p_root[:, None] * p_next


def _two_token_draws(p_root, p_next, q_root, q_next, trials, rng, use_probs=True, width=3):
    """Emitted (first, second) token pairs from verification of random trees drafted from q (siblings without
    replacement); when the accepted path is one token long the second token is drawn from the target, as the
    next step would."""
    vocab = len(p_root)
    config = GenerationConfig(temperature=1.0)
    logits_root = np.log(np.maximum(p_root, 1e-300))
    counts = np.zeros((vocab, vocab))
    for _ in range(trials):
        roots = rng.choice(vocab, size=width, replace=False, p=q_root)
        tokens, parents, probs = list(roots), [-1] * width, [q_root] * width
        for i, r in enumerate(roots):  # every root child gets two children drawn from q_next[r]
            kids = rng.choice(vocab, size=2, replace=False, p=q_next[r])
            tokens += list(kids)
            parents += [i, i]
            probs += [q_next[r], q_next[r]]
        tree = DraftTree(np.array(tokens), np.array(parents), np.stack(probs) if use_probs else None)
        logits = np.stack([logits_root] + [np.log(np.maximum(p_next[t], 1e-300)) for t in tokens])
        nodes, bonus = (verify_rejection if use_probs else verify_sampled)(tree, logits, config, rng)
        emitted = [int(tree.tokens[n]) for n in nodes] + [bonus]
        if len(emitted) == 1:
            emitted.append(int(rng.choice(vocab, p=p_next[emitted[0]])))
        counts[emitted[0], emitted[1]] += 1
    return counts / trials


def _random_dist(rng, vocab, sharp=2.0):
    x = np.exp(rng.normal(size=vocab) * sharp)
    return x / x.sum()


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(7)
    vocab = 6
    p_root, q_root = _random_dist(rng, vocab), _random_dist(rng, vocab)
    p_next = np.stack([_random_dist(rng, vocab) for _ in range(vocab)])
    q_next = np.stack([_random_dist(rng, vocab) for _ in range(vocab)])
    return p_root, p_next, q_root, q_next


TV_BOUND = 0.03  # total variation allowed between 20,000 draws and the exact joint of 36 outcomes


@pytest.mark.parametrize("use_probs", [True, False])
def test_tree_sampling_is_lossless_on_synthetic_distributions(synthetic, use_probs):
    """Rejection sampling over a 3-wide, 2-deep tree (q far from p) emits the target's exact joint distribution
    of the first two tokens."""
    p_root, p_next, q_root, q_next = synthetic
    rng = np.random.default_rng(1)
    empirical = _two_token_draws(p_root, p_next, q_root, q_next, 20000, rng, use_probs=use_probs)
    tv = 0.5 * np.abs(empirical - _exact_two_token_distribution(p_root, p_next)).sum()
    assert tv < TV_BOUND, f"total variation {tv:.4f}"


def test_broken_residual_is_caught(synthetic, monkeypatch):
    """The same test fails when the residual update is broken (p kept instead of max(0, p - q)): it has the power
    to detect a lossy verifier."""
    p_root, p_next, q_root, q_next = synthetic
    monkeypatch.setattr(verify_module, "residual", lambda p, q: p)
    empirical = _two_token_draws(p_root, p_next, q_root, q_next, 20000, np.random.default_rng(1))
    tv = 0.5 * np.abs(empirical - _exact_two_token_distribution(p_root, p_next)).sum()
    assert tv > 3 * TV_BOUND, f"a broken residual went unnoticed (total variation {tv:.4f})"


def test_verify_tree_dispatch():
    rng = np.random.default_rng(0)
    logits = np.zeros((2, 4))
    logits[:, 2] = 5
    tree = DraftTree.chain([2])
    assert verify_tree(tree, logits, GenerationConfig(), rng) == ([0], 2)
    with pytest.raises(ValueError, match="draft probabilities"):
        verify_rejection(tree, logits, GenerationConfig(temperature=1.0), rng)


def test_verified_step_top_k():
    logits = np.array([[0.1, 3.0, 2.0, -1.0], [5.0, 4.0, 6.0, 0.0]])
    step = VerifiedStep(np.array([1, 2]), np.array([-1, 0]), logits, [0], [2, 0], context_length=3)
    assert step.top_k(2).tolist() == [[1, 2], [2, 0]]


# ---- greedy exactness on the tiny models ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_garbage_drafter_is_exact(arch, shape, tiny_bundles, plain, plain_outputs):
    """Random tokens in any tree shape never change greedy output (only the speed)."""
    entry = plain[arch].entry
    drafter = RandomDrafter(entry.vocab_size, shape=shape, seed=hash(shape) % 1000)
    engine = _spec_engine(tiny_bundles[arch], drafter, budget=8)
    for i in range(len(PROMPTS)):
        ids, expected = plain_outputs[arch, i]
        result = engine.generate(ids, max_new_tokens=48, ignore_eos=True)
        assert_exact_or_near_tie(entry, ids, expected, result.token_ids, f"{arch} {shape} prompt {i}")
        assert result.stats.drafted_tokens > 0 and result.stats.steps <= 48
    assert drafter.observed > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth,distractors,budget", [(1, 0, 1), (4, 0, 4), (6, 2, 16), (12, 1, 24), (8, 3, 64)])
def test_oracle_drafter_is_exact_and_accepts_long_runs(arch, depth, distractors, budget, tiny_bundles, plain,
                                                       plain_outputs):
    """Correct drafts hidden among distractors (and corrupted every third step) are accepted up to the first wrong
    token; the output stays the plain output and the mean accepted tokens per step rise above 1."""
    entry = plain[arch].entry
    for i in range(len(PROMPTS)):
        ids, expected = plain_outputs[arch, i]
        drafter = OracleDrafter(ids + expected, len(ids), entry.vocab_size, depth=depth, distractors=distractors)
        result = _spec_engine(tiny_bundles[arch], drafter, budget=budget).generate(
            ids, max_new_tokens=48, ignore_eos=True)
        assert_exact_or_near_tie(entry, ids, expected, result.token_ids, f"{arch} oracle prompt {i}")
        s = result.stats
        if result.token_ids == expected:
            assert s.accepted_tokens > 0 and s.mean_accepted_tokens > 1.0
            assert s.new_tokens == 48 and s.steps == 48 - s.accepted_tokens
            assert s.drafted_tokens >= s.accepted_tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_drafter_under_greedy_is_exact(arch, tiny_bundles, plain, plain_outputs):
    """A drafter that supplies draft probabilities is verified greedily under greedy decoding."""
    entry = plain[arch].entry
    other = "llama" if arch != "llama" else "qwen2"
    drafter = ModelSampleDrafter(load(tiny_bundles[other], drafter=None).entry, width=3, depth=3, top_k=4)
    engine = _spec_engine(tiny_bundles[arch], drafter, budget=6)
    ids, expected = plain_outputs[arch, 0]
    result = engine.generate(ids, max_new_tokens=48, ignore_eos=True)
    assert_exact_or_near_tie(entry, ids, expected, result.token_ids, f"{arch} model-sample")


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 8, 13, 47])
def test_max_new_tokens_inside_accepted_runs(max_new, tiny_bundles, plain, plain_outputs):
    """The token budget cuts an accepted run at exactly max_new_tokens."""
    ids, expected = plain_outputs["qwen2", 1]
    drafter = OracleDrafter(ids + expected, len(ids), plain["qwen2"].entry.vocab_size, depth=10, corrupt_every=0)
    result = _spec_engine(tiny_bundles["qwen2"], drafter).generate(ids, max_new_tokens=max_new, ignore_eos=True)
    assert result.token_ids == expected[:max_new]
    assert result.finish_reason == "length"


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_strings_and_eos_inside_accepted_runs(arch, tiny_bundles, plain, plain_outputs):
    """A stop string or an EOS id that falls in the middle of an accepted run ends the output at the right token,
    with the same text, ids and finish reason as plain decoding."""
    engine_plain = plain[arch]
    ids, expected = plain_outputs[arch, 0]
    drafter = OracleDrafter(ids + expected, len(ids), engine_plain.entry.vocab_size, depth=12, corrupt_every=0)
    spec = _spec_engine(tiny_bundles[arch], drafter, budget=24)
    text = engine_plain.tokenizer.decode(expected)
    stop = text[len(text) // 3: len(text) // 3 + 3]
    eos_id = expected[20]
    cases = [dict(stop=[stop], ignore_eos=False, eos_token_ids=()), dict(eos_token_ids=(eos_id,))]
    for kwargs in cases:
        want = engine_plain.generate(ids, max_new_tokens=48, **kwargs)
        got = spec.generate(ids, max_new_tokens=48, **kwargs)
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
        assert got.finish_reason == "stop" and len(got.token_ids) < 48
        assert got.stats.accepted_tokens > 0
    pieces = list(spec.stream(ids, max_new_tokens=48, stop=[stop], eos_token_ids=()))
    assert "".join(pieces) == engine_plain.generate(ids, max_new_tokens=48, stop=[stop], eos_token_ids=()).text


def test_follow_up_generation_reuses_a_consistent_cache(tiny_bundles, plain, plain_outputs):
    """After speculative generations (including ones cut by stop rules) the cached prefix is still right: a
    follow-up prompt gives what a fresh plain engine gives."""
    # the most varied output (tiny random models tend to repeat themselves)
    arch, prompt = max(plain_outputs, key=lambda k: len(set(plain_outputs[k][1][:16])))
    ids, expected = plain_outputs[arch, prompt]
    eos_at = next(j for j in range(5, 48) if expected[j] not in expected[:j])
    drafter = OracleDrafter(ids + expected, len(ids), plain[arch].entry.vocab_size, depth=8)
    engine = _spec_engine(tiny_bundles[arch], drafter)
    engine.generate(ids, max_new_tokens=10, ignore_eos=True)
    cut = engine.generate(ids, max_new_tokens=30, eos_token_ids=(expected[eos_at],))
    assert cut.token_ids == expected[:eos_at] and cut.finish_reason == "stop"
    follow = ids + expected[:eos_at + 4] + engine.encode(" and then")
    fresh = load(tiny_bundles[arch], drafter=None).generate(follow, max_new_tokens=16, ignore_eos=True)
    got = engine.generate(follow, max_new_tokens=16, ignore_eos=True)
    assert got.token_ids == fresh.token_ids
    assert got.stats.reused_prompt_tokens > len(ids)


def test_bad_drafter_output_raises_clearly(tiny_bundles):
    class Broken(Drafter):
        name = "broken"

        def __init__(self, tree):
            self.tree = tree

        def propose(self, context, budget):
            return self.tree

    bundle = tiny_bundles["qwen2"]
    with pytest.raises(ValueError, match="vocabulary"):
        _spec_engine(bundle, Broken(DraftTree.chain([10**6]))).generate("hi", max_new_tokens=4)
    with pytest.raises(ValueError, match="parents"):
        _spec_engine(bundle, Broken(DraftTree(np.array([1, 2]), np.array([0, -1])))).generate("hi", max_new_tokens=4)
    with pytest.raises(TypeError, match="DraftTree"):
        _spec_engine(bundle, Broken([1, 2])).generate("hi", max_new_tokens=4)
    with pytest.raises(ValueError, match="unknown drafter"):
        load(bundle, drafter="telepathy")
    with pytest.raises(ValueError, match="draft_budget"):
        load(bundle, drafter=None, draft_budget=-1)


def test_stats_and_drafter_lifecycle(tiny_bundles, plain_outputs, plain):
    class Recording(OracleDrafter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.events = []

        def start(self, prompt_ids, config):
            self.events.append(("start", len(prompt_ids)))

        def observe(self, step):
            assert step.fed_tokens[0] == step.fed_tokens[0] and step.target_logits.shape[0] == len(step.fed_tokens)
            self.events.append(("observe", len(step.accepted)))

        def finish(self, context):
            self.events.append(("finish", len(context)))

    ids, expected = plain_outputs["gemma3", 1]
    drafter = Recording(ids + expected, len(ids), plain["gemma3"].entry.vocab_size, depth=5)
    result = _spec_engine(tiny_bundles["gemma3"], drafter).generate(ids, max_new_tokens=30, ignore_eos=True)
    s = result.stats
    assert drafter.events[0] == ("start", len(ids)) and drafter.events[-1][0] == "finish"
    observed = [n for kind, n in drafter.events if kind == "observe"]
    assert len(observed) == s.steps - 1  # every step after the prefill is one verification
    assert sum(observed) + 1 >= 30  # accepted + bonus tokens cover the output (the first came from the prefill)
    d = s.to_dict()
    assert d["drafter"] == "oracle" and d["mean_accepted_tokens"] == pytest.approx(30 / s.steps, abs=1e-3)
    assert 0 < d["acceptance_rate"] <= 1
    assert s.verify_seconds > 0 and s.draft_seconds > 0 and s.bookkeeping_seconds >= 0
    assert s.decode_seconds >= s.verify_seconds


def test_draft_budget_zero_is_plain(tiny_bundles, plain_outputs, plain):
    ids, expected = plain_outputs["qwen2", 0]
    drafter = RandomDrafter(plain["qwen2"].entry.vocab_size)
    result = _spec_engine(tiny_bundles["qwen2"], drafter, budget=0).generate(ids, max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == expected[:16] and result.stats.drafted_tokens == 0 and result.stats.steps == 16


# ---- lossless sampling through the engine ---------------------------------------------------------------------


SAMPLING = dict(temperature=1.0, top_k=4, max_new_tokens=3, ignore_eos=True)
RUNS = 4000
TOKEN2_TV_BOUND = 0.032  # measured: correct verifiers 0.010-0.018, a broken residual 0.048-0.053 (4,000 runs)
TOKEN3_TV_BOUND = 0.045  # measured: correct 0.020-0.022 (more outcomes, so a looser bound)


def _exact_marginals(entry, ids: list[int]) -> tuple[Counter, Counter]:
    """Exact distributions of generated tokens 2 and 3 under plain sampling, enumerated from the target (top-k 4
    keeps this to 4 + 16 + 64 outcomes)."""
    runner = ModelRunner(entry, threads=1)

    def probs(context):
        runner.reset()
        return process_logits(runner.prefill(context), SAMPLING["temperature"], SAMPLING["top_k"])

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


def _empirical_marginals(engine: Engine, ids: list[int], seed0: int) -> tuple[Counter, Counter]:
    second, third = Counter(), Counter()
    for seed in range(seed0, seed0 + RUNS):
        out = engine.generate(ids, seed=seed, **SAMPLING).token_ids
        second[out[1]] += 1 / RUNS
        third[out[2]] += 1 / RUNS
    return second, third


def _tv(a: Counter, b: Counter) -> float:
    return 0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b))


@pytest.fixture(scope="module")
def sampling_setup(plain):
    engine = plain["qwen2"]
    ids = engine.encode(PROMPTS[0])
    return ids, _exact_marginals(engine.entry, ids)


def _reversed_q_drafter(plain) -> ModelSampleDrafter:
    """Draft probabilities on the target's own top-4 tokens with the odds reversed: many rejections, so the
    residual update decides the outcome."""
    return ModelSampleDrafter(plain["qwen2"].entry, width=2, depth=2, top_k=4, seed=3, scramble=True)


@pytest.mark.parametrize("drafter_kind", ["reversed-q", "random"])
def test_speculative_sampling_matches_exact_distribution(drafter_kind, tiny_bundles, plain, sampling_setup):
    """Generated tokens 2 and 3 (the drafted positions) follow the target's exact distribution, with rejection
    sampling against a very different q and with deterministic (garbage) drafts."""
    ids, (second, third) = sampling_setup
    drafter = (_reversed_q_drafter(plain) if drafter_kind == "reversed-q"
               else RandomDrafter(plain["qwen2"].entry.vocab_size, shape="binary", seed=3))
    got_second, got_third = _empirical_marginals(_spec_engine(tiny_bundles["qwen2"], drafter, budget=4), ids, 10_000)
    assert _tv(got_second, second) < TOKEN2_TV_BOUND
    assert _tv(got_third, third) < TOKEN3_TV_BOUND


def test_engine_sampling_test_detects_a_broken_residual(tiny_bundles, plain, sampling_setup, monkeypatch):
    """With the residual update broken (p kept after a rejection) the same test fails: it can catch a lossy
    verifier."""
    ids, (second, _) = sampling_setup
    monkeypatch.setattr(verify_module, "residual", lambda p, q: p)
    got_second, _ = _empirical_marginals(_spec_engine(tiny_bundles["qwen2"], _reversed_q_drafter(plain), budget=4),
                                         ids, 10_000)
    assert _tv(got_second, second) > TOKEN2_TV_BOUND


def test_first_difference_helper():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    tree = random_tree(np.random.default_rng(0), 9, 50, "binary")
    tree.validate(50)
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, 3]


def test_old_int8_activation_bundles_warn_that_speculation_is_not_exact(tiny_bundles, tmp_path):
    """Accuracy level 4 from an exporter whose attention was not T-invariant (no `t_invariant` in the manifest):
    the engine says speculation may change its output. Today's exports say they are T-invariant: no warning."""
    import json
    import shutil
    import warnings

    copy = tmp_path / "level4"
    shutil.copytree(tiny_bundles["qwen2"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for model in manifest["models"].values():
        assert model["quantization"]["t_invariant"] is True
        model["quantization"]["accuracy_level"] = 4
        del model["quantization"]["t_invariant"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="accuracy level 4"):
        engine = load(copy, drafter=RandomDrafter(16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(copy, drafter=None)  # plain decoding: nothing to warn about
        load(tiny_bundles["qwen2"], drafter=RandomDrafter(16))  # exact bundle: no warning
    with pytest.warns(UserWarning, match="accuracy level 4"):
        engine.set_drafter(RandomDrafter(16))
    for model in manifest["models"].values():
        model["quantization"]["t_invariant"] = True
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(copy, drafter=RandomDrafter(16))


def test_engine_measures_a_plain_step_now_and_then(tiny_bundles, monkeypatch):
    """The cost of scoring one token (what drafting must beat) is measured, not extrapolated: the first step of a
    drafting engine, and one every PLAIN_STEP_EVERY steps, asks the drafter for nothing."""
    import edgespec.engine as engine_module

    monkeypatch.setattr(engine_module, "PLAIN_STEP_EVERY", 5)

    class Recorder(Drafter):
        name = "recorder"

        def __init__(self):
            self.budgets = []

        def propose(self, context, budget):
            self.budgets.append(budget)
            return DraftTree.empty()

    drafter = Recorder()
    engine = load(tiny_bundles["qwen2"], threads=1, drafter=drafter, draft_budget=4)
    engine.generate("The quick", max_new_tokens=16, ignore_eos=True)
    assert 1 in engine._verify_cost.seconds
    assert drafter.budgets[0] == 0 and drafter.budgets[1] == 4
    assert [i for i, b in enumerate(drafter.budgets[:-1]) if b == 0] == [0, 6, 12]
    plain = load(tiny_bundles["qwen2"], threads=1, drafter=None)
    plain.generate("The quick", max_new_tokens=4, ignore_eos=True)
    assert 1 in plain._verify_cost.seconds  # plain decoding measures it too
