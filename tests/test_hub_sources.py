"""Hugging Face Hub sources (`hf:owner/repo[/file.gguf]`) and the GGUF byte-level tokenizer built without transformers.

No network: huggingface_hub's download functions are replaced by local stand-ins that lay files out as its cache
does (snapshots/<commit>/...), or HF_HUB_OFFLINE makes the real ones look only at the (empty) local cache. Tests
marked `real` compare the GGUF-built tokenizers with transformers' on the real models' files.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgespec.export import sources
from edgespec.export.gguf_tokenizer import UnsupportedTokenizer, byte_alphabet, byte_level_bpe_from_gguf

from conftest import CORPUS, build_tiny_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SourceError = sources.SourceError


def gguf_bytes(arch: str = "llama") -> bytes:
    """A minimal valid GGUF v3 file: no tensors, one metadata key (general.architecture)."""
    key, val = b"general.architecture", arch.encode()
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 8)
            + struct.pack("<Q", len(val)) + val)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A stand-in Hub: repos under tmp/remote/<owner>/<repo>/..., downloaded into tmp/cache/snapshots/<commit>/
    by replacements of hf_hub_download / snapshot_download that record their arguments."""
    import huggingface_hub
    from huggingface_hub import errors

    remote, cache = tmp_path / "remote", tmp_path / "cache"
    calls = []

    def repo_folder(repo_id: str) -> Path:
        folder = remote / repo_id
        if not folder.is_dir():
            raise errors.LocalEntryNotFoundError(f"{repo_id} is not cached")
        return folder

    def hf_hub_download(repo_id, filename, *, revision=None, local_files_only=False, **kwargs):
        calls.append(("file", repo_id, filename, revision, local_files_only, kwargs))
        source = repo_folder(repo_id) / filename
        if not source.is_file():
            raise errors.LocalEntryNotFoundError(f"{filename} is not cached")
        dest = cache / "snapshots" / COMMIT / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())
        return str(dest)

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append(("folder", repo_id, allow_patterns, revision, local_files_only, kwargs))
        import fnmatch

        dest = cache / "snapshots" / COMMIT
        for path in repo_folder(repo_id).rglob("*"):
            rel = path.relative_to(remote / repo_id).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                (dest / rel).write_bytes(path.read_bytes())
        dest.mkdir(parents=True, exist_ok=True)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return remote, calls


# ----------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, repo, revision, filename", [
    ("hf:Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", None, None),
    ("hf:bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf",
     "bartowski/SmolLM2-135M-Instruct-GGUF", None, "SmolLM2-135M-Instruct-Q4_K_M.gguf"),
    ("hf:o/r@v1.0/sub/dir/m.GGUF", "o/r", "v1.0", "sub/dir/m.GGUF"),
])
def test_hub_ids_parse(text, repo, revision, filename):
    ref = sources.parse_hub_id(text)
    assert (ref.repo_id, ref.revision, ref.filename) == (repo, revision, filename)
    assert str(ref) == text


@pytest.mark.parametrize("text, message", [
    ("hf:justone", "expected hf:owner/repo"),
    ("hf:o/r/model.safetensors", "only a .gguf file"),
    ("hf:o/r//m.gguf", "empty, '.', '..'"),
    ("hf:o/r/../m.gguf", "empty, '.', '..'"),
    ("hf:o/r/a\\b.gguf", "invalid part"),
    ("hf:-o/r", "not a valid Hub name"),
    ("hf:o/r--x", "not a valid Hub name"),
    ("hf:o/r..x", "not a valid Hub name"),
    ("hf:o/" + "r" * 97, "not a valid Hub name"),
    ("hf:o/r@", "revision ''"),
    ("hf:o/r@a:b", "revision 'a:b'"),
])
def test_bad_hub_ids_are_refused_with_the_reason(text, message):
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(".", r"\.").replace("?", r"\?")):
        sources.parse_hub_id(text)


def test_hub_id_length_limit():
    head = "hf:o/r/"
    at_limit = head + "a" * (sources.MAX_HUB_ID_CHARS - len(head) - 5) + ".gguf"
    assert len(at_limit) == sources.MAX_HUB_ID_CHARS
    with pytest.raises(SourceError, match="invalid part"):  # one part over 255 characters: refused, but parsed
        sources.parse_hub_id(at_limit)
    ok = head + "/".join(["a" * 100] * 3) + ".gguf"
    assert sources.parse_hub_id(ok).filename.endswith(".gguf")
    with pytest.raises(SourceError, match=f"at most {sources.MAX_HUB_ID_CHARS}"):
        sources.parse_hub_id(at_limit + "x")


def test_unknown_name_mentions_hub_ids():
    with pytest.raises(ValueError, match="hf:owner/repo"):
        sources.resolve("no-such-model")


# ----------------------------------------------------------------------------------------------------- resolving
def test_hub_gguf_file_resolves_through_hf_hub_download(fake_hub):
    remote, calls = fake_hub
    data = gguf_bytes("llama") + b"\0" * 100
    (remote / "owner/repo-GGUF/sub").mkdir(parents=True)
    (remote / "owner/repo-GGUF/sub/Model-Q4.gguf").write_bytes(data)

    src = sources.resolve("hf:owner/repo-GGUF@main/sub/Model-Q4.gguf")
    assert src.kind == "gguf" and src.name == "Model-Q4" and src.architecture == "llama"
    assert src.sha256 == hashlib.sha256(data).hexdigest() and src.size == len(data)
    assert src.path.name == "Model-Q4.gguf" and src.path.read_bytes() == data
    assert "owner/repo-GGUF" in src.origin and "sub/Model-Q4.gguf" in src.origin and COMMIT in src.origin
    assert calls == [("file", "owner/repo-GGUF", "sub/Model-Q4.gguf", "main", False, {})]
    assert src.to_manifest()["origin"] == src.origin


def test_hub_folder_resolves_through_snapshot_download(fake_hub):
    remote, calls = fake_hub
    repo = remote / "owner/tiny"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (repo / "model.safetensors").write_bytes(b"x")
    (repo / "pytorch_model.bin").write_bytes(b"pickle")  # never downloaded
    (repo / "model-q4.gguf").write_bytes(b"GGUF")  # nor the GGUF variants of a mixed repo

    src = sources.resolve("hf:owner/tiny")
    assert (src.kind, src.name, src.architecture, src.sha256) == ("hf", "tiny", "qwen2", None)
    assert sorted(p.name for p in src.path.iterdir()) == ["config.json", "model.safetensors"]
    kind, repo_id, patterns, revision, local_only, _ = calls[0]
    assert (kind, repo_id, revision, local_only) == ("folder", "owner/tiny", None, False)
    assert set(patterns) == set(sources.HUB_FOLDER_PATTERNS)


def test_hub_folder_without_config_is_explained(fake_hub):
    remote, _ = fake_hub
    (remote / "owner/ggufs").mkdir(parents=True)
    (remote / "owner/ggufs/README.txt").write_text("GGUF files only")
    with pytest.raises(SourceError, match="no config.json"):
        sources.resolve("hf:owner/ggufs")


def test_no_network_is_one_clear_error(fake_hub):
    with pytest.raises(SourceError, match="cannot reach the Hugging Face Hub.*no network") as info:
        sources.resolve("hf:owner/absent/m.gguf")
    assert "hf:owner/absent/m.gguf" in str(info.value)


def test_transport_errors_are_the_same_clear_error(monkeypatch):
    import httpx
    import huggingface_hub

    def fail(*args, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SourceError, match="cannot reach the Hugging Face Hub"):
        sources.resolve("hf:owner/repo")


def test_offline_mode_uses_only_the_local_cache_and_says_so(tmp_path, monkeypatch):
    """The real huggingface_hub functions, HF_HUB_OFFLINE set: no request is made, the message names the setting."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for text in ("hf:edgespec-tests/never-published/m.gguf", "hf:edgespec-tests/never-published"):
        with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set") as info:
            sources.resolve(text)
        assert "not in the local Hugging Face cache" in str(info.value)


def test_offline_mode_passes_local_files_only(fake_hub, monkeypatch):
    remote, calls = fake_hub
    (remote / "o/r").mkdir(parents=True)
    (remote / "o/r/m.gguf").write_bytes(gguf_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.resolve("hf:o/r/m.gguf").kind == "gguf"
    assert calls[-1][4] is True  # local_files_only
    monkeypatch.delenv("HF_HUB_OFFLINE")
    sources.resolve("hf:o/r/m.gguf", download=False)
    assert calls[-1][4] is True


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "gated"), ("RepositoryNotFoundError", "no repository 'o/r'"),
    ("RevisionNotFoundError", "no revision 'v9'"), ("RemoteEntryNotFoundError", "no file 'm.gguf'"),
])
def test_hub_http_errors_are_named(monkeypatch, error, message):
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/o/r"))

    def fail(*args, **kwargs):
        raise getattr(errors, error)("refused", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SourceError, match=message):
        sources.resolve("hf:o/r@v9/m.gguf")


def test_downloaded_file_is_still_checked(fake_hub):
    remote, _ = fake_hub
    (remote / "o/r").mkdir(parents=True)
    (remote / "o/r/bad.gguf").write_bytes(b"not a gguf at all, just text")
    with pytest.raises(SourceError, match="not a GGUF file"):
        sources.resolve("hf:o/r/bad.gguf")


# ----------------------------------------------------------------------------------------------------- tokenizer
def fields_of_tokenizer(path: Path, pre: str | None = "gpt-2") -> dict:
    """GGUF-style tokenizer metadata (as GGUFWeights.fields holds it) of a byte-level BPE tokenizer.json."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
              "tokenizer.ggml.eos_token_id": 0}
    if pre is not None:
        fields["tokenizer.ggml.pre"] = pre
    return fields


def test_gguf_tokenizer_matches_the_original_on_a_tiny_vocabulary(tmp_path):
    from tokenizers import Tokenizer

    build_tiny_tokenizer(tmp_path / "tokenizer.json")
    original = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    built = byte_level_bpe_from_gguf(fields_of_tokenizer(tmp_path / "tokenizer.json"))
    texts = CORPUS[:3] + ["<|im_start|>user\nHi<|im_end|>", "  two  spaces\n\n\ttab", "ünïcödé 日本 🙂", ""]
    for text in texts:
        ids = original.encode(text, add_special_tokens=False).ids
        assert built.encode(text, add_special_tokens=False).ids == ids, text
        assert built.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    assert built.token_to_id("<|im_end|>") == original.token_to_id("<|im_end|>")
    assert {t.content for t in built.get_added_tokens_decoder().values()} == \
        {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_gguf_tokenizer_refuses_what_it_does_not_build(tmp_path):
    build_tiny_tokenizer(tmp_path / "tokenizer.json")
    fields = fields_of_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(UnsupportedTokenizer, match="'llama'"):
        byte_level_bpe_from_gguf({**fields, "tokenizer.ggml.model": "llama"})
    with pytest.raises(UnsupportedTokenizer, match="pre-tokenizer 'tekken'"):
        byte_level_bpe_from_gguf({**fields, "tokenizer.ggml.pre": "tekken"})
    with pytest.raises(ValueError, match=r"merges\[1\] is not two tokens"):
        byte_level_bpe_from_gguf({**fields, "tokenizer.ggml.merges": ["a b", "abc"]})
    with pytest.raises(ValueError, match="token_type has 1 entries"):
        byte_level_bpe_from_gguf({**fields, "tokenizer.ggml.token_type": [1]})
    assert len(set(byte_alphabet().values())) == 256


def test_unsupported_gguf_tokenizer_without_transformers_names_the_extra(tmp_path, monkeypatch):
    from edgespec.export import reference

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    model = tmp_path / "m.gguf"
    model.write_bytes(gguf_bytes())
    with pytest.raises(ImportError, match=r"tokenizer.ggml.model 'llama'.*pip install 'edgespec\[export\]'") as info:
        reference.save_tokenizer_json("gguf", model, tmp_path / "tokenizer.json",
                                      gguf_fields={"tokenizer.ggml.model": "llama"})
    assert info.value.name == "transformers"
    assert not (tmp_path / "tokenizer.json").exists()


# ----------------------------------------------------------------------------------------------------- real models
REAL_TEXTS = CORPUS[:3] + [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "Numbers 1234567890 3.14159 -42 1e-9, dates 2024-12-31, ids 0xDEADBEEF",
    "   leading spaces\ttabs\r\nCRLF\n\n\nblank lines   trailing   ",
    "Émigré façade coöperate naïve — “quotes” ‘single’ … ½ ≠ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "中文测试，日本語のテキスト、한국어 텍스트 and emoji 👩‍💻🚀🇩🇪",
    "<tool_call>{\"name\": \"f\"}</tool_call> <|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
    "I'm sure they'll say it's what we've done; DON'T SHOUT'S",
    "",
]


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_real_gguf_tokenizer_equals_transformers(name, tmp_path):
    from tokenizers import Tokenizer

    from edgespec.export import reference
    from edgespec.export.weights import GGUFWeights

    gguf = sources.resolve(name).path
    built = byte_level_bpe_from_gguf(GGUFWeights(gguf).fields)
    reference_file = tmp_path / "transformers.json"
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).backend_tokenizer.save(str(reference_file))
    assert json.loads(built.to_str()) == json.loads(reference_file.read_text())  # the same tokenizer, field by field
    expected = Tokenizer.from_file(str(reference_file))
    for text in REAL_TEXTS:
        ids = expected.encode(text, add_special_tokens=False).ids
        assert built.encode(text, add_special_tokens=False).ids == ids, text
        assert built.decode(ids, skip_special_tokens=False) == text
    # and the exporter's entry point writes it without transformers' help
    reference.save_tokenizer_json("gguf", gguf, tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads(reference_file.read_text())


@pytest.mark.real
def test_real_gemma_tokenizer_still_goes_through_transformers(tmp_path):
    from edgespec.export import reference
    from edgespec.export.weights import GGUFWeights

    gguf = sources.resolve("gemma3-270m").path
    fields = GGUFWeights(gguf).fields
    with pytest.raises(UnsupportedTokenizer, match="'llama'"):
        byte_level_bpe_from_gguf(fields)
    reference.save_tokenizer_json("gguf", gguf, tmp_path / "tokenizer.json", gguf_fields=fields)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] in ("BPE", "Unigram")


PULL_WITHOUT_TORCH = textwrap.dedent("""
    import sys

    BLOCKED = {"torch", "transformers", "accelerate", "peft"}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    import edgespec.engine
    from edgespec import store

    bundle = store.pull("smollm2-135m", drafters=())
    engine = edgespec.engine.load(str(store.ensure_bundle("smollm2-135m")), threads=1)
    result = engine.generate("def fib(n):", max_new_tokens=8, ignore_eos=True)
    assert len(result.token_ids) == 8
    print("PULLED", bundle, result.token_ids)
    assert not [n for n in sys.modules if n.split(".")[0] in BLOCKED]
""")


@pytest.mark.real
def test_real_pull_needs_no_torch(tmp_path):
    """`pull smollm2-135m` (GGUF cached from earlier runs or fetched) with torch and transformers unimportable."""
    sources.resolve("smollm2-135m")  # fetched here, with everything importable, when not cached yet
    env = {**os.environ, "EDGESPEC_BUNDLES": str(tmp_path / "bundles")}
    proc = subprocess.run([sys.executable, "-c", PULL_WITHOUT_TORCH], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"PULLED {tmp_path / 'bundles' / 'smollm2-135m'}" in proc.stdout
    tokenizer = json.loads((tmp_path / "bundles/smollm2-135m/smollm2-135m/tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE" and len(tokenizer["model"]["vocab"]) == 49152
