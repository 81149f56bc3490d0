"""Hypothesis-driven fuzzing of every loader of untrusted bytes (targets in tests/fuzz_targets.py, docs/hardening.md):
mutated GGUF files, bundle manifests, tokenizer files, n-gram and cross-vocabulary cache files, device profiles and
session histories must be accepted (and then hold nothing out of range) or refused with the loader's own clear error
naming the file; anything else is a crash. Plus the size claims no loader may allocate from.

`EDGESPEC_FUZZ_EXAMPLES` sets the examples per target (default 200, the CI budget: the module takes well under
90 s on 2 cores); `python -m tests.fuzz_run --examples 10000` is the long run."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft

EXAMPLES = int(os.environ.get("EDGESPEC_FUZZ_EXAMPLES", "200"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("name", ft.TARGET_NAMES)
def test_seeds_are_accepted(name, workdir):
    target = ft.get_target(name)
    assert target._seeds
    for seed in target._seeds:
        outcome = ft.run_one(target, seed, workdir)
        assert outcome.kind == "accepted", outcome


@pytest.mark.parametrize("name", ft.TARGET_NAMES)
def test_fuzz_target(name, workdir):
    target = ft.get_target(name)
    labels: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data):
        blob = ft.mutate(target, ft.HypothesisRng(data))
        outcome = ft.run_one(target, blob, workdir)
        labels[outcome.label] += 1
        assert outcome.kind != "crash", (f"{name} crashed: {outcome.type}: {outcome.message}\n"
                                         f"input ({len(blob)} bytes): {blob[:400]!r}")

    one()
    assert sum(labels.values()) >= min(EXAMPLES, 20)
    if name != "history":  # (a history never raises: bad lines are skipped with a warning)
        assert any(label.startswith("error") for label in labels), labels  # the mutations reach the checks


# ------------------------------------------------------------------------------------------------ size claims
def _small_peak(fn, limit_mb: float = 32.0, seconds: float = 5.0):
    """Run fn; return its exception. Fails when it allocated over `limit_mb` MiB (numpy included) or took long."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        error = exc
    else:
        error = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < limit_mb * (1 << 20), f"peak allocation {peak / (1 << 20):.1f} MiB"
    assert time.perf_counter() - t0 < seconds
    return error


def _gguf_with(workdir, edit):
    target = ft.get_target("gguf")
    model = ft.gguf_decode(target._seeds[0])
    edit(model)
    path = workdir / "claims.gguf"
    path.write_bytes(ft.gguf_encode(model))
    return path


@pytest.mark.parametrize("claim", ["tensor_count", "kv_count", "array_length", "string_array_length",
                                   "tensor_dims", "n_dims"])
def test_gguf_size_claims_are_refused_before_allocating(claim, workdir):
    from edgespec.export.sources import SourceError, verify_gguf_header
    from edgespec.export.weights import GGUFWeights

    def edit(model):
        if claim == "tensor_count":
            model["counts"] = [10 ** 12, len(model["kvs"])]
        elif claim == "kv_count":
            model["counts"] = [len(model["tensors"]), 1 << 62]
        elif claim == "array_length":  # a scalar array: gguf.GGUFReader would loop 2**62 times on it
            model["lengths"]["tokenizer.ggml.token_type"] = 1 << 62
        elif claim == "string_array_length":
            model["lengths"]["tokenizer.ggml.tokens"] = 10 ** 9
        elif claim == "tensor_dims":
            model["tensors"][0][1] = [1 << 40, 1 << 40]
        else:
            model["tensors"][0][1] = [1] * 4000

    path = _gguf_with(workdir, edit)
    error = _small_peak(lambda: verify_gguf_header(path))
    assert isinstance(error, SourceError) and str(path) in str(error), error
    error = _small_peak(lambda: GGUFWeights(path))
    assert type(error) is ValueError and "not a readable GGUF file" in str(error), error


def _npz_with(workdir, members, compress=False):
    path = workdir / "claims.npz"
    path.write_bytes(ft._zip(members, compress))
    return path


@pytest.mark.parametrize("shape", ["(1000000000000,)", "(2305843009213693952,)", "(100000000, 4)"])
def test_cache_arrays_claiming_huge_shapes_are_refused_before_allocating(shape, workdir):
    from edgespec.drafters.cachefile import CacheFileError, read_cache_file
    from edgespec.drafters.crossvocab import CrossVocabCache

    arrays = ft.npz_decode(ft.get_target("ngram")._seeds[0])
    members = [(n + ".npy", ft._npy_bytes(a)) for n, a in arrays.items() if n != "entry_key"]
    members.append(ft._forged_member("entry_key", "<i4", shape, b"\x00" * 64))
    path = _npz_with(workdir, members)
    error = _small_peak(lambda: read_cache_file(path, ("persistent",), ft.VOCAB, ft.FINGERPRINT))
    assert isinstance(error, CacheFileError) and "claims shape" in str(error), error
    error = _small_peak(lambda: CrossVocabCache.load(path, ft.PAIR_FINGERPRINT, 10, 10))
    assert isinstance(error, CacheFileError), error


def test_cache_decompression_bomb_and_pickles_are_refused(workdir):
    import io

    from edgespec.drafters.cachefile import CacheFileError, read_npz

    path = workdir / "bomb.npz"
    path.write_bytes(ft._bomb_archive())
    error = _small_peak(lambda: read_npz(path), limit_mb=8)
    assert isinstance(error, CacheFileError) and "decompression bomb" in str(error), error
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = _npz_with(workdir, [("header.npy", buf.getvalue())])
    with pytest.raises(CacheFileError, match="not a plain number type"):
        read_npz(path)
    path = _npz_with(workdir, [("header", b"raw bytes, not an array")])
    with pytest.raises(CacheFileError, match="not an .npy array"):
        read_npz(path)


def test_manifest_and_profile_sizes_are_bounded(workdir, tmp_path):
    import json

    from edgespec.devices.profile import ProfileError, load_profile
    from edgespec.runtimes.manifest import BundleError, load_manifest

    target = ft.get_target("manifest")
    path = ft.prepare(target, workdir)
    raw = json.loads(target._seeds[0])
    for key, value in (("context_length", 10 ** 12), ("num_layers", 10 ** 9), ("head_dim", 1 << 40)):
        edited = json.loads(json.dumps(raw))
        edited["models"]["t"][key] = value
        edited["models"]["t"]["layer_types"] = None
        path.write_text(json.dumps(edited))
        with pytest.raises(BundleError, match="above the limit"):
            load_manifest(path.parent)
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(path.parent)
    profile = tmp_path / "p.json"
    data = json.loads(ft.get_target("profile")._seeds[0])
    data["verify_ms"]["ms"][0][0] = 10 ** 400  # a float cannot hold it: was an OverflowError
    profile.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="verify_ms.ms"):
        load_profile(profile)


def test_history_lines_over_the_limit_are_skipped_unread(tmp_path, monkeypatch):
    from edgespec import history

    monkeypatch.setattr(history, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "h.jsonl"
    path.write_bytes(ft.get_target("history")._seeds[0] + b"x" * 5000 + b"\n" + ft.get_target("history")._seeds[0])
    with pytest.warns(history.HistoryWarning, match="over 1000 bytes"):
        records = history.read_history(path)
    assert len(records) == 6


def test_gguf_scan_accepts_the_seeds_and_agrees_with_the_reader(workdir):
    import gguf

    from edgespec.export.sources import scan_gguf

    for i, seed in enumerate(ft.get_target("gguf")._seeds):
        path = workdir / f"seed{i}.gguf"
        path.write_bytes(seed)
        layout = scan_gguf(path)
        reader = gguf.GGUFReader(str(path))
        assert layout.data_offset == reader.data_offset
        assert [t.name for t in layout.tensors] == [t.name for t in reader.tensors]
        assert [t.n_bytes for t in layout.tensors] == [int(t.n_bytes) for t in reader.tensors]
        assert set(layout.keys) == {k for k in reader.fields if not k.startswith("GGUF.")}
        assert struct.unpack("<I", seed[4:8])[0] == layout.version


# ------------------------------------------------------------------------------------------------ regressions
# Inputs that crashed, hung or got through before the loaders were hardened (each was an IndexError, TypeError,
# AttributeError, ZeroDivisionError, OverflowError, RecursionError, a raw ValueError, a hang, ...; see
# docs/hardening.md). Each must now be a clean refusal of its target, or accepted where that is right.
def _gguf_edit(edit, seed: int = 0) -> bytes:
    model = ft.gguf_decode(ft.get_target("gguf")._seeds[seed])
    edit(model)
    return ft.gguf_encode(model)


def _set_kv(model, key, vtype, value):
    for entry in model["kvs"]:
        if entry[0] == key:
            entry[1], entry[2] = vtype, value


def _quantized_vector(model):
    tensor = next(t for t in model["tensors"] if t[0] == "blk.0.attn_q.weight")
    tensor[0], tensor[1] = "blk.0.q_norm.weight", [tensor[1][0] * tensor[1][1]]


def _json_edit(name: str, edit, seed: int = 0) -> bytes:
    import json

    value = json.loads(ft.get_target(name)._seeds[seed])
    edit(value)
    return json.dumps(value).encode()


def _npz_edit(name: str, edit) -> bytes:
    arrays = ft.npz_decode(ft.get_target(name)._seeds[0])
    members = edit(arrays)
    return ft._zip(members) if members is not None else ft.npz_encode(arrays)


def _header(arrays, **changes):
    import json

    header = json.loads(arrays["header"].tobytes())
    header.update(changes)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)


def _history(record_changes: dict | None = None, raw: bytes | None = None) -> bytes:
    import json

    record = {"v": 1, "time": "t", "model": "m", "prompt": "p", "output": "o", "prompt_ids": [1], "output_ids": [2]}
    record.update(record_changes or {})
    return raw if raw is not None else json.dumps(record).encode() + b"\n"


def _npy_with_header(header: bytes) -> bytes:
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _wordpiece_without_unk(value):
    value["model"]["vocab"].pop("[UNK]")


REGRESSIONS = {
    # GGUF (was: a hang in gguf.GGUFReader, ZeroDivisionError, raw ValueError, TypeError, IndexError)
    "gguf uint8 array claiming 2**62 elements": ("gguf", lambda: _gguf_edit(lambda m: (
        m["kvs"].append(["x.flags", 9, [0, [1, 2, 3]]]), m["lengths"].__setitem__("x.flags", 1 << 62)))),
    "gguf head_count_kv 0": ("gguf", lambda: _gguf_edit(lambda m: _set_kv(m, "qwen2.attention.head_count_kv", 4, 0))),
    "gguf block_count a string": ("gguf", lambda: _gguf_edit(lambda m: _set_kv(m, "qwen2.block_count", 8, b"x"))),
    "gguf block_count an array": ("gguf", lambda: _gguf_edit(lambda m: _set_kv(m, "qwen2.block_count", 9, [4, [1]]))),
    "gguf llama attn_q rows not heads x head_dim": ("gguf", lambda: _gguf_edit(
        lambda m: m["kvs"].append(["llama.attention.key_length", 4, 16]), seed=1)),
    "gguf quantized vector (accepted)": ("gguf", lambda: _gguf_edit(_quantized_vector)),
    # manifest (was: TypeError, AttributeError, raw ValueError, RecursionError, OSError, accepted escapes)
    "manifest target a list": ("manifest", lambda: _json_edit("manifest", lambda r: r.__setitem__("target", ["t"]))),
    "manifest layer_types 5": ("manifest", lambda: _json_edit(
        "manifest", lambda r: r["models"]["t"].__setitem__("layer_types", 5))),
    "manifest special_tokens a list": ("manifest", lambda: _json_edit(
        "manifest", lambda r: r["models"]["t"].__setitem__("special_tokens", [1]))),
    "manifest eos null (accepted)": ("manifest", lambda: _json_edit(
        "manifest", lambda r: r["models"]["t"]["special_tokens"].__setitem__("eos", None))),
    "manifest 5000-digit integer": ("manifest", lambda: _json_edit("manifest", lambda r: None).replace(
        b'"num_layers": 2', b'"num_layers": ' + b"9" * 5000)),
    "manifest nested 100000 deep": ("manifest", lambda: b"[" * 100_000 + b"]" * 100_000),
    "manifest file name too long": ("manifest", lambda: _json_edit(
        "manifest", lambda r: r["models"]["t"].__setitem__("tokenizer", "t/" + "a" * 5000))),
    "manifest graph.data outside": ("manifest", lambda: _json_edit(
        "manifest", lambda r: r["models"]["t"]["graph"].__setitem__("data", "../../etc/passwd"))),
    # profiles (was: OverflowError, RecursionError, an infinite cost)
    "profile ms 10**400": ("profile", lambda: _json_edit(
        "profile", lambda r: r["verify_ms"]["ms"][0].__setitem__(0, 10 ** 400))),
    "profile ms 1e308": ("profile", lambda: _json_edit(
        "profile", lambda r: r["verify_ms"]["ms"][0].__setitem__(2, 1e308))),
    "profile NaN in device": ("profile", lambda: _json_edit(
        "profile", lambda r: r["device"].__setitem__("cpu_count", float("nan")))),
    "profile nested 100000 deep": ("profile", lambda: b"[" * 100_000 + b"]" * 100_000),
    # caches (was: AttributeError, TypeError, tokenize.TokenError, numpy UFuncTypeError, float ids accepted)
    "ngram member not an .npy": ("ngram", lambda: _npz_edit("ngram", lambda a: [
        (n + ".npy", ft._npy_bytes(v)) for n, v in a.items() if n != "entry_next"] + [("entry_next", b"x")])),
    "ngram header max_n true": ("ngram", lambda: _npz_edit("ngram", lambda a: _header(a, max_n=True))),
    "ngram npy header not a literal": ("ngram", lambda: _npz_edit("ngram", lambda a: [
        (n + ".npy", ft._npy_bytes(v)) for n, v in a.items() if n != "key_len"]
        + [("key_len.npy", _npy_with_header(b"{'descr': '<i8', 'shape': (1," + b" " * 15 + b"\n"))])),
    "crossvocab counts as strings": ("crossvocab", lambda: _npz_edit(
        "crossvocab", lambda a: a.__setitem__("count", a["count"].astype("U4")))),
    "crossvocab float ids": ("crossvocab", lambda: _npz_edit(
        "crossvocab", lambda a: a.__setitem__("drafter_seq", a["drafter_seq"] + 0.5))),
    # tokenizer (was: loaded, then an Exception from encode)
    "tokenizer WordPiece without [UNK]": ("tokenizer", lambda: _json_edit("tokenizer", _wordpiece_without_unk, 1)),
    # history (was: RecursionError, raw ValueError; adapt: TypeError on a lone surrogate, OverflowError on 2**40)
    "history nested 100000 deep": ("history", lambda: _history(raw=b"[" * 100_000 + b"]" * 100_000 + b"\n")),
    "history 5000-digit integer": ("history", lambda: _history(raw=b'{"v": ' + b"9" * 5000 + b"}\n")),
    "history lone surrogate": ("history", lambda: _history({"prompt": "a \ud800 b"})),
    "history id 2**40": ("history", lambda: _history({"output_ids": [1 << 40]})),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regression_inputs(case, workdir):
    name, build = REGRESSIONS[case]
    outcome = ft.run_one(ft.get_target(name), build(), workdir)
    assert outcome.kind != "crash", (case, outcome)
    if "(accepted)" in case or name == "history":
        assert outcome.kind == "accepted", (case, outcome)
    else:
        assert outcome.kind == "error", (case, outcome)


def test_regression_gguf_tensor_type_without_a_reader(workdir):
    """An I8 tensor: gguf-py has no dequantizer for it (was a NotImplementedError out of GGUFWeights.get)."""
    def to_i8(model):
        tensor = next(t for t in model["tensors"] if t[0] == "blk.0.attn_k.weight")  # Q4_0 [16, 32]: 288 bytes
        tensor[1], tensor[2] = [32, 9], 24  # I8 [9, 32] = 288 bytes: the data still fits

    outcome = ft.run_one(ft.get_target("gguf"), _gguf_edit(to_i8), workdir)
    assert outcome.kind == "error" and "I8" in outcome.message, outcome
