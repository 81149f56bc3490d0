"""T-invariance: what makes speculation exact on the fast (int8-activation) default.

A token scored inside a T-token chain must get bitwise the logits and K/V it gets when the chain is decoded one
token at a time; the prefill's chunking must not matter either. Tree nodes off the leading chain sit at other cache
slots, so the engine lays the main branch out first and cuts an accepted path where it leaves it
(`verify.cut_to_exact_prefix`): speculative greedy output then equals plain output bitwise, with no near-tie
allowance, for every drafter shape.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgespec.drafters.base import DraftTree, Drafter
from edgespec.engine import load
from edgespec.runtimes.manifest import load_manifest
from edgespec.runtimes.runner import ModelRunner
from edgespec.verify import cut_to_exact_prefix

from spec_helpers import OracleDrafter, RandomDrafter

ARCHS = ("qwen2", "llama", "gemma3")
FORMS = {"int4": dict(quant="int4"), "int8": dict(quant="int8")}  # accuracy level 4, 8-bit as MatMulNBits


@pytest.fixture(scope="session")
def fast_bundles(tiny_models, tmp_path_factory):
    """Tiny models exported in block-quantized forms at the default (int8-activation) kernels."""
    from edgespec.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("fast-bundles")
    out = {}
    for arch, folder in tiny_models.items():
        for form, kwargs in FORMS.items():
            out[arch, form] = export_bundle(str(folder), root / f"{arch}-{form}", name=f"tiny-{arch}-{form}",
                                            log=lambda m: None, **kwargs).bundle
    return out


def chain_mismatches(runner: ModelRunner, prefix, chain) -> dict[int, list[str]]:
    """For T = 2..len(chain): which rows of a T-token forward (logits, or any layer's K/V) differ bitwise from
    decoding the chain one token at a time after `prefix`. Empty when the runner is T-invariant."""
    runner.reset()
    runner.prefill(prefix)
    base = runner.length
    singles = []
    for token in chain:
        singles.append(runner.forward([token])[0].copy())
        runner.commit()
    keys = [k[:, :, base:runner.length].copy() for k in runner.cache.keys]
    values = [v[:, :, base:runner.length].copy() for v in runner.cache.values]
    runner.rewind(base)
    bad = {}
    for t in range(2, len(chain) + 1):
        logits = runner.forward(chain[:t])
        rows = [f"logits[{i}]" for i in range(t) if not np.array_equal(logits[i], singles[i])]
        rows += [f"{kind}[{layer}]" for layer in range(len(keys)) for kind, cache, ref in
                 (("key", runner.cache.keys, keys), ("value", runner.cache.values, values))
                 if not np.array_equal(cache[layer][:, :, base:base + t], ref[layer][:, :, :t])]
        if rows:
            bad[t] = rows
        runner.rewind(base)
    return bad


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("context", [5, 300])
def test_chain_forward_equals_single_steps_bitwise(arch, form, context, fast_bundles):
    """Chains of T = 2..16 at short and long contexts (past the sliding window of the tiny Gemma): every row's
    logits and every layer's K/V are bitwise those of one-at-a-time decoding."""
    entry = load_manifest(fast_bundles[arch, form]).target_model
    assert entry.quantization["accuracy_level"] == 4 and entry.quantization["t_invariant"] is True
    runner = ModelRunner(entry, threads=2, max_context=512)
    rng = np.random.default_rng(context)
    prefix = rng.integers(3, entry.vocab_size, context)
    chain = rng.integers(3, entry.vocab_size, 16)
    assert chain_mismatches(runner, prefix, chain) == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_chunking_does_not_change_the_cache(arch, fast_bundles):
    """The prompt's K/V and last logits are bitwise the same whatever the prefill chunk size (so a reused prefix
    cache and a fresh prefill agree)."""
    entry = load_manifest(fast_bundles[arch, "int4"]).target_model
    runner = ModelRunner(entry, threads=2, max_context=512)
    prompt = np.random.default_rng(1).integers(3, entry.vocab_size, 90)
    results = []
    for chunk in (256, 32, 7, 1):
        runner.reset()
        logits = runner.prefill(prompt, chunk_size=chunk).copy()
        results.append((logits, [k[:, :, :90].copy() for k in runner.cache.keys + runner.cache.values]))
    for logits, kv in results[1:]:
        assert np.array_equal(logits, results[0][0])
        assert all(np.array_equal(a, b) for a, b in zip(kv, results[0][1]))


def test_off_branch_tree_nodes_differ_from_their_paths(fast_bundles):
    """Why trees are cut: a node off the leading chain sits at a cache slot other than its position; somewhere
    among these contexts its logits differ bitwise from decoding its path as a chain (on the main branch they never
    do)."""
    entry = load_manifest(fast_bundles["qwen2", "int4"]).target_model
    runner = ModelRunner(entry, threads=2, max_context=512)
    parents = np.array([-1, 0, 1, 2, 3, 4, 1, 6, 7, -1, 9, 3])
    depth_of = lambda i: 0 if parents[i] < 0 else 1 + depth_of(parents[i])  # noqa: E731
    off_branch_differs = 0
    for context in (5, 40, 127, 250):
        rng = np.random.default_rng(context)
        runner.reset()
        runner.prefill(rng.integers(3, entry.vocab_size, context))
        base = runner.length
        tokens = rng.integers(3, entry.vocab_size, len(parents))
        tree_logits = runner.forward(tokens, parents=parents).copy()
        runner.rewind(base)
        for node in range(len(parents)):
            path, i = [], node
            while i >= 0:
                path.append(i)
                i = parents[i]
            chain_logits = runner.forward(tokens[path[::-1]])[-1].copy()
            runner.rewind(base)
            same = np.array_equal(chain_logits, tree_logits[node])
            if node <= 5:
                assert same, (context, node)  # the leading chain: slot == position
            elif not same:
                off_branch_differs += 1
    assert off_branch_differs > 0


def test_chain_first_and_cut_to_exact_prefix():
    """The main branch (first child at each level) moves to the front as a chain, siblings keep their order; an
    accepted path that leaves it is cut at its first off-branch node, which becomes the bonus, and what lay below
    comes back as the replay."""
    tree = DraftTree(np.array([10, 11, 12, 13, 14, 15]), np.array([-1, -1, 0, 0, 2, 3]))
    laid = tree.chain_first()
    assert laid.tokens.tolist() == [10, 12, 14, 11, 13, 15]
    assert laid.parents.tolist() == [-1, 0, 1, -1, 0, 4]
    assert laid.exact_prefix() == 3 and tree.exact_prefix() == 1
    assert [laid.tokens[c] for c in laid.children()[1]] == [12, 13]  # node 10's children in their old order
    chain = DraftTree.chain([1, 2, 3])
    assert chain.chain_first() is chain and chain.exact_prefix() == 3
    # path 10 -> 13 -> 15 accepted, bonus 99: 13 is off the chain, so it becomes the bonus and 15, 99 replay
    assert cut_to_exact_prefix(laid, [0, 4, 5], 99) == ([0], 13, [15, 99])
    assert cut_to_exact_prefix(laid, [0, 1, 2], 99) == ([0, 1, 2], 99, [])
    assert cut_to_exact_prefix(laid, [3], 99) == ([], 11, [99])


class SecondChildOracle(Drafter):
    """Proposes the plain output as the *second* child at every level (a wrong token first): every accepted path
    leaves the main branch at once, so the engine must cut, take the bonus, and replay the rest."""

    name = "second-child"

    def __init__(self, full_ids, vocab_size, depth=6):
        self.full, self.vocab_size, self.depth = list(full_ids), vocab_size, depth

    def propose(self, context, budget):
        n = len(context)
        truth = self.full[n:n + self.depth]
        if context != self.full[:n] or not truth or budget < 2:
            return DraftTree.empty()
        tokens, parents, parent = [], [], -1
        for token in truth:
            if len(tokens) + 2 > budget:
                break
            tokens += [(token + 1) % self.vocab_size, token]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return DraftTree(np.array(tokens), np.array(parents))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_greedy_equals_plain_bitwise_at_the_fast_default(arch, form, fast_bundles):
    """Every tree shape, partial acceptance, off-branch truths and the replay: token ids identical to plain
    decoding on the same int8-activation bundle, with no near-tie allowance."""
    bundle = fast_bundles[arch, form]
    plain = load(bundle, threads=2, drafter=None)
    prompts = ["The quick brown fox jumps over", "def add(a, b):\n    return"]
    for prompt in prompts:
        ids = plain.encode(prompt)
        expected = plain.generate(ids, max_new_tokens=40, ignore_eos=True).token_ids
        vocab = plain.entry.vocab_size
        drafters = [OracleDrafter(ids + expected, len(ids), vocab, depth=8, distractors=2, corrupt_every=3),
                    SecondChildOracle(ids + expected, vocab)]
        drafters += [RandomDrafter(vocab, shape=shape, seed=3) for shape in ("chain", "wide", "binary", "random")]
        for drafter in drafters:
            spec = plain.variant(drafter, draft_budget=16, tree="scores")
            got = spec.generate(ids, max_new_tokens=40, ignore_eos=True)
            assert got.token_ids == expected, (drafter.name, prompt)
            if isinstance(drafter, (OracleDrafter, SecondChildOracle)):
                assert got.stats.accepted_tokens > 0, drafter.name


def test_sampled_verification_stops_at_the_cut_with_one_draw_per_token():
    """Sampling with deterministic drafts: the walk stops at the first off-branch node it accepts (its token is the
    bonus), having drawn exactly one random number per emitted token, as plain sampling does; the drafted main
    branch below it is the replay."""
    from edgespec.sampling import GenerationConfig
    from edgespec.verify import verify_exact

    tree = DraftTree(np.array([1, 2, 3, 4, 5]), np.array([-1, -1, 1, 2, 2])).chain_first()  # 1 | 2 -> 3 -> 4, 5
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5] and tree.exact_prefix() == 1
    logits = np.full((6, 8), -30.0)
    logits[0, 2] = logits[2, 3] = logits[3, 4] = logits[4, 6] = 30.0  # the target's path: 2, 3, 4, then 6
    config = GenerationConfig(temperature=1.0, seed=0)

    class CountingRng:
        def __init__(self):
            self.rng, self.draws = np.random.default_rng(0), 0

        def random(self, *args, **kwargs):
            self.draws += 1
            return self.rng.random(*args, **kwargs)

    rng = CountingRng()
    accepted, bonus, replay = verify_exact(tree, logits, config, rng)
    assert (accepted, bonus, replay) == ([], 2, [3, 4])
    assert rng.draws == 1
    greedy = GenerationConfig()
    assert verify_exact(tree, logits, greedy, rng) == ([], 2, [3, 4, 6])
