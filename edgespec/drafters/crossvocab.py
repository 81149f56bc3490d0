"""Cross-vocabulary drafting (OmniDraft): a drafter whose tokenizer differs from the target's.

The drafter and the target share *text*, not tokens. This module keeps the two token streams aligned on one
character axis and translates the drafter's guesses into target tokens:

* **Text**: the target's accepted tokens are decoded incrementally (`StreamDecoder`, special tokens kept, an
  incomplete UTF-8 character held back until it completes), giving every target token a character span.
* **Drafter context in step** (`CrossVocabDrafter._sync`): the drafter's cache holds its own tokenization of that
  text. Each step only a short look-behind window is re-encoded (from a clean token boundary a few tokens back,
  since the drafter's tokenization of the text's tail can change when more text arrives: " hel" + "lo"); the
  common prefix with what is cached is kept, the rest rewound and fed. No re-encoding of the whole history.
* **Drafting**: the drafter extends the text greedily, one token per forward (or several per forward with a
  first stage: n-grams in the *drafter's* vocabulary, checked by the drafter in one forward, as in staged
  speculation). Its continuation text is translated to target tokens (`translate`):
  - learned mappings first (`CrossVocabCache`, below), longest drafter n-gram first;
  - the rest through text: the target tokenizer encodes the continuation;
  - traps handled: byte-level and SentencePiece space markers are resolved by decoding (never by string surgery
    on vocabulary entries), an incomplete UTF-8 character (byte-fallback or split byte-level tokens) is cut, a
    drafter end-of-turn becomes the target's token of the same string (or ends the draft), and the word at the
    draft's end is kept out of the proposal until it is complete: the drafter's last token serves only as
    look-ahead, so a target token is proposed only when the drafter has moved past it.
* **Cross-vocabulary n-gram cache** (`CrossVocabCache`): filled from the target's accepted output as it streams.
  Between character positions where both tokenizations have a boundary, a unit pairs a drafter token sequence with
  the target token sequence the target actually produced: one-to-one where the strings agree, many-to-one (a
  drafter n-gram that the target writes as one token) and one-to-many (back). It is saved with the other caches
  (same atomic, versioned file format; kind "crossvocab").
* **Probabilities**: a target token's draft probability is the product of the probabilities of the drafter tokens
  it starts (a merged target token: the product over its drafter tokens). They give the draft tree its scores
  (acceptance estimates calibrated online, which size the proposal). Sampling stays lossless: the translated
  draft is verified as a deterministic proposal (`verify_sampled`: the target samples each position itself and
  follows the draft while it matches), because the law of a *translated* token is not the product of its drafter
  tokens' probabilities (other drafter continuations translate to the same target token), and rejection sampling
  with a q that is not the proposal's law would bias the output.
* **Adapting**: the proposal length follows measured acceptance and measured costs (the marginal-value rule of
  the model drafter), and a `PaysOff` monitor makes the drafter sit out while drafting loses to plain decoding.
"""

from __future__ import annotations

import bisect
import time
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from ..runtimes.checks import short_repr
from ..runtimes.runner import ContextOverflow, ModelRunner
from ..sampling import GenerationConfig
from ..text import StreamDecoder, Tokenizer, common_prefix_length
from .base import DraftTree, Drafter, VerifiedStep
from .cachefile import (MAGIC, CacheFileError, NGramCacheWarning, check_cache_path, read_cache_header, read_npz,
                        tokenizer_fingerprint, write_cache_file)
from .costs import AcceptanceByProbability, ForwardCost, PaysOff, ProposalCost

CACHE_KIND = "crossvocab"
CACHE_VERSION = 1
MAX_UNIT = 4  # longest drafter or target side of a learned unit
_REPLACEMENT = "\ufffd"


# ---------------------------------------------------------------------------------------------------- alignment
def token_spans(offsets, base: int = 0) -> tuple[list[int], list[int]]:
    """Character (starts, ends) of encoded tokens from a tokenizer's offsets, shifted by `base`. Byte-level pieces
    of one character share its span; ends never decrease."""
    starts, ends, last = [], [], base
    for start, end in offsets:
        end = max(last, base + end)
        starts.append(min(base + start, end))
        ends.append(end)
        last = end
    return starts, ends


def align_units(d_ends: list[int], t_ends: list[int], start: int = 0) -> list[tuple[int, int, int, int]]:
    """Units between the character positions where both tokenizations end a token: (d_from, d_to, t_from, t_to)
    index ranges (half-open) into the two token lists, for two tokenizations of the same text starting at `start`
    (token i spans up to `ends[i]`). Tokens after the last common boundary form no unit."""
    units = []
    i = j = 0
    d_from = t_from = 0
    while i < len(d_ends) and j < len(t_ends):
        if d_ends[i] == t_ends[j]:
            if d_ends[i] > start or (i > d_from or j > t_from):
                units.append((d_from, i + 1, t_from, j + 1))
            i += 1
            j += 1
            # zero-width tokens (a BOS) stay with the unit they precede
            d_from, t_from = i, j
        elif d_ends[i] < t_ends[j]:
            i += 1
        else:
            j += 1
    return units


def unit_kind(drafter_tokens: int, target_tokens: int) -> str:
    """'direct' (one to one), 'merge' (a drafter n-gram is one target token), 'split' (one drafter token is several
    target tokens) or 'group' (several to several)."""
    if drafter_tokens == 1 and target_tokens == 1:
        return "direct"
    if target_tokens == 1:
        return "merge"
    if drafter_tokens == 1:
        return "split"
    return "group"


def direct_token_map(draft_tokenizer: Tokenizer, target_tokenizer: Tokenizer) -> dict[int, int]:
    """Drafter id -> target id for tokens whose decoded strings agree exactly (special tokens by their string;
    byte-fallback tokens and partial UTF-8 pieces excluded): OmniDraft's direct one-to-one mappings."""
    def strings(tok: Tokenizer) -> dict[str, int]:
        n = tok.vocab_size
        texts = tok.backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        skip = tok.byte_fallback_ids
        out: dict[str, int] = {}
        for i, text in enumerate(texts):
            if text and i not in skip and _REPLACEMENT not in text:
                out.setdefault(text, i)
        return out

    target = strings(target_tokenizer)
    return {d: target[s] for s, d in strings(draft_tokenizer).items() if s in target}


# ---------------------------------------------------------------------------------------------------- the cache
class CrossVocabCache:
    """Learned mappings from drafter token sequences to the target token sequences the target produced for the
    same text (OmniDraft's cross-vocabulary n-gram cache), with counts. A mapping is used once it was seen
    `min_count` times and holds at least `min_share` of its drafter sequence's observations."""

    def __init__(self, min_count: int = 2, min_share: float = 0.6, cap: int = 200_000):
        self.min_count, self.min_share, self.cap = min_count, min_share, cap
        self.table: dict[tuple[int, ...], Counter] = {}
        self.learned = 0  # units observed since creation or load

    def __len__(self) -> int:
        return len(self.table)

    def add(self, drafter_seq, target_seq, count: int = 1) -> None:
        """Count one observation of `drafter_seq` written by the target as `target_seq`."""
        key, value = tuple(int(t) for t in drafter_seq), tuple(int(t) for t in target_seq)
        if not key or not value or len(key) > MAX_UNIT or len(value) > MAX_UNIT:
            return
        self.table.setdefault(key, Counter())[value] += count
        self.learned += 1

    def mapping(self, drafter_seq) -> tuple[int, ...] | None:
        """The target sequence `drafter_seq` maps to, if the evidence is strong enough."""
        seen = self.table.get(tuple(drafter_seq))
        if not seen:
            return None
        value, count = seen.most_common(1)[0]
        if count < self.min_count or count < self.min_share * sum(seen.values()):
            return None
        return value

    def longest(self, drafter_ids: list[int], start: int) -> tuple[int, tuple[int, ...]] | None:
        """(length, target sequence) of the longest usable mapping of drafter_ids[start:start + length]."""
        for length in range(min(MAX_UNIT, len(drafter_ids) - start), 0, -1):
            value = self.mapping(drafter_ids[start:start + length])
            if value is not None:
                return length, value
        return None

    def sizes(self) -> dict[str, int]:
        """Number of usable mappings per kind, and all entries."""
        sizes = Counter()
        for key in self.table:
            value = self.mapping(key)
            if value is not None:
                sizes[unit_kind(len(key), len(value))] += 1
        return {"entries": len(self.table), **{k: sizes.get(k, 0) for k in ("direct", "merge", "split", "group")}}

    def examples(self, kind: str, n: int = 5) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        """The `n` most observed usable mappings of a kind: (drafter seq, target seq, count)."""
        found = []
        for key, seen in self.table.items():
            value = self.mapping(key)
            if value is not None and unit_kind(len(key), len(value)) == kind:
                found.append((key, value, seen[value]))
        return sorted(found, key=lambda x: -x[2])[:n]

    # -- files ----------------------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays: drafter_seq [N, 4], target_seq [N, 4] (padded with -1), count [N]."""
        rows = [(k, v, c) for k, seen in self.table.items() for v, c in seen.items()]
        if len(rows) > self.cap:  # keep the most observed
            rows = sorted(rows, key=lambda r: -r[2])[:self.cap]
        d = np.full((len(rows), MAX_UNIT), -1, np.int64)
        t = np.full((len(rows), MAX_UNIT), -1, np.int64)
        for i, (k, v, _) in enumerate(rows):
            d[i, :len(k)], t[i, :len(v)] = k, v
        return {"drafter_seq": d, "target_seq": t, "count": np.array([r[2] for r in rows], np.int64)}

    def save(self, path, fingerprint: str, drafter_vocab: int, target_vocab: int) -> None:
        """Write the cache atomically (the file format of the n-gram caches, kind 'crossvocab')."""
        arrays = self.to_arrays()
        header = {"magic": MAGIC, "kind": CACHE_KIND, "version": CACHE_VERSION, "fingerprint": fingerprint,
                  "drafter_vocab": int(drafter_vocab), "target_vocab": int(target_vocab),
                  "entries": int(len(arrays["count"]))}
        write_cache_file(path, header, arrays)

    @classmethod
    def load(cls, path, fingerprint: str, drafter_vocab: int, target_vocab: int, **options) -> "CrossVocabCache":
        """Read a cache file; raises CacheFileError naming what is wrong (another tokenizer pair, corrupt data)."""
        arrays = read_npz(path)  # sizes, dtypes (numbers only) and shapes checked before anything is read
        header = read_cache_header(arrays, "cross-vocabulary cache")
        if header.get("kind") != CACHE_KIND:
            raise CacheFileError("it is not an edgespec cross-vocabulary cache")
        if header.get("version") != CACHE_VERSION:
            raise CacheFileError(f"it has version {short_repr(header.get('version'))}, this runtime reads "
                                 f"{CACHE_VERSION}")
        if header.get("fingerprint") != fingerprint:
            raise CacheFileError("it was built for another pair of tokenizers")
        missing = [k for k in ("drafter_seq", "target_seq", "count") if k not in arrays]
        if missing:
            raise CacheFileError(f"it lacks the arrays {', '.join(missing)}")
        d, t, c = arrays["drafter_seq"], arrays["target_seq"], arrays["count"]
        if any(a.dtype.kind not in "iu" for a in (d, t, c)):
            raise CacheFileError("its arrays must hold integers")
        if d.ndim != 2 or d.shape[1] != MAX_UNIT or t.shape != d.shape or c.shape != (len(d),):
            raise CacheFileError("its arrays have inconsistent shapes")
        if len(c) > 2 * max(options.get("cap", 200_000), 1):
            raise CacheFileError(f"it holds {len(c)} mappings, far over the cap")
        if len(c) and (c.min() < 1 or c.max() >= 1 << 40 or d.max() >= drafter_vocab or t.max() >= target_vocab
                       or d[:, 0].min() < 0 or t[:, 0].min() < 0):
            raise CacheFileError("it holds token ids or counts out of range")
        cache = cls(**options)
        for dk, tv, n in zip(d.tolist(), t.tolist(), c.tolist()):
            key, value = tuple(x for x in dk if x >= 0), tuple(x for x in tv if x >= 0)
            cache.table.setdefault(key, Counter())[value] += n
        return cache


def pair_fingerprint(draft_tokenizer_path, target_tokenizer_path) -> str:
    """Fingerprint of a (drafter, target) tokenizer pair."""
    return f"{tokenizer_fingerprint(draft_tokenizer_path)}-{tokenizer_fingerprint(target_tokenizer_path)}"


# ---------------------------------------------------------------------------------------------------- translation
def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_" or unicodedata.category(ch).startswith("M")


def translate(draft_ids: list[int], draft_ends: list[int], text: str, target_tokenizer: Tokenizer,
              cache: CrossVocabCache | None, complete: bool) -> tuple[list[int], list[int], list[bool]]:
    """Target tokens for drafter tokens `draft_ids` whose continuation text is `text` (token i ends at character
    `draft_ends[i]` of it). Returns (target ids, their character ends, whether each came from a learned mapping).

    Learned mappings apply first (longest drafter n-gram); runs between them go through the target tokenizer.
    Unless `complete` (the drafter ended its turn), only target tokens ending at or before the start of the
    drafter's last token are kept, and none that ends inside the word the text is still writing: the unfinished
    tail stays out of the proposal until the drafter has moved past it."""
    cut = text.find(_REPLACEMENT)
    limit = len(text) if cut < 0 else cut
    if not complete:
        limit = min(limit, draft_ends[-2] if len(draft_ends) > 1 else 0)
    out_ids: list[int] = []
    out_ends: list[int] = []
    learned: list[bool] = []

    def encode_run(a: int, b: int) -> None:  # characters a..b through the target tokenizer
        if b <= a:
            return
        enc = target_tokenizer.backend.encode(text[a:b], add_special_tokens=False)
        _, ends = token_spans(enc.offsets, a)
        out_ids.extend(enc.ids)
        out_ends.extend(ends)
        learned.extend([False] * len(enc.ids))

    run_start, i = 0, 0
    while i < len(draft_ids) and cache is not None and len(cache):
        found = cache.longest(draft_ids, i)
        if found is None:
            i += 1
            continue
        length, value = found
        unit_start = draft_ends[i - 1] if i > 0 else 0
        unit_end = draft_ends[i + length - 1]
        if unit_end > limit:
            break
        encode_run(run_start, unit_start)
        out_ids.extend(value)
        out_ends.extend([unit_end] * len(value))
        learned.extend([True] * len(value))
        run_start, i = unit_end, i + length
    encode_run(run_start, len(text) if cut < 0 else cut)
    keep = 0
    while keep < len(out_ids) and out_ends[keep] <= limit:
        keep += 1
    if not complete:  # nothing may end inside the word the draft is still writing
        word_start = len(text)
        while word_start > 0 and _word_char(text[word_start - 1]):
            word_start -= 1
        while keep > 0 and not learned[keep - 1] and word_start < out_ends[keep - 1] < len(text):
            keep -= 1
    return out_ids[:keep], out_ends[:keep], learned[:keep]


# ---------------------------------------------------------------------------------------------------- the drafter
class CrossVocabDrafter(Drafter):
    """Drafts for a target with another tokenizer (see the module docstring).

    `runner`: the drafter model's runner; `draft_tokenizer`, `target_tokenizer`: the two tokenizers;
    `target_vocab_size`: the target model's vocabulary (ids proposed are always below it); `bos_id`: the drafter's
    BOS, fed once before the text when its model wants one; `cache`: the cross-vocabulary n-gram cache (a fresh one
    by default), `cache_path`: where it is saved after each generation (None: not saved); `stage`: a first-stage
    drafter in the *drafter's* vocabulary (n-grams) whose guesses the drafter checks several per forward;
    `target_cost(T)`: the target's forward time for T tokens (the engine's VerifyCost) for the stop rule;
    `max_draft_tokens`: drafter tokens per proposal at most; `lookbehind`: drafter tokens re-encoded per step."""

    dynamic = True  # grows its own tree by probability: a plan gives it a node count and depth, not a shape

    def __init__(self, runner: ModelRunner, draft_tokenizer: Tokenizer, target_tokenizer: Tokenizer,
                 target_vocab_size: int, *, name: str = "cross", bos_id: int | None = None,
                 cache: CrossVocabCache | None = None, cache_path=None, fingerprint: str = "",
                 stage: Drafter | None = None, stage_budget: int = 6, target_cost=None, max_draft_tokens: int = 24,
                 lookbehind: int = 3, draft_special_ids=None):
        self.runner = runner
        self.draft_tok, self.target_tok = draft_tokenizer, target_tokenizer
        self.target_vocab_size = int(target_vocab_size)
        self.name = name if stage is None else f"{stage.name}>{name}"
        self.bos_id = bos_id
        self.cache = cache if cache is not None else CrossVocabCache()
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.fingerprint = fingerprint
        self.stage, self.stage_budget = stage, stage_budget
        self.target_cost = target_cost
        self.max_draft_tokens, self.lookbehind = max_draft_tokens, lookbehind
        self.forward_cost = ForwardCost()
        self.proposal_cost = ProposalCost()
        self.pays_off = PaysOff()
        self.acceptance = AcceptanceByProbability()
        specials = set(draft_tokenizer.special_ids) | set(draft_special_ids or ())
        self._draft_specials = frozenset(specials)
        self._special_to_target = {}
        for d in specials:  # a drafter special token (end of turn) maps to the target's token of the same string
            target = target_tokenizer.token_to_id(draft_tokenizer.id_to_token(d) or "")
            if target is not None and target < self.target_vocab_size:
                self._special_to_target[d] = target
        self.counters = {"proposals": 0, "forwards": 0, "drafter_tokens": 0, "nodes": 0, "learned_nodes": 0,
                         "accepted": 0, "accepted_learned": 0, "stage_fed": 0, "stage_used": 0, "resyncs": 0,
                         "refed": 0}
        self._config = GenerationConfig()
        self._reset_text()
        self._reset_drafter()
        self._last: tuple[list[int], list[float], list[bool]] | None = None  # last proposal: ids, probs, learned
        self._drafted = False
        self._proposal_seconds = 0.0
        self._dirty = False

    # -- state ----------------------------------------------------------------------------------------------
    def _reset_text(self) -> None:
        self._t_ids: list[int] = []
        self._t_ends: list[int] = []
        self._decoder = StreamDecoder(self.target_tok, skip_special_tokens=False)
        self._text = ""
        self._learned_upto = 0  # characters whose units were already learned

    def _reset_drafter(self) -> None:
        self.runner.reset()
        self._d_ids: list[int] = []  # drafter tokens in its cache (after the BOS), context then drafted
        self._d_starts: list[int] = []
        self._d_ends: list[int] = []
        self._d_text = ""  # the text those tokens spell (context text, then the drafted continuation)
        self._logits = None  # drafter logits after its last cached token
        self._bos_fed = False

    def start(self, prompt_ids: list[int], config: GenerationConfig) -> None:
        """A generation begins: remember the sampling settings, judge afresh."""
        self._config = config
        self.pays_off.restart()

    def reset(self) -> None:
        """Forget the cached context (the learned mappings stay)."""
        self._reset_text()
        self._reset_drafter()
        if self.stage is not None:
            self.stage.reset()

    def _extend_text(self, context: list[int]) -> None:
        """Decode the target's new tokens onto the text (a context that is not an extension: start over)."""
        n = len(self._t_ids)
        if len(context) < n or context[:n] != self._t_ids:
            self._reset_text()
            n = 0
        for token in context[n:]:
            self._text += self._decoder.push(int(token))
            self._t_ids.append(int(token))
            self._t_ends.append(len(self._text))

    def _sync(self) -> int:
        """Bring the drafter's cache in step with the text: keep what agrees, re-encode a short look-behind window
        from a clean token boundary, feed only what differs (at least one token, for fresh logits). Returns the
        number of tokens fed."""
        text = self._text
        agree = common_prefix_length(self._d_text, text)
        k = bisect.bisect_right(self._d_ends, agree)  # cached tokens wholly inside the agreeing text
        r, backed = k, 0
        while r > 0 and backed < self.lookbehind:
            r -= 1
            if r == 0 or self._d_starts[r] == self._d_ends[r - 1]:
                backed += 1
        while r > 0 and self._d_starts[r] != self._d_ends[r - 1]:  # land on a clean boundary
            r -= 1
        begin = self._d_starts[r] if r < len(self._d_ids) else (self._d_ends[-1] if self._d_ids else 0)
        enc = self.draft_tok.backend.encode(text[begin:], add_special_tokens=False)
        new_ids = list(enc.ids)
        starts, ends = token_spans(enc.offsets, begin)
        if not new_ids:  # nothing after the boundary: re-feed the token before it
            if r == 0:
                raise ValueError("the context decodes to no text")
            r -= 1
            new_ids, starts, ends = self._d_ids[r:r + 1], self._d_starts[r:r + 1], self._d_ends[r:r + 1]
        old = self._d_ids[r:]
        m = 0
        while m < min(len(old), len(new_ids)) and old[m] == new_ids[m] and self._d_ends[r + m] == ends[m]:
            m += 1
        m = min(m, len(new_ids) - 1)
        keep = r + m
        if keep < len(self._d_ids):
            self.counters["resyncs"] += 1
        self._truncate(keep)
        feed = new_ids[m:]
        self.counters["refed"] += max(0, len(feed) - 1)
        prefix = [] if self._bos_fed or self.bos_id is None else [self.bos_id]
        t = time.perf_counter()
        if len(feed) + len(prefix) > 1:
            self._logits = self.runner.prefill(prefix + feed)
        else:
            self._logits = self.runner.forward(feed, logit_positions=[0])[-1]
            self.runner.commit()
            self.forward_cost.observe(time.perf_counter() - t)
        self._bos_fed = True
        self.counters["forwards"] += 1
        self._d_ids += feed
        self._d_starts += starts[m:]
        self._d_ends += ends[m:]
        self._d_text = text
        return len(feed)

    def _truncate(self, keep: int) -> None:
        """Keep the first `keep` drafter tokens (after the BOS) in the cache."""
        self.runner.rewind(keep + (1 if self._bos_fed and self.bos_id is not None else 0))
        del self._d_ids[keep:], self._d_starts[keep:], self._d_ends[keep:]
        self._d_text = self._d_text[:self._d_ends[-1]] if self._d_ids else ""

    def _learn(self) -> None:
        """Learn units from the accepted text since the last learned position, up to the last common boundary
        before the text's end (the tail may still change)."""
        if not self._t_ids or not self._d_ids:
            return
        start = self._learned_upto
        ti = bisect.bisect_right(self._t_ends, start)
        di = bisect.bisect_right(self._d_ends, start)
        if (ti > 0 and self._t_ends[ti - 1] != start) or (di > 0 and self._d_ends[di - 1] != start):
            return
        t_ends = self._t_ends[ti:-1]  # never the pending (last) target token: the text may continue it
        d_ends = [e for e in self._d_ends[di:] if e <= (t_ends[-1] if t_ends else start)]
        units = align_units(d_ends, t_ends, start)
        for d_from, d_to, t_from, t_to in units:
            dseq = self._d_ids[di + d_from:di + d_to]
            tseq = self._t_ids[ti + t_from:ti + t_to]
            if any(d in self._draft_specials for d in dseq):
                continue
            self.cache.add(dseq, tseq)
            self._dirty = True
        if units:
            self._learned_upto = t_ends[units[-1][3] - 1]

    # -- drafting -------------------------------------------------------------------------------------------
    def propose(self, context: list[int], budget: int) -> DraftTree:
        """A chain of at most `budget` target tokens translated from the drafter's continuation of the text."""
        t0 = time.perf_counter()
        self.counters["proposals"] += 1
        self._last, self._drafted = None, False
        self.sat_out = budget <= 0 or (self.target_cost is not None and not self.pays_off.should_draft())
        if self.sat_out:  # nothing decoded, re-encoded or run: the next draft catches up in one forward
            return DraftTree.empty()
        try:
            self._extend_text(context)
            if not self._text:
                return DraftTree.empty()
            fed = self._sync()
            self._learn()
            t_sync = time.perf_counter()
            ids, probs, learned = self._draft(budget, t_sync)
        except ContextOverflow:
            return DraftTree.empty()
        self._drafted = True
        # a prompt's prefill is paid once per generation: the step's cost is judged without it
        now = time.perf_counter()
        self._proposal_seconds = now - (t_sync if fed > 8 else t0)
        if not ids:
            return DraftTree.empty()
        if fed <= 8:  # a catch-up after sitting out (or the prompt) is not what a planned step costs
            self.proposal_cost.observe(now - t0, len(ids), now - t_sync)
        self._last = (ids, probs, learned)
        self.counters["nodes"] += len(ids)
        self.counters["learned_nodes"] += sum(learned)
        scores = np.cumprod([self.acceptance.rate(p) for p in probs])
        return DraftTree(np.asarray(ids, np.int64), np.arange(-1, len(ids) - 1), scores=scores)

    def _draft(self, budget: int, t0: float) -> tuple[list[int], list[float], list[bool]]:
        """Extend the text with the drafter until the proposal stops paying; translate it."""
        base_text = self._text
        window = self._window_start()
        window_ids = self._d_ids[window:]
        window_text = self.draft_tok.decode(window_ids, skip_special_tokens=False)
        drafted: list[int] = []
        d_probs: list[float] = []
        d_ends: list[int] = []
        complete = False
        target_ids: list[int] = []
        target_probs: list[float] = []
        learned: list[bool] = []
        logits = self._logits
        while len(drafted) < self.max_draft_tokens:
            row = logits.astype(np.float64)
            row = np.exp(row - row.max())
            row /= row.sum()
            token = int(np.argmax(row))
            prob = float(row[token])
            if token in self._draft_specials:
                complete = True
                if token in self._special_to_target:
                    drafted.append(token)
                    d_probs.append(prob)
                    d_ends.append(d_ends[-1] if d_ends else 0)
                break
            guesses = self._stage_guesses(drafted + [token]) if self.stage is not None else []
            feed = [token] + guesses
            t = time.perf_counter()
            try:
                rows = self.runner.forward(feed)
            except ContextOverflow:
                break
            self.forward_cost.observe(time.perf_counter() - t)
            self.counters["forwards"] += 1
            # the stage's guesses count as long as they equal the drafter's own greedy choice
            used = 0
            while used < len(guesses):
                nxt = rows[used].astype(np.float64)
                if int(np.argmax(nxt)) != guesses[used]:
                    break
                used += 1
            self.runner.commit(list(range(used + 1)))
            new_tokens = feed[:used + 1]
            new_probs = [prob]
            for j in range(used):
                nxt = rows[j].astype(np.float64)
                nxt = np.exp(nxt - nxt.max())
                new_probs.append(float(nxt[guesses[j]] / nxt.sum()))
            self.counters["stage_used"] += used
            logits = rows[used]
            drafted += new_tokens
            d_probs += new_probs
            text = self.draft_tok.decode(window_ids + drafted, skip_special_tokens=False)
            if not text.startswith(window_text):
                break
            continuation = text[len(window_text):]
            if len(new_tokens) == 1:
                d_ends.append(len(continuation))
            else:  # stage tokens rode along: each one's end from its own prefix
                d_ends += self._ends_of(window_ids, window_text, drafted, len(new_tokens))
            self._append_draft(new_tokens, base_text, d_ends[-len(new_tokens):], continuation)
            target_ids, ends, learned = translate(drafted, d_ends, continuation, self.target_tok, self.cache, False)
            target_probs = _start_probs(d_ends, d_probs, ends)
            if len(target_ids) >= budget or not self._worth_continuing(target_probs, t0):
                break
        self.counters["drafter_tokens"] += len(drafted)
        self._logits = logits
        if complete:
            special = drafted[-1] if drafted and drafted[-1] in self._special_to_target else None
            body = drafted[:-1] if special is not None else drafted
            text = (self.draft_tok.decode(window_ids + body, skip_special_tokens=False)[len(window_text):]
                    if body else "")
            ids, ends, learned = translate(body, d_ends[:len(body)], text, self.target_tok, self.cache, True) \
                if body else ([], [], [])
            probs = _start_probs(d_ends[:len(body)], d_probs[:len(body)], ends)
            if special is not None and (len(ids) == 0 or ends[-1] == len(text)):
                ids, probs, learned = ids + [self._special_to_target[special]], probs + [d_probs[-1]], learned + [False]
            target_ids, target_probs = ids, probs
        keep = 0  # ids the target's model cannot take (a tokenizer larger than the model) end the proposal
        while keep < min(budget, len(target_ids)) and 0 <= target_ids[keep] < self.target_vocab_size:
            keep += 1
        return target_ids[:keep], target_probs[:keep], learned[:keep]

    def _ends_of(self, window_ids, window_text, drafted, count) -> list[int]:
        """Character ends (in the continuation) of the last `count` drafted tokens, decoding each prefix."""
        ends = []
        for j in range(len(drafted) - count + 1, len(drafted) + 1):
            text = self.draft_tok.decode(window_ids + drafted[:j], skip_special_tokens=False)
            ends.append(max(0, len(text) - len(window_text)))
        return ends

    def _append_draft(self, tokens, base_text: str, ends, continuation: str) -> None:
        """Record drafted tokens as cached drafter tokens (their spans in text coordinates)."""
        offset = len(base_text)
        for token, end in zip(tokens, ends):
            self._d_starts.append(self._d_ends[-1] if self._d_ends else 0)
            self._d_ids.append(int(token))
            self._d_ends.append(offset + end)
        self._d_text = base_text + continuation

    def _window_start(self) -> int:
        """Index of a clean drafter token boundary two tokens before the cache's end (decoding context)."""
        r = max(0, len(self._d_ids) - 2)
        while r > 0 and self._d_starts[r] != self._d_ends[r - 1]:
            r -= 1
        return r

    def _stage_guesses(self, path: list[int]) -> list[int]:
        """The stage's chain continuing the drafter context plus `path` (drafter vocabulary)."""
        tree = self.stage.propose_continuation(self._d_ids[:len(self._d_ids)], path, self.stage_budget) \
            if path else self.stage.propose(self._d_ids, self.stage_budget)
        chain, node = [], -1
        for i in range(len(tree)):  # the first branch
            if int(tree.parents[i]) == node:
                chain.append(int(tree.tokens[i]))
                node = i
        self.counters["stage_fed"] += len(chain)
        return chain

    def _worth_continuing(self, probs: list[float], t0: float) -> bool:
        """Another drafter forward pays while the tokens it is expected to add per second of drafting and extra
        verification beat the proposal's current rate (measured costs; without them, while the chain's estimate
        stays above 0.1)."""
        scores = np.cumprod([self.acceptance.rate(p) for p in probs]) if probs else np.zeros(0)
        last = float(scores[-1]) if len(scores) else 1.0
        gain = last * self.acceptance.rate(0.5)
        if self.target_cost is None or self.forward_cost.seconds is None:
            return last > 0.1
        n = len(probs)
        elapsed = time.perf_counter() - t0
        rate = (1.0 + float(scores.sum())) / (elapsed + self.target_cost(1 + n))
        extra = self.forward_cost.seconds + self.target_cost(2 + n) - self.target_cost(1 + n)
        return gain / max(extra, 1e-9) > rate

    # -- learning -------------------------------------------------------------------------------------------
    def observe(self, step: VerifiedStep) -> None:
        """Calibrate acceptance from what the target kept; judge whether drafting pays."""
        if self._last is not None:
            ids, probs, learned = self._last
            accepted = len(step.accepted_nodes)
            self.counters["accepted"] += accepted
            self.counters["accepted_learned"] += sum(learned[:accepted])
            reached = min(len(ids), accepted + 1)
            self.acceptance.update(probs[:reached], [0] * reached, [i < accepted for i in range(reached)])
        if self._drafted and self.target_cost is not None:
            seconds = self._proposal_seconds + self.target_cost(len(step.fed_tokens))
            self.pays_off.observe(len(step.accepted), seconds, self.target_cost(1))

    def finish(self, context: list[int]) -> None:
        """Save the learned mappings (a failed save warns; the next one retries)."""
        if self.cache_path is None or not self._dirty:
            return
        try:
            self.cache.save(self.cache_path, self.fingerprint, self.runner.entry.vocab_size, self.target_vocab_size)
            self._dirty = False
        except OSError as exc:
            warnings.warn(f"cross-vocabulary cache {self.cache_path} not saved: {exc}", NGramCacheWarning,
                          stacklevel=2)

    def stats(self) -> dict:
        """Counters plus the learned cache's sizes."""
        c = dict(self.counters)
        c["learned_share"] = round(c["learned_nodes"] / c["nodes"], 3) if c["nodes"] else 0.0
        c["cache"] = self.cache.sizes()
        return c


def _start_probs(d_ends: list[int], d_probs: list[float], t_ends: list[int]) -> list[float]:
    """Each target token's draft probability: the product over the drafter tokens that start inside it."""
    probs = [1.0] * len(t_ends)
    start = 0
    for end, prob in zip(d_ends, d_probs):
        k = bisect.bisect_right(t_ends, start)  # the first target token ending after this drafter token starts
        if k < len(probs):
            probs[k] *= prob
        start = end
    return probs


def open_cache(path, fingerprint: str, drafter_vocab: int, target_vocab: int) -> CrossVocabCache:
    """The cache saved at `path` (a fresh one when missing; a broken file warns and starts fresh). A path that
    exists but is not a regular file (a FIFO would block the reader forever) raises ValueError."""
    if path is None or not check_cache_path(path, "cross-vocabulary cache"):
        return CrossVocabCache()
    try:
        return CrossVocabCache.load(path, fingerprint, drafter_vocab, target_vocab)
    except CacheFileError as exc:
        warnings.warn(f"cross-vocabulary cache {path} not used: {exc}; starting with an empty cache",
                      NGramCacheWarning, stacklevel=2)
        return CrossVocabCache()
