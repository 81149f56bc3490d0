"""Tree planning: which draft tree to verify on this device, from measured costs and measured acceptance.

Sequoia's idea, with the device in the objective. A drafter's acceptance is summarised by rates per *level* (depth
below the pending token) and *sibling rank*: `rates[l, k]` is the chance that the rank-k child of an accepted node
at level l - 1 is accepted (the target's token equals it), learnt online by `AcceptanceStats`. Under those rates
the expected number of accepted nodes of a tree is the sum, over its nodes, of the product of the rates along the
node's path. `best_trees` finds, for every node count n, the tree shape that maximises it (a dynamic program over
subtree sizes and sibling ranks), and `plan_tree` picks the count and depth that maximise expected tokens per
second: (1 + expected accepted) / (verify time of 1 + n tokens + drafting time), the verify time coming from the
device profile's measured curve. When no tree beats plain decoding (1 / verify time of one token) the plan is
empty: speculation is off for that context.

`Planner` keeps one set of statistics per *confidence bucket* (the drafter's own estimate for its first node: an
n-gram match seen 9 times out of 10 is another drafter than a guess), re-plans when the statistics drift or the
context moves to another part of the cost curve, and probes an empty plan now and then (with doubling pauses) so
that a drafter which starts paying is noticed: each probe's outcome is checked for drift at once. It also predicts
each step's tokens and seconds, which the engine compares with what happened (how good the model is).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .drafters.base import DraftTree

MAX_LEVELS = 12  # deepest planned node
MAX_RANK = 4  # siblings per node a plan may use
CONFIDENCE_EDGES = (0.3, 0.7)  # buckets of the drafter's estimate for its best first node
RANK_PRIOR = (1.0, 0.3, 0.15, 0.08)  # prior rate of rank k, relative to rank 0's (before any evidence)


def levels_and_ranks(parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Level (0: children of the pending token) and sibling rank (0: first child) of each node of a tree whose
    parents precede their children."""
    parents = np.asarray(parents, dtype=np.int64)
    levels = np.zeros(len(parents), np.int64)
    ranks = np.zeros(len(parents), np.int64)
    seen: dict[int, int] = {}
    for i, parent in enumerate(parents.tolist()):
        levels[i] = levels[parent] + 1 if parent >= 0 else 0
        ranks[i] = seen.get(parent, 0)
        seen[parent] = ranks[i] + 1
    return levels, ranks


def rank_paths(parents: np.ndarray) -> list[tuple[int, ...]]:
    """Each node's path of sibling ranks from the pending token, e.g. (0, 1): the second child of the first child."""
    _, ranks = levels_and_ranks(parents)
    paths: list[tuple[int, ...]] = []
    for i, parent in enumerate(np.asarray(parents).tolist()):
        paths.append((paths[parent] if parent >= 0 else ()) + (int(ranks[i]),))
    return paths


def expected_accepted(parents: np.ndarray, rates: np.ndarray) -> float:
    """Expected accepted nodes of a tree under per-(level, rank) rates (nodes beyond the table count zero)."""
    levels, ranks = levels_and_ranks(parents)
    reach = np.zeros(len(levels))
    for i, parent in enumerate(np.asarray(parents).tolist()):
        rate = rates[levels[i], ranks[i]] if levels[i] < rates.shape[0] and ranks[i] < rates.shape[1] else 0.0
        reach[i] = rate * (reach[parent] if parent >= 0 else 1.0)
    return float(reach.sum())


# ---- the dynamic program ------------------------------------------------------------------------------------------
def _allocate(rates_k: np.ndarray, child_values: np.ndarray, max_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Best split of m nodes among sibling subtrees of ranks k, k+1, ... (contiguous from rank 0).

    `child_values[s]`: best value of a subtree of s nodes (its root accepted) at this level. Returns G [K+1, M+1]
    (G[k, m]: best value of m nodes given to ranks k..K-1) and the argmax sizes [K, M+1]."""
    ranks = len(rates_k)
    size = max_nodes + 1
    table = np.full((ranks + 1, size), -np.inf)
    table[:, 0] = 0.0
    arg = np.zeros((ranks, size), np.int64)
    m = np.arange(size)[:, None]
    s = np.arange(1, size)[None, :]
    rest = m - s  # nodes left for the later ranks
    valid = rest >= 0
    rest = np.where(valid, rest, 0)
    for k in range(ranks - 1, -1, -1):
        own = np.where(np.isfinite(child_values[1:]), rates_k[k] * np.where(np.isfinite(child_values[1:]),
                                                                             child_values[1:], 0.0), -np.inf)
        candidates = np.where(valid, own[None, :] + table[k + 1][rest], -np.inf)  # [m, s]
        best = candidates.argmax(axis=1)
        table[k, 1:] = candidates[1:, :].max(axis=1)
        arg[k, 1:] = best[1:] + 1
    return table, arg


@dataclass
class TreeShapes:
    """The best tree of every size within a depth limit: `values[n]` expected accepted nodes (-inf: no tree of n
    nodes fits), `build(n)` its parents array."""

    values: np.ndarray
    levels: int
    _tables: list = field(repr=False, default_factory=list)

    def build(self, nodes: int) -> np.ndarray:
        """Parents array (parents before children, siblings in rank order) of the best `nodes`-node tree."""
        parents: list[int] = []

        def place(level: int, count: int, parent: int) -> None:
            table, arg = self._tables[level]
            rank, left = 0, count
            while left > 0:
                size = int(arg[rank, left])
                parents.append(parent)
                node = len(parents) - 1
                if size > 1:
                    place(level + 1, size - 1, node)
                left -= size
                rank += 1

        if nodes > 0 and np.isfinite(self.values[nodes]):
            place(0, nodes, -1)
        return np.asarray(parents, np.int64)


def best_trees(rates: np.ndarray, max_nodes: int, levels: int | None = None) -> TreeShapes:
    """Sequoia's dynamic program: for n = 0..max_nodes, the tree of n nodes no deeper than `levels` that maximises
    the expected number of accepted nodes under `rates[level, rank]`."""
    rates = np.clip(np.asarray(rates, dtype=np.float64), 0.0, 1.0)
    levels = min(levels or rates.shape[0], rates.shape[0])
    size = max_nodes + 1
    tables: list = [None] * levels
    subtree = np.full(size, -np.inf)  # best value of a subtree rooted one level deeper (none below the last level)
    for level in range(levels - 1, -1, -1):
        if level == levels - 1:
            subtree = np.full(size, -np.inf)
            subtree[1] = 1.0
        else:
            below = tables[level + 1][0][0]  # G[0, m] of the children's level
            subtree = np.full(size, -np.inf)
            subtree[1:] = 1.0 + below[:-1]
        tables[level] = _allocate(rates[level], subtree, max_nodes)
    return TreeShapes(values=tables[0][0][0].copy() if levels else np.array([0.0]), levels=levels, _tables=tables)


@dataclass
class TreePlan:
    """A planned draft tree and what the model predicts for it."""

    parents: np.ndarray  # the shape (empty: plain decoding)
    expected_accepted: float
    seconds_per_step: float
    plain_seconds: float  # one plain step at this context
    depth: int = 0
    paths: frozenset = frozenset()

    @property
    def nodes(self) -> int:
        """Planned tree nodes (0: plain decoding)."""
        return len(self.parents)

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens per step: accepted nodes plus the target's own token."""
        return 1.0 + self.expected_accepted

    @property
    def tokens_per_second(self) -> float:
        """Expected tokens per second with this plan."""
        return self.tokens_per_step / self.seconds_per_step

    @property
    def speedup(self) -> float:
        """Expected tokens per second over plain decoding's."""
        return self.tokens_per_second * self.plain_seconds

    def widths(self) -> list[int]:
        """Nodes per level (the shape in one line: [3, 2, 1] is 3 first-level nodes, 2 below them, 1 below)."""
        if not self.nodes:
            return []
        levels, _ = levels_and_ranks(self.parents)
        return np.bincount(levels).tolist()

    def describe(self) -> dict:
        """Plain-dict summary (nodes, depth, widths per level, predictions)."""
        return {"nodes": self.nodes, "depth": self.depth, "widths": self.widths(),
                "tokens_per_step": round(self.tokens_per_step, 3),
                "tokens_per_second": round(self.tokens_per_second, 3), "speedup": round(self.speedup, 3)}


def make_plan(parents: np.ndarray, rates: np.ndarray, verify_seconds: Callable[[int], float],
              draft_seconds: Callable[[int, int], float] | None = None) -> TreePlan:
    """The plan for a given shape: its expected accepted nodes under `rates` and its time per step."""
    parents = np.asarray(parents, np.int64)
    depth = int(levels_and_ranks(parents)[0].max()) + 1 if len(parents) else 0
    draft = draft_seconds(depth, len(parents)) if draft_seconds is not None and len(parents) else 0.0
    return TreePlan(parents=parents, expected_accepted=expected_accepted(parents, rates) if len(parents) else 0.0,
                    seconds_per_step=verify_seconds(1 + len(parents)) + draft, plain_seconds=verify_seconds(1),
                    depth=depth, paths=frozenset(rank_paths(parents)))


def plan_tree(rates: np.ndarray, verify_seconds: Callable[[int], float],
              draft_seconds: Callable[[int, int], float] | None = None, max_nodes: int = 64,
              max_levels: int | None = None, at_least_one: bool = False) -> TreePlan:
    """The tree that maximises expected tokens per second.

    `verify_seconds(T)`: the target's time to score T tokens (the pending one plus T - 1 nodes) at this context;
    `draft_seconds(depth, nodes)`: the drafter's time for such a tree (None: free, as n-gram lookups nearly are).
    When drafting time depends on depth every depth limit is tried; the empty plan (plain decoding) wins unless a
    tree beats it, or `at_least_one` asks for the best non-empty tree (a probe)."""
    rates = np.asarray(rates, dtype=np.float64)
    max_levels = min(max_levels or rates.shape[0], rates.shape[0])
    plain = verify_seconds(1)
    best: tuple[float, int, int, TreeShapes | None] = (-1.0 if at_least_one else 1.0 / plain, 0, 0, None)
    depth_limits = range(1, max_levels + 1) if draft_seconds is not None else [max_levels]
    for levels in depth_limits:
        shapes = best_trees(rates, max_nodes, levels)
        for n in range(1, max_nodes + 1):
            value = shapes.values[n]
            if not np.isfinite(value):
                continue
            seconds = verify_seconds(1 + n) + (draft_seconds(levels, n) if draft_seconds is not None else 0.0)
            rate = (1.0 + value) / seconds
            if rate > best[0] + 1e-12:
                best = (rate, n, levels, shapes)
    _, nodes, _, shapes = best
    parents = shapes.build(nodes) if shapes is not None else np.zeros(0, np.int64)
    return make_plan(parents, rates, verify_seconds, draft_seconds)


def fit_to_shape(tree: DraftTree, paths: frozenset) -> DraftTree:
    """The nodes of `tree` whose rank path lies in the planned shape (`TreePlan.paths`); a drafter that offers
    fewer siblings or levels than planned gives a smaller tree."""
    if not len(tree):
        return tree
    keep = [i for i, path in enumerate(rank_paths(tree.parents)) if path in paths]
    return tree.subtree(keep)


FIXED_SHAPE = re.compile(r"^(chain:(\d+)|tree:(\d+)x(\d+))$")


def fixed_shape(spec: str) -> np.ndarray:
    """Parents of a fixed shape: `chain:K` (K nodes in a line) or `tree:WxD` (W first-level nodes, each the head
    of a chain of D nodes)."""
    match = FIXED_SHAPE.match(spec.strip())
    if not match:
        raise ValueError(f"tree shape {spec!r}: expected chain:K or tree:WxD (for example chain:4 or tree:3x4)")
    if match.group(2) is not None:
        length = int(match.group(2))
        if not 1 <= length <= 64:
            raise ValueError(f"tree shape {spec!r}: chain length must be 1..64")
        return np.arange(-1, length - 1, dtype=np.int64)
    width, depth = int(match.group(3)), int(match.group(4))
    if not (1 <= width <= 8 and 1 <= depth <= 16 and width * depth <= 64):
        raise ValueError(f"tree shape {spec!r}: width 1..8, depth 1..16, at most 64 nodes")
    parents: list[int] = []
    for _ in range(width):
        parent = -1
        for _ in range(depth):
            parents.append(parent)
            parent = len(parents) - 1
    return np.asarray(parents, np.int64)


# ---- online statistics --------------------------------------------------------------------------------------------
class AcceptanceStats:
    """Acceptance by level and sibling rank, learnt from verifications (decaying counts).

    A node counts as *offered* when the target reached it (its parent was accepted, or it is a first-level node)
    and as *accepted* when the target took it. Rates are smoothed towards a prior: the first level's towards
    `first_rate` x `RANK_PRIOR`, each deeper level's towards the level above (deep levels are seen less often)."""

    def __init__(self, first_rate: float = 0.5, levels: int = MAX_LEVELS, ranks: int = MAX_RANK,
                 decay: float = 0.99, prior_weight: float = 2.0):
        self.prior = np.array([first_rate * RANK_PRIOR[min(k, len(RANK_PRIOR) - 1)] for k in range(ranks)])
        self.decay, self.prior_weight = decay, prior_weight
        self.accepted = np.zeros((levels, ranks))
        self.offered = np.zeros((levels, ranks))
        self.updates = 0

    def update(self, parents: np.ndarray, accepted_nodes) -> None:
        """Learn from one verified tree (`accepted_nodes`: tree indices on the accepted path)."""
        if not len(parents):
            return
        levels, ranks = levels_and_ranks(parents)
        accepted = set(int(i) for i in accepted_nodes)
        self.accepted *= self.decay
        self.offered *= self.decay
        self.updates += 1
        for i, parent in enumerate(np.asarray(parents).tolist()):
            level, rank = levels[i], ranks[i]
            if level >= self.offered.shape[0] or rank >= self.offered.shape[1]:
                continue
            if parent < 0 or parent in accepted:
                self.offered[level, rank] += 1.0
                if i in accepted:
                    self.accepted[level, rank] += 1.0

    def rates(self) -> np.ndarray:
        """[levels, ranks] smoothed acceptance rates (each level's rates sum to at most 1, earlier ranks first)."""
        out = np.empty_like(self.accepted)
        prior = self.prior
        w = self.prior_weight
        for level in range(out.shape[0]):
            row = (self.accepted[level] + w * prior) / (self.offered[level] + w)
            room = 1.0
            for rank in range(len(row)):  # at most one sibling is accepted: later ranks share what is left
                row[rank] = min(row[rank], room)
                room -= row[rank]
            out[level] = row
            prior = row
        return out


@dataclass
class StepPrediction:
    """What the planner expected of one step."""

    tokens: float
    seconds: float
    bucket: int


class Planner:
    """Plans per confidence bucket, re-planned when statistics drift or the context moves along the cost curve.

    `verify_seconds(T, context)`: target forward time for T tokens at a context length (a device profile, or the
    engine's online measurements); `draft_seconds(depth, nodes)`: drafting time of such a tree (None: free);
    `dynamic`: the drafter grows its own tree by probability (a model drafter) and gets the plan's node count and
    depth, not its exact shape."""

    def __init__(self, verify_seconds: Callable[[int, int], float],
                 draft_seconds: Callable[[int, int], float] | None = None, max_nodes: int = 16,
                 dynamic: bool = False, edges=CONFIDENCE_EDGES, replan_every: int = 16, drift: float = 0.05,
                 context_step: int = 256, first_pause: int = 8, max_pause: int = 256):
        self.verify_seconds, self.draft_seconds = verify_seconds, draft_seconds
        self.max_nodes, self.dynamic = max(0, int(max_nodes)), dynamic
        self.edges = tuple(edges)
        mids = np.diff(np.concatenate([[0.0], self.edges, [1.0]])) / 2 + np.concatenate([[0.0], self.edges])
        self.stats = [AcceptanceStats(first_rate=float(m)) for m in mids]
        self.replan_every, self.drift, self.context_step = replan_every, drift, context_step
        self.first_pause, self.max_pause = first_pause, max_pause
        self._plans: dict[tuple[int, int], tuple[TreePlan, np.ndarray, int]] = {}
        self._probe_plans: dict[tuple[int, int], tuple[TreePlan, int]] = {}
        self._pause = [first_pause] * len(self.stats)
        self._until_probe = [first_pause] * len(self.stats)
        self._armed = [False] * len(self.stats)  # a probe is due: the next proposal of the bucket is verified
        self.replans = 0

    # -- buckets and plans ------------------------------------------------------------------------------------
    def bucket(self, tree: DraftTree) -> int:
        """Confidence bucket of a proposal: its best first-level node's score (no scores: the middle bucket)."""
        if tree.scores is None or not len(tree):
            return len(self.edges) // 2
        first = float(np.max(tree.scores[tree.parents < 0]))
        return int(np.searchsorted(self.edges, first, side="right"))

    def _context_key(self, context: int) -> int:
        return int(context) // self.context_step

    def forget_plans(self) -> None:
        """Drop every cached plan (the cost model changed); the next request plans again."""
        self._plans.clear()
        self._probe_plans.clear()

    def plan(self, bucket: int, context: int, probe: bool = False) -> TreePlan:
        """The current plan for a bucket at a context length (re-planned when stale). `probe`: the best non-empty
        tree instead, for bringing fresh evidence to a bucket whose plan is plain decoding."""
        key = (bucket, self._context_key(context))
        stats = self.stats[bucket]
        if probe:
            cached = self._probe_plans.get(key)
            if cached is None or cached[1] != stats.updates:
                cached = (self._solve(stats.rates(), key, at_least_one=True), stats.updates)
                self._probe_plans[key] = cached
            return cached[0]
        plan, rechecked = self._still_valid(key)
        if plan is not None:
            if rechecked:  # the drift check ran and passed: its clock restarts, check again later
                self._plans[key] = (plan, self._plans[key][1], stats.updates)
            return plan
        rates = stats.rates()
        plan = self._solve(rates, key)
        self._plans[key] = (plan, rates, stats.updates)
        self.replans += 1
        return plan

    def _still_valid(self, key: tuple[int, int]) -> tuple[TreePlan | None, bool]:
        """The cached plan for `key` while it holds (None: none yet, or its statistics drifted), and whether the
        drift check had to run for it (`replan_every` updates since it was made or last checked; any update for a
        plain plan). Reads only."""
        cached = self._plans.get(key)
        if cached is None:
            return None, False
        plan, planned_rates, at_update = cached
        stats = self.stats[key[0]]
        # a plain plan learns only from its rare probes: each one is checked at once (waiting for `replan_every`
        # of them would keep a bucket plain for thousands of steps after the drafter started paying)
        if stats.updates - at_update < (self.replan_every if plan.nodes else 1):
            return plan, False
        if float(np.abs(stats.rates() - planned_rates).max()) < self.drift:
            return plan, True
        return None, False

    def _peek(self, bucket: int, context: int) -> TreePlan:
        """The plan `plan` would return now, without caching it or moving the re-plan clocks (looking at the
        planner must not change what it drafts later)."""
        key = (bucket, self._context_key(context))
        plan, _ = self._still_valid(key)
        return plan if plan is not None else self._solve(self.stats[bucket].rates(), key)

    def _solve(self, rates: np.ndarray, key: tuple[int, int], at_least_one: bool = False) -> TreePlan:
        mid_context = (key[1] + 0.5) * self.context_step
        verify = lambda tokens: self.verify_seconds(tokens, mid_context)  # noqa: E731
        return plan_tree(rates, verify, self.draft_seconds, self.max_nodes, at_least_one=at_least_one)

    def request(self, context: int) -> int:
        """Nodes to ask the drafter for this step: the most any bucket's plan could use. A bucket whose plan is
        plain decoding counts steps towards its next probe; once due, the probe's size is asked for until a
        proposal of that bucket arrives."""
        if self.max_nodes <= 0:
            return 0
        wanted = 0
        for bucket in range(len(self.stats)):
            plan = self.plan(bucket, context)
            if plan.nodes == 0:
                if not self._armed[bucket]:
                    self._until_probe[bucket] -= 1
                    self._armed[bucket] = self._until_probe[bucket] <= 0
                if self._armed[bucket]:
                    plan = self.plan(bucket, context, probe=True)
            wanted = max(wanted, plan.nodes)
        return wanted

    def fit(self, tree: DraftTree, context: int) -> tuple[DraftTree, StepPrediction]:
        """Cut a proposal to its bucket's plan (or the bucket's due probe); returns the tree to verify and the
        step's prediction."""
        bucket = self.bucket(tree)
        plan = self.plan(bucket, context)
        if plan.nodes:
            self._pause[bucket] = self.first_pause
        elif len(tree) and self._armed[bucket]:
            plan = self.plan(bucket, context, probe=True)
            self._armed[bucket] = False
            self._pause[bucket] = min(self.max_pause, self._pause[bucket] * 2)
            self._until_probe[bucket] = self._pause[bucket]
        if plan.nodes == 0:
            tree = DraftTree.empty()
        elif self.dynamic:
            tree = tree.prune(plan.nodes, plan.depth)
        else:
            tree = fit_to_shape(tree, plan.paths)
        return tree, self.predict(tree, bucket, context)

    def predict(self, tree: DraftTree, bucket: int, context: int) -> StepPrediction:
        """Expected tokens and seconds of verifying `tree` (drafting included) under the current statistics."""
        if not len(tree):
            return StepPrediction(1.0, self.verify_seconds(1, context), bucket)
        rates = self.stats[bucket].rates()
        depth = int(tree.depths().max())
        draft = self.draft_seconds(depth, len(tree)) if self.draft_seconds is not None else 0.0
        return StepPrediction(1.0 + expected_accepted(tree.parents, rates),
                              self.verify_seconds(1 + len(tree), context) + draft, bucket)

    def observe(self, tree: DraftTree, accepted_nodes, bucket: int) -> None:
        """Learn from one verified tree of `bucket`."""
        if len(tree):
            self.stats[bucket].update(tree.parents, accepted_nodes)

    def describe(self, context: int) -> list[dict]:
        """The current plan of every bucket at a context length, with the bucket's score range and evidence (read
        only: the planner's cache and re-plan clocks are left as they are)."""
        bounds = (0.0,) + self.edges + (1.0,)
        out = []
        for bucket, stats in enumerate(self.stats):
            plan = self._peek(bucket, context)
            out.append({"bucket": f"{bounds[bucket]:.1f}-{bounds[bucket + 1]:.1f}", "steps": stats.updates,
                        "first_rate": round(float(stats.rates()[0, 0]), 3), **plan.describe()})
        return out
