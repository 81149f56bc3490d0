"""Static n-gram caches: count the n-grams of a text corpus into a cache file (`edgespec ngram build`).

The file (kind "static", the format of `edgespec.drafters.cachefile`) is read by the n-gram drafter's static tier,
read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cachefile import MAX_CACHE_ENTRIES, make_header, tokenizer_fingerprint, write_cache_file
from .ngram_table import COUNT_LIMIT, DEFAULT_MAX_N, drop_entries, empty_arrays, entries_to_evict

DEFAULT_STATIC_CAP = 500_000


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
    from ..runtimes.manifest import load_manifest
    from ..text import Tokenizer

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
    from ..cliargs import at_most, bounded_int, new_or_regular_file

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
