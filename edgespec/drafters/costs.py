"""The acceptance and cost models the model drafters share (`ModelDrafter`, `CrossVocabDrafter`): how often the
target accepts a drafted token of a given draft probability, what one drafter forward costs, and whether drafting
pays off against plain decoding at all."""

from __future__ import annotations

import numpy as np


class AcceptanceByProbability:
    """How often the target accepts a drafted token, as a function of the drafter's probability for it and its rank
    among its siblings (first, second, later): decaying counts in bins of log10(probability). A bin starts from an
    optimistic prior (`prior_rate`, worth `prior_weight` pseudo-counts), so unproven nodes get verified and the bin
    learns; after that the measured rate rules. This is the drafter's confidence calibration: random-init models
    are flat but can be right, real models can be sharp but wrong."""

    EDGES = np.array([-3.0, -2.0, -1.5, -1.0, -0.7, -0.4, -0.2, -0.1, -0.04])  # log10 probability bin edges

    # Prior acceptance: sqrt(p) of the bin's middle probability (above p, so optimistic, since a same-family
    # drafter tends to be under-confident), scaled down for later siblings (they are tried only after the earlier
    # ones failed). Measured with Qwen2.5-Coder-0.5B drafting for 1.5B: first children accept at ~0.5 for
    # p in 0.1-0.2, ~0.75 for p in 0.4-0.6, 0.98 above 0.9; second children at 0.1-0.3.
    RANK_FACTORS = (1.0, 0.5, 0.35)
    RANKS = len(RANK_FACTORS)  # first, second, later siblings

    def __init__(self, prior_weight: float = 2.0, decay: float = 0.98):
        self.prior_weight, self.decay = prior_weight, decay
        bounds = np.concatenate([[-4.0], self.EDGES, [0.0]])
        middle = 10.0 ** ((bounds[:-1] + bounds[1:]) / 2)
        self.prior_rate = np.minimum(0.97, np.sqrt(middle))[None, :] * np.array(self.RANK_FACTORS)[:, None]
        self.accepted = np.zeros((self.RANKS, len(self.EDGES) + 1))
        self.reached = np.zeros((self.RANKS, len(self.EDGES) + 1))

    def bin(self, prob: float, rank: int = 0) -> tuple[int, int]:
        """Bin of a draft probability at a sibling rank."""
        return min(rank, self.RANKS - 1), int(np.searchsorted(self.EDGES, np.log10(max(prob, 1e-12))))

    def rate(self, prob: float, rank: int = 0) -> float:
        """Estimated acceptance of a token drafted with probability `prob` as its parent's `rank`-th child (given
        the parent was accepted and the earlier siblings were not)."""
        b = self.bin(prob, rank)
        return float((self.accepted[b] + self.prior_rate[b] * self.prior_weight) / (self.reached[b] + self.prior_weight))

    def update(self, probs, ranks, accepted) -> None:
        """Learn from nodes the target reached: draft probabilities, sibling ranks, whether each was accepted."""
        self.accepted *= self.decay
        self.reached *= self.decay
        for prob, rank, ok in zip(probs, ranks, accepted):
            b = self.bin(prob, rank)
            self.reached[b] += 1.0
            self.accepted[b] += 1.0 if ok else 0.0


class ForwardCost:
    """Running mean of the drafter's forward time (seconds), for the stop rule."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.seconds: float | None = None

    def observe(self, seconds: float) -> None:
        """Record one forward."""
        self.seconds = seconds if self.seconds is None else self.seconds + self.smoothing * (seconds - self.seconds)


class ProposalCost:
    """What one proposal of a model drafter costs as a function of its depth, learned from the proposals it made:
    a fixed part (following the text: feeding the tokens accepted since the last proposal, re-encoding and
    aligning for a cross-vocabulary drafter) plus a part per level (a drafter forward, fewer when a first stage's
    guesses ride along, plus translating). Decaying means of seconds and depth per proposal, and of seconds per
    level over deep proposals, give both parts. The planner sizes trees with it, staged and cross-vocabulary
    drafters included."""

    def __init__(self, smoothing: float = 0.1):
        self.smoothing = smoothing
        self.mean_seconds: float | None = None
        self.mean_depth = 0.0
        self.per_level: float | None = None
        self.proposals = 0

    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def observe(self, seconds: float, depth: int, level_seconds: float | None = None) -> None:
        """One proposal of `depth` levels took `seconds`; `level_seconds`: the time spent growing levels (drafter
        forwards and translation), when the drafter knows it apart from following the text."""
        if depth <= 0 or not seconds >= 0.0:
            return
        self.proposals += 1
        self.mean_seconds = self._mean(self.mean_seconds, seconds)
        self.mean_depth = self.mean_depth + (depth - self.mean_depth) * (1.0 if self.proposals == 1 else self.smoothing)
        if level_seconds is not None and level_seconds >= 0.0:
            self.per_level = self._mean(self.per_level, level_seconds / depth)

    def seconds(self, depth: int) -> float | None:
        """Estimated seconds of a proposal `depth` levels deep (None before the first proposal)."""
        if self.mean_seconds is None:
            return None
        per_level = self.per_level if self.per_level is not None else self.mean_seconds / max(self.mean_depth, 1.0)
        fixed = max(0.0, self.mean_seconds - per_level * self.mean_depth)
        return fixed + per_level * max(int(depth), 0)


class PaysOff:
    """Is drafting paying on this context? A decaying average of tokens per second over drafted steps (accepted +
    bonus over draft + verification time) against plain decoding (one token per target step). It judges only on
    evidence: after `min_steps` drafted steps of this generation (one unlucky step proves nothing, and the
    acceptance estimates are still learning then). While drafting loses (tokens per second
    below margin x plain's), the drafter sits out `pause` steps (plain decoding, no drafter forward at all), then
    probes once; the pause doubles while probes keep losing (up to `max_pause`) and resets when drafting wins. A
    new generation starts judging afresh."""

    def __init__(self, decay: float = 0.8, first_pause: int = 4, max_pause: int = 64, margin: float = 1.0,
                 min_steps: int = 4):
        self.decay, self.first_pause, self.max_pause, self.margin = decay, first_pause, max_pause, margin
        self.min_steps = min_steps
        self.tokens = self.seconds = 0.0
        self.steps = 0
        self.pause = first_pause
        self.wait = 0
        self.skipped = 0

    def restart(self) -> None:
        """A new generation: judge it afresh."""
        self.tokens = self.seconds = 0.0
        self.steps = 0
        self.wait = 0

    def should_draft(self) -> bool:
        """False while sitting out."""
        if self.wait > 0:
            self.wait -= 1
            self.skipped += 1
            return False
        return True

    def observe(self, tokens: int, seconds: float, plain_seconds: float) -> None:
        """One drafted step produced `tokens` in `seconds`; a plain step takes `plain_seconds`."""
        self.tokens = self.decay * self.tokens + tokens
        self.seconds = self.decay * self.seconds + seconds
        self.steps += 1
        if self.steps < self.min_steps:
            return
        if self.tokens / self.seconds * plain_seconds < self.margin:
            self.wait = self.pause
            self.pause = min(self.max_pause, self.pause * 2)
        else:
            self.pause = self.first_pause
