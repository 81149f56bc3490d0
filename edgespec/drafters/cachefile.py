"""The one versioned cache-file format of the drafters' caches (n-gram tiers and cross-vocabulary mappings).

Cache files are `.npz` archives (loaded with allow_pickle=False) with a JSON header (magic, kind, version, and per
kind: max_n, vocab_size, tokenizer fingerprint, clock for the n-gram kinds "persistent" and "static"; see
`make_header`) and numeric arrays. Writes go through the runtime's one atomic writer (`runtimes.files.atomic_writer`:
temporary file in the same folder + os.replace; temporary files over a minute old, left by a writer killed
mid-write, are removed by the next write). A corrupt, truncated, foreign or wrong-version file gives a
`NGramCacheWarning` and an empty cache, never a crash and never a token outside the vocabulary; a path that exists but
is not a regular file (a FIFO would block the reader forever) raises ValueError.

Loading is bounded: a file holds at most MAX_CACHE_ENTRIES n-grams and entries and MAX_CACHE_BYTES of arrays (checked
before anything is read).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..runtimes.checks import short_repr
from ..runtimes.files import atomic_writer, check_regular_file, open_regular
from .ngram_table import COUNT_LIMIT, STAMP_LIMIT, empty_arrays, fit_max_n

MAGIC = "edgespec-ngram"
FORMAT_VERSION = 1


class NGramCacheWarning(UserWarning):
    """An n-gram cache file could not be used (corrupt, truncated, foreign, wrong version) or saved."""


class CacheFileError(Exception):
    """A cache file cannot be used; the message says why."""


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """Short hex sha256 of a tokenizer.json's bytes: caches built with another tokenizer are refused. The file is
    checked first (a regular file of at most MAX_TOKENIZER_BYTES, else ValueError) and hashed in 1 MiB pieces."""
    from ..text import check_tokenizer_file

    check_tokenizer_file(os.fspath(path))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]



def default_cache_root() -> Path:
    """The folder of the drafters' persistent caches: $EDGESPEC_NGRAM_DIR, default ~/.cache/edgespec/ngram."""
    return Path(os.environ.get("EDGESPEC_NGRAM_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "edgespec",
                                                                     "ngram"))


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
        fd = open_regular(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise CacheFileError("it is not a regular file (a FIFO, device or folder)") from None
        raise CacheFileError(f"it cannot be opened ({exc})") from None
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
    return check_regular_file(path, what)


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


