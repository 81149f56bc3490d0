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

Cache files are `.npz` archives (loaded with allow_pickle=False) with a JSON header (magic, kind, version, max_n,
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

import hashlib
import heapq
import itertools
import json
import math
import os
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtimes.manifest import atomic_writer, short_repr
from .drafting import Drafter, DraftTree, VerifiedStep, fast_top_k
from .sampling import GenerationConfig
from .text import common_prefix_length

__all__ = [
    "NGramDrafter", "Thresholds", "TierThresholds", "NGramTable", "NGramCacheWarning", "StaticBuildReport",
    "build_static_cache", "register_cli", "default_cache_path", "tokenizer_fingerprint", "fast_top_k",
    "FORMAT_VERSION",
]

MAGIC = "edgespec-ngram"
FORMAT_VERSION = 1
DEFAULT_MAX_N = 4
DEFAULT_PERSISTENT_CAP = 200_000
DEFAULT_STATIC_CAP = 500_000
MAX_CHILDREN = 4  # continuations drafted below one node (the shares' thresholds rarely let more through)
TIERS = ("context", "session", "persistent", "static", "recycled")


class NGramCacheWarning(UserWarning):
    """An n-gram cache file could not be used (corrupt, truncated, foreign, wrong version) or saved."""


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


# ---------------------------------------------------------------------------------------------------- n-gram table
STAMP_BITS = 36  # an entry is one int: count << STAMP_BITS | stamp, so sorting entries ranks by count, then recency
STAMP_LIMIT = 1 << STAMP_BITS  # stamps (token positions, summed over generations) stay below 6.9e10
COUNT_LIMIT = 1 << (63 - STAMP_BITS)  # counts stay below 1.3e8 (a packed entry fits an int64)


def pack_entry(count: int, stamp: int) -> int:
    """One table entry: `count` occurrences, the latest at `stamp` (0 <= stamp < STAMP_LIMIT)."""
    return (count << STAMP_BITS) | stamp


def entry_count(entry: int) -> int:
    """The count of a packed entry."""
    return entry >> STAMP_BITS


def entry_stamp(entry: int) -> int:
    """The stamp (recency) of a packed entry."""
    return entry & (STAMP_LIMIT - 1)


class Continuations:
    """What followed one n-gram: `next[token]` = packed (count, stamp) entry (stamp: latest position, larger = more
    recent), `total` the sum of all counts (evicted continuations stay counted, so shares stay honest) and `best`
    the largest count (a quick reject against the thresholds)."""

    __slots__ = ("total", "best", "next")

    def __init__(self) -> None:
        self.total = 0
        self.best = 0
        self.next: dict[int, int] = {}


class NGramTable:
    """N-gram tuples (lengths 1..max_n) -> `Continuations`; `entries` counts (n-gram, next token) pairs."""

    def __init__(self, max_n: int = DEFAULT_MAX_N):
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.max_n = max_n
        self.grams: dict[tuple[int, ...], Continuations] = {}
        self.entries = 0

    def __len__(self) -> int:
        return self.entries

    def clear(self) -> None:
        """Forget everything."""
        self.grams.clear()
        self.entries = 0

    def add(self, key: tuple[int, ...], token: int, stamp: int, count: int = 1) -> None:
        """Count `count` more occurrences of `token` after `key`, seen at `stamp`."""
        conts = self.grams.get(key)
        if conts is None:
            conts = self.grams[key] = Continuations()
        old = conts.next.get(token)
        if old is None:
            self.entries += 1
            new_count = count
        else:
            new_count = entry_count(old) + count
            stamp = max(stamp, entry_stamp(old))
        conts.next[token] = pack_entry(new_count, stamp)
        conts.total += count
        if new_count > conts.best:
            conts.best = new_count

    def add_tokens(self, tokens, start: int = 0, stamp_offset: int = 0) -> None:
        """Count the n-grams of `tokens` whose next token is at a position >= `start` (stamp: offset + position).

        Adding a sequence in pieces (`start` = what was already added) gives the same table as adding it at once."""
        max_n = self.max_n
        for i in range(max(start, 1), len(tokens)):
            token = tokens[i]
            stamp = stamp_offset + i
            for n in range(1, min(max_n, i) + 1):
                self.add(tuple(tokens[i - n:i]), token, stamp)

    def remove(self, key: tuple[int, ...], token: int) -> None:
        """Drop one (key, token) entry (its count stays in the key's total); a key left empty is dropped."""
        conts = self.grams.get(key)
        if conts is None or token not in conts.next:
            return
        count = entry_count(conts.next.pop(token))
        self.entries -= 1
        if not conts.next:
            del self.grams[key]
        elif count >= conts.best:
            conts.best = entry_count(max(conts.next.values()))

    def to_arrays(self, keys=None) -> dict[str, np.ndarray]:
        """The table (or only its n-grams in `keys` that it holds) as cache-file arrays (see `empty_arrays`)."""
        arrays = empty_arrays(self.max_n)
        if keys is None:
            keys, conts = list(self.grams), list(self.grams.values())
        else:
            keys = [key for key in keys if key in self.grams]
            conts = [self.grams[key] for key in keys]
        if not keys:
            return arrays
        key_lens = np.fromiter(map(len, keys), np.int64, len(keys))
        flat_tokens = np.fromiter(itertools.chain.from_iterable(keys), np.int64, int(key_lens.sum()))
        rows = np.repeat(np.arange(len(keys)), key_lens)
        cols = np.arange(len(flat_tokens)) - np.repeat(np.cumsum(key_lens) - key_lens, key_lens)
        key_tokens = np.full((len(keys), self.max_n), -1, np.int32)
        key_tokens[rows, cols] = flat_tokens
        sizes = np.fromiter((len(c.next) for c in conts), np.int64, len(conts))
        entries = int(sizes.sum())
        next_tokens = np.fromiter(itertools.chain.from_iterable(c.next for c in conts), np.int64, entries)
        packed = np.fromiter(itertools.chain.from_iterable(c.next.values() for c in conts), np.int64, entries)
        arrays.update(key_tokens=key_tokens, key_len=key_lens.astype(np.int8),
                      key_total=np.fromiter((c.total for c in conts), np.int64, len(conts)),
                      entry_key=np.repeat(np.arange(len(keys), dtype=np.int32), sizes),
                      entry_next=next_tokens.astype(np.int32), entry_count=packed >> STAMP_BITS,
                      entry_stamp=packed & (STAMP_LIMIT - 1))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], max_n: int) -> "NGramTable":
        """A table from checked cache-file arrays; keys longer than `max_n` are skipped, repeated entries merged."""
        table = cls(max_n)
        order = np.lexsort((arrays["entry_next"], arrays["entry_key"]))
        entry_key, entry_next = arrays["entry_key"][order], arrays["entry_next"][order]
        if len(entry_key) == 0:
            return table
        counts = arrays["entry_count"][order].astype(np.int64)
        packed = ((counts << STAMP_BITS) | arrays["entry_stamp"][order].astype(np.int64)).tolist()
        counts, next_tokens = counts.tolist(), entry_next.tolist()
        starts = np.flatnonzero(np.r_[True, entry_key[1:] != entry_key[:-1]])
        ends = np.r_[starts[1:], len(entry_key)]
        key_ids = entry_key[starts]
        lengths = arrays["key_len"][key_ids]
        key_tokens = arrays["key_tokens"][key_ids]
        totals = arrays["key_total"][key_ids]
        repeated = bool(np.any((entry_key[1:] == entry_key[:-1]) & (entry_next[1:] == entry_next[:-1])))
        grams = table.grams
        for length in range(1, max_n + 1):  # keys of one length at a time: tuples straight from the columns
            rows = np.flatnonzero(lengths == length)
            keys = zip(*(key_tokens[rows, col].tolist() for col in range(length)))
            for key, start, end, total in zip(keys, starts[rows].tolist(), ends[rows].tolist(), totals[rows].tolist()):
                if repeated or key in grams:  # malformed but usable: merge entry by entry
                    for token, entry in zip(next_tokens[start:end], packed[start:end]):
                        table.add(key, token, entry_stamp(entry), entry_count(entry))
                    grams[key].total += total - sum(counts[start:end])
                    continue
                conts = grams[key] = Continuations()
                conts.total = total
                if end - start == 1:
                    conts.best, conts.next = counts[start], {next_tokens[start]: packed[start]}
                else:
                    conts.best = max(counts[start:end])
                    conts.next = dict(zip(next_tokens[start:end], packed[start:end]))
                table.entries += end - start
        return table


HASH_MASK = (1 << 64) - 1
CONTINUATIONS_CACHED = 4096  # a StaticTable keeps this many looked-up Continuations (then starts afresh)
LOOKUPS_CACHED = 16384  # and this many answers of `row_of`


def key_hash(key: tuple[int, ...], width: int) -> int:
    """`key_hashes` of one n-gram (as a Python int), for a table whose key rows are `width` tokens wide."""
    h = len(key)
    for col in range(width):
        h = (h * 0x100000001B3 + (key[col] + 1 if col < len(key) else 0)) & HASH_MASK
        h ^= h >> 29
    return h


def canonical_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checked cache-file arrays as one row per distinct n-gram (`keys` [K, width], -1 padded, with `lengths`,
    `totals` and `best` counts), its entries sorted by next token in `next`, `counts`, `stamps` from
    `starts[k]` to `starts[k + 1]`; the rows are sorted by their `key_hashes`, held in `hashes`. Repeated n-grams
    and entries are merged as `NGramTable.from_arrays` merges them (counts added, latest stamp, totals added);
    n-grams without an entry are dropped."""
    entry_key = arrays["entry_key"].astype(np.int64)
    width = arrays["key_tokens"].shape[1]
    if len(entry_key) == 0:
        empty = np.zeros(0, np.int64)
        return {"keys": np.zeros((0, width), np.int32), "lengths": empty, "totals": empty, "best": empty,
                "starts": np.zeros(1, np.int64), "next": empty, "counts": empty, "stamps": empty,
                "hashes": np.zeros(0, np.uint64)}
    used = np.flatnonzero(np.bincount(entry_key, minlength=len(arrays["key_len"])))  # rows with an entry
    rows, lengths = arrays["key_tokens"][used], arrays["key_len"][used].astype(np.int64)
    row_hashes = key_hashes(rows, lengths)
    by_hash = np.lexsort(tuple(rows[:, col] for col in reversed(range(width))) + (row_hashes,))
    rows, lengths, row_hashes = rows[by_hash], lengths[by_hash], row_hashes[by_hash]
    new_key = np.r_[True, np.any(rows[1:] != rows[:-1], axis=1)]  # equal rows are neighbours now
    groups = np.flatnonzero(new_key)
    keys, lengths, hashes = rows[groups], lengths[groups], row_hashes[groups]  # sorted by hash already
    totals = np.add.reduceat(arrays["key_total"][used][by_hash].astype(np.int64), groups)
    canonical = np.zeros(len(arrays["key_len"]), np.int64)
    canonical[used[by_hash]] = np.cumsum(new_key) - 1
    next_token = arrays["entry_next"].astype(np.int64)
    pair = canonical[entry_key] * (int(next_token.max()) + 1) + next_token  # < 2**22 keys x 2**24 tokens
    order = np.argsort(pair, kind="stable")
    pair = pair[order]
    first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    counts = np.add.reduceat(arrays["entry_count"][order].astype(np.int64), first)
    stamps = np.maximum.reduceat(arrays["entry_stamp"][order].astype(np.int64), first)
    key_of, next_token = canonical[entry_key][order][first], next_token[order][first]
    starts = np.searchsorted(key_of, np.arange(len(keys) + 1))
    return {"keys": keys, "lengths": lengths, "totals": totals, "best": np.maximum.reduceat(counts, starts[:-1]),
            "starts": starts, "next": next_token, "counts": counts, "stamps": stamps, "hashes": hashes}


class StaticGrams:
    """The `grams` of a StaticTable: `get(key)` as a dict's, answering from the arrays."""

    def __init__(self, table: "StaticTable"):
        self._table = table

    def get(self, key: tuple[int, ...], default=None):
        """The Continuations of n-gram `key`, or `default` when the table does not hold it."""
        row = self._table.row_of(key)
        return default if row is None else self._table.continuations(row)

    def __contains__(self, key) -> bool:
        return self._table.row_of(key) is not None

    def __len__(self) -> int:
        return len(self._table.arrays["lengths"])

    def __iter__(self):
        a = self._table.arrays
        for row, length in enumerate(a["lengths"].tolist()):
            yield tuple(a["keys"][row, :length].tolist())

    def __getitem__(self, key):
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def keys(self):
        """Every n-gram the table holds (a generator: built one by one)."""
        return iter(self)

    def items(self):
        """(n-gram, Continuations) of every n-gram the table holds, one by one."""
        return ((key, self._table.continuations(row)) for row, key in enumerate(self))


class StaticTable:
    """A read-only n-gram table kept as numpy arrays (`canonical_arrays`): what a static cache file is loaded as.

    It answers the lookups drafting makes of an NGramTable (`grams.get(key)` -> Continuations, `max_n`, `entries`)
    with the same results, but holds about the file's bytes in memory and loads in numpy time, where an NGramTable
    holds a tuple, a Continuations and a dict per n-gram (~1 kB each: a 79 MB cache took 3.7 s and 950 MB). A
    lookup costs a hash, a binary search and, on a hit, building the n-gram's Continuations (the latest
    CONTINUATIONS_CACHED are kept)."""

    def __init__(self, arrays: dict[str, np.ndarray], max_n: int):
        self.max_n = max_n
        self.arrays = canonical_arrays(arrays)
        self.width = self.arrays["keys"].shape[1]
        self.entries = int(len(self.arrays["next"]))
        self.grams = StaticGrams(self)
        self._cache: dict[int, Continuations] = {}
        self._rows: dict[tuple[int, ...], int | None] = {}
        self._hashes, self._keys, self._lengths = self.arrays["hashes"], self.arrays["keys"], self.arrays["lengths"]
        self._longest = min(self.max_n, self.width) if len(self._hashes) else 0

    def __len__(self) -> int:
        return self.entries

    def row_of(self, key: tuple[int, ...]) -> int | None:
        """The row of n-gram `key`, or None (the latest LOOKUPS_CACHED answers are kept: drafting asks for the same
        tails again and again)."""
        known = self._rows.get(key, -1)
        if known != -1:
            return known
        row = self._search(key)
        if len(self._rows) >= LOOKUPS_CACHED:
            self._rows.clear()
        self._rows[key] = row
        return row

    def _search(self, key: tuple[int, ...]) -> int | None:
        """`row_of` without the cache: a binary search of the key's hash, then the rows of that hash compared."""
        if not 1 <= len(key) <= self._longest:
            return None
        hashes = self._hashes
        h = key_hash(key, self.width)
        i = int(hashes.searchsorted(np.uint64(h)))  # (a Python int would be compared as a float)
        while i < len(hashes) and int(hashes[i]) == h:
            if self._lengths[i] == len(key) and tuple(self._keys[i, :len(key)].tolist()) == key:
                return i
            i += 1
        return None

    def continuations(self, row: int) -> Continuations:
        """The Continuations of a row (packed entries as NGramTable holds them)."""
        conts = self._cache.get(row)
        if conts is None:
            a = self.arrays
            start, end = int(a["starts"][row]), int(a["starts"][row + 1])
            conts = Continuations()
            conts.total, conts.best = int(a["totals"][row]), int(a["best"][row])
            conts.next = {token: pack_entry(count, stamp) for token, count, stamp in zip(
                a["next"][start:end].tolist(), a["counts"][start:end].tolist(), a["stamps"][start:end].tolist())}
            if len(self._cache) >= CONTINUATIONS_CACHED:
                self._cache.clear()
            self._cache[row] = conts
        return conts


def ngram_keys(tokens, start: int, max_n: int) -> set[tuple[int, ...]]:
    """The n-grams (n = 1..max_n) that `NGramTable.add_tokens(tokens, start)` counts a continuation of."""
    return {tuple(tokens[i - n:i]) for i in range(max(start, 1), len(tokens)) for n in range(1, min(max_n, i) + 1)}


# ---------------------------------------------------------------------------------------------------- cache arrays
def empty_arrays(max_n: int) -> dict[str, np.ndarray]:
    """Cache-file arrays of an empty table.

    Keys: `key_tokens` int32 [K, max_n] (left-aligned, -1 padding), `key_len` int8 [K], `key_total` int64 [K] (all
    continuations ever counted). Entries: `entry_key` int32 [E] (row in the keys), `entry_next` int32 [E],
    `entry_count` int64 [E], `entry_stamp` int64 [E] (recency)."""
    return {"key_tokens": np.zeros((0, max_n), np.int32), "key_len": np.zeros(0, np.int8),
            "key_total": np.zeros(0, np.int64), "entry_key": np.zeros(0, np.int32),
            "entry_next": np.zeros(0, np.int32), "entry_count": np.zeros(0, np.int64),
            "entry_stamp": np.zeros(0, np.int64)}


def fit_max_n(arrays: dict[str, np.ndarray], max_n: int) -> dict[str, np.ndarray]:
    """Checked arrays reshaped to keys of at most `max_n` tokens: longer keys dropped, padding set to -1."""
    lengths = arrays["key_len"].astype(np.int64)
    width = arrays["key_tokens"].shape[1]
    key_tokens = np.full((len(lengths), max_n), -1, np.int32)
    common = min(width, max_n)
    key_tokens[:, :common] = arrays["key_tokens"][:, :common]
    key_tokens[np.arange(max_n)[None, :] >= lengths[:, None]] = -1
    fitted = dict(arrays, key_tokens=key_tokens)
    too_long = np.flatnonzero((lengths > max_n)[arrays["entry_key"]])
    return drop_entries(fitted, too_long)


def concat_arrays(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Both tables' rows in one set of arrays (`second`'s entries point past `first`'s keys)."""
    offset = len(first["key_len"])
    out = {name: np.concatenate([first[name], second[name]]) for name in first}
    out["entry_key"] = np.concatenate([first["entry_key"], second["entry_key"] + offset]).astype(np.int32)
    return out


def key_hashes(key_tokens: np.ndarray, key_len: np.ndarray) -> np.ndarray:
    """A uint64 hash of each key row (padding ignored), to find rows of the same n-gram in two tables."""
    lengths = key_len.astype(np.int64)
    hashes = lengths.astype(np.uint64)
    for col in range(key_tokens.shape[1]):
        value = np.where(col < lengths, key_tokens[:, col].astype(np.int64) + 1, 0).astype(np.uint64)
        hashes = hashes * np.uint64(0x100000001B3) + value
        hashes ^= hashes >> np.uint64(29)
    return hashes


def rows_of_keys(arrays: dict[str, np.ndarray], keys: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask of the key rows of `arrays` holding an n-gram of `keys` (both padded with -1)."""
    if len(keys["key_len"]) == 0 or len(arrays["key_len"]) == 0:
        return np.zeros(len(arrays["key_len"]), bool)
    wanted = key_hashes(keys["key_tokens"], keys["key_len"])
    order = np.argsort(wanted)
    have = key_hashes(arrays["key_tokens"], arrays["key_len"])
    pos = np.minimum(np.searchsorted(wanted[order], have), len(order) - 1)
    match = order[pos]
    return ((wanted[match] == have) & (keys["key_len"][match] == arrays["key_len"])
            & np.all(keys["key_tokens"][match] == arrays["key_tokens"], axis=1))


def drop_keys(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """`arrays` without the key rows where `rows` is True (and their entries)."""
    return drop_entries(arrays, np.flatnonzero(rows[arrays["entry_key"]])) if rows.any() else arrays


def entries_to_evict(counts: np.ndarray, stamps: np.ndarray, cap: int) -> np.ndarray:
    """Indices of the entries to drop so that `cap` remain: lowest count first, then least recent."""
    excess = len(counts) - cap
    if excess <= 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((stamps, counts))  # ascending count, then ascending stamp
    return order[:excess]


def drop_entries(arrays: dict[str, np.ndarray], drop: np.ndarray) -> dict[str, np.ndarray]:
    """`arrays` without the entries at `drop`, and without the keys left with no entry."""
    if len(drop) == 0:
        return arrays
    keep = np.ones(len(arrays["entry_key"]), bool)
    keep[drop] = False
    entry_key = arrays["entry_key"][keep]
    used = np.zeros(len(arrays["key_len"]), bool)
    used[entry_key] = True
    new_index = np.cumsum(used) - 1
    return {"key_tokens": arrays["key_tokens"][used], "key_len": arrays["key_len"][used],
            "key_total": arrays["key_total"][used], "entry_key": new_index[entry_key].astype(np.int32),
            "entry_next": arrays["entry_next"][keep], "entry_count": arrays["entry_count"][keep],
            "entry_stamp": arrays["entry_stamp"][keep]}


def evict_to_cap(table: NGramTable, arrays: dict[str, np.ndarray], cap: int) -> dict[str, np.ndarray]:
    """Drop entries from `table` and its `arrays` until at most `cap` remain; returns the arrays kept."""
    drop = entries_to_evict(arrays["entry_count"], arrays["entry_stamp"], cap)
    if len(drop) == 0:
        return arrays
    key_rows = arrays["key_tokens"][arrays["entry_key"][drop]].tolist()
    key_lens = arrays["key_len"][arrays["entry_key"][drop]].tolist()
    for row, length, token in zip(key_rows, key_lens, arrays["entry_next"][drop].tolist()):
        table.remove(tuple(row[:length]), token)
    return drop_entries(arrays, drop)


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


# ---------------------------------------------------------------------------------------------------- cache files
class CacheFileError(Exception):
    """A cache file cannot be used; the message says why."""


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """Short hex sha256 of a tokenizer.json's bytes: caches built with another tokenizer are refused. The file is
    checked first (a regular file of at most MAX_TOKENIZER_BYTES, else ValueError) and hashed in 1 MiB pieces."""
    from .text import check_tokenizer_file

    check_tokenizer_file(os.fspath(path))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def default_cache_path(cache_root: str | os.PathLike, bundle_name: str, fingerprint: str) -> Path:
    """`cache_root/<bundle_name>-<fingerprint>.npz` (unsafe characters of the name replaced by '_')."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(bundle_name)).strip("._") or "bundle"
    return Path(cache_root) / f"{safe}-{fingerprint or 'nofingerprint'}.npz"


def make_header(kind: str, max_n: int, vocab_size: int, fingerprint: str, clock: int,
                arrays: dict[str, np.ndarray]) -> dict:
    """The JSON header of a cache file."""
    return {"magic": MAGIC, "kind": kind, "version": FORMAT_VERSION, "max_n": int(max_n),
            "vocab_size": int(vocab_size), "fingerprint": fingerprint, "clock": int(clock),
            "keys": int(len(arrays["key_len"])), "entries": int(len(arrays["entry_key"]))}


def write_cache_file(path: str | os.PathLike, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a cache file atomically: a temporary file in the same folder, then os.replace (the old file stays
    intact if anything fails, and no temporary file is left behind; stale ones of killed writers are removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, prefix=f".{path.name}.") as f:  # (also removes stale temporary files of this cache)
        header_bytes = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
        np.savez(f, header=header_bytes, **arrays)


def check_arrays(arrays: dict[str, np.ndarray], max_n: int, vocab_size: int) -> None:
    """Raise CacheFileError unless the arrays are consistent and every token id is inside the vocabulary."""
    expected = empty_arrays(max_n)
    for name, like in expected.items():
        array = arrays.get(name)
        if array is None:
            raise CacheFileError(f"array {name!r} is missing")
        if array.dtype.kind not in "iu" or array.ndim != like.ndim or array.shape[1:] != like.shape[1:]:
            raise CacheFileError(f"array {name!r} has dtype {array.dtype} and shape {array.shape}")
    keys, entries = len(arrays["key_len"]), len(arrays["entry_key"])
    if keys > MAX_CACHE_ENTRIES or entries > MAX_CACHE_ENTRIES:
        raise CacheFileError(f"it holds {keys} n-grams and {entries} entries (at most {MAX_CACHE_ENTRIES} each)")
    if len(arrays["key_tokens"]) != keys or len(arrays["key_total"]) != keys:
        raise CacheFileError("key arrays differ in length")
    if any(len(arrays[name]) != entries for name in ("entry_next", "entry_count", "entry_stamp")):
        raise CacheFileError("entry arrays differ in length")
    if keys:
        lengths = arrays["key_len"].astype(np.int64)
        if lengths.min() < 1 or lengths.max() > max_n:
            raise CacheFileError(f"n-gram lengths outside 1..{max_n}")
        key_tokens = arrays["key_tokens"][np.arange(max_n)[None, :] < lengths[:, None]]
        if key_tokens.min() < 0 or key_tokens.max() >= vocab_size:
            raise CacheFileError(f"an n-gram token is outside the vocabulary of {vocab_size}")
        if arrays["key_total"].min() < 0 or arrays["key_total"].max() >= 1 << 62:
            raise CacheFileError("a key's total is out of range")
    if entries == 0:
        return
    if arrays["entry_next"].min() < 0 or arrays["entry_next"].max() >= vocab_size:
        raise CacheFileError(f"a next token is outside the vocabulary of {vocab_size}")
    if arrays["entry_key"].min() < 0 or arrays["entry_key"].max() >= keys:
        raise CacheFileError("an entry points outside the key table")
    if arrays["entry_count"].min() < 1 or arrays["entry_count"].max() >= COUNT_LIMIT:
        raise CacheFileError(f"an entry has a count outside 1..{COUNT_LIMIT - 1}")
    if arrays["entry_stamp"].min() < 0 or arrays["entry_stamp"].max() >= STAMP_LIMIT:
        raise CacheFileError(f"an entry has a stamp outside 0..{STAMP_LIMIT - 1}")
    summed = np.bincount(arrays["entry_key"].astype(np.int64), weights=arrays["entry_count"], minlength=keys)
    if np.any(arrays["key_total"] < summed):
        raise CacheFileError("a key's total is below the sum of its entries' counts")


# Limits of the cache-file reader (`read_npz`): every array's size is checked against them, and against the bytes
# the archive really holds, before anything is allocated from the sizes an .npy header claims.
MAX_CACHE_BYTES = 256 << 20  # all arrays of one file, uncompressed (a 500,000-entry static cache is ~25 MB)
MAX_COMPRESSION = 100  # a compressed member may inflate at most this much (ours are never compressed)
MAX_CACHE_MEMBERS = 32
MAX_CACHE_ENTRIES = 1 << 22  # n-grams, and (n-gram, next) entries, of one file: 8x the default static cap
MAX_HEADER_BYTES = 1 << 20


def read_npz(path: str | os.PathLike, max_bytes: int = MAX_CACHE_BYTES,
             max_members: int = MAX_CACHE_MEMBERS) -> dict[str, np.ndarray]:
    """Every array of an `.npz` archive, read without pickles and without trusting its size fields: each member
    must be an `.npy` file whose header (read with numpy's header parser, itself capped) declares a plain numeric
    dtype (bool, integer or float: never objects) and a shape whose bytes are exactly what the member holds; the
    arrays together stay under `max_bytes` (compressed members included: a decompression bomb is refused from its
    declared size). Raises CacheFileError saying what is wrong."""
    from numpy.lib import format as npy_format

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CacheFileError(f"it cannot be opened ({exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheFileError("it is not a regular file (a FIFO, device or folder)")
    try:
        with os.fdopen(fd, "rb") as raw, zipfile.ZipFile(raw) as archive:
            infos = archive.infolist()
            if len(infos) > max_members:
                raise CacheFileError(f"it holds {len(infos)} members (at most {max_members})")
            total = 0
            for info in infos:
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise CacheFileError(f"member {info.filename[:80]!r} is not an .npy array")
                if info.file_size > max(1 << 20, MAX_COMPRESSION * info.compress_size):
                    raise CacheFileError(f"member {info.filename[:80]!r} inflates {info.compress_size} bytes to "
                                         f"{info.file_size} (a decompression bomb?)")
                total += info.file_size
                if total > max_bytes:
                    raise CacheFileError(f"its arrays take over {max_bytes} bytes")
            arrays = {}
            for info in infos:
                name = info.filename[:-len(".npy")]
                with archive.open(info) as f:
                    version = npy_format.read_magic(f)
                    if version == (1, 0):
                        shape, _fortran, dtype = npy_format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _fortran, dtype = npy_format.read_array_header_2_0(f)
                    else:
                        raise CacheFileError(f"array {name[:80]!r} has .npy version {version}")
                    if dtype.hasobject or dtype.kind not in "biuf" or dtype.itemsize == 0:
                        raise CacheFileError(f"array {name[:80]!r} has dtype {dtype}: not a plain number type")
                    if any(d < 0 for d in shape):
                        raise CacheFileError(f"array {name[:80]!r} has a negative dimension in shape {shape}")
                    claimed = math.prod(shape) * dtype.itemsize
                    if claimed != info.file_size - f.tell():
                        raise CacheFileError(f"array {name[:80]!r} claims shape {shape} ({claimed} bytes) but "
                                             f"holds {info.file_size - f.tell()} bytes")
                with archive.open(info) as f:
                    arrays[name] = npy_format.read_array(f, allow_pickle=False)
            return arrays
    except CacheFileError:
        raise
    except Exception as exc:  # noqa: BLE001  the body only parses the file: zipfile, zlib, struct and numpy's
        # header parser raise many kinds on corrupt input (BadZipFile, EOFError, ValueError, tokenize.TokenError,
        # SyntaxError, ...): each is this file's fault, never a crash
        raise CacheFileError(f"it is corrupt or truncated ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_cache_header(arrays: dict[str, np.ndarray], what: str) -> dict:
    """The JSON header object of a cache file's arrays (uint8 array `header`); CacheFileError when unusable."""
    header = arrays.get("header")
    if header is None:
        raise CacheFileError(f"it is not an edgespec {what} (no header)")
    if header.ndim != 1 or header.dtype != np.uint8 or header.size > MAX_HEADER_BYTES:
        raise CacheFileError(f"its header is not a JSON text of at most {MAX_HEADER_BYTES} bytes")
    try:
        data = json.loads(header.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, integers too long, deep nesting
        raise CacheFileError(f"its header is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict) or data.get("magic") != MAGIC:
        raise CacheFileError(f"it is not an edgespec {what} (wrong magic)")
    return data


def read_cache_file(path: str | os.PathLike, kinds: tuple[str, ...], vocab_size: int,
                    fingerprint: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a cache file; raises CacheFileError saying what is wrong with it."""
    arrays = read_npz(path)
    header = read_cache_header(arrays, "n-gram cache")
    arrays = {name: array for name, array in arrays.items() if name != "header"}
    if header.get("version") != FORMAT_VERSION:
        raise CacheFileError(f"it has format version {short_repr(header.get('version'))}, "
                             f"this runtime reads version {FORMAT_VERSION}")
    if header.get("kind") not in kinds:
        raise CacheFileError(f"it is a {short_repr(header.get('kind'))} cache, expected {' or '.join(kinds)}")
    if header.get("vocab_size") != vocab_size:
        raise CacheFileError(f"it was built for a vocabulary of {short_repr(header.get('vocab_size'))} tokens, "
                             f"this model has {vocab_size}")
    if header.get("fingerprint") != fingerprint:
        raise CacheFileError(f"it was built with another tokenizer (fingerprint "
                             f"{short_repr(header.get('fingerprint'))}, expected {fingerprint!r})")
    file_max_n = header.get("max_n")
    if type(file_max_n) is not int or not 1 <= file_max_n <= 64:  # (not a bool either)
        raise CacheFileError(f"its max_n {short_repr(file_max_n)} is invalid")
    clock = header.get("clock", 0)
    if type(clock) is not int or not 0 <= clock < STAMP_LIMIT:
        raise CacheFileError(f"its clock {short_repr(clock)} is invalid")
    check_arrays(arrays, file_max_n, vocab_size)
    return header, arrays


def check_cache_path(path, what: str = "n-gram cache") -> bool:
    """True when `path` is a regular file, False when nothing is there; ValueError naming it when it is something
    else (a FIFO, which would block a reader forever, a device or a folder) or cannot be looked up."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} path {path} cannot be examined: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} path {path} is not a regular file (a FIFO, device or folder): refused")
    return True


def load_cache(path, kinds: tuple[str, ...], max_n: int, vocab_size: int,
               fingerprint: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(header, arrays fitted to `max_n`) of a cache file; None when the file does not exist. A file that cannot be
    used gives an NGramCacheWarning naming the reason, and ({}, empty arrays). A path that exists but is not a
    regular file raises ValueError (`check_cache_path`)."""
    if not check_cache_path(path):
        return None
    try:
        header, arrays = read_cache_file(path, kinds, vocab_size, fingerprint)
    except CacheFileError as exc:
        warnings.warn(f"n-gram cache {path} not used: {exc}; starting with an empty cache", NGramCacheWarning,
                      stacklevel=3)
        return {}, empty_arrays(max_n)
    return header, fit_max_n(arrays, max_n)


# ---------------------------------------------------------------------------------------------------- static caches
@dataclass
class StaticBuildReport:
    """What `build_static_cache` wrote."""

    path: Path
    files: int
    tokens: int
    keys: int
    entries: int
    evicted: int


def count_ngrams(sequences: list[np.ndarray], max_n: int) -> dict[str, np.ndarray]:
    """Cache-file arrays counting the n-grams (n = 1..max_n) of each sequence (none spans two sequences)."""
    parts = []
    key_offset = 0
    for n in range(1, max_n + 1):
        windows = [np.lib.stride_tricks.sliding_window_view(seq, n + 1) for seq in sequences if len(seq) > n]
        if not windows:
            continue
        rows, counts = np.unique(np.concatenate(windows), axis=0, return_counts=True)  # sorted by key, then next
        keys = rows[:, :n]
        new_key = np.ones(len(rows), bool)
        new_key[1:] = np.any(keys[1:] != keys[:-1], axis=1)
        starts = np.flatnonzero(new_key)
        key_tokens = np.full((len(starts), max_n), -1, np.int32)
        key_tokens[:, :n] = keys[starts]
        parts.append({"key_tokens": key_tokens, "key_len": np.full(len(starts), n, np.int8),
                      "key_total": np.add.reduceat(counts, starts).astype(np.int64),
                      "entry_key": (np.cumsum(new_key) - 1 + key_offset).astype(np.int32),
                      "entry_next": rows[:, n].astype(np.int32), "entry_count": counts.astype(np.int64),
                      "entry_stamp": np.zeros(len(rows), np.int64)})
        key_offset += len(starts)
    if not parts:
        return empty_arrays(max_n)
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def limit_counts(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` with counts and totals divided down (shares kept) when a count reaches COUNT_LIMIT."""
    if len(arrays["entry_count"]) == 0 or arrays["entry_count"].max() < COUNT_LIMIT:
        return arrays
    factor = int(arrays["entry_count"].max()) // (COUNT_LIMIT - 1) + 1
    counts = np.maximum(arrays["entry_count"] // factor, 1)
    summed = np.bincount(arrays["entry_key"], weights=counts, minlength=len(arrays["key_len"])).astype(np.int64)
    return dict(arrays, entry_count=counts, key_total=np.maximum(arrays["key_total"] // factor, summed))


def read_text_files(text_files) -> list[tuple[Path, str]]:
    """(path, text) of each file; a missing, non-file or non-UTF-8 input raises an error naming it."""
    paths = [Path(p) for p in text_files]
    if not paths:
        raise ValueError("no text files given")
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"text file not found: {path}")
        if not path.is_file():
            raise ValueError(f"not a file: {path}")
    texts = []
    for path in paths:
        try:
            texts.append((path, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text ({exc})") from None
    return texts


def build_static_cache(text_files, tokenizer, out_path, max_n: int = DEFAULT_MAX_N, fingerprint: str = "",
                       vocab_size: int | None = None, max_entries: int = DEFAULT_STATIC_CAP) -> StaticBuildReport:
    """Count the n-grams of text files tokenized with `tokenizer` (anything with `encode(str) -> list[int]`) into a
    static cache file at `out_path` (kind "static"), keeping the `max_entries` most frequent (n-gram, next) pairs.

    `vocab_size` defaults to `tokenizer.vocab_size`; use the target model's vocabulary size and
    `tokenizer_fingerprint(tokenizer.json)` so that the engine's drafter accepts the file."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    if not 0 <= max_entries <= MAX_CACHE_ENTRIES:
        raise ValueError(f"max_entries must be in 0..{MAX_CACHE_ENTRIES} (what a cache file may hold), "
                         f"got {max_entries}")
    if vocab_size is None:
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if not isinstance(vocab_size, int):
            raise ValueError("vocab_size is required (the tokenizer has no vocab_size)")
    sequences = []
    for path, text in read_text_files(text_files):
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{path}: the tokenizer produced ids outside the vocabulary of {vocab_size}")
        sequences.append(ids)
    arrays = limit_counts(count_ngrams(sequences, max_n))
    drop = entries_to_evict(arrays["entry_count"], arrays["entry_stamp"], max_entries)
    arrays = drop_entries(arrays, drop)
    write_cache_file(out_path, make_header("static", max_n, vocab_size, fingerprint, 0, arrays), arrays)
    return StaticBuildReport(Path(out_path), len(sequences), int(sum(len(s) for s in sequences)),
                             len(arrays["key_len"]), len(arrays["entry_key"]), len(drop))


def cmd_ngram_build(args) -> int:
    """`edgespec ngram build FILES... -o CACHE --bundle BUNDLE [--max-n N] [--max-entries M]`."""
    from .runtimes.manifest import load_manifest
    from .text import Tokenizer

    for path in args.files:  # before loading anything: a typo fails at once
        if not os.path.exists(path):
            raise FileNotFoundError(f"text file not found: {path}")
    target = load_manifest(args.bundle).target_model
    tokenizer = Tokenizer(target.tokenizer_path)
    report = build_static_cache(args.files, tokenizer, args.output, max_n=args.max_n,
                                fingerprint=tokenizer_fingerprint(target.tokenizer_path),
                                vocab_size=target.vocab_size, max_entries=args.max_entries)
    print(f"static n-gram cache {report.path}: {report.files} files, {report.tokens} tokens, "
          f"{report.keys} n-grams, {report.entries} continuations kept, {report.evicted} evicted (max_n {args.max_n})")
    return 0


MAX_BUILD_FILES = 10_000  # text files of one `edgespec ngram build`
MAX_FILE_N = 64  # the largest max_n a cache file may hold (read_cache_header)


def register_cli(subparsers) -> None:
    """Add the `ngram` command (subcommand `build`) to an argparse subparsers object."""
    from .cliargs import at_most, bounded_int, new_or_regular_file

    parser = subparsers.add_parser("ngram", help="n-gram draft caches")
    commands = parser.add_subparsers(dest="ngram_command", required=True)
    build = commands.add_parser("build", help="build a static n-gram cache from text files with a bundle's tokenizer")
    build.add_argument("files", nargs="+", type=new_or_regular_file, action=at_most(MAX_BUILD_FILES),
                       help=f"UTF-8 text files (regular files, at most {MAX_BUILD_FILES})")
    build.add_argument("-o", "--output", type=new_or_regular_file, required=True, help="cache file to write (.npz)")
    build.add_argument("--bundle", "-b", required=True, help="bundle whose target tokenizer is used")
    build.add_argument("--max-n", type=bounded_int(1, MAX_FILE_N), default=DEFAULT_MAX_N,
                       help=f"longest n-gram, 1 to {MAX_FILE_N} (default %(default)s)")
    build.add_argument("--max-entries", type=bounded_int(0, MAX_CACHE_ENTRIES), default=DEFAULT_STATIC_CAP,
                       help=f"keep the most frequent (n-gram, next) pairs, 0 to {MAX_CACHE_ENTRIES} "
                            f"(default %(default)s)")
    build.set_defaults(func=cmd_ngram_build)


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
