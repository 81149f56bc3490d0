"""The tree-size decision: verification cost model, node selection and calibration of acceptance estimates."""

from __future__ import annotations

import numpy as np
import pytest

from edgespec.budget import Calibration, VerifyCost, choose_nodes


def test_verify_cost_prior_measured_and_interpolated():
    cost = VerifyCost(prior_slope=0.1, smoothing=0.5)
    assert cost.cost(1) == pytest.approx(1.0) and cost.cost(11) == pytest.approx(2.0)
    cost.observe(1, 0.10)
    assert cost.cost(1) == pytest.approx(0.10)
    assert cost.cost(11) == pytest.approx(0.20)  # scaled by the prior from the nearest measurement
    cost.observe(5, 0.20)
    assert cost.cost(3) == pytest.approx(0.15)  # interpolated between 1 and 5
    cost.observe(5, 0.30)
    assert cost.cost(5) == pytest.approx(0.25)  # moving average


def test_choose_nodes_keeps_what_pays_off():
    parents = np.array([-1, 0, 1, 2])
    flat = lambda t: 1.0 + 0.1 * (t - 1)  # noqa: E731
    assert choose_nodes(np.array([0.9, 0.8, 0.7, 0.6]), parents, flat) == [0, 1, 2, 3]
    assert choose_nodes(np.array([0.05, 0.01, 0.0, 0.0]), parents, flat) == []  # not worth 10% per token
    steep = lambda t: 1.0 + 1.0 * (t - 1)  # noqa: E731 (every token doubles the cost: never pays)
    assert choose_nodes(np.array([0.9, 0.8, 0.7, 0.6]), parents, steep) == []
    # a likely sibling is taken before an unlikely deep node, and children only with their parents
    tree_parents = np.array([-1, -1, 0])
    assert choose_nodes(np.array([0.5, 0.45, 0.02]), tree_parents, flat) == [0, 1]


def test_calibration_moves_estimates_towards_outcomes():
    calib = Calibration()
    scores, parents = np.array([0.5, 0.25]), np.array([-1, 0])
    assert Calibration.conditional(scores, parents).tolist() == [0.5, 0.5]
    for _ in range(20):
        calib.update(scores, parents, accepted_nodes=[0, 1])  # always accepted: under-confident drafter
    assert calib.factor > 1.5
    assert calib.adjust(scores, parents)[1] > 0.25
    for _ in range(60):
        calib.update(scores, parents, accepted_nodes=[])  # never accepted: over-confident
    assert calib.factor < 0.5
    adjusted = calib.adjust(scores, parents)
    assert adjusted[0] < 0.25 and adjusted[1] <= adjusted[0]


def _hand_profile(ms_by_size: dict[int, float]):
    from edgespec.devices.profile import DeviceProfile

    sizes = sorted(ms_by_size)
    return DeviceProfile(name="hand", created="2026-12-06T00:00:00", device={"device_id": "test"}, threads=2,
                         bundle={"key": "test", "model": "tiny"},
                         verify_ms={"contexts": [128], "sizes": sizes, "ms": [[ms_by_size[n] for n in sizes]]})


def test_profile_cost_corrects_one_size_measured_at_a_bad_moment():
    """The recorded case: one token profiled at 777 ms while a compiler ran, truly 158 ms. After a few plain steps
    the one-token cost is the observed one; sizes that match the profile keep its costs."""
    from edgespec.budget import ProfileCost

    cost = ProfileCost(_hand_profile({1: 777.0, 2: 278.0, 4: 328.0, 8: 380.0}))
    cost.context = 128
    for _ in range(7):
        cost.observe(1, 0.158)
        cost.observe(4, 0.330)
    profiled = {n: cost.profile.verify_seconds(n, 128) for n in (1, 4, 8)}
    assert profiled[1] > 0.4  # the bad reading (seen through the profile's non-decreasing fit)
    assert not cost.changed and cost.cost(1) == pytest.approx(profiled[1])  # not enough evidence yet
    cost.observe(1, 0.158)
    cost.observe(4, 0.330)
    assert cost.changed and cost.scale == 1.0 and set(cost.corrections) == {1}
    assert cost.cost(1) == pytest.approx(0.158)
    assert cost.cost(4) == pytest.approx(profiled[4]) and cost.cost(8) == pytest.approx(profiled[8])


def test_profile_cost_scales_a_profile_from_another_load_and_lets_go_when_it_holds_again():
    from edgespec.budget import ProfileCost

    cost = ProfileCost(_hand_profile({1: 100.0, 2: 110.0, 4: 130.0}))
    cost.context = 128
    for i in range(24):
        cost.observe(1 + i % 3, 0.3 * cost.profile.verify_seconds(1 + i % 3, 128))  # 3x faster everywhere
    assert cost.scale == pytest.approx(0.3) and cost.corrections == {}
    assert cost.cost(2) == pytest.approx(0.033) and cost.changed
    cost.changed = False
    for i in range(64):
        cost.observe(1 + i % 3, cost.profile.verify_seconds(1 + i % 3, 128))  # the profile holds again
    assert cost.changed and cost.scale == 1.0 and cost.cost(4) == pytest.approx(0.130)


def test_engine_says_when_the_profile_is_wrong_and_plans_again(tiny_bundles):
    """A tiny model's forwards take well under a millisecond; a profile claiming 10-20 ms is corrected, with a
    warning naming the profile and the command that measures it again, and the output stays exact."""
    import warnings

    from edgespec.engine import load

    plain = load(tiny_bundles["qwen2"], threads=1, drafter=None)
    expected = plain.generate("The quick", max_new_tokens=24, ignore_eos=True).token_ids
    engine = load(tiny_bundles["qwen2"], threads=1, drafter="ngram", ngram_cache=False, history=False,
                  device=_hand_profile({1: 10.0, 2: 11.0, 4: 12.0, 8: 14.0, 16: 20.0}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = engine.generate("The quick", max_new_tokens=24, ignore_eos=True).token_ids
    assert got == expected
    messages = [str(w.message) for w in caught if "does not match this session's timings" in str(w.message)]
    assert messages and "'hand'" in messages[0] and "edgespec profile --bundle" in messages[0]
    assert engine._verify_cost.scale < 0.5
