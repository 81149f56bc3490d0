"""The managed model store (edgespec.store): pull, ensure_bundle, list_models, remove and their CLI.

The known short names are pointed at the tiny random models of conftest (through the exporter's `resolve`), so every
pull here is a real export into the store, only of tiny models and without the parity check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import pytest

from edgespec import store
from edgespec.store import StoreError


@pytest.fixture
def store_dirs(tmp_path, monkeypatch):
    """A private store ($EDGESPEC_BUNDLES) and GGUF cache ($EDGESPEC_CACHE)."""
    monkeypatch.setenv("EDGESPEC_BUNDLES", str(tmp_path / "bundles"))
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    return tmp_path / "bundles", tmp_path / "models"


@pytest.fixture
def tiny_sources(tiny_models, store_dirs, monkeypatch):
    """Known names resolve to tiny HF folders (the 1.5B and 0.5B to tiny Qwen2s, SmolLM2 to a tiny Llama); returns
    the list of names the exporter resolved."""
    from edgespec.export import bundle, sources

    folders = {"qwen2.5-coder-1.5b": tiny_models["qwen2"], "qwen2.5-coder-0.5b": tiny_models["qwen2"],
               "smollm2-135m": tiny_models["llama"], "gemma3-270m": tiny_models["gemma3"]}
    resolved = []

    def resolve(name, cache_dir=None, **kwargs):
        resolved.append(name)
        return dataclasses.replace(sources.resolve(str(folders[name])), name=name)

    monkeypatch.setattr(bundle, "resolve", resolve)
    return resolved


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def leftovers(root: Path) -> list[str]:
    """Everything in the store folder but bundles and lock files."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


# ----------------------------------------------------------------------------------------------------- names
def test_names_are_bounded_and_never_paths():
    assert store.validate_name("a" * store.MAX_NAME_CHARS)
    for bad in ("", "a" * (store.MAX_NAME_CHARS + 1), "a/b", "a\\b", "..", "a..b", ".hidden", "-x", "x y", "~x"):
        with pytest.raises(StoreError):
            store.validate_name(bad)


def test_store_names_of_sources():
    assert store.bundle_name_for("smollm2-135m") == "smollm2-135m"
    assert store.bundle_name_for("hf:Qwen/Qwen2.5-0.5B-Instruct") == "Qwen--Qwen2.5-0.5B-Instruct"
    assert store.bundle_name_for("hf:o/r@v2/sub/M-Q4.gguf") == "o--r--at-v2--sub--M-Q4"
    respelled = store.bundle_name_for("hf:o/r/my model.gguf")
    assert respelled.startswith("o--r--my-model-") and len(respelled) == len("o--r--my-model-") + 16
    long_a = "hf:o/r/" + "/".join(["a" * 90] * 4) + ".gguf"
    long_b = long_a.replace("a.gguf", "b.gguf")
    name_a, name_b = store.bundle_name_for(long_a), store.bundle_name_for(long_b)
    assert len(name_a) == store.MAX_NAME_CHARS and name_a != name_b and store.bundle_name_for(long_a) == name_a
    with pytest.raises(StoreError, match="known models: .*smollm2-135m"):
        store.bundle_name_for("llama-7b")
    with pytest.raises(StoreError, match="only a .gguf file"):
        store.bundle_name_for("hf:o/r/weights.bin")
    with pytest.raises(StoreError, match=f"at most {store.MAX_SOURCE_CHARS}"):
        store.bundle_name_for("hf:o/" + "r" * store.MAX_SOURCE_CHARS)


def test_store_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGESPEC_BUNDLES", raising=False)
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "c"))
    assert store.bundles_dir() == tmp_path / "c" / "bundles"
    monkeypatch.setenv("EDGESPEC_BUNDLES", str(tmp_path / "b"))
    assert store.bundles_dir() == tmp_path / "b"
    monkeypatch.delenv("EDGESPEC_BUNDLES")
    monkeypatch.delenv("EDGESPEC_CACHE")
    assert store.bundles_dir() == Path.home() / ".cache" / "edgespec" / "bundles"


# ----------------------------------------------------------------------------------------------------- pull
def test_pull_exports_the_target_with_its_default_drafters(tiny_sources, store_dirs):
    from edgespec.engine import load

    bundles, _ = store_dirs
    assert store.DEFAULT_DRAFTERS["qwen2.5-coder-1.5b"] == ("smollm2-135m",)
    dest = store.pull("qwen2.5-coder-1.5b")
    assert dest == bundles / "qwen2.5-coder-1.5b"
    assert tiny_sources == ["qwen2.5-coder-1.5b", "smollm2-135m"]
    manifest = manifest_of(dest)
    assert manifest["target"] == "qwen2.5-coder-1.5b"
    assert {n: m["role"] for n, m in manifest["models"].items()} == {"qwen2.5-coder-1.5b": "target",
                                                                    "smollm2-135m": "drafter"}
    assert "accuracy" not in manifest["models"]["qwen2.5-coder-1.5b"]  # no parity check by default
    assert leftovers(bundles) == []
    engine = load(str(dest), threads=1)
    try:
        assert len(engine.generate("def add(a, b):", max_new_tokens=4, ignore_eos=True).token_ids) == 4
    finally:
        engine.close()


def test_pull_keeps_a_bundle_unless_forced(tiny_sources, store_dirs):
    dest = store.pull("smollm2-135m")
    assert tiny_sources == ["smollm2-135m"]  # no default drafters for the smallest model
    stamp = (dest / "manifest.json").stat().st_mtime_ns
    messages = []
    assert store.pull("smollm2-135m", log=messages.append) == dest
    assert tiny_sources == ["smollm2-135m"] and "already exported" in messages[0]
    assert store.pull("smollm2-135m", force=True) == dest
    assert tiny_sources == ["smollm2-135m"] * 2
    assert (dest / "manifest.json").stat().st_mtime_ns != stamp


def test_pull_takes_explicit_drafters_or_none(tiny_sources, store_dirs):
    dest = store.pull("qwen2.5-coder-0.5b", drafters=["smollm2-135m"])
    assert set(manifest_of(dest)["models"]) == {"qwen2.5-coder-0.5b", "smollm2-135m"}
    dest = store.pull("qwen2.5-coder-1.5b", drafters=())
    assert set(manifest_of(dest)["models"]) == {"qwen2.5-coder-1.5b"}


def test_pull_refuses_bad_names_before_doing_anything(store_dirs):
    bundles, _ = store_dirs
    with pytest.raises(StoreError, match="unknown model"):
        store.pull("../etc")
    with pytest.raises(StoreError, match="unknown model"):
        store.pull("smollm2-135m", drafters=["/tmp/x.gguf"])
    with pytest.raises(StoreError, match=f"at most {store.MAX_PULL_DRAFTERS} drafters"):
        store.pull("smollm2-135m", drafters=["smollm2-135m"] * (store.MAX_PULL_DRAFTERS + 1))
    assert not bundles.exists()


def test_an_interrupted_pull_leaves_no_bundle(tiny_sources, store_dirs, monkeypatch):
    from edgespec.export import bundle

    bundles, _ = store_dirs
    real_build = bundle.build_decoder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle, "build_decoder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.pull("smollm2-135m")
    assert not (bundles / "smollm2-135m").exists() and leftovers(bundles) == []
    assert [r.name for r in store.list_models() if r.exported_bytes is not None] == []

    (bundles / ".smollm2-135m.k1ll3d_x.partial" / "smollm2-135m").mkdir(parents=True)  # as a SIGKILL leaves it
    (bundles / ".smollm2-135m.v2.k1ll3d_x.partial").mkdir()  # another name's ("smollm2-135m.v2"): kept
    monkeypatch.setattr(bundle, "build_decoder", real_build)
    assert store.is_bundle(store.pull("smollm2-135m"))
    assert leftovers(bundles) == [".smollm2-135m.v2.k1ll3d_x.partial"]


def test_concurrent_pulls_of_one_name_export_once(tiny_sources, store_dirs, monkeypatch):
    from edgespec.export import bundle

    real_export = bundle.export_bundle
    exports = []

    def slow_export(*args, **kwargs):
        exports.append(args[1])
        time.sleep(0.5)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(bundle, "export_bundle", slow_export)
    results, errors = [], []

    def run():
        try:
            results.append(store.pull("smollm2-135m"))
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert len(exports) == 1


# ----------------------------------------------------------------------------------------------------- ensure
def test_ensure_bundle_returns_a_bundle_folder_as_is(tiny_bundles, store_dirs, tmp_path):
    assert store.ensure_bundle(tiny_bundles["qwen2"]) == tiny_bundles["qwen2"]
    assert store.ensure_bundle(str(tiny_bundles["llama"])) == tiny_bundles["llama"]
    (tmp_path / "not-a-bundle").mkdir()
    with pytest.raises(StoreError, match="not a bundle folder"):
        store.ensure_bundle(tmp_path / "not-a-bundle")
    with pytest.raises(StoreError, match="no such bundle folder"):
        store.ensure_bundle(str(tmp_path / "absent"))


def test_ensure_bundle_pulls_a_known_name_once(tiny_sources, store_dirs, capfd):
    bundles, _ = store_dirs
    first = store.ensure_bundle("smollm2-135m")
    assert first == bundles / "smollm2-135m" and store.is_bundle(first)
    assert "not exported yet" in capfd.readouterr().err
    assert store.ensure_bundle("smollm2-135m") == first
    assert tiny_sources == ["smollm2-135m"]  # the second call found it


def test_ensure_bundle_finds_other_bundles_of_the_store(tiny_bundles, store_dirs):
    import shutil

    bundles, _ = store_dirs
    shutil.copytree(tiny_bundles["gemma3"], bundles / "my-gemma")
    assert store.ensure_bundle("my-gemma") == bundles / "my-gemma"
    with pytest.raises(StoreError, match="unknown model 'my-gemmaa'.*smollm2-135m"):
        store.ensure_bundle("my-gemmaa")
    with pytest.raises(StoreError, match="unknown model"):
        store.ensure_bundle("x" * (store.MAX_NAME_CHARS + 1))


# ----------------------------------------------------------------------------------------------------- list, rm
def test_list_models_reports_downloads_and_exports(tiny_sources, tiny_bundles, store_dirs):
    import shutil

    from edgespec.export import sources

    bundles, models = store_dirs
    rows = {r.name: r for r in store.list_models()}
    assert set(rows) == set(sources.MODELS)
    assert all(r.downloaded_bytes is None and r.exported_bytes is None for r in rows.values())

    (models / "gemma3-270m.gguf").write_bytes(b"GGUF" + b"\0" * 96)  # an incomplete download
    dest = store.pull("smollm2-135m")
    shutil.copytree(tiny_bundles["qwen2"], bundles / "mine")
    (bundles / "empty-folder").mkdir()
    (bundles / ".mine.x.partial").mkdir()
    rows = {r.name: r for r in store.list_models()}
    assert set(rows) == set(sources.MODELS) | {"mine"}
    assert rows["gemma3-270m"].downloaded_bytes == 100 and not rows["gemma3-270m"].gguf_complete
    on_disk = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert rows["smollm2-135m"].exported_bytes == on_disk > 0 and rows["smollm2-135m"].bundle == str(dest)
    assert not rows["mine"].known and rows["mine"].description.startswith("tiny-qwen2")
    table = store.models_table(list(rows.values()))
    assert "smollm2-135m" in table and "100 B*" in table and "incomplete" in table


def test_remove_deletes_bundles_and_optionally_the_gguf(tiny_sources, store_dirs):
    bundles, models = store_dirs
    dest = store.pull("smollm2-135m")
    (models / "smollm2-135m.gguf").write_bytes(b"GGUF")
    (models / "smollm2-135m.gguf.json").write_text("{}")
    assert store.remove("smollm2-135m") == [dest]
    assert not dest.exists() and leftovers(bundles) == [] and (models / "smollm2-135m.gguf").exists()
    with pytest.raises(StoreError, match="no bundle of 'smollm2-135m'.*--gguf"):
        store.remove("smollm2-135m")
    assert store.remove("smollm2-135m", gguf=True) == [models / "smollm2-135m.gguf", models / "smollm2-135m.gguf.json"]
    with pytest.raises(StoreError, match="invalid model name"):
        store.remove("../bundles")
    with pytest.raises(StoreError, match="no bundle of 'nothing-here'"):
        store.remove("nothing-here")


# ----------------------------------------------------------------------------------------------------- CLI
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgespec")
    sub = parser.add_subparsers(dest="command", required=True)
    store.register_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_pull_models_rm(tiny_sources, store_dirs, capsys):
    bundles, _ = store_dirs
    assert run_cli(["pull", "qwen2.5-coder-1.5b", "--no-drafters"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(bundles / "qwen2.5-coder-1.5b")
    assert tiny_sources == ["qwen2.5-coder-1.5b"]

    assert run_cli(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "downloaded", "exported"]
    row = next(line for line in lines if line.startswith("qwen2.5-coder-1.5b"))
    assert row.split()[1] == "-" and "Qwen2.5-Coder-1.5B" in row

    assert run_cli(["models", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["qwen2.5-coder-1.5b"]["bundle"] == str(bundles / "qwen2.5-coder-1.5b")

    assert run_cli(["rm", "qwen2.5-coder-1.5b"]) == 0
    assert "removed" in capsys.readouterr().err and not (bundles / "qwen2.5-coder-1.5b").exists()


def test_cli_models_fetch_prints_the_gguf_path(tmp_path, capsys):
    import struct

    key, val = b"general.architecture", b"llama"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<I", 8) + struct.pack("<Q", len(val)) + val)
    assert run_cli(["models", "--fetch", str(gguf)]) == 0
    assert capsys.readouterr().out.strip() == str(gguf.resolve())


def test_cli_limits(store_dirs, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(["pull", "x" * (store.MAX_SOURCE_CHARS + 1)])
    assert info.value.code == 2
    too_many = [arg for _ in range(store.MAX_PULL_DRAFTERS + 1) for arg in ("--drafter", "smollm2-135m")]
    with pytest.raises(SystemExit):
        run_cli(["pull", "smollm2-135m", *too_many])
    assert f"at most {store.MAX_PULL_DRAFTERS} values" in capsys.readouterr().err
    with pytest.raises(StoreError, match="unknown model"):
        run_cli(["pull", "no-such-model"])
    with pytest.raises(StoreError, match="only a .gguf file"):
        run_cli(["rm", "hf:o/r/x.txt"])


def test_store_import_is_light():
    """`import edgespec.store` loads no exporter dependency (the runtime imports it for `edgespec run MODEL`)."""
    import subprocess
    import sys

    code = ("import sys, edgespec.store; heavy = [m for m in ('torch', 'transformers', 'onnx', 'gguf', "
            "'huggingface_hub', 'edgespec.export.bundle') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
