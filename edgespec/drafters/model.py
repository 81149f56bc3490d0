"""Model drafters: a small model of the target's vocabulary (or the target itself with layers skipped) grows the
draft tree by its own probabilities.

`ModelDrafter` runs any bundle model through its own `ModelRunner` and grows a tree best-first on cumulative draft
probability, in the manner of EAGLE-2 / DySpec: every drafter forward scores the most promising unexpanded nodes
at once (a tree-masked batch over the nodes cached by earlier forwards), each scored node offers its `width` most
likely tokens (greedy) or `width` draws without replacement (sampling, Gumbel top-k) as children. A node's estimate
is the product along its path of acceptance rates learned online per (draft probability, sibling rank)
(`AcceptanceByProbability`). Growth stops when another forward would lower the step's expected tokens per second:
the tokens it is expected to add, over the drafter forward plus the extra verification it costs (both measured as
we go), no longer beat the step's current average (`_worth_a_forward`).

The drafter's KV cache follows the accepted text: after each verification the accepted nodes it already scored are
kept (`ModelRunner.select`), the rest dropped; the next proposal feeds only what it has not seen (usually the
target's bonus token). Nothing is re-prefilled.

Staged speculation (Spector and Re): with a `stage` drafter (n-gram caches, or any `Drafter`), the stage's guesses
ride along in the drafter's forwards as extra tree nodes; where the drafter's own children agree with them the
tree grows several levels per forward. The stage only saves forwards: the tree is always the drafter's own choice,
so draft probabilities (and lossless rejection sampling) are unchanged.

Self-speculation (`shared_cache=True`): the drafter is the target's own runner with a subset of its layers
(`layer_gates`, from a bundle exported with `--self-speculative`), optionally through a reduced LM head; the draft
nodes' K/V are dropped before the target verifies, because skipped layers leave no K/V. `LayerSearch` picks the
layer set online from measured tokens per second (`edgespec.drafters.factory` builds one for the spec "self").

The acceptance and cost models shared with the cross-vocabulary drafter are in `edgespec.drafters.costs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..runtimes.runner import ContextOverflow, ModelRunner
from ..sampling import GenerationConfig, process_logits
from ..text import common_prefix_length
from .base import DraftTree, Drafter, VerifiedStep, fast_top_k
from .costs import AcceptanceByProbability, ForwardCost, PaysOff, ProposalCost


@dataclass
class _Node:
    token: int
    parent: int  # draft node index, -1 = child of the context
    score: float  # estimated probability that the whole path is accepted (what expansion ranks by)
    sel: float  # what the tree is cut by: never above the parent's or an earlier sibling's; when sampling, it
    # never depends on the node's own drawn token (keeping or dropping a drawn sibling by its value would bias
    # rejection sampling), only on its parent and its rank
    cond: float  # draft probability given the parent
    rank: int  # position among its siblings (the order they are tried)
    depth: int  # 1 for the context's children
    slot: int = -1  # index in the drafter's cache after the context (-1: not scored yet)
    children: list[int] = field(default_factory=list)
    expanded: bool = False


def softmax_top(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely entries of softmax(row): (indices, probabilities), best first."""
    top = fast_top_k(row[None, :], k)[0]
    peak = float(row.max())
    log_z = peak + np.log(np.exp(row - peak, dtype=np.float64).sum())
    return top, np.exp(row[top].astype(np.float64) - log_z)


def gumbel_top(q: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k draws without replacement from the distribution q, in draw order (Gumbel top-k)."""
    support = np.flatnonzero(q > 0)
    k = min(k, len(support))
    keys = np.log(q[support]) + rng.gumbel(size=len(support))
    top = np.argpartition(-keys, k - 1)[:k] if k < len(support) else np.arange(len(support))
    top = top[np.argsort(-keys[top], kind="stable")]
    return support[top]


class ModelDrafter(Drafter):
    """Drafts a token tree with a model (see the module docstring).

    `runner`: the drafter model's runner (its vocabulary must be the target's). `width`: children offered per
    scored node. `frontier`: nodes scored per drafter forward. `max_forwards`: forwards per proposal.
    `stage`: a first-stage drafter whose guesses ride along (staged speculation); `stage_budget` its nodes per
    forward. `target_cost(T)`: the target's forward time for T tokens (the engine's VerifyCost), used with the
    drafter's own measured forward time to decide when growing the tree stops paying. `shared_cache`: the runner is
    the target's own (self-speculation): draft K/V are dropped after each proposal. `layer_search`: chooses the
    layer gates per proposal (self-speculation)."""

    dynamic = True  # grows its own tree by probability: a plan gives it a node count and depth, not a shape

    def __init__(self, runner: ModelRunner, name: str = "draft", *, width: int = 3, frontier: int = 4,
                 max_forwards: int = 10, stage: Drafter | None = None, stage_budget: int = 8, target_cost=None,
                 shared_cache: bool = False, layer_search: "LayerSearch | None" = None, draft_head: bool = False,
                 temperature: float | None = None):
        if width < 1 or frontier < 1 or max_forwards < 1:
            raise ValueError("width, frontier and max_forwards must be >= 1")
        self.runner = runner
        self.name = name if stage is None else f"{stage.name}>{name}"
        self.width, self.frontier, self.max_forwards = width, frontier, max_forwards
        self.stage, self.stage_budget = stage, stage_budget
        self.target_cost = target_cost
        self.shared_cache = shared_cache
        self.layer_search = layer_search
        self.draft_head = draft_head
        self.temperature = temperature  # sampling: the draft distribution's temperature (None: the target's)
        self.vocab_size = runner.entry.vocab_size
        self.forward_cost = ForwardCost()
        self.proposal_cost = ProposalCost()
        self.pays_off = PaysOff()
        self.acceptance = AcceptanceByProbability()  # drafter probability -> how often the target accepts
        self.counters = {"proposals": 0, "forwards": 0, "nodes": 0, "stage_fed": 0, "stage_used": 0,
                         "accepted": 0}
        self._cached: list[int] = []  # real context tokens whose K/V the drafter's cache holds
        self._config = GenerationConfig()
        self._rng = np.random.default_rng()
        self._nodes: list[_Node] = []
        self._roots: list[int] = []  # the context's children among _nodes
        self._dists: dict[int, np.ndarray] = {}  # sampling: draft distribution after each scored node (-1: context)
        self._stage_slots = 0
        self._base = 0
        self._gates = None
        self._proposal_seconds = 0.0
        self._drafted = False  # the last proposal ran the drafter (not sitting out)

    # ---- the Drafter interface --------------------------------------------------------------------------------
    def start(self, prompt_ids: list[int], config: GenerationConfig) -> None:
        """Prefill the drafter's cache with the prompt (reusing the prefix it already holds)."""
        self._config = config
        self._rng = np.random.default_rng(None if config.seed is None else config.seed + 7919)
        self.pays_off.restart()
        if self.stage is not None:
            self.stage.start(prompt_ids, config)
        if self.shared_cache:
            return
        prompt = list(prompt_ids)[:-1]
        common = common_prefix_length(self._cached, prompt)
        self.runner.rewind(min(common, self.runner.length))
        self._cached = self._cached[:common]
        if len(prompt) > common:
            self.runner.prefill(prompt[common:])
            self._cached = prompt

    def propose(self, context: list[int], budget: int) -> DraftTree:
        """A tree of at most `budget` nodes, grown best-first by the drafter's probabilities."""
        t0 = self._t_propose = time.perf_counter()
        self.counters["proposals"] += 1
        self._nodes, self._roots, self._dists, self._stage_slots = [], [], {}, 0
        self._drafted = False
        self.sat_out = budget <= 0 or (self.target_cost is not None and not self.pays_off.should_draft())
        if self.sat_out:  # no forward: the next draft feeds what it missed in one
            return DraftTree.empty()
        if self.layer_search is not None:
            self._gates = self.layer_search.choose()
            if self._gates is None:  # no layer set beats plain decoding here
                self._proposal_seconds = time.perf_counter() - t0
                return DraftTree.empty()
        t_grow, fed = t0, 0
        try:
            root_row, stage_items = self._sync(context, budget)
            fed, t_grow = self._fed, time.perf_counter()
            self._offer_children(-1, root_row, stage_items)
            self._grow(context, budget)
        except ContextOverflow:
            self._nodes = []
        finally:
            if self.shared_cache:  # skipped layers left no K/V: the target re-scores everything
                self.runner.rewind(len(context) - 1)
        tree = self._tree(budget)
        self._drafted = True
        now = time.perf_counter()
        self._proposal_seconds = now - t0
        if len(tree) and fed <= 8:  # a catch-up after sitting out (or the prompt) is not what a planned step costs
            self.proposal_cost.observe(now - t0, int(tree.depths().max()), now - t_grow)
        return tree

    def observe(self, step: VerifiedStep) -> None:
        """Keep the accepted nodes' K/V, learn how the drafter's probabilities compare with acceptance."""
        accepted_tokens = step.accepted[:-1]
        path = self._follow(accepted_tokens)
        self.counters["accepted"] += len(path)
        self._learn(path, step)
        if self._drafted and self.target_cost is not None:
            seconds = self._proposal_seconds + self.target_cost(len(step.fed_tokens))
            self.pays_off.observe(len(step.accepted), seconds, self.target_cost(1))
            if self.layer_search is not None:
                self.layer_search.observe(self._gates, len(step.accepted), seconds)
        if self.stage is not None:
            self.stage.observe(step)
        if self.shared_cache or not self._nodes:
            return
        fed = []
        for node in path:  # scored nodes form a prefix of the accepted path
            if self._nodes[node].slot < 0:
                break
            fed.append(node)
        self.runner.select(self._base, [self._nodes[n].slot for n in fed])
        self._cached = self._cached[:self._base] + [self._nodes[n].token for n in fed]

    def finish(self, context: list[int]) -> None:
        """Pass the end of a generation on to the stage."""
        if self.stage is not None:
            self.stage.finish(context)

    def reset(self) -> None:
        """Forget the cached context."""
        if not self.shared_cache:
            self.runner.reset()
        self._cached = []
        if self.stage is not None:
            self.stage.reset()

    # ---- growing the tree -------------------------------------------------------------------------------------
    def _forward(self, tokens, parents=None, logit_positions=None, past_visible=None, positions=None):
        t = time.perf_counter()
        kwargs = {}
        if self._gates is not None:
            kwargs["layer_gates"] = self._gates
        if self.draft_head:
            kwargs["draft_head"] = True
        logits = self.runner.forward(tokens, parents, logit_positions, past_visible=past_visible,
                                     positions=positions, **kwargs)
        self.runner.commit()
        self.forward_cost.observe(time.perf_counter() - t)
        self.counters["forwards"] += 1
        return logits

    def _sync(self, context: list[int], budget: int):
        """Bring the cache up to `context` (feeding only what it lacks, at least the last token) together with the
        stage's guesses from the root; returns the logits after the context and the stage items."""
        if self.shared_cache:
            common = len(context) - 1
            if self.runner.length != common:
                raise RuntimeError(f"self-speculation expects the target cache at {common}, not {self.runner.length}")
        else:
            common = min(common_prefix_length(self._cached, context), len(context) - 1, self.runner.length)
            self.runner.rewind(common)
        feed = list(context[common:])
        f = self._fed = len(feed)
        stage = self._stage_tree(context, [], budget)
        tokens = feed + stage.tokens.tolist()
        parents = list(range(-1, f - 1)) + [p + f if p >= 0 else f - 1 for p in stage.parents.tolist()]
        logits = self._forward(tokens, np.asarray(parents, np.int64), np.arange(f - 1, len(tokens)))
        self._base = common + f
        self._cached = list(context)
        self._stage_slots = len(stage)
        return logits[0], self._stage_items(stage, 0, logits[1:])

    def _stage_tree(self, context, path, budget) -> DraftTree:
        if self.stage is None:
            return DraftTree.empty()
        tree = (self.stage.propose(context, min(budget, self.stage_budget)) if not path
                else self.stage.propose_continuation(context, path, min(budget, self.stage_budget)))
        if len(tree):
            tree.validate(self.vocab_size)
            self.counters["stage_fed"] += len(tree)
        return tree

    @staticmethod
    def _stage_items(stage: DraftTree, first_slot: int, rows: np.ndarray) -> list[tuple]:
        """A stage's scored guesses: (token, parent within the stage or -1, cache slot after the context, logits
        after it), in the stage tree's order."""
        return [(int(tok), int(par), first_slot + j, rows[j])
                for j, (tok, par) in enumerate(zip(stage.tokens.tolist(), stage.parents.tolist()))]

    def _row_tokens(self) -> np.ndarray | None:
        """Token ids of a logits row's columns: None for the full vocabulary, the reduced draft head's ids."""
        return getattr(self.runner, "draft_head_tokens", None) if self.draft_head else None

    def _children_of(self, row: np.ndarray, q: np.ndarray | None) -> list[tuple[int, float, float]]:
        """(token, draft probability, rank prior) of the children a scored node offers, in the order they are
        tried. Greedy (`q` None): the `width` most likely tokens (the prior is their probability). Sampling:
        `width` draws without replacement from the draft distribution `q`; the prior of the j-th draw is the j-th
        largest probability, which does not depend on what was drawn."""
        if q is None:
            ids = self._row_tokens()
            top, probs = softmax_top(row, self.width)
            tokens = ids[top] if ids is not None else top
            return [(int(t), float(p), float(p)) for t, p in zip(tokens, probs)]
        drawn = gumbel_top(q, self.width, self._rng)
        ranked = np.sort(q[np.argpartition(-q, len(drawn) - 1)[:len(drawn)]])[::-1] if len(drawn) else []
        return [(int(t), float(q[t]), float(r)) for t, r in zip(drawn, ranked)]

    def _draft_distribution(self, row: np.ndarray) -> np.ndarray:
        """The drafter's sampling distribution over the full vocabulary (the target's temperature, top-k, top-p)."""
        c = self._config
        temperature = self.temperature or c.temperature
        ids = self._row_tokens()
        if ids is None:
            return process_logits(row, temperature, c.top_k, c.top_p)
        full = np.full(self.vocab_size, -np.inf, dtype=np.float32)
        full[ids] = row
        return process_logits(full, temperature, c.top_k, c.top_p)

    def _offer_children(self, parent: int, row: np.ndarray, items, item_parent: int = -1) -> None:
        """Add the children scored node `parent` offers; children that a stage item already scored are expanded
        at once (recursively), which is how a stage saves drafter forwards."""
        parent_score = self._nodes[parent].score if parent >= 0 else 1.0
        parent_sel = self._nodes[parent].sel if parent >= 0 else 1.0
        depth = self._nodes[parent].depth + 1 if parent >= 0 else 1
        if parent >= 0:
            self._nodes[parent].expanded = True
        q = None
        if not self._config.is_greedy:  # computed once: the children's draws and the tree's probs share it
            q = self._dists[parent] = self._draft_distribution(row)
        previous = parent_sel
        for rank, (token, prob, prior) in enumerate(self._children_of(row, q)):
            rate = self.acceptance.rate(prob, rank)
            sel = min(parent_score * (rate if prior == prob else self.acceptance.rate(prior, rank)), previous)
            previous = sel  # below the parent and every earlier sibling
            node = len(self._nodes)
            self._nodes.append(_Node(token, parent, parent_score * rate, sel, prob, rank, depth))
            if parent >= 0:
                self._nodes[parent].children.append(node)
            else:
                self._roots.append(node)
            match = next((k for k, item in enumerate(items) if item[1] == item_parent and item[0] == token), None)
            if match is not None:
                self._nodes[node].slot = items[match][2]
                self.counters["stage_used"] += 1
                self._offer_children(node, items[match][3], items, match)

    def _grow(self, context: list[int], budget: int) -> None:
        """Score the best open nodes, a batch per forward, while it pays."""
        fed = self._stage_slots  # draft slots cached after the context so far
        t_start = self._t_propose
        for _ in range(self.max_forwards - 1):
            open_nodes = [i for i, n in enumerate(self._nodes) if n.slot < 0 and not n.expanded]
            if not open_nodes:
                return
            scores = sorted((n.sel for n in self._nodes), reverse=True)
            floor = scores[budget - 1] if len(scores) >= budget else 0.0  # children of nodes below it never make it
            open_nodes.sort(key=lambda i: (-self._nodes[i].score, i))
            pick = [i for i in open_nodes[:self.frontier] if self._nodes[i].score > floor]
            pick = self._worth_a_forward(pick, scores, time.perf_counter() - t_start)
            if not pick:
                return
            best_path = self._path_tokens(pick[0])
            stage = self._stage_tree(context, best_path, budget)
            tokens = [self._nodes[i].token for i in pick] + stage.tokens.tolist()
            parents = [-1] * len(pick) + [p + len(pick) if p >= 0 else 0 for p in stage.parents.tolist()]
            depths = [self._nodes[i].depth for i in pick]
            stage_depths = (stage.depths() + self._nodes[pick[0]].depth).tolist() if len(stage) else []
            positions = self._base + np.asarray(depths + stage_depths, dtype=np.int64) - 1
            past_visible = np.zeros((len(tokens), fed), dtype=bool)
            for row, i in enumerate(pick):
                past_visible[row] = self._ancestor_slots(i, fed)
            if len(stage):
                past_visible[len(pick):] = past_visible[0]
            logits = self._forward(tokens, np.asarray(parents), None, past_visible=past_visible, positions=positions)
            for row, i in enumerate(pick):
                self._nodes[i].slot = fed + row
            items = self._stage_items(stage, fed + len(pick), logits[len(pick):])
            fed += len(tokens)
            for row, i in enumerate(pick):
                self._offer_children(i, logits[row], items if row == 0 else [], -1)

    def _ancestor_slots(self, node: int, fed: int) -> np.ndarray:
        visible = np.zeros(fed, dtype=bool)
        parent = self._nodes[node].parent
        while parent >= 0:
            visible[self._nodes[parent].slot] = True
            parent = self._nodes[parent].parent
        return visible

    def _path_tokens(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(self._nodes[node].token)
            node = self._nodes[node].parent
        return path[::-1]

    def _worth_a_forward(self, pick: list[int], chosen: list[float], elapsed: float) -> list[int]:
        """The prefix of `pick` whose expansion raises the expected tokens per second of this step (marginal value:
        expand while the expected tokens a forward adds, per second it adds in drafting and verification, beat the
        step's current average). `chosen`: every node's estimate, best first. Without cost measurements, expand."""
        if self.forward_cost.seconds is None or self.target_cost is None or not pick:
            return pick
        cost = self.target_cost
        # the best the tree offers now: (1 + expected accepted) / (draft time + verification of the best prefix)
        expected, best_rate, best_n = 1.0, 1.0 / (elapsed + cost(1)), 0
        for n, est in enumerate(chosen, 1):
            expected += est
            rate = expected / (elapsed + cost(1 + n))
            if rate > best_rate:
                best_rate, best_n = rate, n
        first_child = self.acceptance.rate(0.5, 0)  # what a scored node's best child typically adds
        kept, gain = [], 0.0
        for i in pick:
            gain += self._nodes[i].score * first_child
            extra = self.forward_cost.seconds + cost(2 + best_n + len(kept)) - cost(1 + best_n)
            if gain / extra <= best_rate:
                break
            kept.append(i)
        return kept

    def _tree(self, budget: int) -> DraftTree:
        """The `budget` best nodes (a node always after its parent and its earlier siblings), renumbered."""
        nodes = self._nodes
        if not nodes:
            return DraftTree.empty()
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].sel, nodes[i].depth, i))[:budget]
        keep = sorted(order, key=lambda i: (nodes[i].depth, i))
        kept = set(keep)
        keep = [i for i in keep if nodes[i].parent < 0 or nodes[i].parent in kept]
        index = {old: new for new, old in enumerate(keep)}
        tokens = np.array([nodes[i].token for i in keep], np.int64)
        parents = np.array([index[nodes[i].parent] if nodes[i].parent >= 0 else -1 for i in keep], np.int64)
        scores = np.array([nodes[i].sel for i in keep])
        self.counters["nodes"] += len(keep)
        probs = None
        if not self._config.is_greedy:
            probs = np.stack([self._dists[nodes[i].parent] for i in keep])
        return DraftTree(tokens, parents, probs=probs, scores=scores)

    # ---- learning from the verification ----------------------------------------------------------------------
    def _follow(self, tokens: list[int]) -> list[int]:
        """Draft nodes on the path spelled by `tokens` (as far as the draft goes)."""
        path, kids = [], self._roots
        for token in tokens:
            node = next((k for k in kids if self._nodes[k].token == token), None)
            if node is None:
                break
            path.append(node)
            kids = self._nodes[node].children
        return path

    def _learn(self, path: list[int], step: VerifiedStep) -> None:
        """Calibrate the drafter's probabilities against acceptance at the nodes the target reached."""
        if not self._nodes:
            return
        verified = set(self._follow_verified(step))
        reached = [k for k in self._roots if k in verified]
        for node in path:
            reached += [k for k in self._nodes[node].children if k in verified]
        if not reached:
            return
        accepted = set(path)
        self.acceptance.update([self._nodes[k].cond for k in reached], [self._nodes[k].rank for k in reached],
                               [k in accepted for k in reached])

    def _follow_verified(self, step: VerifiedStep) -> list[int]:
        """Draft nodes that were in the verified tree (the engine may have cut ours)."""
        fed = step.fed_tokens.tolist()[1:]
        parents = [p - 1 if p > 0 else -1 for p in step.fed_parents.tolist()[1:]]
        mapped: list[int] = []
        for token, parent in zip(fed, parents):
            kids = self._roots if parent < 0 else (
                self._nodes[mapped[parent]].children if mapped[parent] >= 0 else [])
            mapped.append(next((k for k in kids if self._nodes[k].token == token), -1))
        return [m for m in mapped if m >= 0]



class LayerSearch:
    """Chooses the self-speculative layer set online (in the manner of SWIFT's on-the-fly search, without
    training): each candidate set's tokens per second (accepted tokens + bonus over draft + verify time) is tracked
    as a decaying average; every set is tried `warmup` times, then the best is used, with one exploration step every
    `explore_every` steps. With `plain_rate` (a callable: tokens per second of plain decoding), drafting is switched
    off (`choose` returns None) while no set beats it. A single candidate without `plain_rate` pins the set."""

    def __init__(self, candidates: list[np.ndarray], warmup: int = 3, explore_every: int = 12, decay: float = 0.9,
                 plain_rate=None):
        if not candidates:
            raise ValueError("LayerSearch needs at least one candidate layer set")
        self.candidates = [np.asarray(c, dtype=bool) for c in candidates]
        self.warmup, self.explore_every, self.decay = warmup, explore_every, decay
        self.tokens = np.zeros(len(candidates))
        self.seconds = np.zeros(len(candidates))
        self.tries = np.zeros(len(candidates), dtype=np.int64)
        self.steps = 0
        self._current = 0
        self.plain_rate = plain_rate
        self.off_steps = 0  # proposals skipped because plain decoding was faster
        self._interval = explore_every  # steps between explorations; doubles while they find nothing better
        self._next_explore = explore_every
        self._explored = 0
        self._explore_from = None

    def _beats_plain(self) -> bool:
        return self.plain_rate is None or self.rates()[self.best] >= self.plain_rate()

    def rates(self) -> np.ndarray:
        """Measured tokens per second of each candidate (0 before it was tried)."""
        return np.divide(self.tokens, self.seconds, out=np.zeros_like(self.tokens), where=self.seconds > 0)

    @property
    def best(self) -> int:
        """Index of the fastest candidate so far."""
        return int(np.argmax(self.rates()))

    def choose(self) -> np.ndarray | None:
        """The gates for the next proposal (None: decode plainly this step)."""
        self.steps += 1
        untried = np.flatnonzero(self.tries < self.warmup)
        if len(untried):
            self._current = int(untried[0])
        elif self.steps >= self._next_explore and (len(self.candidates) > 1 or self.plain_rate is not None):
            others = [i for i in range(len(self.candidates)) if i != self.best or self.plain_rate is not None]
            self._explored += 1
            self._current = others[self._explored % len(others)]
            self._explore_from = self.best if self._beats_plain() else None
            self._next_explore = self.steps + self._interval
        elif not self._beats_plain():
            self._current = None
            self.off_steps += 1
        else:
            self._current = self.best
        return None if self._current is None else self.candidates[self._current]

    def observe(self, gates, tokens: int, seconds: float) -> None:
        """Credit the set used for the last proposal with `tokens` produced in `seconds`."""
        i = self._current
        if i is None:
            return
        self.tries[i] += 1
        self.tokens[i] = self.decay * self.tokens[i] + tokens
        self.seconds[i] = self.decay * self.seconds[i] + seconds
        if self.steps == self._next_explore - self._interval and self.tries.min() >= self.warmup:  # an exploration
            found = (self.best if self._beats_plain() else None) != self._explore_from
            self._interval = self.explore_every if found else min(256, self._interval * 2)
            self._next_explore = self.steps + self._interval

    def describe(self, i: int | None = None) -> str:
        """Human-readable form of a candidate (default: the best)."""
        return describe_gates(self.candidates[self.best if i is None else i])


def describe_gates(gates: np.ndarray) -> str:
    """'exit=E' for a prefix of layers, else 'skip=a,b,...'."""
    gates = np.asarray(gates, dtype=bool)
    on = np.flatnonzero(gates)
    if len(on) and np.array_equal(on, np.arange(len(on))):
        return f"exit={len(on) - 1}" if len(on) < len(gates) else "all"
    return "skip=" + ",".join(str(i) for i in np.flatnonzero(~gates))


def candidate_layer_sets(num_layers: int) -> list[np.ndarray]:
    """Layer sets worth trying on a model of `num_layers` (measured on Qwen2.5-Coder-1.5B: early exit without a
    trained exit head agrees with the full model on 1-2% of tokens at half depth, so no early exits here; skipping
    a block of early-middle layers or spread-out middle layers keeps 70-85% top-1 agreement). The first two and the
    last layers always run."""
    q = num_layers / 4
    lo, mid, hi = int(q), int(2 * q), int(3 * q)
    sets = []
    for skipped in (range(lo, mid), range(lo, lo + max(1, int(q / 2))), range(lo + 1, hi + 1, 4),
                    range(lo + 1, hi + 1, 2), range(lo + 3, hi, 4)):
        gates = np.ones(num_layers, dtype=bool)
        gates[[i for i in skipped if 2 <= i < num_layers - 1]] = False
        sets.append(gates)
    unique = []
    for gates in sets:
        if gates.any() and not gates.all() and not any(np.array_equal(gates, u) for u in unique):
            unique.append(gates)
    if not unique:  # very shallow models: skip one layer at a time
        for i in range(1, num_layers):
            gates = np.ones(num_layers, dtype=bool)
            gates[i] = False
            unique.append(gates)
    return unique


def parse_layer_option(text: str, num_layers: int) -> np.ndarray:
    """Gates from 'exit=E', 'skip=a,b,c' or 'layers=0-13,20' (layer indices from 0)."""
    key, _, value = text.partition("=")
    gates = np.zeros(num_layers, dtype=bool)

    def indices(spec: str) -> list[int]:
        out = []
        for part in filter(None, spec.split(",")):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
        return out

    try:
        if key == "exit":
            gates[:int(value) + 1] = True
        elif key == "skip":
            gates[:] = True
            gates[indices(value)] = False
        elif key == "layers":
            gates[indices(value)] = True
        else:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"bad layer set {text!r} for a {num_layers}-layer model: use exit=E, skip=a,b or "
                         "layers=a-b") from None
    if not gates.any() or gates.all():
        raise ValueError(f"layer set {text!r} must skip some layers and keep at least one")
    return gates
