"""Bad input gets a clear, specific error, and never corrupts state: broken bundles, prompts longer than the
context, truncated GGUF files, unsupported architectures and exports that fail half-way."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgespec.engine import load
from edgespec.runtimes.manifest import BundleError, load_manifest
from edgespec.runtimes.runner import ContextOverflow


# ---- helpers ------------------------------------------------------------------------------------------------------


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(bundle: Path, edit) -> dict:
    """Apply `edit(manifest, target_entry)` to bundle/manifest.json in place."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest, manifest["models"][manifest["target"]])
    path.write_text(json.dumps(manifest))
    return manifest


def target_entry(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest["models"][manifest["target"]]


@pytest.fixture
def bundle(tiny_bundles, tmp_path) -> Path:
    """A private, writable copy of the tiny Qwen2 bundle."""
    return copy_bundle(tiny_bundles["qwen2"], tmp_path / "bundle")


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- broken bundles -----------------------------------------------------------------------------------------------


def test_bundle_folder_missing(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load(tmp_path / "no-such-bundle")
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "no-such-bundle")


def test_bundle_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a folder"):
        load(tmp_path / "file")


def test_manifest_missing(bundle):
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load(bundle)


@pytest.mark.parametrize("content", ["{not json", "", "\xff\xfe garbage"])
def test_manifest_not_json(bundle, content):
    (bundle / "manifest.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(BundleError, match="not valid JSON"):
        load(bundle)


@pytest.mark.parametrize("edit", [
    lambda m, e: m.__setitem__("format", "something-else"),
    lambda m, e: m.pop("format"),
])
def test_wrong_format_field(bundle, edit):
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match="format field"):
        load(bundle)


def test_manifest_not_an_object(bundle):
    (bundle / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(BundleError, match="not an edgespec bundle manifest"):
        load(bundle)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unsupported_schema_version(bundle, version):
    edit_manifest(bundle, lambda m, e: m.__setitem__("schema_version", version))
    with pytest.raises(BundleError, match=r"schema_version .* is not supported"):
        load(bundle)


def test_models_missing_or_empty(bundle):
    edit_manifest(bundle, lambda m, e: m.__setitem__("models", {}))
    with pytest.raises(BundleError, match="'models' must be a non-empty object"):
        load(bundle)


def test_target_not_among_models(bundle):
    edit_manifest(bundle, lambda m, e: m.__setitem__("target", "nobody"))
    with pytest.raises(BundleError, match="target 'nobody' is not one of the models"):
        load(bundle)


def test_graph_file_missing(bundle):
    (bundle / target_entry(bundle)["graph"]["file"]).unlink()
    with pytest.raises(BundleError, match="graph file .* is missing"):
        load(bundle)


def test_tokenizer_file_missing(bundle):
    (bundle / target_entry(bundle)["tokenizer"]).unlink()
    with pytest.raises(BundleError, match="tokenizer file .* is missing"):
        load(bundle)


def test_tokenizer_file_corrupt(bundle):
    (bundle / target_entry(bundle)["tokenizer"]).write_text("{ this is not a tokenizer")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        load(bundle)


@pytest.mark.parametrize("field, value, match", [
    ("num_layers", 0, "must be positive"),
    ("num_layers", "2", "must be an integer"),
    ("num_layers", True, "must be an integer"),
    ("architecture", "gpt2", r"unsupported architecture 'gpt2' \(supported: qwen2, llama, gemma3\)"),
    ("role", "boss", "role must be"),
    ("num_kv_heads", 3, "not a multiple of num_kv_heads"),
    ("layer_types", ["full", "weird"], "layer_types"),
    ("special_tokens", {"eos": [100000]}, "outside the vocabulary"),
])
def test_bad_model_fields(bundle, field, value, match):
    edit_manifest(bundle, lambda m, e: e.__setitem__(field, value))
    with pytest.raises(BundleError, match=match):
        load(bundle)


def test_missing_model_field(bundle):
    edit_manifest(bundle, lambda m, e: e.pop("head_dim"))
    with pytest.raises(BundleError, match="missing field 'head_dim'"):
        load(bundle)


@pytest.mark.parametrize("vocab", [512, 1000])
def test_manifest_vocab_size_does_not_match_graph(bundle, vocab):
    edit_manifest(bundle, lambda m, e: e.__setitem__("vocab_size", vocab))
    with pytest.raises(BundleError, match=f"vocabulary 384, the manifest says {vocab}"):
        load(bundle)


def test_manifest_layers_do_not_match_graph(bundle):
    edit_manifest(bundle, lambda m, e: (e.__setitem__("num_layers", 3), e.__setitem__("layer_types", None)))
    with pytest.raises(BundleError, match="does not match the manifest"):
        load(bundle)


def test_manifest_kv_heads_do_not_match_graph(bundle):
    edit_manifest(bundle, lambda m, e: e.__setitem__("num_kv_heads", 4))
    with pytest.raises(BundleError, match="KV shape .* does not match the manifest"):
        load(bundle)


def test_tokenizer_bigger_than_model_vocabulary(bundle):
    """A tokenizer with more tokens than the model's embedding rows is the wrong tokenizer for this model."""
    from tokenizers import AddedToken, Tokenizer

    path = bundle / target_entry(bundle)["tokenizer"]
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() <= 384
    tok.add_tokens([AddedToken(f"<extra_{i}>", special=False) for i in range(64)])
    assert tok.get_vocab_size() > 384
    tok.save(str(path))
    with pytest.raises(ValueError, match=r"tokenizer .* has \d+ tokens but the model's vocabulary is 384"):
        load(bundle)


def test_manifest_vocab_size_below_tokenizer(bundle):
    """vocab_size edited down below the tokenizer's size (and the special ids): refused with a clear error."""
    edit_manifest(bundle, lambda m, e: e.__setitem__("vocab_size", 300))
    with pytest.raises(ValueError, match=r"tokenizer .* has \d+ tokens but the model's vocabulary is 300"):
        load(bundle)


@pytest.mark.parametrize("key", ["graph", "tokenizer"])
@pytest.mark.parametrize("value, match", [
    ("../../etc/passwd", "points outside the bundle"),
    ("../outside/model.onnx", "points outside the bundle"),
    ("/etc/passwd", "absolute path"),
    ("", "expected a relative path"),
])
def test_path_traversal_refused(bundle, key, value, match):
    (bundle.parent / "outside").mkdir(exist_ok=True)
    (bundle.parent / "outside" / "model.onnx").write_bytes(b"x")

    def edit(m, e):
        if key == "graph":
            e["graph"]["file"] = value
        else:
            e["tokenizer"] = value

    edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=match):
        load(bundle)
    with pytest.raises(BundleError, match=match):
        load_manifest(bundle, check_files=False)  # refused even without touching the files


def test_symlink_escaping_the_bundle_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    real = bundle / target_entry(bundle)["graph"]["file"]
    shutil.copy(real, outside / "model.onnx")
    os.symlink(outside, bundle / "link")
    edit_manifest(bundle, lambda m, e: e["graph"].__setitem__("file", "link/model.onnx"))
    with pytest.raises(BundleError, match="points outside the bundle"):
        load(bundle)


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 100, b"ONNX? no."])
def test_corrupt_onnx_graph(bundle, content):
    (bundle / target_entry(bundle)["graph"]["file"]).write_bytes(content)
    with pytest.raises(BundleError, match="cannot load ONNX graph"):
        load(bundle)


# ---- context overflow ---------------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context(tiny_bundles):
    engine = load(tiny_bundles["qwen2"], max_context=64)
    assert engine.context_length == 64
    short = engine.encode("The quick brown fox")
    expected = load(tiny_bundles["qwen2"]).generate(short, max_new_tokens=12, ignore_eos=True)

    engine.generate(short, max_new_tokens=12, ignore_eos=True)  # something cached before the failure
    long_ids = [int(i) for i in np.random.default_rng(0).integers(3, 300, size=100)]
    with pytest.raises(ContextOverflow, match="context length is 64") as info:
        engine.generate(long_ids, max_new_tokens=4)
    assert "100 tokens" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ContextOverflow, match="context length"):
        list(engine.stream(long_ids, max_new_tokens=4))
    with pytest.raises(ContextOverflow, match="context length"):
        engine.generate(long_ids[:64], max_new_tokens=1)  # exactly the context: no room for a token
    long_text = "The quick brown fox jumps over the lazy dog. " * 12
    assert len(engine.encode(long_text)) > 64
    with pytest.raises(ContextOverflow, match="context length"):
        engine.generate(long_text)

    # state not corrupted: the same engine still generates exactly
    r = engine.generate(short, max_new_tokens=12, ignore_eos=True)
    assert r.token_ids == expected.token_ids and r.text == expected.text
    # and a prompt that just fits still works (1 token of room)
    fits = engine.generate(long_ids[:63], max_new_tokens=8, ignore_eos=True)
    assert len(fits.token_ids) == 1 and fits.finish_reason == "length"
    fresh = load(tiny_bundles["qwen2"]).generate(long_ids[:63], max_new_tokens=1, ignore_eos=True)
    assert fits.token_ids == fresh.token_ids


def test_runner_refuses_to_overflow_and_keeps_its_cache(tiny_bundles):
    from edgespec.runtimes.manifest import load_manifest
    from edgespec.runtimes.runner import ModelRunner

    entry = load_manifest(tiny_bundles["llama"]).target_model
    runner = ModelRunner(entry, threads=1, max_context=16)
    runner.prefill(list(range(3, 13)))
    assert runner.length == 10
    with pytest.raises(ContextOverflow, match="context length 16"):
        runner.prefill(list(range(3, 10)))
    with pytest.raises(ContextOverflow, match="context length 16"):
        runner.forward(list(range(3, 10)))
    assert runner.length == 10
    runner.forward([5, 6])
    runner.commit()
    assert runner.length == 12


# ---- truncated / foreign GGUF -------------------------------------------------------------------------------------


def write_small_gguf(path: Path) -> Path:
    """A small but complete llama-style GGUF (~2 MB of f32 tensors plus metadata)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((4096, 64)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.add_tensor("output.weight", rng.standard_normal((4096, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def test_complete_gguf_resolves(small_gguf):
    from edgespec.export.sources import resolve

    src = resolve(small_gguf)
    assert src.kind == "gguf" and src.architecture == "llama" and src.size == small_gguf.stat().st_size


@pytest.mark.parametrize("keep", [1 << 20, 200, 30, "all-but-1"])
def test_truncated_gguf(small_gguf, tmp_path, keep):
    from edgespec.export.sources import SourceError, resolve
    from edgespec.export.weights import GGUFWeights

    data = small_gguf.read_bytes()
    n = len(data) - 1 if keep == "all-but-1" else keep
    assert n < len(data)
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:n])
    with pytest.raises(SourceError, match="truncated|corrupt"):
        resolve(path)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        GGUFWeights(path)


def test_not_a_gguf(tmp_path):
    from edgespec.export.sources import SourceError, resolve

    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(SourceError, match="not a GGUF file"):
        resolve(path)


# ---- unsupported architectures ------------------------------------------------------------------------------------


def test_unsupported_gguf_architecture():
    from edgespec.export.arch import spec_from_gguf_fields

    with pytest.raises(ValueError, match=r"'falcon' is not supported; supported: qwen2, llama, gemma3"):
        spec_from_gguf_fields({"general.architecture": "falcon"}, set())


def make_gpt2_folder(folder: Path) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 1, "n_head": 2,
        "vocab_size": 64, "n_positions": 64}))
    save_file({"transformer.wte.weight": np.zeros((64, 32), dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def test_unsupported_hf_architecture_export(tmp_path):
    from edgespec.export.bundle import export_bundle

    src = make_gpt2_folder(tmp_path / "gpt2-tiny")
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: .*llama.*qwen2") as info:
        export_bundle(str(src), out, log=lambda m: None)
    assert "gemma3" in str(info.value)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_unsupported_architecture_from_the_cli(tmp_path, capsys):
    from edgespec import cli

    src = make_gpt2_folder(tmp_path / "gpt2-tiny")
    rc = cli.main(["export", str(src), "-o", str(tmp_path / "b"), "--no-parity"])
    assert rc == 2
    assert "gpt2" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ---- exports never leave half-written bundles ---------------------------------------------------------------------


def _no_leftovers(parent: Path, name: str) -> None:
    left = [p.name for p in parent.iterdir() if p.name != name]
    assert not [p for p in left if p.endswith(".partial") or ".old-" in p or p.startswith(f".{name}")], left


@pytest.mark.parametrize("exc", [RuntimeError("graph builder exploded"), KeyboardInterrupt()])
def test_export_failing_midway_leaves_nothing(tiny_models, tmp_path, monkeypatch, exc):
    import edgespec.export.bundle as bundle_module

    calls = []

    def broken_build(spec, weights, out_dir, opts, progress=None):
        Path(out_dir, "model.onnx").write_bytes(b"half a graph")
        Path(out_dir, "model.onnx.data").write_bytes(b"\x00" * 1024)
        calls.append(out_dir)
        raise exc

    monkeypatch.setattr(bundle_module, "build_decoder", broken_build)
    parent = tmp_path / "bundles"
    out = parent / "tiny"
    with pytest.raises(type(exc)):
        bundle_module.export_bundle(str(tiny_models["llama"]), out, log=lambda m: None)
    assert calls and ".partial" in calls[0]  # the failure happened inside the temporary folder
    assert not Path(calls[0]).exists()
    assert not out.exists()
    _no_leftovers(parent, "tiny")
    assert list(parent.iterdir()) == []


def test_export_failing_in_the_parity_step_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import edgespec.export.bundle as bundle_module

    def broken_reference(kind, path, progress=None):
        raise RuntimeError("reference model unavailable")

    monkeypatch.setattr(bundle_module.reference, "load_reference_model", broken_reference)
    parent = tmp_path / "bundles"
    with pytest.raises(RuntimeError, match="reference model unavailable"):
        bundle_module.export_bundle(str(tiny_models["qwen2"]), parent / "tiny", log=lambda m: None)
    assert list(parent.iterdir()) == []


def test_export_with_a_broken_source_leaves_nothing(tmp_path):
    from edgespec.export.bundle import export_bundle
    from edgespec.export.sources import SourceError

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    parent = tmp_path / "bundles"
    with pytest.raises(SourceError):
        export_bundle(str(bad), parent / "tiny", log=lambda m: None)
    assert list(parent.iterdir()) == []


def test_export_over_an_existing_bundle(tiny_bundles, tiny_models, tmp_path, monkeypatch):
    import edgespec.export.bundle as bundle_module

    parent = tmp_path / "bundles"
    parent.mkdir()
    existing = copy_bundle(tiny_bundles["llama"], parent / "tiny")
    before = tree_snapshot(existing)

    # without force: refused before any work, bundle untouched
    with pytest.raises(bundle_module.ExportError, match="exists.*overwrite=True"):
        bundle_module.export_bundle(str(tiny_models["qwen2"]), existing, log=lambda m: None)
    assert tree_snapshot(existing) == before
    _no_leftovers(parent, "tiny")

    # with force but failing half-way: the old bundle survives intact and still loads
    def broken_build(spec, weights, out_dir, opts, progress=None):
        Path(out_dir, "model.onnx").write_bytes(b"half a graph")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundle_module, "build_decoder", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        bundle_module.export_bundle(str(tiny_models["qwen2"]), existing, overwrite=True, log=lambda m: None)
    assert tree_snapshot(existing) == before
    _no_leftovers(parent, "tiny")
    assert [p.name for p in parent.iterdir()] == ["tiny"]
    assert load(existing).generate("Hi", max_new_tokens=3, ignore_eos=True).token_ids


def test_cli_export_over_existing_bundle_without_force(tiny_bundles, tiny_models, tmp_path, capsys):
    from edgespec import cli

    existing = copy_bundle(tiny_bundles["gemma3"], tmp_path / "tiny")
    before = tree_snapshot(existing)
    rc = cli.main(["export", str(tiny_models["gemma3"]), "-o", str(existing), "--no-parity"])
    assert rc == 2
    assert "--force" in capsys.readouterr().err
    assert tree_snapshot(existing) == before
