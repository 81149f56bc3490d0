"""`edgespec bench --replay`: the real engine, planner and drafters replayed on a bench run's recorded greedy
outputs, the target's forwards costed by a device profile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgespec.bench.replay import ReplayRunner, read_result, replay_table
from edgespec.devices.profile import DeviceProfile, bundle_key


def _runner(recorded, cost=lambda tokens, context: 0.01 * tokens + 0.0001 * context):
    runner = ReplayRunner(entry=None, vocab_size=50, max_context=64, cost=cost)
    runner.record(recorded)
    return runner


def test_replay_runner_prefers_the_recorded_next_token_on_the_recorded_path():
    runner = _runner([1, 2, 3, 4, 5, 6, 7])
    logits = runner.prefill([1, 2])
    assert logits.argmax() == 3 and runner.length == 2
    assert runner.prefill_seconds == pytest.approx(0.02 + 0.0) and runner.decode_seconds == 0.0
    # pending 3, then a tree: 4 (on the record) with child 5 (on), and 9 (off) with child 5 (off the record)
    logits = runner.forward([3, 4, 9, 5, 5], np.array([-1, 0, 0, 1, 2]))
    assert logits.shape == (5, 50)
    assert [int(r.argmax()) for r in logits[:3]] == [4, 5, 5]  # after 3: 4; after 4: 5; after 9: any (rejected)
    assert int(logits[3].argmax()) == 6
    assert runner.last_seconds == pytest.approx(0.05 + 0.0002) and runner.decode_seconds == runner.last_seconds
    runner.commit([0, 1, 3])
    assert runner.cached == [1, 2, 3, 4, 5]
    assert runner.forward([6])[0].argmax() == 7
    runner.rewind(2)
    assert runner.length == 2 and runner.forward([3], logit_positions=[0])[0].argmax() == 4


def test_replay_runner_refuses_overflow_and_empty_prefill():
    from edgespec.runtimes.runner import ContextOverflow

    runner = _runner([1, 2, 3])
    with pytest.raises(ValueError, match="at least one token"):
        runner.prefill([])
    with pytest.raises(ContextOverflow):
        runner.forward(list(range(65)))


def test_read_result_errors(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(ValueError, match="cannot be read"):
        read_result(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an edgespec bench result"):
        read_result(path)
    path.write_text(json.dumps({"format": "edgespec-bench", "summary": {"baseline": "plain"},
                                "rows": [{"system": "plain", "question_id": 1, "output_ids": [1]}]}))
    with pytest.raises(ValueError, match="no prompt token ids"):
        read_result(path)
    path.write_text(json.dumps({"format": "edgespec-bench", "summary": {"baseline": "plain"}, "rows": []}))
    with pytest.raises(ValueError, match="no 'plain' rows"):
        read_result(path)


@pytest.fixture
def tiny_profile(tiny_bundles, tmp_path):
    """A hand-made profile of the tiny Qwen2 bundle: a forward of T tokens costs 10 + 2 T ms."""
    from edgespec.runtimes.manifest import load_manifest

    entry = load_manifest(tiny_bundles["qwen2"]).target_model
    sizes = [1, 2, 4, 8, 16, 32, 64]
    profile = DeviceProfile(
        name="replay-test", created="2025-01-01T00:00:00+00:00", device={"device_id": "test-cpu", "cpu_count": 2},
        threads=1, bundle={"model": entry.name, "quantization": dict(entry.quantization), "graph_bytes": 1,
                           "key": bundle_key(entry)},
        verify_ms={"contexts": [16, 256], "sizes": sizes, "ms": [[10.0 + 2 * s for s in sizes]] * 2},
        memory={})
    return profile.save(tmp_path / "profile.json")


def test_replay_follows_the_recording_and_matches_the_measured_run(tiny_bundles, tiny_profile, tmp_path, capsys):
    from edgespec import cli

    items = [{"question_id": i, "category": c, "turns": [f"def f{i}(x): return x + {i}\ndef f{i}(x):",
                                                         f"and again, def f{i}(x):"]} for i, c in enumerate("ab")]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in items) + "\n", encoding="utf-8")
    recorded = tmp_path / "run.json"
    common = ["-b", str(tiny_bundles["qwen2"]), "--threads", "1", "--device", str(tiny_profile)]
    args = cli.build_parser().parse_args(
        ["bench", *common, "--data", str(data), "--max-new-tokens", "16", "--no-peers", "--in-process",
         "--mode", "plain,ngram@chain:3", "--json", str(recorded)])
    assert args.func(args) == 0
    out = tmp_path / "replay.json"
    args = cli.build_parser().parse_args(
        ["bench", *common, "--replay", str(recorded), "--mode", "ngram@chain:3,self", "--json", str(out)])
    assert args.func(args) == 0
    replay = json.loads(out.read_text())
    assert replay["format"] == "edgespec-bench-replay" and replay["device_profile"] == "profile"  # a profile file goes by its name
    assert replay["systems"]["self"]["status"] == "skipped"
    rows = replay["rows"]
    run = json.loads(recorded.read_text())
    # every replayed generation reproduces the recorded output (turn 2 included), and plain costs what the profile says
    key = lambda r: (r["question_id"], r.get("turn", 1))  # noqa: E731
    plain = {key(r): r for r in run["rows"] if r["system"] == "plain"}
    assert len(rows) == 2 * len(plain) == 8
    for r in rows:
        assert r["output_ids"] == plain[key(r)]["output_ids"]
    for r in rows:
        if r["system"] == "plain":
            assert r["steps"] == 16 and r["stats"]["verify_seconds"] == pytest.approx(15 * 0.012, rel=1e-6)
    # the n-gram drafter is replayed faithfully: τ as measured, up to the recycled guesses a replay cannot know
    measured = run["summary"]["overall"]["ngram@chain:3"]["mean_accepted_tokens"]
    replayed = replay["summary"]["overall"]["ngram@chain:3"]["mean_accepted_tokens"]
    assert replayed > 1.0 and abs(replayed - measured) <= 0.25 * measured, (replayed, measured)
    header, table = replay_table(replay)
    assert header[1:3] == ["replayed τ", "measured τ"] and len(table) == 3
    assert "replayed decode speedup" in capsys.readouterr().out


def test_read_result_size_limit(tmp_path, monkeypatch):
    from edgespec.bench import replay

    path = tmp_path / "r.json"
    body = json.dumps({"format": "edgespec-bench", "summary": {"baseline": "plain"},
                       "rows": [{"system": "plain", "question_id": 1, "prompt_ids": [1], "output_ids": [2]}]})
    path.write_text(body)
    monkeypatch.setattr(replay, "MAX_RESULT_BYTES", len(body.encode()))
    assert read_result(path)["rows"][0]["prompt_ids"] == [1]  # at the limit
    path.write_text(body + " ")
    with pytest.raises(ValueError, match="bench result"):
        read_result(path)  # one byte over
