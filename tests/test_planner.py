"""The tree planner: Sequoia's dynamic program against brute force, the device cost curve in the objective,
online acceptance statistics, re-planning, probing, and fixed shapes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgespec.drafters.base import DraftTree
from edgespec.planner import (AcceptanceStats, Planner, best_trees, expected_accepted, fit_to_shape, fixed_shape,
                              levels_and_ranks, make_plan, plan_tree, rank_paths)


def _all_trees(n: int, levels: int, ranks: int):
    """Every parents array of n nodes (parents before children) within the level and rank limits."""
    for parents in itertools.product(*[range(-1, i) for i in range(n)]):
        parents = np.array(parents)
        lv, rk = levels_and_ranks(parents)
        if lv.max() < levels and rk.max() < ranks:
            yield parents


def test_levels_ranks_and_paths():
    parents = np.array([-1, -1, 0, 0, 2, -1])
    levels, ranks = levels_and_ranks(parents)
    assert levels.tolist() == [0, 0, 1, 1, 2, 0]
    assert ranks.tolist() == [0, 1, 0, 1, 0, 2]
    assert rank_paths(parents) == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0), (2,)]
    rates = np.array([[0.5, 0.2, 0.1], [0.4, 0.1, 0.0], [0.3, 0.0, 0.0]])
    # 0.5 + 0.2 + 0.5*0.4 + 0.5*0.1 + 0.5*0.4*0.3 + 0.1
    assert expected_accepted(parents, rates) == pytest.approx(0.5 + 0.2 + 0.2 + 0.05 + 0.06 + 0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_program_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.0, 0.6, (3, 3))
    rates /= np.maximum(1.0, rates.sum(axis=1, keepdims=True))
    shapes = best_trees(rates, 6, levels=3)
    for n in range(1, 6):
        brute = max(expected_accepted(p, rates) for p in _all_trees(n, 3, 3))
        assert shapes.values[n] == pytest.approx(brute)
        built = shapes.build(n)
        assert len(built) == n and expected_accepted(built, rates) == pytest.approx(brute)
        assert np.all(built < np.arange(n))  # parents before children


def test_depth_limit_and_chain_for_high_first_rank():
    rates = np.tile([0.9, 0.05, 0.02, 0.01], (12, 1))
    shapes = best_trees(rates, 8)
    assert shapes.build(8).tolist() == list(range(-1, 7))  # a chain: rank 0 dominates at every level
    limited = best_trees(rates, 8, levels=2)
    assert levels_and_ranks(limited.build(8))[0].max() <= 1
    assert not np.isfinite(best_trees(rates, 20, levels=1).values[5])  # 5 siblings do not fit 4 ranks


def test_plan_follows_the_cost_curve():
    rates = AcceptanceStats(first_rate=0.8).rates()
    flat = plan_tree(rates, lambda t: 0.1 * (1 + 0.02 * (t - 1)), max_nodes=32)
    moderate = plan_tree(rates, lambda t: 0.1 * (1 + 0.2 * (t - 1)), max_nodes=32)
    steep = plan_tree(rates, lambda t: 0.1 * t, max_nodes=32)  # n tokens cost n steps: nothing pays
    assert flat.nodes > moderate.nodes > 0
    assert steep.nodes == 0 and steep.tokens_per_step == 1.0 and steep.speedup == pytest.approx(1.0)
    assert flat.speedup > moderate.speedup > 1.0
    # the plan is the best of all sizes under the same model
    for n in range(1, 33):
        shape = best_trees(rates, 32).build(n)
        assert make_plan(shape, rates, lambda t: 0.1 * (1 + 0.2 * (t - 1))).tokens_per_second <= \
            moderate.tokens_per_second + 1e-9
    probe = plan_tree(rates, lambda t: 0.1 * t, max_nodes=32, at_least_one=True)
    assert probe.nodes >= 1


def test_drafting_time_shortens_the_plan():
    rates = np.tile([0.7, 0.15, 0.05, 0.02], (12, 1))
    verify = lambda t: 0.1 * (1 + 0.05 * (t - 1))  # noqa: E731
    free = plan_tree(rates, verify, None, max_nodes=32)
    costly = plan_tree(rates, verify, lambda depth, nodes: 0.04 * depth, max_nodes=32)
    assert costly.depth < free.depth
    assert costly.seconds_per_step == pytest.approx(verify(1 + costly.nodes) + 0.04 * costly.depth)


def test_acceptance_stats_learn_level_and_rank():
    stats = AcceptanceStats(first_rate=0.5, decay=1.0, prior_weight=2.0)
    parents = np.array([-1, -1, 0])  # two first-level siblings, a child below the first
    for i in range(100):
        stats.update(parents, [1] if i % 4 == 0 else [0, 2] if i % 4 == 1 else [0])
    assert stats.offered[0, :2].tolist() == [100, 100]
    assert stats.offered[1, 0] == 75  # reached only when node 0 was accepted
    rates = stats.rates()
    assert rates[0, 0] == pytest.approx((75 + 1.0) / 102)
    assert rates[0, 1] == pytest.approx((25 + 2 * 0.15) / 102)
    assert rates[1, 0] == pytest.approx((25 + 2 * rates[0, 0]) / 77)
    assert np.all(rates.sum(axis=1) <= 1.0 + 1e-9)


def test_fit_to_shape_and_fixed_shapes():
    tree = DraftTree(np.array([10, 11, 12, 13, 14]), np.array([-1, -1, 0, 0, 2]), scores=np.arange(5) / 10)
    chain = frozenset(rank_paths(fixed_shape("chain:2")))
    fitted = fit_to_shape(tree, chain)
    assert fitted.tokens.tolist() == [10, 12] and fitted.parents.tolist() == [-1, 0]
    assert fitted.scores.tolist() == [0.0, 0.2]
    wide = fixed_shape("tree:2x3")
    assert wide.tolist() == [-1, 0, 1, -1, 3, 4]
    assert fit_to_shape(tree, frozenset(rank_paths(wide))).tokens.tolist() == [10, 11, 12, 14]
    for bad in ("chain:0", "chain:x", "tree:9x9", "line:3", ""):
        with pytest.raises(ValueError):
            fixed_shape(bad)


def _tree(first_score: float, depth: int = 4) -> DraftTree:
    scores = first_score ** np.arange(1, depth + 1)
    return DraftTree(np.arange(depth) + 5, np.arange(-1, depth - 1), scores=scores)


def test_planner_buckets_and_switch_off():
    cheap = lambda t, ctx: 0.1 * (1 + 0.05 * (t - 1))  # noqa: E731
    planner = Planner(cheap, max_nodes=8, first_pause=4)
    assert planner.bucket(_tree(0.9)) == 2 and planner.bucket(_tree(0.1)) == 0 and planner.bucket(_tree(0.5)) == 1
    # the confident bucket keeps being accepted, the unsure one never
    for _ in range(200):
        tree, prediction = planner.fit(_tree(0.9), 100)
        planner.observe(tree, list(range(len(tree))), prediction.bucket)
        tree, prediction = planner.fit(_tree(0.1), 100)
        planner.observe(tree, [], prediction.bucket)
    confident, unsure = planner.plan(2, 100), planner.plan(0, 100)
    assert confident.nodes >= 4 and unsure.nodes == 0
    assert planner.stats[2].rates()[0, 0] > 0.9 and planner.stats[0].rates()[0, 0] < 0.1
    # an unsure proposal is dropped (plain step) except for a probe now and then, with doubling pauses
    verified = []
    for _ in range(60):
        planner.request(100)
        tree, _ = planner.fit(_tree(0.1), 100)
        verified.append(len(tree))
    probes = [i for i, n in enumerate(verified) if n]
    assert 1 <= len(probes) <= 4 and all(b - a >= 8 for a, b in zip(probes, probes[1:]))
    assert planner.request(100) >= confident.nodes


def _stale_planner():
    """A planner whose bucket 2 was planned on a right drafter, then saw it stop being right (its plan is stale);
    returns it and that first plan."""
    moderate = lambda t, ctx: 0.1 * (1 + 0.3 * (t - 1))  # noqa: E731
    planner = Planner(moderate, max_nodes=8, replan_every=4)
    for _ in range(100):
        planner.observe(_tree(0.9), [0, 1, 2, 3], 2)
    before = planner.plan(2, 10)
    for _ in range(300):
        planner.observe(_tree(0.9), [], 2)  # the drafter stopped being right
    return planner, before


def test_planner_replans_when_acceptance_drifts():
    planner, before = _stale_planner()
    after = planner.plan(2, 10)
    assert before.nodes > after.nodes and planner.replans >= 2


def test_describe_reads_the_plans_without_moving_the_replan_clocks():
    planner, before = _stale_planner()  # stale: the next plan() re-plans
    plans, replans = dict(planner._plans), planner.replans
    described = planner.describe(10)
    assert planner._plans == plans and planner.replans == replans  # looking changed nothing
    after = planner.plan(2, 10)
    assert described[2]["nodes"] == after.nodes < before.nodes  # and it showed what plan() now returns


def test_a_plain_bucket_speculates_again_after_a_few_good_probes():
    """A bucket planned plain (its prior does not pay on this cost curve) learns only from probes; each probe's
    outcome is checked at once, so a drafter that turns out right is used after two probes, not after the
    `replan_every` (16) probes that would take thousands of steps with doubling pauses."""
    costly = lambda t, ctx: 0.1 * (1 + 0.7 * (t - 1))  # noqa: E731  (one drafted node pays above 0.7 acceptance)
    planner = Planner(costly, max_nodes=8, first_pause=8)
    assert planner.plan(1, 100).nodes == 0  # the middle bucket's prior, 0.5, does not pay
    drafted_at = None
    for step in range(60):
        planner.request(100)
        tree, prediction = planner.fit(_tree(0.5), 100)
        planner.observe(tree, list(range(len(tree))), prediction.bucket)  # every probe is fully accepted
        if planner.plan(1, 100).nodes:
            drafted_at = step
            break
    assert drafted_at is not None and drafted_at < 40  # probes at steps 7 and 23: the second one flips the plan


def test_planner_uses_the_cost_at_the_context_length():
    # verification gets dearer with context: short contexts draft, long ones do not
    cost = lambda t, ctx: 0.1 * (1 + (0.02 if ctx < 1000 else 1.5) * (t - 1))  # noqa: E731
    planner = Planner(cost, max_nodes=8)
    for _ in range(50):
        planner.observe(_tree(0.5), [0], 1)
    assert planner.plan(1, 100).nodes > 0 and planner.plan(1, 3000).nodes == 0


# ---- the engine under each tree policy (tiny models) ---------------------------------------------------------------
from edgespec.devices import DeviceProfile  # noqa: E402
from edgespec.engine import load  # noqa: E402

from spec_helpers import OracleDrafter, assert_exact_or_near_tie  # noqa: E402

PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"


def _profile(slope: float, name: str = "hand") -> DeviceProfile:
    """A hand-made profile: one token 10 ms, each further token `slope` x 10 ms."""
    sizes = [1, 2, 4, 8, 16, 32, 64]
    return DeviceProfile(name=name, created="2026-11-24T00:00:00", device={"device_id": "test"}, threads=2,
                         bundle={"key": "test", "model": "tiny"},
                         verify_ms={"contexts": [128], "sizes": sizes, "ms": [[10.0 * (1 + slope * (n - 1))
                                                                                for n in sizes]]})


@pytest.fixture(scope="module")
def reference(tiny_bundles):
    engine = load(tiny_bundles["qwen2"], threads=2, drafter=None)
    ids = engine.encode(PROMPT)
    return engine, ids, engine.generate(ids, max_new_tokens=40, ignore_eos=True).token_ids


@pytest.mark.parametrize("tree", ["plan", "scores", "chain:1", "chain:3", "tree:2x2", "tree:3x4"])
def test_every_tree_policy_is_exact(tree, tiny_bundles, reference):
    plain, ids, expected = reference
    for drafter in ("ngram", "oracle"):
        spec = OracleDrafter(ids + expected, len(ids), plain.entry.vocab_size, depth=6, distractors=2) \
            if drafter == "oracle" else "ngram"
        engine = load(tiny_bundles["qwen2"], threads=2, drafter=spec, tree=tree, device=_profile(0.05),
                      history=False)
        assert engine.tree_policy == tree
        result = engine.generate(ids, max_new_tokens=40, ignore_eos=True)
        assert_exact_or_near_tie(plain.entry, ids, expected, result.token_ids, f"{tree} {drafter}")
        s = result.stats
        if tree.startswith("chain:"):  # a fixed chain never verifies more than K nodes per step
            assert s.drafted_tokens <= int(tree[6:]) * s.steps
        if drafter == "oracle" and tree != "scores":
            assert s.accepted_tokens > 0


def test_plan_follows_the_device_profile(tiny_bundles, reference):
    """The same drafter on a device where verifying more tokens is nearly free drafts big trees; where each token
    costs a full step, the plan is plain decoding (except for rare probes)."""
    plain, ids, expected = reference
    outcomes = {}
    for slope in (0.02, 1.5):
        drafter = OracleDrafter(ids + expected, len(ids), plain.entry.vocab_size, depth=8, distractors=1,
                                corrupt_every=1000)
        engine = load(tiny_bundles["qwen2"], threads=2, drafter=drafter, device=_profile(slope), history=False)
        assert engine.tree_policy == "plan" and engine._planner is not None
        result = engine.generate(ids, max_new_tokens=40, ignore_eos=True)
        assert_exact_or_near_tie(plain.entry, ids, expected, result.token_ids, f"slope {slope}")
        outcomes[slope] = result.stats
        s = result.stats
        # every decode step was planned and predicted, except those that replayed a path cut for exactness
        assert s.predicted_steps + s.replayed_steps == s.steps - 1
        assert s.observed_tokens + s.replayed_tokens == s.new_tokens - 1
    flat, steep = outcomes[0.02], outcomes[1.5]
    # (the oracle hides the truth behind a sibling half the time: such paths are cut for exactness and replayed)
    assert flat.mean_accepted_tokens > 1.6 and flat.drafted_tokens > 0
    assert steep.drafted_tokens <= 0.2 * flat.drafted_tokens and steep.mean_accepted_tokens < 1.5
    # the model's prediction of tokens per step follows what happened (an oracle drafter: long accepted runs)
    assert flat.predicted_tokens / flat.predicted_steps == pytest.approx(
        flat.observed_tokens / flat.predicted_steps, rel=0.35)


def test_engine_rejects_bad_tree_policies(tiny_bundles):
    for bad in ("chain", "tree:0x1", "biggest", 3):
        with pytest.raises((ValueError, TypeError)):
            load(tiny_bundles["qwen2"], threads=2, drafter="ngram", tree=bad, history=False)


def test_proposal_cost_splits_following_from_levels():
    from edgespec.drafters.costs import ProposalCost

    cost = ProposalCost(smoothing=0.5)
    assert cost.seconds(3) is None
    for depth in (2, 4, 2, 4, 3):  # 1 ms to follow the text + 5 ms a level
        cost.observe(0.001 + 0.005 * depth, depth, 0.005 * depth)
    assert cost.seconds(1) == pytest.approx(0.006, rel=0.05) and cost.seconds(6) == pytest.approx(0.031, rel=0.05)
    cost.observe(1.0, 0)  # a proposal that drafted nothing teaches nothing
    assert cost.proposals == 5
    only_totals = ProposalCost()
    only_totals.observe(0.02, 4)  # no split known: all of it per level
    assert only_totals.seconds(2) == pytest.approx(0.01)
