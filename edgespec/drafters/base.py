"""The drafter interface: a drafter proposes a token tree, then learns from what the target accepted.

Every drafter (n-gram caches, model drafters, staged, self-speculative, cross-vocabulary) implements the same two
methods, in the spirit of Hugging Face's `CandidateGenerator`:

* `propose(context, budget) -> DraftTree`: at most `budget` nodes continuing `context` (all token ids so far:
  prompt, generated tokens and the token that is about to be fed);
* `observe(step)`: a `VerifiedStep` telling which tokens the target accepted and what it predicted at every
  scored position.

`start` and `finish` bracket one generation (optional hooks with empty defaults). Everything else the engine asks of
a drafter is declared on `Drafter` with a neutral default: `dynamic`, `planned`, `stage`, `runner`, `forward_cost`
and `save`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..runtimes.kvcache import tree_depths
from ..sampling import GenerationConfig

if TYPE_CHECKING:
    from ..runtimes.runner import ModelRunner
    from .costs import ForwardCost, ProposalCost


@dataclass
class DraftTree:
    """A token tree continuing the context.

    `tokens[i]` is node i's token; `parents[i]` its parent node (-1: a child of the context's last token), always
    `< i`. A chain is a tree whose parents are -1, 0, 1, ... Siblings must be distinct and are tried in order.
    `probs`, when given, is `[N, V]`: row i is the draft distribution node i's token was drawn from (siblings share
    it); it enables lossless rejection sampling. Deterministic drafters (n-grams) leave it None. `scores`, when
    given, is the drafter's estimate of the probability that each node's whole path is accepted (never above its
    parent's); the engine uses it to cut the tree to the size that pays off on this device.
    """

    tokens: np.ndarray
    parents: np.ndarray
    probs: np.ndarray | None = None
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64).reshape(-1)
        self.parents = np.asarray(self.parents, dtype=np.int64).reshape(-1)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)

    @classmethod
    def empty(cls) -> "DraftTree":
        """No draft: the step decodes one token."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def chain(cls, tokens, probs=None) -> "DraftTree":
        """A single branch."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        return cls(tokens, np.arange(-1, len(tokens) - 1, dtype=np.int64), probs)

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> np.ndarray:
        """Depth of each node, 1 for the children of the context."""
        return tree_depths(self.parents) + 1

    def children(self) -> list[list[int]]:
        """children[0] lists the context's children, children[i + 1] node i's (in order)."""
        kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, parent in enumerate(self.parents):
            kids[parent + 1].append(i)
        return kids

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError for a malformed tree (bad parents, tokens outside the vocabulary, repeated siblings,
        probabilities of the wrong shape or zero at a drafted token)."""
        n = len(self.tokens)
        if len(self.parents) != n:
            raise ValueError(f"draft tree has {n} tokens but {len(self.parents)} parents")
        if n == 0:
            return
        if np.any(self.parents < -1) or np.any(self.parents >= np.arange(n)):
            raise ValueError(f"draft tree parents {self.parents.tolist()} must be -1 or an earlier node")
        if self.tokens.min() < 0 or self.tokens.max() >= vocab_size:
            raise ValueError(f"draft token outside the vocabulary of {vocab_size}: {self.tokens.tolist()}")
        pairs = set(zip(self.parents.tolist(), self.tokens.tolist()))
        if len(pairs) != n:
            raise ValueError("draft tree repeats a token among siblings")
        if self.probs is not None:
            if self.probs.shape != (n, vocab_size):
                raise ValueError(f"draft probs have shape {self.probs.shape}, expected {(n, vocab_size)}")
            if np.any(self.probs[np.arange(n), self.tokens] <= 0):
                raise ValueError("a drafted token has zero draft probability")
        if self.scores is not None and self.scores.shape != (n,):
            raise ValueError(f"draft scores have shape {self.scores.shape}, expected {(n,)}")

    def chain_first(self) -> "DraftTree":
        """The same tree with its main branch (the first child at every level) laid out first, as a chain: nodes
        0..d-1 then have parents -1, 0, .., d-2. Siblings keep their order. The target scores the main branch at
        the cache slots plain decoding would use, so its logits are bitwise those of one-at-a-time decoding (see
        `exact_prefix`); the other nodes follow in their original order."""
        n = len(self)
        if n == 0:
            return self
        branch = self.main_branch()
        if branch == list(range(len(branch))):
            return self
        on_branch = set(branch)
        order = branch + [i for i in range(n) if i not in on_branch]
        index = {old: new for new, old in enumerate(order)}
        parents = [index[int(self.parents[i])] if self.parents[i] >= 0 else -1 for i in order]
        return DraftTree(self.tokens[order], np.asarray(parents, dtype=np.int64),
                         self.probs[order] if self.probs is not None else None,
                         self.scores[order] if self.scores is not None else None)

    def main_branch(self, below: int = -1) -> list[int]:
        """The nodes of the first-child chain under node `below` (-1: from the context), top down."""
        kids = self.children()
        branch, node = [], below
        while kids[node + 1]:
            node = kids[node + 1][0]
            branch.append(node)
        return branch

    def exact_prefix(self) -> int:
        """How many leading nodes form a chain (parents -1, 0, 1, ..): the nodes whose cache slots equal their
        positions, so the target's logits for them equal one-at-a-time decoding bitwise."""
        chain = np.arange(-1, len(self) - 1)
        off = np.flatnonzero(self.parents != chain)
        return int(off[0]) if len(off) else len(self)

    def prune(self, max_nodes: int, max_depth: int) -> "DraftTree":
        """The first `max_nodes` nodes no deeper than `max_depth` (a node is kept only with its parent)."""
        keep: list[int] = []
        kept = set()
        depth = self.depths()
        for i in range(len(self)):
            parent = int(self.parents[i])
            if len(keep) >= max_nodes or depth[i] > max_depth or (parent >= 0 and parent not in kept):
                continue
            kept.add(i)
            keep.append(i)
        return self.subtree(keep)

    def subtree(self, keep) -> "DraftTree":
        """The nodes `keep` (ascending; each one's parent must be kept too), renumbered."""
        keep = [int(i) for i in keep]
        if len(keep) == len(self):
            return self
        index = {old: new for new, old in enumerate(keep)}
        parents = [index[int(self.parents[i])] if self.parents[i] >= 0 else -1 for i in keep]
        return DraftTree(self.tokens[keep], np.asarray(parents, dtype=np.int64),
                         self.probs[keep] if self.probs is not None else None,
                         self.scores[keep] if self.scores is not None else None)


@dataclass
class VerifiedStep:
    """What one verification produced, for `Drafter.observe`.

    `fed_tokens` are the tokens the target scored: the pending context token (index 0) followed by the tree's
    nodes; `fed_parents` their parents within `fed_tokens` (-1 for index 0). `target_logits[j]` are the target's
    logits for the token after `fed_tokens[j]`. `accepted_nodes` are the tree nodes (tree indices) on the accepted
    path, `accepted` the tokens appended to the context this step (their tokens plus the target's bonus token).
    """

    fed_tokens: np.ndarray
    fed_parents: np.ndarray
    target_logits: np.ndarray
    accepted_nodes: list[int]
    accepted: list[int]
    context_length: int  # tokens in the context before this step's accepted tokens were appended
    _topk: dict = field(default_factory=dict, repr=False)

    def top_k(self, k: int) -> np.ndarray:
        """The target's k most likely next tokens after each fed token, best first: int64 [len(fed_tokens), k]."""
        if k not in self._topk:
            self._topk[k] = fast_top_k(self.target_logits, k)
        return self._topk[k]


def fast_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k indices of each row of `logits` [R, V], best first: int64 [R, min(k, V)].

    Much faster than a full argpartition on large vocabularies: the k-th largest of a strided sample bounds the
    row's k-th largest from below, so only the few values above it are ranked."""
    logits = np.asarray(logits)
    rows, vocab = logits.shape
    k = max(0, min(k, vocab))
    out = np.empty((rows, k), np.int64)
    if k == 0:
        return out
    stride = 64
    for r in range(rows):
        row = logits[r]
        if vocab >= stride * k * 4:
            floor = np.partition(row[::stride], -k)[-k]
            candidates = np.flatnonzero(row >= floor)
        else:
            candidates = np.arange(vocab)
        if len(candidates) < k:  # NaNs in the row: fall back to the plain way
            candidates = np.arange(vocab)
        values = row[candidates]
        top = np.argpartition(-values, k - 1)[:k]
        top = top[np.argsort(-values[top], kind="stable")]
        out[r] = candidates[top]
    return out


class Drafter:
    """Base class of drafters: override `propose` (and `observe` to learn)."""

    name = "none"
    dynamic = False  # True: grows its own tree by probability (gets a plan's node count, not its exact shape)
    stage: "Drafter | None" = None  # a first-stage drafter drafting for this one (staged speculation)
    runner: "ModelRunner | None" = None  # the model this drafter runs, if any (its device-profile costs are used)
    forward_cost: "ForwardCost | None" = None  # the measured time of one of its model's forwards, if it runs one

    proposal_cost: "ProposalCost | None" = None  # its measured time per proposal by depth, if it measures one
    sat_out = False  # its last `propose` did no work at all (it sits out while drafting loses): nothing to follow

    def draft_seconds(self, depth: int, nodes: int) -> float | None:
        """This drafter's own estimate of the time to propose a tree `depth` levels deep with `nodes` nodes, from
        its measured proposals (`proposal_cost`), or None before it has measured any (the engine then assumes one
        drafter forward per level)."""
        return self.proposal_cost.seconds(depth) if self.proposal_cost is not None else None

    def start(self, prompt_ids: list[int], config: GenerationConfig) -> None:
        """A generation begins from `prompt_ids` with `config` (sampling drafters read temperature etc.)."""

    def propose(self, context: list[int], budget: int) -> DraftTree:
        """A tree of at most `budget` nodes continuing `context`."""
        return DraftTree.empty()

    def propose_continuation(self, context: list[int], path: list[int], budget: int) -> DraftTree:
        """A tree continuing `context + path`, where `path` is speculative (not yet verified): what a drafter can
        offer as the first stage of a staged drafter. Must not learn from `path`. Default: nothing."""
        return DraftTree.empty()

    def observe(self, step: VerifiedStep) -> None:
        """Learn from one verification."""

    def finish(self, context: list[int]) -> None:
        """The generation ended; `context` holds the prompt and every token the engine committed or yielded."""

    def reset(self) -> None:
        """Forget session state (a new conversation)."""

    def planned(self, on: bool) -> None:
        """Told whether a tree planner sizes this drafter's trees from its acceptance statistics per confidence
        bucket. A drafter that corrects its own estimates from outcomes should stop while planned: the correction
        moves proposals between the planner's buckets, which changes what gets verified and so what either
        learns (a loop that can lock a good drafter out). Default: nothing to do."""

    def save(self) -> None:
        """Persist what this drafter keeps across sessions (its cache files); called by `Engine.close`. May raise
        OSError (the engine warns). Default: nothing to save."""
