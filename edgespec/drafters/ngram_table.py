"""The n-gram table and its array form: what the n-gram drafter's tiers and cache files hold.

A table stores `n-gram tuple -> Continuations` (`next[token]`: count and stamp, the latest position, packed in one
int); continuations are ranked by count, then recency. `NGramTable` is the dict form a tier grows as it learns;
`StaticTable` keeps a static cache as numpy arrays (about the file's size in memory, loaded in numpy time). The array
form (`to_arrays` / `from_arrays`: one row per n-gram key and per (key, next token) entry) is what cache files store
(`edgespec.drafters.cachefile`); the helpers below merge, cut and evict in that form.
"""

from __future__ import annotations

import itertools

import numpy as np

DEFAULT_MAX_N = 4

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

