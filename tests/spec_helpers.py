"""Drafters and checks shared by the speculative-decoding tests.

The drafters here are deliberately varied: garbage (random tokens in random tree shapes), an oracle that knows the
plain continuation and hides it among distractors, and a sampling drafter with real draft probabilities from a
second model. The exactness check compares speculative with plain greedy output and allows a difference only at a
near-tie of the plain target's logits.
"""

from __future__ import annotations

import numpy as np

from edgespec.drafters.base import DraftTree, Drafter
from edgespec.runtimes.runner import ModelRunner
from edgespec.sampling import process_logits

NEAR_TIE_BOUND = 1e-3  # top-1 minus top-2 logit: the largest margin a T-token forward may flip


def random_tree(rng: np.random.Generator, size: int, vocab_size: int, shape: str) -> DraftTree:
    """A tree of `size` random tokens: "chain", "wide" (all children of the root), "binary" or "random" parents.
    Siblings are made distinct."""
    parents = []
    for i in range(size):
        if shape == "chain":
            parents.append(i - 1)
        elif shape == "wide":
            parents.append(-1)
        elif shape == "binary":
            parents.append((i - 1) // 2 if i else -1)
        else:
            parents.append(int(rng.integers(-1, i)) if i else -1)
    tokens, seen = [], set()
    for parent in parents:
        while True:
            token = int(rng.integers(0, vocab_size))
            if (parent, token) not in seen:
                seen.add((parent, token))
                tokens.append(token)
                break
    return DraftTree(np.array(tokens), np.array(parents))


class RandomDrafter(Drafter):
    """Garbage: random tokens in a tree of the given shape (exactness must survive it)."""

    name = "random"

    def __init__(self, vocab_size: int, shape: str = "random", seed: int = 0):
        self.vocab_size, self.shape, self.rng = vocab_size, shape, np.random.default_rng(seed)
        self.observed = 0

    def propose(self, context, budget):
        return random_tree(self.rng, budget, self.vocab_size, self.shape)

    def observe(self, step):
        self.observed += 1
        assert step.accepted[-1] == step.accepted[-1]  # the bonus is always there
        assert len(step.accepted) == len(step.accepted_nodes) + 1


class OracleDrafter(Drafter):
    """Knows the plain output `expected` after `prompt_len` tokens: proposes it `depth` deep, each true token among
    `distractors` random siblings (at a random place among them), and sometimes corrupts the chain at
    `corrupt_at`. Tests that long accepted runs, wide trees and partial acceptance are all exact."""

    name = "oracle"

    def __init__(self, full_ids: list[int], prompt_len: int, vocab_size: int, depth: int = 6,
                 distractors: int = 2, corrupt_every: int = 3, seed: int = 0):
        self.full, self.prompt_len, self.vocab_size = list(full_ids), prompt_len, vocab_size
        self.depth, self.distractors, self.corrupt_every = depth, distractors, corrupt_every
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def propose(self, context, budget):
        self.calls += 1
        n = len(context)
        if context[:n] != self.full[:n]:
            return DraftTree.empty()  # off the known path (e.g. after a near-tie): propose nothing
        truth = self.full[n:n + self.depth]
        if self.corrupt_every and self.calls % self.corrupt_every == 0 and len(truth) > 1:
            cut = int(self.rng.integers(0, len(truth)))
            truth = truth[:cut] + [(truth[cut] + 1) % self.vocab_size]
        tokens, parents = [], []
        parent = -1
        for token in truth:
            siblings = {token}
            row = []
            for _ in range(self.distractors):
                other = int(self.rng.integers(0, self.vocab_size))
                if other not in siblings:
                    siblings.add(other)
                    row.append(other)
            row.insert(int(self.rng.integers(0, len(row) + 1)), token)
            for sibling in row:
                tokens.append(sibling)
                parents.append(parent)
                if sibling == token:
                    true_index = len(tokens) - 1
            parent = true_index
        return DraftTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64)).prune(budget, 10**9)


class ModelSampleDrafter(Drafter):
    """A drafter with draft probabilities: a second (tiny) model samples `width` distinct root children without
    replacement from its processed distribution q, then extends the first one `depth - 1` more tokens. The tree
    carries q for every node, so verification uses rejection sampling."""

    name = "model-sample"

    def __init__(self, entry, width: int = 2, depth: int = 2, temperature: float = 1.0, top_k: int = 0,
                 seed: int = 0, scramble: bool = False):
        self.runner = ModelRunner(entry, threads=1)
        self.width, self.depth, self.temperature, self.top_k = width, depth, temperature, top_k
        self.scramble = scramble  # reverse q's ranking over its support: same tokens, the unlikely ones favoured
        self.rng = np.random.default_rng(seed)

    def _q(self, ids: list[int]) -> np.ndarray:
        self.runner.reset()
        logits = self.runner.prefill(ids)
        q = process_logits(logits, self.temperature, self.top_k)
        if self.scramble:
            support = np.flatnonzero(q > 0)
            ranked = support[np.argsort(q[support], kind="stable")]
            q[ranked] = q[ranked[::-1]]
        return q

    def _draw_without_replacement(self, q: np.ndarray, n: int) -> list[int]:
        q = q.copy()
        out = []
        for _ in range(min(n, int((q > 0).sum()))):
            token = int(self.rng.choice(len(q), p=q / q.sum()))
            out.append(token)
            q[token] = 0.0
        return out

    def propose(self, context, budget):
        q_root = self._q(context)
        roots = self._draw_without_replacement(q_root, min(self.width, budget))
        tokens, parents, probs = list(roots), [-1] * len(roots), [q_root] * len(roots)
        path = list(context)
        node = 0
        for _ in range(self.depth - 1):
            if len(tokens) >= budget or not tokens:
                break
            path.append(tokens[node])
            q = self._q(path)
            child = self._draw_without_replacement(q, 1)[0]
            tokens.append(child)
            parents.append(node)
            probs.append(q)
            node = len(tokens) - 1
        return DraftTree(np.array(tokens), np.array(parents), np.stack(probs) if probs else None)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length when one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_margin(entry, prompt_ids: list[int], generated: list[int]) -> float:
    """The plain target's top-1 minus top-2 logit after `prompt_ids + generated`, computed as plain decoding does
    (prefill the prompt, then one token at a time)."""
    runner = ModelRunner(entry, threads=2)
    logits = runner.prefill(prompt_ids)
    for token in generated:
        logits = runner.forward([token])[0]
        runner.commit()
    top = np.sort(logits.astype(np.float64))
    return float(top[-1] - top[-2])


def assert_exact_or_near_tie(entry, prompt_ids: list[int], plain: list[int], spec: list[int], label: str) -> None:
    """Speculative greedy output must equal plain greedy output; if it does not, the first difference must sit at a
    near-tie of the plain target (top-2 margin below NEAR_TIE_BOUND), and never anywhere else."""
    diff = first_difference(plain, spec)
    if diff is None:
        return
    assert diff < min(len(plain), len(spec)), f"{label}: one output is a prefix of the other ({len(plain)} vs {len(spec)})"
    margin = top2_margin(entry, prompt_ids, plain[:diff])
    assert margin < NEAR_TIE_BOUND, (
        f"{label}: speculative output differs from plain at token {diff} ({plain[diff]} vs {spec[diff]}) where the "
        f"target's top-2 margin is {margin:.3g}, not a near-tie")


class DraftEvery:
    """A stand-in for `PaysOff` that lets the drafter draft on one step in `every` and sit out the others: tests of
    the lazy catch-up (a drafter that sat out feeds what it missed in one forward when it next drafts)."""

    def __init__(self, every: int):
        self.every, self.calls, self.skipped = every, 0, 0

    def should_draft(self) -> bool:
        self.calls += 1
        ok = self.calls % self.every == 1
        self.skipped += not ok
        return ok

    def observe(self, *args) -> None:
        pass

    def restart(self) -> None:
        pass


def forwards_while_sitting_out(drafter, schedule: DraftEvery) -> list[int]:
    """Wrap `drafter.propose` and `observe`; returns a list that collects the drafter model's forwards made on the
    steps the schedule sat out (it must stay all zeros)."""
    idle_forwards: list[int] = []
    propose, observe = drafter.propose, drafter.observe
    state = {"idle": False, "before": 0}

    def counted_propose(context, budget):
        skipped = schedule.skipped
        state["before"] = drafter.counters["forwards"]
        tree = propose(context, budget)
        state["idle"] = schedule.skipped > skipped
        if state["idle"]:
            idle_forwards.append(drafter.counters["forwards"] - state["before"])
        return tree

    def counted_observe(step):
        observe(step)
        if state["idle"]:
            idle_forwards[-1] = drafter.counters["forwards"] - state["before"]

    drafter.propose, drafter.observe = counted_propose, counted_observe
    return idle_forwards
