"""Fuzz targets: one per loader of untrusted bytes (docs/hardening.md).

Each target has valid seed files (written by the real writers: the gguf package's GGUFWriter, `write_cache_file`,
`CrossVocabCache.save`, `DeviceProfile.to_dict`, `SessionLog`, the tokenizers trainer), mutators (byte flips,
truncation, insertion, deletion, duplication, splicing of seeds, interesting integers written over any offset, and
structure-aware ones: JSON values swapped for other types, huge or negative numbers, NaN, deep nesting, long strings
and hostile paths; GGUF metadata, counts, lengths and tensor infos; npz arrays and their headers), and a `load`
function that hands the bytes (written to a file) to the loader the way the runtime or exporter does, then checks what
was accepted (every path inside the bundle, every token id inside the vocabulary, ...).

One target is no file loader: `stop` feeds stop strings and text pieces (both from the input bytes) to
edgespec.text.StopMatcher and compares it with a naive reference at every push.
`request` feeds HTTP request bodies to the server's parser (edgespec.server.parse_json_body, parse_request).

`run_one(target, data, workdir)` classifies one input:

* "accepted": the loader returned and the result passed the target's checks;
* "error:<Type>": the loader refused it with one of the target's clean errors (our own exception classes, or a
  ValueError that names the file) or, for the caches and the history, the documented warning;
* "crash:<Type>": anything else (IndexError, KeyError, TypeError, MemoryError, OverflowError, a numpy error, a
  clean error that does not name the file, a check of the accepted result that failed): a bug in the loader.

Mutators draw from an `Rng`: `RandomRng` (random.Random; `python -m tests.fuzz_run`) or `HypothesisRng`
(Hypothesis `st.data()`; tests/test_fuzz.py). Pure functions of their input otherwise; nothing here needs torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
import shutil
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

TARGET_NAMES = ("gguf", "manifest", "tokenizer", "ngram", "crossvocab", "profile", "history", "stop", "request")

VOCAB = 96  # vocabulary of the cache and history targets
FINGERPRINT = "0123456789abcdef"
PAIR_FINGERPRINT = f"{FINGERPRINT}-fedcba9876543210"
DRAFTER_VOCAB, TARGET_VOCAB = 80, VOCAB


# ------------------------------------------------------------------------------------------------------ randomness
class RandomRng:
    """Draws from a random.Random."""

    def __init__(self, seed):
        self.r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def bytes(self, n: int) -> bytes:
        return self.r.randbytes(n)


class HypothesisRng:
    """Draws from Hypothesis' `st.data()` (so failures shrink and replay)."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def bytes(self, n: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=n, max_size=n))


def choice(rng, seq):
    return seq[rng.int(0, len(seq) - 1)]


# ------------------------------------------------------------------------------------------------------ byte mutators
INTERESTING = (0, 1, 2, 3, 4, 7, 8, 9, 12, 16, 31, 32, 33, 63, 64, 100, 127, 128, 255, 256, 1000, 1024, 4096, 32767,
               32768, 65535, 65536, 1 << 20, 1 << 24, 1 << 31, (1 << 31) - 1, 1 << 32, (1 << 32) - 1, 10 ** 12,
               1 << 40, 1 << 62, 1 << 63, (1 << 63) - 1, (1 << 64) - 1, (1 << 64) - 2)


def flip_bits(data: bytes, rng) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.int(1, 8)):
        out[rng.int(0, len(out) - 1)] ^= 1 << rng.int(0, 7)
    return bytes(out)


def set_bytes(data: bytes, rng) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.int(1, 4)):
        out[rng.int(0, len(out) - 1)] = choice(rng, (0, 1, 0x7F, 0x80, 0xFF, rng.int(0, 255)))
    return bytes(out)


def truncate(data: bytes, rng) -> bytes:
    return data[:rng.int(0, max(0, len(data) - 1))]


def insert(data: bytes, rng) -> bytes:
    at = rng.int(0, len(data))
    blob = rng.bytes(rng.int(1, 32)) if rng.int(0, 1) else bytes([rng.int(0, 255)]) * rng.int(1, 4096)
    return data[:at] + blob + data[at:]


def delete(data: bytes, rng) -> bytes:
    if not data:
        return data
    a = rng.int(0, len(data) - 1)
    return data[:a] + data[a + rng.int(1, min(256, len(data) - a)):]


def duplicate(data: bytes, rng) -> bytes:
    if not data:
        return data
    a = rng.int(0, len(data) - 1)
    b = a + rng.int(1, min(512, len(data) - a))
    at = rng.int(0, len(data))
    return data[:at] + data[a:b] * rng.int(1, 8) + data[at:]


def interesting_int(data: bytes, rng) -> bytes:
    if not data:
        return data
    width = choice(rng, (1, 2, 4, 8))
    value = choice(rng, INTERESTING) & ((1 << (8 * width)) - 1)
    at = rng.int(0, max(0, len(data) - width))
    return data[:at] + value.to_bytes(width, "little")[:len(data) - at] + data[at + width:]


BYTE_MUTATORS = (flip_bits, set_bytes, truncate, insert, delete, duplicate, interesting_int)


def splice(data: bytes, other: bytes, rng) -> bytes:
    """A prefix of one file and a suffix of another."""
    return data[:rng.int(0, len(data))] + other[rng.int(0, len(other)):]


# ------------------------------------------------------------------------------------------------------ JSON mutators
HOSTILE_STRINGS = ("", "x", "A" * 100_000, "../" * 40 + "etc/passwd", "/etc/passwd", "..", ".", "\\windows\\x",
                   "C:/x", "a\u0000b", "\ud800", "\u202e\u0000\uffff", "t/../../outside/model.onnx",
                   "../outside/model.onnx", "evil/model.onnx", "loop/x", "t/./model.onnx", "t//model.onnx",
                   "t/model.onnx/", "~/x", "%s%n{0}", "NaN", "-1", "1e999")
_RAW = "\u0000RAW{}\u0000"  # a placeholder replaced by raw JSON text after serialising


def _nested(depth: int):
    return "[" * depth + "]" * depth


RAW_VALUES = (_nested(200), _nested(5000), _nested(200_000), "9" * 5000, "-" + "9" * 4400, "1" + "0" * 400,
              "1e99999", "-0", '{"a":' * 3000 + "1" + "}" * 3000, "NaN", "-Infinity")


def _replacement(rng, old):
    kind = rng.int(0, 7)
    if kind == 0:  # type swapped
        return choice(rng, (0, -1, 1, 1.5, True, False, None, "", "1", [], {}, [old], {"k": old}, str(old)[:64]))
    if kind == 1:  # huge numbers
        return choice(rng, (10 ** 30, -(10 ** 30), 1 << 63, 1 << 64, (1 << 64) - 1, 1e308, -1e308, 10 ** 400,
                            float("nan"), float("inf"), float("-inf"), 5e-324, 2 ** 31, 2 ** 53 + 1))
    if kind == 2:  # negative or zero sizes
        return choice(rng, (-1, -2, 0, -(1 << 31), -(1 << 63), -0.0, -1.0))
    if kind == 3:  # strings and paths
        return choice(rng, HOSTILE_STRINGS)
    if kind == 4:  # raw text: deep nesting, integers too long to read, ...
        return _RAW.format(rng.int(0, len(RAW_VALUES) - 1))
    if kind == 5 and isinstance(old, (int, float)) and not isinstance(old, bool) and math.isfinite(old):  # nudged
        return choice(rng, (old + 1, old - 1, old * 2, -old, old * 1000, int(old) // 2))
    if kind == 6 and isinstance(old, list):  # list edited
        out = list(old)
        op = rng.int(0, 3)
        if op == 0 and out:
            del out[rng.int(0, len(out) - 1)]
        elif op == 1 and out:
            out.insert(rng.int(0, len(out)), out[rng.int(0, len(out) - 1)])
        elif op == 2:
            out = out[::-1]
        else:
            out = out * rng.int(2, 50)
        return out
    if kind == 7 and isinstance(old, dict):  # object edited
        out = dict(old)
        if out and rng.int(0, 1):
            del out[choice(rng, list(out))]
        else:
            out[choice(rng, ("format", "models", "target", "extra", "", "magic", "v"))] = _replacement(rng, None)
        return out
    return choice(rng, (None, [], {}, "", 0))


def _nodes(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:64]):
            yield from _nodes(v, path + (i,))


def _set(value, path, new):
    if not path:
        return new
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return value


def mutate_json_value(value, rng, ops: int | None = None):
    """`value` (a parsed JSON document, copied) with 1-3 nodes replaced; may contain raw placeholders."""
    value = json.loads(json.dumps(value))
    for _ in range(ops or rng.int(1, 3)):
        nodes = list(_nodes(value))
        path = choice(rng, nodes)
        old = value
        for key in path:
            old = old[key]
        if path and rng.int(0, 5) == 0 and isinstance(_get_parent(value, path), dict):
            del _get_parent(value, path)[path[-1]]  # a key removed
        else:
            value = _set(value, path, _replacement(rng, old))
    return value


def _get_parent(value, path):
    for key in path[:-1]:
        value = value[key]
    return value


def dump_json(value, rng=None) -> bytes:
    """JSON text of a mutated value, raw placeholders replaced (NaN/Infinity written as Python's json does)."""
    text = json.dumps(value, indent=None if rng is None or rng.int(0, 1) else 1)
    for i, raw in enumerate(RAW_VALUES):
        text = text.replace(json.dumps(_RAW.format(i)), raw)
    return text.encode("utf-8", errors="surrogatepass")


def json_mutation(data: bytes, rng) -> bytes:
    try:
        value = json.loads(data)
    except ValueError:
        return flip_bits(data, rng)
    return dump_json(mutate_json_value(value, rng), rng)


# ------------------------------------------------------------------------------------------------------ GGUF model
# A minimal GGUF encoder/decoder (little-endian, v3) for structure-aware mutation of the seeds GGUFWriter wrote.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_decode(data: bytes) -> dict:
    """{"version", "kvs": [[key, vtype, value]], "tensors": [[name, dims, ttype, offset]], "alignment", "data"} of a
    valid GGUF file (values: numbers, bytes for strings, [item type, [values]] for arrays)."""
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, pos)
    pos += 20

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        pos += n
        return data[pos - n:pos]

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            (item, n) = struct.unpack_from("<IQ", data, pos)
            pos += 12
            return [item, [value(item) for _ in range(n)]]
        (v,) = struct.unpack_from(_SCALAR[vtype], data, pos)
        pos += struct.calcsize(_SCALAR[vtype])
        return v

    kvs = []
    for _ in range(n_kv):
        key = string().decode()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        kvs.append([key, vtype, value(vtype)])
    tensors = []
    for _ in range(n_tensors):
        name = string().decode()
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4
        dims = list(struct.unpack_from(f"<{nd}Q", data, pos))
        pos += 8 * nd
        ttype, offset = struct.unpack_from("<IQ", data, pos)
        pos += 12
        tensors.append([name, dims, ttype, offset])
    alignment = next((v for k, t, v in kvs if k == "general.alignment"), 32)
    start = -(-pos // alignment) * alignment
    return {"version": version, "kvs": kvs, "tensors": tensors, "alignment": alignment, "data": data[start:],
            "counts": None, "lengths": {}}


def gguf_encode(model: dict) -> bytes:
    """Bytes of a model from `gguf_decode` (with its forged counts / array lengths, when set)."""
    out = bytearray()
    counts = model.get("counts") or (len(model["tensors"]), len(model["kvs"]))
    out += b"GGUF" + struct.pack("<IQQ", model["version"], counts[0] & (2 ** 64 - 1), counts[1] & (2 ** 64 - 1))
    forged = model.get("lengths") or {}

    def string(b: bytes):
        out.extend(struct.pack("<Q", len(b)) + b)

    def value(vtype, v, key):
        if vtype == 8:
            string(v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass"))
        elif vtype == 9:
            item, items = v
            out.extend(struct.pack("<IQ", item & 0xFFFFFFFF, forged.get(key, len(items)) & (2 ** 64 - 1)))
            for x in items:
                value(item, x, None)
        elif vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            try:
                out.extend(struct.pack(fmt, v))
            except (struct.error, TypeError):
                out.extend(b"\xff" * struct.calcsize(fmt))
        else:  # an unknown type: a few bytes of something
            out.extend(b"\x01\x00\x00\x00")

    for key, vtype, v in model["kvs"]:
        string(key.encode("utf-8", "surrogatepass"))
        out.extend(struct.pack("<I", vtype & 0xFFFFFFFF))
        value(vtype, v, key)
    for name, dims, ttype, offset in model["tensors"]:
        string(name.encode("utf-8", "surrogatepass"))
        out.extend(struct.pack("<I", len(dims)))
        for d in dims:
            out.extend(struct.pack("<Q", d & (2 ** 64 - 1)))
        out.extend(struct.pack("<IQ", ttype & 0xFFFFFFFF, offset & (2 ** 64 - 1)))
    alignment = model["alignment"] if isinstance(model["alignment"], int) and model["alignment"] > 0 else 32
    out.extend(b"\x00" * ((-len(out)) % min(alignment, 1 << 16)))
    return bytes(out + model["data"])


_GGUF_VALUES = (0, 1, 2, -1, 3, 7, 64, 1 << 20, (1 << 32) - 1, (1 << 63) - 1, 1.5, float("nan"), float("inf"), -0.0,
                1e-30)


def gguf_structured(data: bytes, rng) -> bytes:
    """A GGUF seed with its metadata, counts, array lengths or tensor infos changed, re-encoded."""
    model = gguf_decode(data)
    for _ in range(rng.int(1, 3)):
        op = rng.int(0, 9)
        kvs, tensors = model["kvs"], model["tensors"]
        if op == 0 and kvs:  # a value replaced by one of another type
            kv = choice(rng, kvs)
            vtype = choice(rng, (0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 255))
            kv[1] = vtype
            kv[2] = (b"x" * rng.int(0, 3) if vtype == 8 else [choice(rng, (4, 8, 9, 0, 12, 99)), [1, 2]]
                     if vtype == 9 else choice(rng, _GGUF_VALUES))
        elif op == 1 and kvs:  # a number changed, type kept
            kv = choice(rng, kvs)
            if kv[1] in _SCALAR:
                kv[2] = choice(rng, _GGUF_VALUES)
        elif op == 2 and kvs:  # a key removed, renamed or doubled
            i = rng.int(0, len(kvs) - 1)
            action = rng.int(0, 2)
            if action == 0:
                del kvs[i]
            elif action == 1:
                kvs[i][0] = choice(rng, [k for k, _, _ in kvs] + ["general.alignment", "\udcff", ""])
            else:
                kvs.append(list(kvs[i]))
        elif op == 3:  # general.alignment
            kvs.append(["general.alignment", choice(rng, (4, 4, 5, 10)), choice(rng, (0, 1, 3, 8, 64, 1 << 31, 1 << 40))])
        elif op == 4:  # forged header counts
            counts = [len(tensors), len(kvs)]
            counts[rng.int(0, 1)] = choice(rng, INTERESTING)
            model["counts"] = counts
        elif op == 5:  # a forged array length
            arrays = [k for k, t, _ in kvs if t == 9]
            if arrays:
                model["lengths"][choice(rng, arrays)] = choice(rng, INTERESTING)
        elif op == 6 and tensors:  # tensor dims
            t = choice(rng, tensors)
            action = rng.int(0, 3)
            if action == 0:
                t[1] = [choice(rng, INTERESTING) for _ in range(rng.int(0, 6))]
            elif action == 1 and t[1]:
                t[1][rng.int(0, len(t[1]) - 1)] = choice(rng, INTERESTING)
            elif action == 2:
                t[1] = t[1][::-1]
            else:
                t[1] = t[1] + [choice(rng, (1, 2, 3))]
        elif op == 7 and tensors:  # tensor type
            choice(rng, tensors)[2] = choice(rng, tuple(range(42)) + (200, 1 << 31))  # every GGML type and two bogus
        elif op == 8 and tensors:  # tensor offset or name
            t = choice(rng, tensors)
            if rng.int(0, 1):
                t[3] = choice(rng, INTERESTING + (t[3] + 1, t[3] + 32))
            else:
                t[0] = choice(rng, [u[0] for u in tensors] + ["", "\udcff", "x" * 70_000])
        elif op == 9:  # the data section cut or padded
            model["data"] = model["data"][:rng.int(0, len(model["data"]))] if rng.int(0, 1) else \
                model["data"] + b"\x00" * rng.int(1, 64)
    return gguf_encode(model)


# ------------------------------------------------------------------------------------------------------ npz model
def npz_decode(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an npz (a seed, or an earlier mutation's output: forged members may claim huge shapes, so
    only archives whose members hold what they claim are decoded)."""
    from edgespec.drafters.cachefile import read_npz

    with tempfile.NamedTemporaryFile(suffix=".npz") as f:
        f.write(data)
        f.flush()
        read_npz(f.name)  # raises CacheFileError (an Exception) on anything forged
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def npz_encode(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _forged_member(name: str, descr: str, shape_text: str, payload: bytes) -> tuple[str, bytes]:
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape_text)
    header += " " * ((-(len(header) + 11)) % 64) + "\n"
    return name + ".npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + payload


def _zip(members: list[tuple[str, bytes]], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, payload in members:
            zf.writestr(name, payload)
    return buf.getvalue()


def npz_structured(data: bytes, rng) -> bytes:
    """An npz seed with its header JSON, an array's dtype, shape or values changed, an array dropped or added,
    or a member forged (a shape claiming 10**12 elements, an object dtype, a compressed bomb), re-encoded."""
    arrays = npz_decode(data)
    names = sorted(arrays)
    op = rng.int(0, 9)
    if op == 0 and "header" in arrays:  # header JSON
        header = json.loads(arrays["header"].tobytes())
        arrays["header"] = np.frombuffer(dump_json(mutate_json_value(header, rng)), np.uint8)
    elif op == 1:  # dtype
        name = choice(rng, names)
        dtype = choice(rng, (np.float64, np.float16, np.bool_, np.uint64, np.int8, np.uint8, np.int64, np.complex64,
                             "U4", "S3", "datetime64[s]"))
        try:
            arrays[name] = arrays[name].astype(dtype)
        except (TypeError, ValueError):
            arrays[name] = np.zeros(arrays[name].shape, np.float32)
    elif op == 2:  # shape
        name = choice(rng, names)
        a = arrays[name]
        action = rng.int(0, 3)
        arrays[name] = (a.reshape(-1) if action == 0 else a[None] if action == 1 else a.T if action == 2
                        else a[:rng.int(0, max(0, len(a) - 1))] if a.ndim else a.reshape(1))
    elif op == 3:  # values
        name = choice(rng, names)
        a = np.array(arrays[name])
        if a.size and a.dtype.kind in "iu":
            flat = a.reshape(-1)
            for _ in range(rng.int(1, 3)):
                value = choice(rng, (-1, -2, 0, VOCAB - 1, VOCAB, DRAFTER_VOCAB, 1 << 31, (1 << 31) - 1, 1 << 36,
                                     1 << 62, -(1 << 63), np.iinfo(a.dtype).max, np.iinfo(a.dtype).min))
                flat[rng.int(0, len(flat) - 1)] = np.array(value).astype(a.dtype)
            arrays[name] = a
    elif op == 4:  # an array dropped
        del arrays[choice(rng, names)]
    elif op == 5:  # an array added or duplicated under another name
        arrays[choice(rng, ("extra", "header", "entry_key", "count", "z" * 40))] = arrays[choice(rng, names)]
    elif op == 6:  # an array made much longer
        name = choice(rng, names)
        a = arrays[name]
        if a.ndim:
            arrays[name] = np.concatenate([a] * rng.int(2, 64)) if len(a) else np.zeros((rng.int(1, 9),) + a.shape[1:],
                                                                                          a.dtype)
    elif op == 7:  # a member forged with a size claim the bytes do not back
        members = [(n + ".npy", _npy_bytes(a)) for n, a in arrays.items()]
        forged = _forged_member(choice(rng, names), choice(rng, ("<i8", "<i4", "|u1", "|O", "<f8", "|V8")),
                                choice(rng, ("(1000000000000,)", "(4294967296, 4)", "(-1,)", "(3, -5)", "(0, 1000000000000)",
                                             "(2305843009213693952,)", "()", "(1, 2, 3, 4, 5)")),
                                b"\x00" * rng.int(0, 64))
        members = [m for m in members if m[0] != forged[0]] + [forged]
        return _zip(members)
    elif op == 8:  # an object (pickle) array, or a member that is not .npy
        name = choice(rng, names)
        members = [(n + ".npy", _npy_bytes(a)) for n, a in arrays.items() if n != name]
        if rng.int(0, 1):
            buf = io.BytesIO()
            np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
            members.append((name + ".npy", buf.getvalue()))
        else:
            members.append((name, b"not an array"))
        return _zip(members)
    else:  # a compressed member inflating to far more than it holds
        return _bomb_archive()
    return npz_encode(arrays)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


_BOMB = []


def _bomb_archive() -> bytes:
    """An npz whose one member is an .npy of 16 MiB of zeros, deflated to ~16 kB (built once)."""
    if not _BOMB:
        _BOMB.append(_zip([_forged_member("header", "|u1", "(16777216,)", bytes(1 << 24))], compress=True))
    return _BOMB[0]


# ------------------------------------------------------------------------------------------------------ JSONL
def jsonl_structured(data: bytes, rng) -> bytes:
    """A history file with one record's JSON mutated, a garbage line inserted, or a line end removed."""
    lines = data.split(b"\n")
    i = rng.int(0, max(0, len(lines) - 2))
    op = rng.int(0, 3)
    if op <= 1 and lines[i].strip():
        lines[i] = json_mutation(lines[i], rng).replace(b"\n", b" ")
    elif op == 2:
        lines.insert(i, choice(rng, (b"{", b"[]", b"null", b"\xff\xfe", b'{"v": 1}', _nested(100_000).encode(),
                                     b"9" * 5000, b" " * 10, b"\x00" * 8)))
    else:
        lines[i] = lines[i] + lines.pop(i + 1) if i + 1 < len(lines) else lines[i]
    return b"\n".join(lines)


# ------------------------------------------------------------------------------------------------------ targets
class OracleViolation(AssertionError):
    """A loader accepted something it must not (a path outside the bundle, a token outside the vocabulary, ...)."""


class FuzzTimeout(KeyboardInterrupt):
    """One input ran too long (raised from a SIGALRM handler; a KeyboardInterrupt so no loader swallows it)."""


class Refused(Exception):
    """A loader refused its input the documented way without raising (a warning and an empty cache)."""


def check(condition, message: str) -> None:
    if not condition:
        raise OracleViolation(message)


@dataclass
class Target:
    """One loader of untrusted bytes."""

    name: str
    file_name: str
    seeds: Callable[[Path], list[bytes]]  # valid files (built in a folder once)
    load: Callable[[Path, Path], None]  # (file, workdir): raise a clean error, Refused, or return (accepted)
    clean: tuple[type, ...]  # exception classes that are clean refusals
    structured: tuple[Callable, ...] = ()  # structure-aware mutators
    setup: Callable[[Path], None] | None = None  # prepares the workdir once (bundle folder, ...)
    _seeds: list[bytes] = field(default_factory=list, repr=False)

    def file(self, workdir: Path) -> Path:
        return workdir / self.name / self.file_name


def _quiet():
    logging.getLogger("gguf").setLevel(logging.ERROR)
    logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)
    logging.getLogger("gguf.gguf_reader").setLevel(logging.ERROR)


# -- GGUF --------------------------------------------------------------------------------------------------------
def _write_gguf(path: Path, arch: str, seed: int) -> bytes:
    import gguf

    _quiet()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        writer.add_sliding_window(8)
        writer.add_key_length(8)
    tokens = [f"t{i}" for i in range(30)] + ["<|im_end|>", "<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 30 + [3, 3])
    writer.add_token_merges(["t 1", "t 2"])
    writer.add_bos_token_id(31)
    writer.add_eos_token_id(30)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.add_tensor("token_embd.weight", rng.standard_normal((32, 32)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((32, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # 4 heads of 8
    q4 = gguf.quants.quantize(rng.standard_normal((16, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("blk.0.attn_k.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def gguf_seeds(folder: Path) -> list[bytes]:
    return [_write_gguf(folder / f"{arch}.gguf", arch, i) for i, arch in enumerate(("qwen2", "llama", "gemma3"))]


def gguf_load(path: Path, workdir: Path) -> None:
    from edgespec.export.sources import verify_gguf_header
    from edgespec.export.weights import GGUFWeights

    _quiet()
    header = verify_gguf_header(path)
    weights = GGUFWeights(path, "gguf")
    spec = weights.spec
    check(header.tensor_count == len(weights.tensors), "tensor count differs between the checks")
    for value in (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                  spec.vocab_size, spec.context_length, spec.intermediate_size):
        check(isinstance(value, int) and value > 0, f"accepted a non-positive size {value!r}")
    check(math.isfinite(spec.rms_norm_eps) and math.isfinite(spec.rope_theta), "accepted a non-finite number")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in weights.tensors:
            weights.get(name)


# -- manifest ----------------------------------------------------------------------------------------------------
def manifest_setup(workdir: Path) -> None:
    """A bundle folder whose files exist (contents are never read by load_manifest), a folder outside it with the
    same file names, a link to that folder and a link loop inside the bundle."""
    bundle = workdir / "manifest"
    outside = workdir / "outside"
    for folder in (bundle / "t", bundle / "d", outside):
        folder.mkdir(parents=True, exist_ok=True)
    for rel in ("t/model.onnx", "t/model.onnx.data", "t/tokenizer.json", "t/draft_head_tokens.npy", "d/model.onnx",
                "d/model.onnx.data", "d/tokenizer.json"):
        (bundle / rel).write_bytes(b"x")
    for name in ("model.onnx", "tokenizer.json", "passwd"):
        (outside / name).write_bytes(b"secret")
    for link, to in (("evil", outside), ("loop", bundle / "loop")):
        with contextlib.suppress(FileExistsError, OSError):
            (bundle / link).symlink_to(to)


def _model(arch: str, role: str, folder: str, layers: int, **extra) -> dict:
    d = {
        "role": role, "architecture": arch,
        "source": {"kind": "gguf", "name": folder, "path": "/models/x.gguf", "sha256": "0" * 64, "origin": "test"},
        "num_layers": layers, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "vocab_size": 384, "context_length": 512, "sliding_window": None, "layer_types": ["full"] * layers,
        "special_tokens": {"bos": 0, "eos": [2, 1], "pad": 0, "add_bos": False},
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "quantization": {"mode": "gguf", "accuracy_level": 0, "tensor_types": {"Q4_K": 3}},
        "graph": {"file": f"{folder}/model.onnx", "data": f"{folder}/model.onnx.data", "kv_dtype": "float32"},
        "tokenizer": f"{folder}/tokenizer.json",
        "accuracy": {"text_tokens": 256, "top1_agreement": 0.99, "perplexity": 8.1, "reference_perplexity": 8.0},
    }
    d.update(extra)
    return d


def manifest_seeds(folder: Path) -> list[bytes]:
    base = {"format": "edgespec-bundle", "schema_version": 1, "created_by": "edgespec 0.1.0",
            "created_at": "2026-01-01T00:00:00+00:00", "target": "t", "shared_vocabulary": True,
            "models": {"t": _model("qwen2", "target", "t", 2, self_speculation={
                "layer_gates": True, "draft_head_tokens": "t/draft_head_tokens.npy"}),
                "d": _model("llama", "drafter", "d", 1)}}
    gemma = json.loads(json.dumps(base))
    gemma["models"]["t"].update(architecture="gemma3", sliding_window=8, layer_types=["sliding", "full"])
    del gemma["models"]["d"]
    return [json.dumps(base, indent=2).encode(), json.dumps(gemma).encode()]


def manifest_load(path: Path, workdir: Path) -> None:
    from edgespec.runtimes.manifest import SHAPE_LIMITS, load_manifest

    bundle = path.parent
    manifest = load_manifest(bundle)
    root = bundle.resolve()
    for entry in manifest.models.values():
        paths = [entry.graph_path, entry.tokenizer_path, entry.graph_data_path,
                 (entry.self_speculation or {}).get("draft_head_tokens")]
        for p in paths:
            if p is not None:
                resolved = Path(p).resolve()
                check(root in resolved.parents, f"accepted a path outside the bundle: {p}")
        for key, limit in SHAPE_LIMITS.items():
            value = getattr(entry, key)
            check(type(value) is int and 0 < value <= limit, f"accepted {key}={value!r}")
        check(entry.chat_template is None or isinstance(entry.chat_template, str), "accepted a non-string template")
        check(all(isinstance(d, dict) for d in (entry.quantization, entry.accuracy, entry.source)),
              "accepted a non-object quantization/accuracy/source")
        check(len(entry.layer_types) == entry.num_layers and set(entry.layer_types) <= {"full", "sliding"},
              "accepted bad layer_types")
        for tok in (*entry.eos_token_ids, entry.bos_token_id, entry.pad_token_id):
            check(tok is None or (type(tok) is int and 0 <= tok < entry.vocab_size), f"accepted token id {tok!r}")
        check(isinstance(entry.add_bos, bool), "accepted a non-boolean add_bos")
    check(manifest.target_model.role == "target", "the target is not a target")


# -- tokenizer ---------------------------------------------------------------------------------------------------
SAMPLE_TEXT = "Hello wörld! def f(x):\n    return x + 1 <|im_end|> 日本語 \U0001F600"


def tokenizer_seeds(folder: Path) -> list[bytes]:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
              "Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001F600"] * 10
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer()
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]", "[SEP]"],
                                                                    show_progress=False))
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=100, special_tokens=["<unk>"],
                                                                unk_token="<unk>", show_progress=False))
    return [tok.to_str().encode() for tok in (bpe, wordpiece, unigram)]


def tokenizer_load(path: Path, workdir: Path) -> None:
    from edgespec.text import StreamDecoder, Tokenizer

    tok = Tokenizer(path)
    ids = tok.encode(SAMPLE_TEXT)
    tok.decode(ids)
    size = tok.vocab_size
    tok.decode(list(range(min(size, 400))) + [size, size + 7])
    decoder = StreamDecoder(tok)
    decoder.push_many(ids + list(range(min(size, 40))))
    decoder.flush()
    tok.byte_fallback_ids  # noqa: B018
    for i in range(min(size, 50)):
        tok.id_to_token(i)


# -- n-gram cache ------------------------------------------------------------------------------------------------
def ngram_seeds(folder: Path) -> list[bytes]:
    from edgespec.drafters.cachefile import make_header, write_cache_file
    from edgespec.drafters.ngram_table import NGramTable

    rng = np.random.default_rng(0)
    out = []
    for i, (kind, max_n) in enumerate((("persistent", 4), ("static", 4), ("persistent", 2))):
        table = NGramTable(max_n)
        for _ in range(3):
            table.add_tokens(rng.integers(0, VOCAB, 40).tolist())
        arrays = table.to_arrays()
        path = folder / f"ngram{i}.npz"
        write_cache_file(path, make_header(kind, max_n, VOCAB, FINGERPRINT, 120, arrays), arrays)
        out.append(path.read_bytes())
    return out


def ngram_load(path: Path, workdir: Path) -> None:
    from edgespec.drafters.cachefile import NGramCacheWarning
    from edgespec.drafters.ngram import NGramDrafter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drafter = NGramDrafter(VOCAB, FINGERPRINT, max_n=4, static_path=path, recycling=False)
    refusals = [w for w in caught if issubclass(w.category, NGramCacheWarning)]
    if refusals:
        raise Refused(str(refusals[0].message))
    table = drafter.static_table
    check(table is not None, "no static table")
    for key, conts in table.grams.items():
        check(1 <= len(key) <= 4 and all(0 <= t < VOCAB for t in key), f"accepted n-gram {key}")
        check(all(0 <= t < VOCAB for t in conts.next), f"accepted next tokens {list(conts.next)[:4]}")
    contexts = [list(key) for key in list(table.grams)[:3]] + [[1, 2, 3], []]
    for context in contexts:
        tree = drafter.propose(context or [0], 12)
        check(all(0 <= t < VOCAB for t in tree.tokens.tolist()), "proposed a token outside the vocabulary")


# -- cross-vocabulary cache --------------------------------------------------------------------------------------
def crossvocab_seeds(folder: Path) -> list[bytes]:
    from edgespec.drafters.crossvocab import CrossVocabCache

    rng = np.random.default_rng(1)
    out = []
    for i in range(2):
        cache = CrossVocabCache()
        for _ in range(30):
            cache.add(rng.integers(0, DRAFTER_VOCAB, rng.integers(1, 5)).tolist(),
                      rng.integers(0, TARGET_VOCAB, rng.integers(1, 5)).tolist(), count=int(rng.integers(1, 5)))
        path = folder / f"cv{i}.npz"
        cache.save(path, PAIR_FINGERPRINT, DRAFTER_VOCAB, TARGET_VOCAB)
        out.append(path.read_bytes())
    return out


def crossvocab_load(path: Path, workdir: Path) -> None:
    from edgespec.drafters.cachefile import NGramCacheWarning
    from edgespec.drafters.crossvocab import MAX_UNIT, open_cache

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = open_cache(path, PAIR_FINGERPRINT, DRAFTER_VOCAB, TARGET_VOCAB)
    refusals = [w for w in caught if issubclass(w.category, NGramCacheWarning)]
    if refusals:
        raise Refused(str(refusals[0].message))
    for key, seen in cache.table.items():
        check(1 <= len(key) <= MAX_UNIT and all(type(t) is int and 0 <= t < DRAFTER_VOCAB for t in key),
              f"accepted drafter sequence {key}")
        for value, count in seen.items():
            check(1 <= len(value) <= MAX_UNIT and all(type(t) is int and 0 <= t < TARGET_VOCAB for t in value),
                  f"accepted target sequence {value}")
            check(type(count) is int and count >= 1, f"accepted count {count!r}")
    cache.sizes()
    for key in list(cache.table)[:5]:
        cache.longest(list(key) + [1], 0)


# -- device profile ----------------------------------------------------------------------------------------------
def profile_seeds(folder: Path) -> list[bytes]:
    from edgespec.devices.profile import DeviceProfile

    full = DeviceProfile(
        name="seed", created="2026-01-01T00:00:00+00:00",
        device={"device_id": "test-cpu-2c-8gb", "machine": "x86_64", "os": "Linux", "cpu_model": "Test CPU",
                "cpu_count": 2, "ram_mb": 8000, "onnxruntime": "1.0"},
        threads=2, bundle={"model": "m", "quantization": {"mode": "fp32"}, "graph_bytes": 10, "num_layers": 2,
                           "hidden_size": 64, "key": "0123456789abcdef"},
        verify_ms={"contexts": [100, 300], "sizes": [1, 2, 4], "ms": [[10.0, 12.0, 20.0], [20.0, 24.0, 40.0]]},
        drafters={"d": {"sizes": [1, 4], "ms": [2.0, 5.0], "load_s": 0.5, "memory_mb": 12.0}}, load_s=1.5,
        memory={"total_mb": 8000.0, "available_mb": 6000.0, "target_rss_mb": 100.0, "bytes_per_file_byte": 1.1})
    quick = DeviceProfile(name="q", created="x", device={"device_id": "a-1c"}, threads=1,
                          bundle={"model": "m", "key": "k"}, verify_ms={"contexts": [512], "sizes": [1],
                                                                        "ms": [[5.0]]}, quick=True)
    return [json.dumps(p.to_dict(), indent=2).encode() for p in (full, quick)]


def profile_load(path: Path, workdir: Path) -> None:
    from edgespec.devices.profile import default_profile_name, load_profile

    profile = load_profile(path)
    for tokens in (1, 2, 3, 7, 64, 1000):
        for context in (0, 1, 150, 10 ** 6):
            value = profile.verify_seconds(tokens, context)
            check(math.isfinite(value) and value >= 0, f"verify_seconds({tokens}, {context}) = {value}")
    for name in profile.drafters:
        value = profile.drafter_seconds(name, 3)
        check(value is not None and math.isfinite(value) and value >= 0, f"drafter_seconds = {value}")
    profile.summary()
    json.dumps(profile.to_dict(), allow_nan=False)  # a loaded profile can be saved again
    stem = default_profile_name(profile.device_id, profile.threads, profile.key)
    check("/" not in stem and "\\" not in stem and not stem.startswith("."), f"profile file name {stem!r}")


# -- session history ---------------------------------------------------------------------------------------------
_HISTORY_TOKENIZER = []


def history_seeds(folder: Path) -> list[bytes]:
    from edgespec.history import SessionLog

    log = SessionLog(folder / "h.jsonl")
    log.append("Question: capital of Germany?\nAnswer:", " Berlin.", [5, 6, 7], [8, 9], "t")
    log.append("<|im_start|>user\nhi<|im_end|>", "Hello \u00e9\U0001F600", [1, 2], [3, 4, 5, 2], "t")
    log.append("", "", [], [], "t")
    return [log.path.read_bytes()]


def history_load(path: Path, workdir: Path) -> None:
    from edgespec.export.adapt import build_example
    from edgespec.history import HistoryWarning, read_history

    if not _HISTORY_TOKENIZER:
        from tokenizers import Tokenizer

        _HISTORY_TOKENIZER.append(Tokenizer.from_str(tokenizer_seeds(Path(tempfile.gettempdir()))[0].decode()))
    tok = _HISTORY_TOKENIZER[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_history(path)
    for w in caught:
        check(issubclass(w.category, HistoryWarning) and str(path) in str(w.message), f"warning {w.message}")
    for i, record in enumerate(records):
        for key, kind in (("prompt", str), ("output", str), ("prompt_ids", list), ("output_ids", list)):
            check(isinstance(record[key], kind), f"accepted record field {key}")
        build_example(i, record, tok, tok, bos=None, mapped_weight=0.5)  # what `edgespec adapt` does with it


# -- stop strings ------------------------------------------------------------------------------------------------
# An input is UTF-8 (bad bytes replaced): sections split at NUL; the first is the generated text, cut into the pieces
# pushed one by one at each \x01 (the markers removed), the others are the stop strings. The matcher
# (edgespec.text.StopMatcher) must refuse exactly the stop sets over its limits, and otherwise agree with a naive
# reference at every push: emitted text = the text so far minus its longest suffix that is a proper prefix of a stop
# string, and the first stop string to end (ties: the longest) cuts the text.
STOP_SEP, STOP_CUT = "\x00", "\x01"
STOP_CHECKED_PUSHES = 64  # pushes checked against the reference one by one (the final result always is)


def stop_encode(text_pieces: list[str], stops: list[str]) -> bytes:
    return STOP_SEP.join([STOP_CUT.join(text_pieces), *stops]).encode("utf-8", "surrogatepass")


def stop_decode(data: bytes) -> tuple[list[str], list[str]]:
    text, *stops = data.decode("utf-8", "replace").split(STOP_SEP)
    return text.split(STOP_CUT), stops


def stop_seeds(folder: Path) -> list[bytes]:
    from edgespec.text import MAX_STOP_CHARS, MAX_STOP_STRINGS

    long_stop = ("ab" * MAX_STOP_CHARS)[:MAX_STOP_CHARS]
    return [
        stop_encode(["Hello", " wor", "ld\n", "\nUs", "er: more"], ["\n\nUser:", "</s>"]),
        stop_encode(["a\n", "\nUs", "age", "\n"], ["\n\nUser:"]),
        stop_encode(["xa", "bcd", "bc"], ["abcd", "bc", "b", "ab"]),
        stop_encode(["aaaa", "aaab", "aab", "a"], ["aab", "aaab", "aaaab"]),
        stop_encode(["caf\u00e9 \u65e5", "\u672c \U0001F600", "<|im_end|>x"], ["<|im_end|>", "\U0001F600 <"]),
        stop_encode([long_stop[:700], long_stop[700:], "x"], [long_stop, "ba" * 10]),
        stop_encode(["no stop here"], []),
        stop_encode(["s07", "s1", "5 end"], [f"s{i:02d}" for i in range(MAX_STOP_STRINGS)]),
    ]


def stop_structured(data: bytes, rng) -> bytes:
    """A stop set or text edited: a stop made from a piece of the text (so it matches), one at or over the length
    limit, many stops, an empty one, a repeated one, the text made of a stop's prefixes, cuts moved."""
    from edgespec.text import MAX_STOP_CHARS, MAX_STOP_STRINGS

    pieces, stops = stop_decode(data)
    text = "".join(pieces)
    kind = rng.int(0, 7)
    if kind == 0 and text:
        a = rng.int(0, len(text) - 1)
        stops.append(text[a:a + rng.int(1, 12)])
    elif kind == 1:
        stops.append(("xy" * MAX_STOP_CHARS)[:MAX_STOP_CHARS + rng.int(-1, 1)])
    elif kind == 2:
        stops += [f"q{i}" for i in range(MAX_STOP_STRINGS + rng.int(-2, 2))]
    elif kind == 3:
        stops.insert(rng.int(0, len(stops)), "")
    elif kind == 4 and stops:
        stops.append(choice(rng, stops))
    elif kind == 5 and stops:
        stop = choice(rng, stops)
        text = "".join(stop[:rng.int(0, len(stop))] for _ in range(rng.int(1, 40)))
        pieces = [text]
    elif kind == 6 and stops:
        text += choice(rng, stops)[:-1] if rng.int(0, 1) else choice(rng, stops)
        pieces = [text]
    if kind in (5, 6, 7):  # cut the text at random places
        cuts = sorted({rng.int(0, len(text)) for _ in range(rng.int(0, 12))})
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    return stop_encode(pieces, stops)


def stop_reference(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(end, stop) of the stop string that ends first in `text` (ties: the longest), or None."""
    best = None
    for s in dict.fromkeys(stops):
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < (best[0], -len(best[1]))):
            best = (i + len(s), s)
    return best


def stop_hold(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `stops` (checked naively)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def stop_load(path: Path, workdir: Path) -> None:
    from edgespec.text import MAX_STOP_CHARS, MAX_STOP_STRINGS, StopMatcher

    pieces, stops = stop_decode(path.read_bytes())
    over = (len(stops) > MAX_STOP_STRINGS or any(not s for s in stops)
            or any(len(s) > MAX_STOP_CHARS for s in stops))
    try:
        matcher = StopMatcher(stops)
    except ValueError as exc:
        check(over, f"refused a valid stop set: {exc}")
        raise Refused(f"{path}: {exc}") from None
    check(not over, "accepted a stop set over the limits")
    text = "".join(pieces)
    found = stop_reference(text, stops)
    emitted, so_far = "", ""
    for number, piece in enumerate(pieces):
        emitted += matcher.push(piece)
        so_far += piece
        if matcher.stopped or number >= STOP_CHECKED_PUSHES:
            continue
        check(found is None or found[0] > len(so_far), "stopped late")
        check(emitted == so_far[:len(so_far) - stop_hold(so_far, stops)], f"push {number}: emitted {emitted!r}")
    if found is None:
        check(not matcher.stopped and matcher.stop_string is None, "stopped without a stop string in the text")
        check(emitted + matcher.flush() == text == matcher.text, "text lost or changed without a stop")
    else:
        end, stop = found
        check(matcher.stopped and matcher.stop_string == stop, f"stop {matcher.stop_string!r}, expected {stop!r}")
        check(emitted == matcher.text == text[:end - len(stop)], "text before the stop differs")
        check(matcher.flush() == "" and matcher.push("more") == "", "text after the stop")


# -- server request bodies ---------------------------------------------------------------------------------------
# The bytes are an HTTP request body as `edgespec serve` receives it: `parse_json_body` (size, value count,
# nesting, JSON) then `parse_request` (every field checked and bounded). A refusal must be a 400/404/413 with a short
# message (never an echo of the input); an accepted request must be within every limit.
REQUEST_MODEL = "tiny"


def request_seeds(folder: Path) -> list[bytes]:
    bodies = [
        {"model": REQUEST_MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "What is Berlin?", "name": "ann"}],
         "max_tokens": 24, "temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n\n", "User:"], "user": "u1"},
        {"model": REQUEST_MODEL, "messages": [{"role": "developer", "content": [{"type": "text", "text": "Hi"}]},
                                              {"role": "assistant", "content": None}, {"role": "user", "content": ""}],
         "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 3, "n": 1},
        {"model": REQUEST_MODEL, "prompt": "def add(a, b):", "max_tokens": 16, "stop": "\n", "top_k": 40,
         "ignore_eos": True, "logprobs": None, "echo": False, "frequency_penalty": 0},
        {"model": REQUEST_MODEL, "prompt": [[1, 2, 3, 4]], "max_tokens": 256, "temperature": 2},
        {"model": REQUEST_MODEL, "prompt": ["caf\u00e9 \U0001F600"], "response_format": {"type": "text"}},
    ]
    return [json.dumps(b).encode() for b in bodies]


def request_structured(data: bytes, rng) -> bytes:
    """A field set at, just under or just over its limit (messages, content, content parts, names, stop strings,
    prompt text and token ids, the body's value count), or to a hostile value."""
    from edgespec import server as srv

    body = json.loads(data)
    limit = choice(rng, (-1, 0, 1))
    kind = rng.int(0, 7)
    if kind == 0:
        body["messages"] = [{"role": "user", "content": "x"}] * (srv.MAX_MESSAGES + limit)
    elif kind == 1:
        body["messages"] = [{"role": "user", "content": "y" * (srv.MAX_TEXT_CHARS + limit)}]
    elif kind == 2:
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "z"}] * (srv.MAX_CONTENT_PARTS
                                                                                          + limit)}]
    elif kind == 3:
        body["stop"] = ["s" * (srv.MAX_STOP_CHARS + limit)] * rng.int(1, srv.MAX_STOP_STRINGS + 1)
    elif kind == 4:
        body["prompt"] = [1] * (srv.MAX_PROMPT_IDS + limit) if rng.int(0, 1) else "p" * (srv.MAX_TEXT_CHARS + limit)
    elif kind == 5:
        body[choice(rng, ("user", "model"))] = "u" * (srv.MAX_NAME_CHARS + limit)
    elif kind == 6:
        body["prompt"] = [0] * (srv.MAX_JSON_VALUES + limit - 3)  # the value count around its limit
    else:
        name = choice(rng, ("temperature", "top_p", "top_k", "seed", "max_tokens", "n", "stream", "stream_options",
                            "stop", "messages", "prompt", "user", "logit_bias", "tools"))
        body[name] = _replacement(rng, body.get(name))
    return dump_json(body, rng)


def request_load(path: Path, workdir: Path) -> None:
    from edgespec import server as srv
    from edgespec.sampling import GenerationConfig

    raw = path.read_bytes()
    kind = "chat" if b'"messages"' in raw else "completion"
    try:
        spec = srv.parse_request(srv.parse_json_body(raw), kind, REQUEST_MODEL, 256, 16)
    except srv.APIError as exc:
        check(exc.status in (400, 404, 413), f"HTTP {exc.status} for a bad request")
        check(len(exc.message) <= 1000, f"an error message of {len(exc.message)} characters (an echoed input?)")
        json.dumps(exc.body())
        raise Refused(f"{path.name}: HTTP {exc.status} {exc.code} ({exc.param}): {exc.message}") from None
    check(spec.kind == kind, "kind")
    if kind == "chat":
        check(1 <= len(spec.messages) <= srv.MAX_MESSAGES, f"{len(spec.messages)} messages")
        check(all(m["role"] in srv.ROLES and isinstance(m["content"], str) for m in spec.messages), "a message")
        check(sum(len(m["content"]) for m in spec.messages) <= srv.MAX_TEXT_CHARS, "content over the limit")
    elif isinstance(spec.prompt, str):
        check(len(spec.prompt) <= srv.MAX_TEXT_CHARS, "prompt over the limit")
    else:
        check(0 < len(spec.prompt) <= srv.MAX_PROMPT_IDS and all(type(t) is int for t in spec.prompt), "token ids")
    stops = spec.options["stop"]
    check(len(stops) <= srv.MAX_STOP_STRINGS and all(0 < len(s) <= srv.MAX_STOP_CHARS for s in stops), "stops")
    check(1 <= spec.options["max_new_tokens"] <= 256, "max_new_tokens")
    check(spec.user is None or len(spec.user) <= srv.MAX_NAME_CHARS, "user")
    GenerationConfig(**spec.options).validate()


# -- the table ---------------------------------------------------------------------------------------------------
def _clean_classes(name: str) -> tuple[type, ...]:
    if name == "gguf":
        from edgespec.export.arch import UnsupportedArchitecture
        from edgespec.export.sources import SourceError

        return SourceError, ValueError, UnsupportedArchitecture
    if name == "manifest":
        from edgespec.runtimes.manifest import BundleError

        return (BundleError,)
    if name == "tokenizer":
        return (ValueError,)
    if name in ("ngram", "crossvocab", "history", "stop", "request"):
        return (Refused,)
    if name == "profile":
        from edgespec.devices.profile import ProfileError

        return (ProfileError,)
    raise KeyError(name)


_TARGETS: dict[str, Target] = {}


def get_target(name: str) -> Target:
    """The target `name` (seeds built on first use)."""
    if name not in _TARGETS:
        spec = {
            "gguf": ("model.gguf", gguf_seeds, gguf_load, (gguf_structured,), None),
            "manifest": ("manifest.json", manifest_seeds, manifest_load, (json_mutation,), manifest_setup),
            "tokenizer": ("tokenizer.json", tokenizer_seeds, tokenizer_load, (json_mutation,), None),
            "ngram": ("cache.npz", ngram_seeds, ngram_load, (npz_structured,), None),
            "crossvocab": ("crossvocab.npz", crossvocab_seeds, crossvocab_load, (npz_structured,), None),
            "profile": ("profile.json", profile_seeds, profile_load, (json_mutation,), None),
            "history": ("history.jsonl", history_seeds, history_load, (jsonl_structured,), None),
            "stop": ("stop.bin", stop_seeds, stop_load, (stop_structured,), None),
            "request": ("request.json", request_seeds, request_load, (json_mutation, request_structured), None),
        }[name]
        file_name, seeds, load, structured, setup = spec
        target = Target(name, file_name, seeds, load, _clean_classes(name), structured, setup)
        with tempfile.TemporaryDirectory() as tmp:
            target._seeds = seeds(Path(tmp))
        _TARGETS[name] = target
    return _TARGETS[name]


def mutate(target: Target, rng) -> bytes:
    """One mutated input: a seed, 0-2 structure-aware mutations, then 0-2 byte-level ones (at least one in all);
    sometimes spliced with another seed."""
    seeds = target._seeds
    data = choice(rng, seeds)
    n_struct = rng.int(0, 2) if target.structured else 0
    n_bytes = rng.int(0 if n_struct else 1, 2)
    for _ in range(n_struct):
        try:
            data = choice(rng, target.structured)(data, rng)
        except Exception:  # noqa: BLE001  an earlier mutation made the input unparsable for this one
            break  # (go on with byte mutations)
    for _ in range(n_bytes):
        if rng.int(0, 9) == 0:
            data = splice(data, choice(rng, seeds), rng)
        else:
            data = choice(rng, BYTE_MUTATORS)(data, rng)
    return data


@dataclass
class Outcome:
    """What one input did: kind "accepted", "error" or "crash", and the exception's type name and message."""

    kind: str
    type: str = ""
    message: str = ""

    @property
    def label(self) -> str:
        return self.kind if self.kind == "accepted" else f"{self.kind}:{self.type}"


def prepare(target: Target, workdir: Path) -> Path:
    """The target's input file path under `workdir` (its folder created, its setup run once)."""
    path = target.file(workdir)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        if target.setup is not None:
            target.setup(workdir)
    return path


def run_one(target: Target, data: bytes, workdir: Path) -> Outcome:
    """Write `data` as the target's file under `workdir` and load it; classify what happened. A clean error is an
    exception of exactly one of the target's classes (a stdlib subclass such as UnicodeDecodeError or
    json.JSONDecodeError escaping raw is a crash) whose message names the file."""
    path = prepare(target, workdir)
    path.write_bytes(data)
    try:
        target.load(path, workdir)
    except (KeyboardInterrupt, SystemExit):  # FuzzTimeout included
        raise
    except BaseException as exc:  # noqa: BLE001
        message = str(exc)
        if type(exc) not in target.clean:
            return Outcome("crash", type(exc).__name__, message[:2000])
        if str(path) not in message and path.name not in message:
            return Outcome("crash", f"{type(exc).__name__} not naming the file", message[:2000])
        return Outcome("error", type(exc).__name__, message[:500])
    return Outcome("accepted")


def clear_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
