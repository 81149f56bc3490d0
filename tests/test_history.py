"""The generation history log (edgespec/history.py): paths, the on/off switch, appending, reading back, torn and
corrupt lines, the size cap."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgespec.history import HistoryWarning, SessionLog, default_history_path, history_enabled, read_history, trim_start


def _append(log: SessionLog, i: int) -> None:
    log.append(f"prompt {i}", f" output {i} caf\u00e9 \U0001F600", [1, 2, i], [3, i, 4], model="tiny")


def test_default_path_uses_the_env_folder_bundle_and_target(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_HISTORY_DIR", str(tmp_path / "hist"))
    path = default_history_path(tmp_path / "bundles" / "qwen", "qwen2.5-coder-1.5b")
    assert path == tmp_path / "hist" / "qwen--qwen2.5-coder-1.5b.jsonl"
    assert not path.parent.exists()  # nothing is created by asking


def test_default_path_without_env_is_under_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGESPEC_HISTORY_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = default_history_path("bundles/b", "t/../x")
    assert path.parent == tmp_path / ".cache" / "edgespec" / "history"
    assert path.name.startswith("b--") and "/" not in path.name and path.suffix == ".jsonl"


@pytest.mark.parametrize("value,enabled", [(None, False), ("", False), ("1", True), ("on", True), ("YES", True),
                                           (" True ", True), ("0", False), ("off", False), ("OFF", False),
                                           ("false", False), (" False ", False), ("no", False)])
def test_history_enabled_follows_the_env(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("EDGESPEC_HISTORY", raising=False)
    else:
        monkeypatch.setenv("EDGESPEC_HISTORY", value)
    assert history_enabled() is enabled


def test_append_and_read_back(tmp_path):
    path = tmp_path / "deep" / "folder" / "h.jsonl"
    log = SessionLog(path)
    for i in range(3):
        _append(log, i)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert set(first) == {"v", "time", "model", "prompt", "output", "prompt_ids", "output_ids"}
    records = read_history(path)
    assert [r["prompt"] for r in records] == ["prompt 0", "prompt 1", "prompt 2"]
    assert records[2]["output"] == " output 2 caf\u00e9 \U0001F600"
    assert records[2]["prompt_ids"] == [1, 2, 2] and records[2]["output_ids"] == [3, 2, 4]
    assert records[0]["v"] == 1 and records[0]["model"] == "tiny" and records[0]["time"].endswith("+00:00")


def test_numpy_ids_are_written_as_plain_ints(tmp_path):
    import numpy as np

    log = SessionLog(tmp_path / "h.jsonl")
    log.append("p", "o", np.array([5, 6], dtype=np.int64), np.array([7], dtype=np.int64), "m")
    assert read_history(log.path)[0]["prompt_ids"] == [5, 6]


def test_torn_and_corrupt_lines_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "h.jsonl"
    log = SessionLog(path)
    _append(log, 0)
    with open(path, "ab") as f:
        f.write(b"this is not json\n")
        f.write(json.dumps({"v": 1, "prompt": "no other fields"}).encode() + b"\n")
        f.write(b"\xff\xfe broken utf-8\n")
        f.write(json.dumps({"v": 1, "time": "t", "model": "m", "prompt": "p", "output": "o", "prompt_ids": [1],
                            "output_ids": ["x"]}).encode() + b"\n")
        f.write(b"\n")
        f.write(b'{"v": 1, "time": "2026-11-2')  # torn last write
    _append(log, 1)  # must start on a fresh line, not extend the torn one
    with pytest.warns(HistoryWarning) as caught:
        records = read_history(path)
    assert [r["prompt"] for r in records] == ["prompt 0", "prompt 1"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 5
    for number, message in zip((2, 3, 4, 5, 7), messages):
        assert f"{path}:{number}:" in message
    assert any("missing field" in m for m in messages)
    assert any("not valid JSON" in m for m in messages)


def test_missing_file_says_how_logging_is_turned_on(tmp_path):
    with pytest.raises(FileNotFoundError, match="EDGESPEC_HISTORY") as info:
        read_history(tmp_path / "none.jsonl")
    assert "none.jsonl" in str(info.value)


def test_cap_keeps_the_newest_half(tmp_path):
    path = tmp_path / "h.jsonl"
    probe = SessionLog(tmp_path / "probe.jsonl")
    _append(probe, 0)
    size = probe.path.stat().st_size
    log = SessionLog(path, max_bytes=int(size * 10.5))
    for i in range(10):
        _append(log, i)
    assert len(read_history(path)) == 10
    _append(log, 10)  # would pass the cap: the 5 newest lines are kept, then this one appended
    prompts = [r["prompt"] for r in read_history(path)]
    assert prompts == [f"prompt {i}" for i in range(5, 11)]
    assert path.stat().st_size <= log.max_bytes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the rewrite left no temporary file


def test_a_record_bigger_than_the_cap_still_goes_in_alone(tmp_path):
    log = SessionLog(tmp_path / "h.jsonl", max_bytes=200)
    _append(log, 0)
    log.append("p" * 500, "o", [1], [2], "m")
    assert [len(r["prompt"]) for r in read_history(log.path)] == [500]


def test_history_enabled_refuses_other_values(monkeypatch):
    monkeypatch.setenv("EDGESPEC_HISTORY", "maybe")
    with pytest.raises(ValueError, match="EDGESPEC_HISTORY='maybe' is neither on"):
        history_enabled()


@pytest.mark.parametrize("data,keep,start", [
    (b"", 10, 0), (b"aa\nbb\ncc\n", 100, 0), (b"aa\nbb\ncc\n", 6, 3), (b"aa\nbb\ncc\n", 5, 6),
    (b"aa\nbb\ncc\n", 3, 6), (b"aa\nbb\ncc\n", 2, 9), (b"aa\nbb\ncc\n", 0, 9), (b"aa\nbb\ncc", 4, 6),
    (b"aaaaaa", 3, 6)])
def test_trim_start_is_the_first_whole_line_within_keep(tmp_path, data, keep, start):
    import io

    assert trim_start(io.BytesIO(data), len(data), keep) == start


def test_bad_max_bytes():
    with pytest.raises(ValueError, match="max_bytes"):
        SessionLog("x.jsonl", max_bytes=0)


def test_history_module_needs_no_torch():
    code = "import sys, edgespec.history; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
