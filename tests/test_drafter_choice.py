"""The default drafter ("auto"): n-grams, staged in front of the cheapest bundled drafter model when its forward
costs at most MAX_DRAFTER_COST_SHARE of a target step (device profile, else model sizes); said in
`engine.speculation.reason`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from edgespec import load
from edgespec.drafters import choice


def _entry(tmp_path: Path, name: str, size: int):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"x" * 100)
    (folder / "model.onnx.data").write_bytes(b"x" * size)
    return SimpleNamespace(name=name, graph_path=folder / "model.onnx")


def _manifest(target, *drafters):
    return SimpleNamespace(drafters=lambda: list(drafters), models={e.name: e for e in (target, *drafters)})


def test_choice_by_model_sizes(tmp_path):
    target = _entry(tmp_path, "big", 10_000)
    small, mid = _entry(tmp_path, "small", 900), _entry(tmp_path, "mid", 4_000)
    same = lambda a, b: a.name == "mid"  # noqa: E731
    spec, reason = choice.choose_drafter(_manifest(target, mid, small), target, None, same)
    assert spec == "ngram>cross:small" and "model sizes" in reason and "small" in reason
    spec, reason = choice.choose_drafter(_manifest(target, mid), target, None, same)
    assert spec == "ngram" and "41%" in reason and "mid" in reason  # (4000 + 100) / (10000 + 100)
    assert choice.choose_drafter(_manifest(target), target, None, same)[0] == "ngram"


def test_choice_prefers_the_device_profile(tmp_path):
    target = _entry(tmp_path, "big", 10_000)
    drafter = _entry(tmp_path, "small", 9_000)  # big on disk, but the profile measured it fast
    profile = SimpleNamespace(name="p", matches=lambda entry: entry is target,
                              drafter_seconds=lambda name, tokens: 0.005 if name == "small" else None,
                              verify_seconds=lambda tokens, context: 0.1)
    spec, reason = choice.choose_drafter(_manifest(target, drafter), target, profile, lambda a, b: True)
    assert spec == "ngram>draft:small" and "device profile p" in reason and "5%" in reason


def test_load_says_why_and_stays_exact(copy_drafter_bundle, monkeypatch):
    prompt = "def f(x): return x + 1\ndef f(x):"
    plain = load(copy_drafter_bundle, threads=1, drafter=None)
    expected = plain.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
    assert plain.speculation.reason == "plain decoding"
    engine = load(copy_drafter_bundle, threads=1, ngram_cache=False)  # the default: auto
    assert engine.drafter.name == "ngram" and "copy" in engine.speculation.reason  # a copy costs 100%: not added
    monkeypatch.setattr(choice, "MAX_DRAFTER_COST_SHARE", 2.0)
    engine = load(copy_drafter_bundle, threads=1, ngram_cache=False, tree="chain:4")
    assert engine.drafter.name == "ngram>draft:copy" and engine.speculation.drafter == "ngram>draft:copy"
    assert engine.speculation.reason.startswith("auto: n-grams, then copy")
    assert engine.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids == expected
    engine.set_drafter("ngram")
    assert engine.speculation.reason == "given"
