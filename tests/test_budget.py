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
