"""N-gram drafting from cache tiers: the context, this session, a persistent cache file and a static corpus cache.

`NGramDrafter` proposes token trees without a draft model. Each tree node's children come from the tier whose
longest matching n-gram (the last n tokens of context + path, n from `max_n` down to 1) gives the most likely
continuation; when no tier matches, from *token recycling* (the target's own top-k after that token, as last seen).

| tier       | holds                                                   | updated                          |
|------------|---------------------------------------------------------|----------------------------------|
| context    | the prompt and everything generated so far              | per token, incrementally         |
| session    | prompt + output of the previous generations             | `finish`; cleared by `reset`     |
| persistent | n-gram counts of every generation, in a cache file      | `finish` (merged and saved)      |
| static     | n-gram counts of a text corpus (`edgespec ngram build`) | never (read-only)                |
| recycled   | token -> the target's top-k next tokens after it        | `observe`; latest replaces       |

A tier stores `n-gram tuple -> Continuations` (`next[token]`: count and stamp, the latest position, packed in one
int); continuations are ranked by count, then recency. Each tier has thresholds (`Thresholds`): a minimum count and a
minimum share of the n-gram's continuations, per n, lax for the context and strict for the persistent and static tiers
(in the manner of llama.cpp's ngram-cache). A drafted node's estimated acceptance is the product along its path of
`weight[tier, n] * share`; the tree grows best-first up to the node budget and stops below `min_node_prob`.

Cache files (`edgespec.drafters.cachefile`) are `.npz` archives (loaded with allow_pickle=False) with a JSON header (magic, kind, version, max_n,
vocab_size, tokenizer fingerprint, clock) and one row per n-gram key and per (key, next token) entry. Writes are
atomic (temporary file in the same folder + os.replace; temporary files over a minute old, left by a writer killed
mid-write, are removed by the next write). A corrupt, truncated, foreign or wrong-version file gives a
`NGramCacheWarning` and an empty cache, never a crash and never a token outside the vocabulary; a path that exists but
is not a regular file (a FIFO would block the reader forever) raises ValueError.

Loading is bounded: a file holds at most MAX_CACHE_ENTRIES n-grams and entries and MAX_CACHE_BYTES of arrays (checked
before anything is read); a static tier stays as numpy arrays (`StaticTable`: about the file's size in memory, loaded
in numpy time), and a persistent file is cut to the drafter's `persistent_cap` entries before its table is built.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..sampling import GenerationConfig
from ..text import common_prefix_length
from .base import Drafter, DraftTree, VerifiedStep, fast_top_k
from .cachefile import NGramCacheWarning, load_cache, make_header, write_cache_file
from .ngram_table import (DEFAULT_MAX_N, NGramTable, StaticTable, concat_arrays, drop_entries, drop_keys,
                          empty_arrays, entries_to_evict, entry_count, evict_to_cap, ngram_keys, pack_entry,
                          rows_of_keys)

__all__ = ["NGramDrafter", "Thresholds", "TierThresholds", "NGramCacheWarning"]

DEFAULT_PERSISTENT_CAP = 200_000
MAX_CHILDREN = 4  # continuations drafted below one node (the shares' thresholds rarely let more through)
TIERS = ("context", "session", "persistent", "static", "recycled")


# ---------------------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class TierThresholds:
    """When a tier's continuation may be drafted, and how likely it is taken to be accepted.

    Tuples are indexed by n - 1 (n: length of the matched n-gram; the last value holds for longer n). A continuation
    is drafted when its count >= `min_count[n]` and its share of the n-gram's continuations >= `min_share[n]`; its
    estimated acceptance is `weight[n] * share`. N-grams shorter than `min_n` are not looked up.
    """

    min_count: tuple[int, ...]
    min_share: tuple[float, ...]
    weight: tuple[float, ...]
    min_n: int = 1

    def at(self, n: int) -> tuple[int, float, float]:
        """(min_count, min_share, weight) for n-grams of length n."""
        return (self.min_count[min(n, len(self.min_count)) - 1], self.min_share[min(n, len(self.min_share)) - 1],
                self.weight[min(n, len(self.weight)) - 1])

    @property
    def max_weight(self) -> float:
        """The largest estimate this tier can give (a share of 1 at the best-weighted n)."""
        return max(self.weight)


@dataclass(frozen=True)
class Thresholds:
    """Per-tier thresholds and acceptance weights (defaults to be tuned with benchmark measurements).

    | tier       | min_count n=1..4 | min_share n=1..4       | weight n=1..4          | min_n |
    |------------|------------------|------------------------|------------------------|-------|
    | context    | 2, 1, 1, 1       | 0.60, 0.34, 0.25, 0.25 | 0.35, 0.55, 0.70, 0.80 | 1     |
    | session    | 2, 2, 1, 1       | 0.60, 0.40, 0.34, 0.34 | 0.30, 0.50, 0.60, 0.70 | 1     |
    | persistent | 4, 3, 2, 2       | 0.75, 0.60, 0.50, 0.50 | 0.30, 0.45, 0.55, 0.60 | 2     |
    | static     | 4, 3, 3, 2       | 0.75, 0.66, 0.60, 0.60 | 0.25, 0.40, 0.50, 0.55 | 2     |

    `recycle_weights[r]`: estimated acceptance of the target's rank-r (0 = top-1) recycled next token; its length
    caps the ranks drafted. The context tier is lax (one earlier occurrence of a 2..4-gram suffices: prompt lookup);
    the persistent and static tiers, which mix many unrelated texts, need repeated and dominant continuations.
    """

    context: TierThresholds = TierThresholds((2, 1, 1, 1), (0.60, 0.34, 0.25, 0.25), (0.35, 0.55, 0.70, 0.80), 1)
    session: TierThresholds = TierThresholds((2, 2, 1, 1), (0.60, 0.40, 0.34, 0.34), (0.30, 0.50, 0.60, 0.70), 1)
    persistent: TierThresholds = TierThresholds((4, 3, 2, 2), (0.75, 0.60, 0.50, 0.50), (0.30, 0.45, 0.55, 0.60), 2)
    static: TierThresholds = TierThresholds((4, 3, 3, 2), (0.75, 0.66, 0.60, 0.60), (0.25, 0.40, 0.50, 0.55), 2)
    recycle_weights: tuple[float, ...] = (0.30, 0.12)


# ---------------------------------------------------------------------------------------------------- lookups
def longest_match(table: NGramTable, tail: tuple[int, ...], limits: TierThresholds,
                  vocab_size: int) -> list[tuple[int, float]]:
    """Continuations of the longest n-gram ending `tail` that pass `limits`: [(token, estimate)], best first.

    Continuations are ranked by count, then recency; estimate = weight[n] * count / total."""
    grams = table.grams
    for n in range(min(len(tail), table.max_n), limits.min_n - 1, -1):
        conts = grams.get(tail[-n:])
        if conts is None:
            continue
        min_count, min_share, weight = limits.at(n)
        need = max(min_count, math.ceil(min_share * conts.total - 1e-9))  # the smallest count that passes
        if conts.best < need:
            continue
        floor = pack_entry(need, 0)
        picked = sorted(((entry, token) for token, entry in conts.next.items()
                         if entry >= floor and 0 <= token < vocab_size), reverse=True)
        if not picked:
            continue
        scale = weight / conts.total
        return [(token, entry_count(entry) * scale) for entry, token in picked[:MAX_CHILDREN]]
    return []


def grow_tree(root_tail: tuple[int, ...], budget: int, children_of, min_node_prob: float, max_depth: int,
              max_n: int, source_caps: dict[str, int] | None = None
              ) -> tuple[list[int], list[int], list[str], list[float]]:
    """Best-first draft tree: (tokens, parents, sources, estimates).

    `children_of(tail)` gives [(token, estimate, source)] for the node whose last tokens are `tail`; a node's
    estimated acceptance is its parent's times its own estimate. The most likely frontier node is added next, until
    `budget` nodes, none left at or above `min_node_prob`, or `max_depth`. `source_caps[source]` caps the nodes
    from one source. Parents come before children; siblings are distinct (one `children_of` call each)."""
    tokens: list[int] = []
    parents: list[int] = []
    sources: list[str] = []
    estimates: list[float] = []
    if budget <= 0 or max_depth <= 0:
        return tokens, parents, sources, estimates
    caps = dict(source_caps or {})
    frontier: list = []
    order = itertools.count()

    def push_children(node: int, node_prob: float, tail: tuple[int, ...], depth: int) -> None:
        for token, estimate, source in children_of(tail):
            prob = node_prob * estimate
            if prob >= min_node_prob:
                heapq.heappush(frontier, (-prob, next(order), node, token, source, tail, depth))

    push_children(-1, 1.0, root_tail, 0)
    while frontier and len(tokens) < budget:
        neg_prob, _, parent, token, source, parent_tail, parent_depth = heapq.heappop(frontier)
        if source in caps:
            if caps[source] <= 0:
                continue
            caps[source] -= 1
        node = len(tokens)
        tokens.append(token)
        parents.append(parent)
        sources.append(source)
        estimates.append(-neg_prob)
        if parent_depth + 1 < max_depth and len(tokens) < budget:
            push_children(node, -neg_prob, (parent_tail + (token,))[-max_n:], parent_depth + 1)
    return tokens, parents, sources, estimates


def tree_paths(tokens: list[int], parents: list[int]) -> list[tuple[int, ...]]:
    """Each node's token path from the root (parents precede children)."""
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(tokens, parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (int(token),))
    return paths



# ---------------------------------------------------------------------------------------------------- the drafter
TIER_DECAY = 0.97  # per verification: the calibration follows the last few dozen steps
TIER_PRIOR = 2.0  # pseudo-counts: a factor of 1 until the evidence outweighs them
TIER_FACTOR_MIN, TIER_FACTOR_MAX = 0.1, 3.0


def fresh_counters() -> dict:
    """Tuning counters: proposals, empty proposals, and per tier the nodes drafted and accepted."""
    return {"proposals": 0, "empty": 0, "drafted": dict.fromkeys(TIERS, 0), "accepted": dict.fromkeys(TIERS, 0)}


class NGramDrafter(Drafter):
    """Draft trees from n-gram cache tiers (context, session, persistent, static) and token recycling.

    `vocab_size`: the target's vocabulary (no id >= it is ever proposed); `fingerprint`: the tokenizer's
    (`tokenizer_fingerprint`), cache files with another are refused; `persistent_path`: the persistent cache file
    (None: no persistent tier; a missing file is created on the first `finish`); `static_path`: a cache built by
    `build_static_cache` (None: no static tier; a missing file raises FileNotFoundError); `thresholds`: per-tier
    `Thresholds`; `recycling`: draft the target's recycled top-k when no n-gram matches, at most `recycling_budget`
    nodes per tree, remembering `recycling_k` tokens per token; `min_node_prob`: smallest estimated acceptance of a
    drafted node (on a CPU each node costs verification time: scoring 4 tokens costs ~1.6x one, 16 tokens ~2.8x);
    `max_depth`: deepest node; `persistent_cap`: most (n-gram, next) entries kept in the persistent file.

    After each `propose`, `last_sources[i]` names the tier of node i; `counters` accumulates proposals, empty
    proposals, and nodes drafted and accepted per tier.
    """

    name = "ngram"

    def __init__(self, vocab_size: int, fingerprint: str = "", max_n: int = DEFAULT_MAX_N,
                 persistent_path: str | os.PathLike | None = None, static_path: str | os.PathLike | None = None,
                 thresholds: Thresholds = Thresholds(), recycling: bool = True, recycling_budget: int = 2,
                 recycling_k: int = 8, min_node_prob: float = 0.05, max_depth: int = 16,
                 persistent_cap: int = DEFAULT_PERSISTENT_CAP):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.vocab_size = int(vocab_size)
        self.fingerprint = fingerprint
        self.max_n = max_n
        self.thresholds = thresholds
        self.recycling = recycling
        self.recycling_budget = recycling_budget
        self.recycling_k = recycling_k
        self.min_node_prob = min_node_prob
        self.max_depth = max_depth
        self.persistent_cap = persistent_cap

        self.context_table = NGramTable(max_n)
        self._ingested: list[int] = []  # the tokens counted in the context table, in order
        self.session_table = NGramTable(max_n)
        self._session_clock = 0
        self._last_finished: list[int] = []  # already counted in the session and persistent tiers

        self.static_table: NGramTable | StaticTable | None = None
        if static_path is not None:
            loaded = load_cache(static_path, ("static", "persistent"), max_n, self.vocab_size, fingerprint)
            if loaded is None:
                raise FileNotFoundError(f"static n-gram cache not found: {static_path}")
            self.static_table = StaticTable(loaded[1], max_n)

        self.persistent_path = Path(persistent_path) if persistent_path is not None else None
        self.persistent_table: NGramTable | None = None
        self._persistent_arrays = empty_arrays(max_n)  # the persistent tier as last saved or loaded
        self._persistent_clock = 0
        self._dirty_keys: set[tuple[int, ...]] = set()  # n-grams counted since then
        if self.persistent_path is not None:
            self._load_persistent()

        self.recycled: dict[int, list[int]] = {}  # token -> the target's ranked next tokens, latest observation
        self.last_sources: list[str] = []
        self._last_paths: dict[tuple[int, ...], tuple[str, float]] = {}  # last proposal: path -> (tier, estimate)
        self.counters = fresh_counters()
        # online calibration per tier: decaying sums of accepted nodes and of their estimates, over the nodes the
        # target reached (children of the root or of an accepted node)
        self.tier_accepted: dict[str, float] = dict.fromkeys(TIERS, 0.0)
        self.tier_estimated: dict[str, float] = dict.fromkeys(TIERS, 0.0)
        self.self_calibrating = True  # off while a planner sizes the trees (see `planned`)

    # -- tiers ---------------------------------------------------------------------------------------------------
    def _load_persistent(self) -> None:
        loaded = load_cache(self.persistent_path, ("persistent", "static"), self.max_n, self.vocab_size,
                            self.fingerprint)
        header, arrays = loaded if loaded is not None else ({}, empty_arrays(self.max_n))
        if header.get("kind") == "static":
            warnings.warn(f"n-gram cache {self.persistent_path} is a static cache, not a persistent one: it is used "
                          f"read-only and never overwritten", NGramCacheWarning, stacklevel=3)
            if self.static_table is None:
                self.static_table = StaticTable(arrays, self.max_n)
            self.persistent_path = None
            return
        # the next save keeps persistent_cap entries: drop the rest now, before a Python table is built of them
        arrays = drop_entries(arrays, entries_to_evict(arrays["entry_count"], arrays["entry_stamp"],
                                                       self.persistent_cap))
        table = NGramTable.from_arrays(arrays, self.max_n)
        if table.entries != len(arrays["entry_key"]):  # the file repeated entries: save what the table holds
            arrays = table.to_arrays()
        self.persistent_table, self._persistent_arrays = table, arrays
        self._persistent_clock = int(header.get("clock", 0))

    def _tiers(self) -> list[tuple[str, NGramTable, TierThresholds]]:
        """(name, table, thresholds) of the n-gram tiers that hold something, in priority order."""
        limits = self.thresholds
        tiers = (("context", self.context_table, limits.context), ("session", self.session_table, limits.session),
                 ("persistent", self.persistent_table, limits.persistent),
                 ("static", self.static_table, limits.static))
        return [tier for tier in tiers if tier[1] is not None and tier[1].entries]

    def planned(self, on: bool) -> None:
        """Under a tree planner the tier corrections are off (estimates stay the tiers' own weights x shares): the
        planner's per-bucket acceptance is the calibration, and a second one, learnt only from verified drafts,
        pushed proposals into buckets that are never verified and so never corrected back. The sums keep being
        learnt, so switching back resumes from them."""
        self.self_calibrating = not on

    def tier_factor(self, tier: str) -> float:
        """How the tier's estimates compare with what the target accepted so far (1 before any evidence, and 1
        while a planner sizes the trees)."""
        if not self.self_calibrating:
            return 1.0
        return min(TIER_FACTOR_MAX, max(TIER_FACTOR_MIN, (self.tier_accepted[tier] + TIER_PRIOR)
                                        / (self.tier_estimated[tier] + TIER_PRIOR)))

    def _children(self, tiers, tail: tuple[int, ...]) -> list[tuple[int, float, str]]:
        """Children candidates of a node whose last tokens are `tail`: the continuations of the tier whose best
        continuation is the most likely (ties: the earlier tier); else recycled tokens. Estimates are the tier's
        weight x share, corrected by the tier's measured acceptance (`tier_factor`), at most 1."""
        best_source, best = None, []
        for name, table, limits in tiers:
            factor = self.tier_factor(name)
            if best and best[0][1] >= limits.max_weight * factor:
                continue  # this tier cannot beat what we have
            found = longest_match(table, tail, limits, self.vocab_size)
            if found and (not best or found[0][1] * factor > best[0][1]):
                best_source, best = name, [(token, min(1.0, estimate * factor)) for token, estimate in found]
        if best:
            return [(token, estimate, best_source) for token, estimate in best]
        if self.recycling and tail:
            ranked = self.recycled.get(tail[-1])
            if ranked:
                factor = self.tier_factor("recycled")
                return [(token, min(1.0, weight * factor), "recycled")
                        for token, weight in zip(ranked, self.thresholds.recycle_weights)]
        return []

    def _ingest(self, context) -> None:
        """Bring the context tier up to `context`: count only the new tokens, or rebuild when `context` does not
        extend what was counted (checked on its first and last few tokens; `start` checks the whole prompt)."""
        seen = len(self._ingested)
        if not self._extends_cheaply(context, seen):
            self.context_table.clear()
            self._ingested = []
            seen = 0
        if len(context) > seen:
            self._ingested.extend(context[seen:])
            self.context_table.add_tokens(self._ingested, seen)

    def _extends_cheaply(self, context, seen: int) -> bool:
        if len(context) < seen:
            return False
        head, tail = min(seen, 4), min(seen, 8)
        return (list(context[:head]) == self._ingested[:head]
                and list(context[seen - tail:seen]) == self._ingested[seen - tail:])

    # -- the Drafter interface -----------------------------------------------------------------------------------
    def start(self, prompt_ids: list[int], config: GenerationConfig | None = None) -> None:
        """A generation begins: keep the context tier if the prompt extends it (a chat turn), else rebuild it."""
        prompt = list(prompt_ids)
        seen = len(self._ingested)
        if len(prompt) < seen or prompt[:seen] != self._ingested:
            self.context_table.clear()
            self._ingested = []
        self._ingest(prompt)

    def propose(self, context: list[int], budget: int) -> DraftTree:
        """A best-first tree of at most `budget` nodes continuing `context` (empty when nothing is likely)."""
        self._ingest(context)
        self.counters["proposals"] += 1
        tiers = self._tiers()
        caps = {"recycled": self.recycling_budget if self.recycling else 0}
        root_tail = tuple(self._ingested[-self.max_n:])
        tokens, parents, sources, estimates = grow_tree(
            root_tail, budget, lambda tail: self._children(tiers, tail), self.min_node_prob, self.max_depth,
            self.max_n, caps)
        self.last_sources = sources
        # each node's own estimate before the tier's correction: what the calibration compares with outcomes
        raw = [est / (estimates[p] if p >= 0 else 1.0) / self.tier_factor(src)
               for est, p, src in zip(estimates, parents, sources)]
        self._last_paths = dict(zip(tree_paths(tokens, parents), zip(sources, raw)))
        if not tokens:
            self.counters["empty"] += 1
            return DraftTree.empty()
        drafted = self.counters["drafted"]
        for source in sources:
            drafted[source] += 1
        return DraftTree(np.array(tokens, np.int64), np.array(parents, np.int64),
                         scores=np.array(estimates, np.float64))

    def propose_continuation(self, context: list[int], path: list[int], budget: int) -> DraftTree:
        """A tree continuing `context + path` (`path` speculative: looked up, never counted into the tiers), for a
        staged drafter that asks the caches what may follow its own draft."""
        self._ingest(context)
        tail = tuple((self._ingested[-self.max_n:] + list(path))[-self.max_n:])
        tokens, parents, _, estimates = grow_tree(
            tail, budget, lambda t: self._children(self._tiers(), t), self.min_node_prob, self.max_depth,
            self.max_n, {"recycled": 0})
        if not tokens:
            return DraftTree.empty()
        return DraftTree(np.array(tokens, np.int64), np.array(parents, np.int64), scores=np.array(estimates))

    def observe(self, step: VerifiedStep) -> None:
        """Count the accepted nodes per tier; remember the target's top-k after each token on the accepted path
        (the pending token and the accepted nodes: their predictions were made in the real context)."""
        fed = step.fed_tokens.tolist()
        if len(fed) > 1:  # the engine may have verified a cut of our tree: match nodes by their token path
            parents = [p - 1 if p > 0 else -1 for p in step.fed_parents.tolist()[1:]]
            verified = tree_paths(fed[1:], parents)
            accepted_nodes = set(step.accepted_nodes)
            for tier in TIERS:
                self.tier_accepted[tier] *= TIER_DECAY
                self.tier_estimated[tier] *= TIER_DECAY
            for node, parent in enumerate(parents):
                known = self._last_paths.get(verified[node])
                if known is None or not (parent < 0 or parent in accepted_nodes):
                    continue  # not ours, or never reached: says nothing about its estimate
                source, estimate = known
                self.tier_estimated[source] += estimate
                if node in accepted_nodes:
                    self.tier_accepted[source] += 1.0
                    self.counters["accepted"][source] += 1
        if not self.recycling or self.recycling_k <= 0:
            return
        path = [0] + [node + 1 for node in step.accepted_nodes]
        rows = fast_top_k(np.asarray(step.target_logits)[path], self.recycling_k).tolist()
        for index, ranked in zip(path, rows):
            self.recycled[fed[index]] = [token for token in ranked if token < self.vocab_size]

    def finish(self, context: list[int]) -> None:
        """Count the generation's tokens in the session tier and the persistent cache, and save the cache file (a
        failed save warns; the next one retries)."""
        context = list(context)
        start = common_prefix_length(self._last_finished, context)  # a chat turn repeats the history: count it once
        self.session_table.add_tokens(context, start, self._session_clock)
        self._session_clock += len(context)
        self._last_finished = context
        if self.persistent_table is None:
            return
        self.persistent_table.add_tokens(context, start, self._persistent_clock)
        self._persistent_clock += len(context)
        self._dirty_keys |= ngram_keys(context, start, self.max_n)
        try:
            self.save()
        except OSError as exc:
            warnings.warn(f"n-gram cache {self.persistent_path} not saved: {exc}", NGramCacheWarning, stacklevel=2)

    def reset(self) -> None:
        """A new conversation: forget the context and session tiers (the persistent cache and recycling stay)."""
        self.context_table.clear()
        self._ingested = []
        self.session_table.clear()
        self._last_finished = []

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the persistent tier to its file, evicting down to `persistent_cap` entries (lowest count, then
        least recent). Only the n-grams counted since the last save are converted; the rest is merged as arrays.
        Raises OSError when the file cannot be written (the old file stays intact)."""
        if self.persistent_table is None or self.persistent_path is None:
            return
        fresh = self.persistent_table.to_arrays(self._dirty_keys)
        base = self._persistent_arrays
        merged = concat_arrays(drop_keys(base, rows_of_keys(base, fresh)), fresh)
        merged = evict_to_cap(self.persistent_table, merged, self.persistent_cap)
        self._persistent_arrays, self._dirty_keys = merged, set()
        header = make_header("persistent", self.max_n, self.vocab_size, self.fingerprint, self._persistent_clock,
                             merged)
        write_cache_file(self.persistent_path, header, merged)
