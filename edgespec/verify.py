"""Verification: given a draft tree and the target's logits at every node, pick the accepted path and the bonus.

`logits[0]` are the target's logits after the context's last token, `logits[i + 1]` after tree node i. Each
function walks down from the root and returns `(accepted_nodes, bonus_token)`: the tree nodes on the accepted path
(root first) and the token the target itself contributes after them. All three are exact by construction:

* `verify_greedy`: follow the child equal to the target's argmax; the bonus is the argmax where no child matches.
  Output equals plain greedy decoding whenever the scored logits equal plain decoding's.
* `verify_sampled`: for deterministic drafts (no draft probabilities): sample the target's token at each node and
  follow the child that matches; every emitted token is a plain draw from the target.
* `verify_rejection`: multi-draft tree rejection sampling with draft probabilities q (siblings drawn from q
  without replacement): try siblings in order, accept child x with probability min(1, p(x) / q(x)); on rejection
  p <- normalise(max(0, p - q)) and x is removed from q; if no child is accepted, sample from the residual p.

The logits given to them must be the target's after the history rules (`apply_history_rules`: the repetition penalty
over the prompt, the output and each node's own path, and the stop ids masked until min_new_tokens), so every row
is what plain decoding would score at that position.
"""

from __future__ import annotations

import numpy as np

from .drafters.base import DraftTree
from .sampling import GenerationConfig, HistoryRules, probabilities, sample


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The target distribution after a rejection: normalise(max(0, p - q)) (p itself if nothing is left)."""
    rest = np.maximum(p - q, 0.0)
    total = rest.sum()
    return rest / total if total > 0 else p


def node_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    """The tokens from the root down to each node, the node's own token included (parents come before children)."""
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(tree.tokens.tolist(), tree.parents.tolist()):
        paths.append((paths[parent] if parent >= 0 else ()) + (int(token),))
    return paths


class RuledRows:
    """The target's logits `[len(tree) + 1, V]` with the history rules applied as plain decoding would at each row:
    row 0 after the context, row i + 1 after tree node i with the repetition penalty over the context plus the
    node's path and the stop ids masked while the path leaves fewer than min_new_tokens new tokens. A row is
    computed when first read: a verification walk reads only the rows on its way down."""

    def __init__(self, tree: DraftTree, logits: np.ndarray, rules: HistoryRules):
        self.logits, self.rules = logits, rules
        self.paths = [()] + node_paths(tree)
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index not in self._rows:
            self._rows[index] = self.rules.row(self.logits[index], self.paths[index])
        return self._rows[index]


def apply_history_rules(tree: DraftTree, logits: np.ndarray, rules: HistoryRules) -> "np.ndarray | RuledRows":
    """What the verification functions must read for the target's `logits` of `tree`: `logits` itself when no
    history rule is in force, else their RuledRows (each row under the rules of its own path)."""
    if not rules.in_force:
        return logits
    return RuledRows(tree, logits, rules)


def _child_with_token(tree: DraftTree, kids: list[int], token: int) -> int | None:
    for child in kids:
        if tree.tokens[child] == token:
            return child
    return None


def follow_matches(tree: DraftTree, logits: np.ndarray, pick, stop_at: int | None = None) -> tuple[list[int], int]:
    """Walk down the tree: at each node `pick(logits row)` chooses the target's token; follow the child with that
    token, or stop and return it as the bonus. A child at index `stop_at` or later is returned as the bonus
    without walking below it."""
    children = tree.children()
    accepted: list[int] = []
    node = -1
    while True:
        token = pick(logits[node + 1])
        child = _child_with_token(tree, children[node + 1], token)
        if child is None or (stop_at is not None and child >= stop_at):
            return accepted, token
        accepted.append(child)
        node = child


def verify_greedy(tree: DraftTree, logits: np.ndarray) -> tuple[list[int], int]:
    """Longest root path whose tokens equal the target's argmax at each step, and the argmax after it."""
    return follow_matches(tree, logits, lambda row: int(np.argmax(row)))


def verify_sampled(tree: DraftTree, logits: np.ndarray, config: GenerationConfig,
                   rng: np.random.Generator, stop_at: int | None = None) -> tuple[list[int], int]:
    """Deterministic drafts: draw the target's token at each node (temperature/top-k/top-p/min-p applied) and follow the
    matching child; the first draw that matches no child (or matches a child at `stop_at` or later) is the bonus.
    One draw per emitted token, as plain sampling makes."""
    return follow_matches(tree, logits, lambda row: sample(probabilities(row, config), rng), stop_at)


def verify_rejection(tree: DraftTree, logits: np.ndarray, config: GenerationConfig,
                     rng: np.random.Generator, stop_at: int | None = None) -> tuple[list[int], int]:
    """Multi-draft rejection sampling over the tree (tree.probs required; siblings drawn from q without
    replacement). The emitted tokens follow the target's processed distribution exactly. An accepted child at
    index `stop_at` or later ends the walk as the bonus (it is a draw from its parent's distribution)."""
    if tree.probs is None:
        raise ValueError("verify_rejection needs draft probabilities (tree.probs)")
    children = tree.children()
    accepted: list[int] = []
    node = -1
    while True:
        p = probabilities(logits[node + 1], config)
        kids = children[node + 1]
        if not kids:
            return accepted, sample(p, rng)
        q = np.asarray(tree.probs[kids[0]], dtype=np.float64).copy()
        q /= q.sum()
        chosen = None
        for child in kids:
            token = int(tree.tokens[child])
            if rng.random() * q[token] < p[token]:  # accept with probability min(1, p/q)
                chosen = child
                break
            p = residual(p, q)
            q[token] = 0.0
            total = q.sum()
            if total > 0:
                q /= total
        if chosen is None:
            return accepted, sample(p, rng)
        if stop_at is not None and chosen >= stop_at:
            return accepted, int(tree.tokens[chosen])
        accepted.append(chosen)
        node = chosen


def verify_tree(tree: DraftTree, logits: np.ndarray, config: GenerationConfig,
                rng: np.random.Generator, stop_at: int | None = None) -> tuple[list[int], int]:
    """The exact verification rule for `config`: greedy, rejection sampling with draft probabilities, or
    target sampling for deterministic drafts (`stop_at` as in `follow_matches`; greedy walks the whole tree)."""
    if config.is_greedy:
        return verify_greedy(tree, logits)
    if tree.probs is not None:
        return verify_rejection(tree, logits, config, rng, stop_at)
    return verify_sampled(tree, logits, config, rng, stop_at)


def verify_exact(tree: DraftTree, logits: np.ndarray, config: GenerationConfig,
                 rng: np.random.Generator) -> tuple[list[int], int, list[int]]:
    """`verify_tree` using only logits computed at plain decoding's cache slots; returns (accepted nodes, bonus,
    replay).

    A node outside the tree's leading chain (`DraftTree.exact_prefix`) is scored at a cache slot other than its
    position, so its logits and K/V may differ from plain decoding in the last bits. The first such node on the
    accepted path was still chosen by its parent's exact logits: it becomes the bonus token (fed again next step,
    at its own slot). `replay` is a likely draft for the next step, verified there as a chain: under greedy
    decoding the path the inexact logits chose below the cut (`cut_to_exact_prefix`); when sampling, the walk
    stops at the cut (one random draw per emitted token, as in plain sampling) and the replay is the drafted main
    branch below it."""
    if config.is_greedy:
        return cut_to_exact_prefix(tree, *verify_greedy(tree, logits))
    prefix = tree.exact_prefix()
    accepted, bonus = verify_tree(tree, logits, config, rng, stop_at=prefix)
    parent = accepted[-1] if accepted else -1
    cut = next((c for c in tree.children()[parent + 1] if c >= prefix and tree.tokens[c] == bonus), None)
    return accepted, bonus, [] if cut is None else [int(tree.tokens[n]) for n in tree.main_branch(cut)]


def cut_to_exact_prefix(tree: DraftTree, accepted: list[int], bonus: int) -> tuple[list[int], int, list[int]]:
    """Cut a fully walked accepted path at its first node outside the leading chain: returns (the nodes before it,
    its token as the bonus, the tokens below it on the path plus the old bonus as the replay)."""
    prefix = tree.exact_prefix()
    for i, node in enumerate(accepted):
        if node >= prefix:
            replay = [int(tree.tokens[n]) for n in accepted[i + 1:]] + [int(bonus)]
            return accepted[:i], int(tree.tokens[node]), replay
    return accepted, bonus, []
