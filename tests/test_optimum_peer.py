"""The optimum bench peer (edgespec/bench/peers/optimum.py, its generation process optimum_runner.py and
tools/optimum_peer/prepare.py): why it is skipped, the commands it builds, the runner's protocol, and (marked `real`,
skipped without the optimum environment of tools/optimum_peer/setup.sh) real generation through optimum-onnx."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgespec.bench import run_job
from edgespec.bench.peers import PEER_JOBS, PEERS, optimum, optimum_runner, peer_job

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "tools" / "optimum_peer" / "prepare.py"
REAL_GGUF = Path.home() / ".cache" / "edgespec" / "models" / "qwen2.5-coder-1.5b.gguf"
REAL_VENV = Path(os.environ.get("EDGESPEC_OPTIMUM_VENV") or Path.home() / ".cache" / "edgespec" / "optimum-venv")


def load_prepare():
    """tools/optimum_peer/prepare.py as a module (it imports only the standard library at the top)."""
    spec = importlib.util.spec_from_file_location("optimum_prepare", PREPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def optimum_home(tmp_path, monkeypatch):
    """The peer's folders moved under tmp_path (a venv that does not exist yet, an empty models folder)."""
    monkeypatch.setenv("EDGESPEC_OPTIMUM_VENV", str(tmp_path / "venv"))
    monkeypatch.setenv("EDGESPEC_OPTIMUM_MODELS", str(tmp_path / "models"))
    return tmp_path


def fake_venv(root: Path) -> Path:
    """A "virtual environment" whose python is this interpreter (which has no optimum)."""
    python = root / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    return python


def write_marker(source: Path, **changes) -> Path:
    """A prepared export of `source` as prepare.py records it (its source identity, optionally changed)."""
    folder = optimum.export_dir(source)
    folder.mkdir(parents=True)
    identity = {**load_prepare().source_identity(source), **changes}
    (folder / optimum.MARKER).write_text(json.dumps({"format": "edgespec-optimum-peer", "source": identity}))
    return folder


def test_the_peer_is_registered():
    assert "optimum" in PEERS and PEER_JOBS["optimum"] is optimum.run_optimum_job
    assert optimum.MARKER == load_prepare().MARKER  # both sides agree on the finished-export file


def test_model_name_and_export_dir(optimum_home):
    assert optimum.model_name("/m/qwen2.5-coder-1.5b.gguf") == "qwen2.5-coder-1.5b"
    assert optimum.model_name("/m/Tiny.GGUF") == "Tiny"
    assert optimum.model_name("/m/hf-folder") == "hf-folder"
    assert optimum.export_dir("/m/x.gguf") == optimum_home / "models" / "x" / "int4"


def test_default_folders_are_under_the_edgespec_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGESPEC_OPTIMUM_VENV", raising=False)
    monkeypatch.delenv("EDGESPEC_OPTIMUM_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert optimum.venv_python() == tmp_path / ".cache" / "edgespec" / "optimum-venv" / "bin" / "python"
    assert optimum.export_dir("a.gguf") == tmp_path / ".cache" / "edgespec" / "peers" / "optimum" / "a" / "int4"


def test_missing_names_the_venv_and_the_setup_script(optimum_home):
    reason = optimum.missing()
    assert str(optimum_home / "venv") in reason and "tools/optimum_peer/setup.sh" in reason
    fake_venv(optimum_home)
    assert optimum.missing() is None


def test_unsuitable_without_an_export_says_how_to_make_it(optimum_home, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    reason = optimum.unsuitable(str(source))
    assert "no optimum-onnx int4 export of m" in reason and f"setup.sh {source}" in reason
    folder = optimum.export_dir(source)
    folder.mkdir(parents=True)  # an unfinished export (no marker) is not taken
    assert "no optimum-onnx int4 export" in optimum.unsuitable(str(source))


def test_unsuitable_accepts_a_matching_export_and_refuses_a_stale_one(optimum_home, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    write_marker(source)
    assert optimum.unsuitable(str(source)) is None
    source.write_bytes(b"GGUF, other weights")
    reason = optimum.unsuitable(str(source))
    assert "made from other weights" in reason and "size" in reason and "--force" in reason


def test_unsuitable_refuses_a_bad_marker_at_its_size_limit(optimum_home, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    folder = write_marker(source)
    marker = folder / optimum.MARKER
    text = marker.read_text()
    marker.write_text(text + " " * (optimum.MAX_MARKER_BYTES - len(text)))  # exactly at the limit: read
    assert optimum.unsuitable(str(source)) is None
    marker.write_text(text + " " * (optimum.MAX_MARKER_BYTES - len(text) + 1))
    assert "optimum peer marker" in optimum.unsuitable(str(source))
    marker.write_text("[1, 2]")
    assert "not a JSON object" in optimum.unsuitable(str(source))
    marker.write_text("{not json")
    assert "is not valid JSON" in optimum.unsuitable(str(source))


def test_runner_command_is_isolated_and_carries_threads_and_pad(optimum_home):
    command = optimum.runner_command("/v/bin/python", "/m/int4", 2, 151643)
    assert command[:3] == ["/v/bin/python", "-I", str(optimum.RUNNER)]
    assert optimum.RUNNER.is_file() and optimum.RUNNER.parent == Path(optimum.__file__).parent
    assert command[3:] == ["--model", "/m/int4", "--threads", "2", "--pad-token-id", "151643"]
    assert optimum.runner_command("p", "m", 1, None)[-1] == "0"


def test_peer_job_is_skipped_with_the_reason(optimum_home, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    args = argparse.Namespace(peer_model=str(source), max_new_tokens=4, max_context=64, warmup=0)
    prompts = [{"question_id": 1, "category": "c", "ids": [1, 2, 3]}]
    assert "is not set up" in peer_job("optimum", args, prompts, 1, {}, 64)
    fake_venv(optimum_home)
    assert "no optimum-onnx int4 export" in peer_job("optimum", args, prompts, 1, {}, 64)
    write_marker(source)
    job = peer_job("optimum", args, prompts, 1, {"pad_token_id": 7}, 64)
    assert (job["kind"], job["source_path"], job["pad_token_id"]) == ("optimum", str(source), 7)


def test_a_runner_that_cannot_load_fails_the_peer_with_its_error(optimum_home, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    fake_venv(optimum_home)  # this interpreter has no optimum: the real runner reports why it cannot load
    write_marker(source)
    job = {"kind": "optimum", "source_path": str(source), "threads": 1, "max_new_tokens": 2, "warmup": 0,
           "prompts": [{"question_id": 1, "category": "c", "ids": [1, 2]}], "pad_token_id": 0}
    result = run_job(job)
    assert result["status"] == "failed" and result["rows"] == []
    assert "cannot load" in result["note"] and "optimum" in result["note"]


def test_run_job_keeps_the_peak_memory_a_job_reports(monkeypatch):
    from edgespec.bench import run as bench_run

    monkeypatch.setitem(bench_run.JOBS, "optimum", lambda job: {"status": "ok", "rows": [], "peak_rss_mb": 1234.0})
    assert run_job({"kind": "optimum"})["peak_rss_mb"] == 1234.0


# ---- the generation process -----------------------------------------------------------------------------------------
def test_parse_request_accepts_ids_and_count_and_refuses_the_rest():
    assert optimum_runner.parse_request('{"ids": [1, 2, 3], "n": 4}') == ([1, 2, 3], 4)
    limit = optimum_runner.MAX_NEW_TOKENS
    assert optimum_runner.parse_request(json.dumps({"ids": [1], "n": limit})) == ([1], limit)
    for line, match in (("[1]", "JSON object"), ('{"ids": [], "n": 1}', "non-empty"),
                        ('{"ids": [1, -2], "n": 1}', "token ids"), ('{"ids": [1.5], "n": 1}', "token ids"),
                        ('{"ids": [1], "n": 0}', "from 1 to"), ('{"ids": [1], "n": true}', "from 1 to"),
                        ('{"ids": [1]}', "from 1 to"), ("{", "Expecting"),
                        (json.dumps({"ids": [1], "n": optimum_runner.MAX_NEW_TOKENS + 1}), "from 1 to")):
        with pytest.raises(ValueError, match=match):
            optimum_runner.parse_request(line)


def test_parse_request_size_limit():
    base = '{"ids": [1], "n": 1}'
    at_limit = base + " " * (optimum_runner.MAX_REQUEST_BYTES - len(base))
    assert optimum_runner.parse_request(at_limit) == ([1], 1)
    with pytest.raises(ValueError, match="over"):
        optimum_runner.parse_request(at_limit + " ")


class CountingModel:
    """A stand-in for ORTModelForCausalLM.generate: notes the config, streams the prompt then each new token, and
    answers token ids counting up from the last prompt id."""

    def __init__(self):
        self.configs = []

    def generate(self, input_ids, attention_mask, generation_config, streamer):
        import torch

        self.configs.append(generation_config)
        assert attention_mask.shape == input_ids.shape and int(attention_mask.sum()) == input_ids.numel()
        n = generation_config.max_new_tokens
        new = torch.arange(1, n + 1, dtype=torch.long)[None] + input_ids[0, -1]
        streamer.put(input_ids)
        for i in range(n):
            streamer.put(new[:, i])
        streamer.end()
        return torch.cat([input_ids, new], dim=1)


def test_serve_generates_exactly_n_greedy_tokens_per_request():
    pytest.importorskip("transformers")
    model, replies = CountingModel(), []
    optimum_runner.serve(model, 5, ['{"ids": [10, 11], "n": 3}\n', "\n", '{"ids": [4], "n": 1}\n'], replies.append)
    assert [r["output_ids"] for r in replies] == [[12, 13, 14], [5]]
    stats = replies[0]["stats"]
    assert (stats["prompt_tokens"], stats["new_tokens"]) == (2, 3)
    assert 0 <= stats["time_to_first_token"] <= stats["total_seconds"] and replies[0]["peak_rss_mb"] > 0
    config = model.configs[0]
    assert (config.do_sample, config.eos_token_id, config.min_new_tokens, config.pad_token_id) == (False, None, 3, 5)


def test_serve_ends_at_a_bad_request_with_an_error():
    pytest.importorskip("transformers")
    replies = []
    optimum_runner.serve(CountingModel(), 0, ['{"ids": [1], "n": 2}', '{"ids": "x", "n": 2}', '{"ids": [1], "n": 2}'],
                         replies.append)
    assert len(replies) == 2 and replies[0]["output_ids"] == [2, 3] and "bad request" in replies[1]["error"]


def test_runner_thread_count_limits():
    assert optimum_runner.thread_count("1") == 1
    assert optimum_runner.thread_count(str(optimum_runner.MAX_THREADS)) == optimum_runner.MAX_THREADS
    for text in ("0", str(optimum_runner.MAX_THREADS + 1), "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            optimum_runner.thread_count(text)


def test_prepare_refuses_bad_sources_and_settings(tmp_path, capsys):
    prepare = load_prepare()
    (tmp_path / "w.bin").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    for argv, match in (([str(tmp_path / "nope.gguf")], "not found"), ([str(tmp_path / "w.bin")], "not a .gguf"),
                        ([str(tmp_path / "folder")], "no config.json"),
                        ([str(tmp_path / "folder"), "--block-size", "24"], "power of two"),
                        ([str(tmp_path / "folder"), "--block-size", "512"], "power of two"),
                        ([str(tmp_path / "folder"), "--accuracy-level", "5"], "0 to 4")):
        with pytest.raises(SystemExit):
            prepare.parse_args(argv + ["--out", str(tmp_path / "out")])
        assert match in capsys.readouterr().err
    (tmp_path / "folder" / "config.json").write_text("{}")
    args = prepare.parse_args([str(tmp_path / "folder"), "--out", str(tmp_path / "out"), "--block-size", "256"])
    assert (args.block_size, args.accuracy_level) == (256, 4)
    assert prepare.block_size("16") == 16


# ---- real: the optimum environment of tools/optimum_peer/setup.sh ---------------------------------------------------
needs_venv = pytest.mark.skipif(not (REAL_VENV / "bin" / "python").is_file(),
                                reason=f"no optimum environment at {REAL_VENV} (run tools/optimum_peer/setup.sh)")


@pytest.mark.real
@needs_venv
def test_prepare_and_generate_a_tiny_model_through_optimum(tmp_path, monkeypatch):
    """The whole pipeline on a tiny random Qwen2 folder: optimum-onnx export, int4 by MatMulNBitsQuantizer, then
    the peer generates exactly N tokens, the same for the same prompt."""
    from conftest import make_tiny_model

    monkeypatch.setenv("EDGESPEC_OPTIMUM_VENV", str(REAL_VENV))
    monkeypatch.setenv("EDGESPEC_OPTIMUM_MODELS", str(tmp_path / "models"))
    source = make_tiny_model("qwen2", tmp_path / "tiny-qwen2")
    out = optimum.export_dir(source).parent
    subprocess.run([str(REAL_VENV / "bin" / "python"), "-I", str(PREPARE), str(source), "--out", str(out)],
                   check=True, timeout=600)
    assert optimum.unsuitable(str(source)) is None
    marker = optimum.read_marker(optimum.export_dir(source))
    settings = marker["quantization"]
    assert (settings["block_size"], settings["accuracy_level"], settings["float_weight_matmuls_left"]) == (32, 4, 0)
    assert settings["matmulnbits_nodes"] == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    assert not (out / "work").exists() and not (out / "int4.partial").exists()
    prompts = [{"question_id": q, "category": "c", "ids": [5, 6, 7, 8]} for q in (1, 2)]
    result = run_job({"kind": "optimum", "source_path": str(source), "threads": 1, "max_new_tokens": 6,
                      "warmup": 1, "prompts": prompts, "pad_token_id": 0})
    assert result["status"] == "ok", result.get("note")
    rows = result["rows"]
    assert [r["new_tokens"] for r in rows] == [6, 6] and rows[0]["output_ids"] == rows[1]["output_ids"]
    assert all(0 <= t < 384 for t in rows[0]["output_ids"])
    assert "optimum-onnx" in result["version"] and result["peak_rss_mb"] > 0


@pytest.mark.real
@needs_venv
@pytest.mark.skipif(not REAL_GGUF.is_file(), reason=f"{REAL_GGUF} not downloaded")
def test_real_qwen_coder_through_optimum_agrees_with_its_own_greedy_run(monkeypatch):
    """Qwen2.5-Coder-1.5B as setup.sh prepares it: exactly N tokens, the same for the same prompt, and the int4
    model still answers a one-word question right (the export carries the real model, not noise)."""
    monkeypatch.setenv("EDGESPEC_OPTIMUM_VENV", str(REAL_VENV))
    if optimum.unsuitable(str(REAL_GGUF)):
        pytest.skip(optimum.unsuitable(str(REAL_GGUF)))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(optimum.export_dir(REAL_GGUF) / "tokenizer.json"))
    text = ("<|im_start|>user\nReply with one word: what is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    prompts = [{"question_id": q, "category": "c", "ids": ids} for q in (1, 2)]
    result = run_job({"kind": "optimum", "source_path": str(REAL_GGUF), "threads": 2, "max_new_tokens": 4,
                      "warmup": 0, "prompts": prompts, "pad_token_id": 151643})
    assert result["status"] == "ok", result.get("note")
    rows = result["rows"]
    assert [r["new_tokens"] for r in rows] == [4, 4] and rows[0]["output_ids"] == rows[1]["output_ids"]
    assert "Paris" in tokenizer.decode(rows[0]["output_ids"])
