"""How big a draft tree pays off: an online cost model of verification and the node selection it drives.

On a CPU, scoring T tokens in one forward is far from free (measured on Qwen2.5-Coder-0.5B with a 1,000-token
context, 2 threads: T=1 62 ms, T=4 76 ms, T=8 94 ms, T=16 153 ms), so a tree should only be as large as its expected
gain. `VerifyCost` keeps a running estimate of the forward time for each T from the engine's own measurements
(with a linear prior for sizes not yet seen); `choose_nodes` keeps the prefix of the drafter's most likely nodes
that maximises expected tokens per second: (1 + sum of the kept nodes' acceptance estimates) / cost(1 + nodes).
"""

from __future__ import annotations

import numpy as np

PRIOR_SLOPE = 0.08  # relative cost of each extra token before any measurement (measured 0.05-0.2 on CPUs)


class VerifyCost:
    """Running estimate of the target's forward time for T tokens (exponential moving average per T)."""

    def __init__(self, prior_slope: float = PRIOR_SLOPE, smoothing: float = 0.3):
        self.prior_slope = prior_slope
        self.smoothing = smoothing
        self.seconds: dict[int, float] = {}

    def prior(self, tokens: int) -> float:
        """Relative cost before measurements: 1 + slope * (T - 1)."""
        return 1.0 + self.prior_slope * (tokens - 1)

    def observe(self, tokens: int, seconds: float) -> None:
        """Record one forward of `tokens` tokens that took `seconds`."""
        old = self.seconds.get(tokens)
        self.seconds[tokens] = seconds if old is None else old + self.smoothing * (seconds - old)

    def cost(self, tokens: int) -> float:
        """Estimated time of a forward of `tokens` tokens (measured, interpolated, or scaled by the prior)."""
        if tokens in self.seconds:
            return self.seconds[tokens]
        lower = max((t for t in self.seconds if t < tokens), default=None)
        upper = min((t for t in self.seconds if t > tokens), default=None)
        if lower is not None and upper is not None:
            w = (tokens - lower) / (upper - lower)
            return self.seconds[lower] * (1 - w) + self.seconds[upper] * w
        anchor = lower if lower is not None else upper
        if anchor is None:
            return self.prior(tokens)
        return self.seconds[anchor] * self.prior(tokens) / self.prior(anchor)


class ProfileCost:
    """Verification time from a device profile (`edgespec.devices`) at the engine's current context length (the
    engine sets `context` before each step), checked against the engine's own timings.

    A profile measured at a bad moment (a compiler running beside it), on another machine or under another load
    must not stay wrong. Each forward's time is compared with the profile's. When the median ratio (observed /
    profile) of the last forwards, at least `minimum` of them, is off by more than `tolerance`, every size is
    scaled by it (`scale`); a size whose own median ratio still differs from that by more than `tolerance` gets its
    own factor (`corrections`: one token measured at 777 ms instead of 158 ms). The scale applies only when every
    size observed often enough is off the same way. `changed` tells the engine (which re-plans and says so) when a
    correction appears, goes, or moves by more than `tolerance`.""" 

    def __init__(self, profile, window: int = 16, minimum: int = 8, tolerance: float = 1.5):
        self.profile = profile
        self.context = 0
        self.window, self.minimum, self.tolerance = window, minimum, tolerance
        self._ratios: dict[int, list[float]] = {}
        self.scale = 1.0  # factor on every size
        self.corrections: dict[int, float] = {}  # tokens -> factor replacing `scale` for that size
        self.changed = False

    def _off(self, ratio: float) -> bool:
        return ratio > self.tolerance or ratio < 1.0 / self.tolerance

    def observe(self, tokens: int, seconds: float) -> None:
        """Record one forward of `tokens` tokens that took `seconds` at the current context."""
        predicted = self.profile.verify_seconds(tokens, self.context)
        if not predicted > 0 or not seconds > 0:
            return
        ratios = self._ratios.setdefault(tokens, [])
        ratios.append(seconds / predicted)
        del ratios[:-self.window]
        if len(ratios) < self.minimum:
            return
        sized = {t: float(np.median(r)) for t, r in self._ratios.items() if len(r) >= self.minimum}
        values = list(sized.values())
        same_side = all(v > 1 for v in values) or all(v < 1 for v in values)
        scale = float(np.median(values)) if same_side and all(self._off(v) for v in values) else 1.0
        corrections = {t: r for t, r in sized.items() if self._off(r / scale)}
        if (scale, corrections) != (self.scale, self.corrections):
            moved = scale != self.scale and (self.scale == 1.0 or scale == 1.0 or self._off(scale / self.scale))
            moved = moved or set(corrections) != set(self.corrections) or any(
                self._off(r / self.corrections[t]) for t, r in corrections.items() if t in self.corrections)
            self.scale, self.corrections = scale, corrections
            self.changed = self.changed or moved

    def factor(self, tokens: int) -> float:
        """The correction applied to the profile's time for `tokens` tokens (1.0: the profile holds)."""
        return self.corrections.get(tokens, self.scale)

    def seconds(self, tokens: int, context: int) -> float:
        """The forward time of `tokens` tokens at `context`: the profile's, corrected where observed otherwise."""
        return self.profile.verify_seconds(tokens, context) * self.factor(tokens)

    def cost(self, tokens: int) -> float:
        """The forward time for `tokens` tokens at the current context length."""
        return self.seconds(tokens, self.context)


def choose_nodes(scores: np.ndarray, parents: np.ndarray, cost) -> list[int]:
    """The nodes to verify (ascending): the most likely ones first (a node only after its parent), as many as
    maximise (1 + sum of their scores) / cost(1 + count). `cost(T)` is the forward time of T tokens."""
    scores = np.asarray(scores, dtype=np.float64)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen: list[int] = []
    taken = set()
    pending = list(order)
    best_value, best_count = 1.0 / cost(1), 0
    expected = 1.0
    while pending:
        node = next((i for i in pending if parents[i] < 0 or parents[i] in taken), None)
        if node is None:
            break
        pending.remove(node)
        taken.add(node)
        chosen.append(node)
        expected += max(float(scores[node]), 0.0)
        value = expected / cost(1 + len(chosen))
        if value > best_value:
            best_value, best_count = value, len(chosen)
    return sorted(chosen[:best_count])


class Calibration:
    """Online correction of a drafter's acceptance estimates.

    A node's score is the product of per-step (conditional) estimates along its path. After each verification the
    nodes the target actually reached (children of the root and of accepted nodes) are compared with their
    conditional estimates; `factor` = (accepted + 1) / (estimated + 1) over a decaying window, and `adjust`
    rescales every conditional estimate by it (capped at 1). Over-confident drafts shrink, under-confident ones
    (long copied runs) grow."""

    def __init__(self, decay: float = 0.9, lowest: float = 0.2, highest: float = 4.0):
        self.decay, self.lowest, self.highest = decay, lowest, highest
        self.accepted = 0.0
        self.estimated = 0.0

    @property
    def factor(self) -> float:
        """Multiplier applied to each conditional estimate."""
        return min(self.highest, max(self.lowest, (self.accepted + 1.0) / (self.estimated + 1.0)))

    @staticmethod
    def conditional(scores: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """Per-node estimates given the parent was accepted: score / parent's score."""
        parent_scores = np.where(parents >= 0, scores[np.maximum(parents, 0)], 1.0)
        return np.divide(scores, parent_scores, out=np.zeros_like(scores), where=parent_scores > 0)

    def adjust(self, scores: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """Scores recomputed from the rescaled conditional estimates (parents precede children)."""
        cond = np.minimum(1.0, self.conditional(scores, parents) * self.factor)
        out = np.empty_like(cond)
        for i, parent in enumerate(parents):
            out[i] = cond[i] * (out[parent] if parent >= 0 else 1.0)
        return out

    def update(self, scores: np.ndarray, parents: np.ndarray, accepted_nodes: list[int]) -> None:
        """Learn from one verification of a tree with (unadjusted) `scores`."""
        cond = self.conditional(scores, parents)
        accepted = set(accepted_nodes)
        reached = [i for i, parent in enumerate(parents) if parent < 0 or parent in accepted]
        self.accepted = self.decay * self.accepted + len(accepted)
        self.estimated = self.decay * self.estimated + float(cond[reached].sum())
