"""The public Python API (docs/api.md): the documented surface and nothing else, docstrings with examples and
types, the example scripts, cancellation (also during prefill), and one engine shared by several threads."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import edgespec
from edgespec import SpeculationConfig, TextStream, load

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
PROMPTS = ("def add(a, b):\n    return", "The quick brown fox jumps over", "import numpy as np\n\nx = np.")
WITH_EXAMPLES = ("load", "Engine", "TextStream", "SpeculationConfig", "GenerationResult", "GenerationConfig")
ENGINE_METHODS_WITH_EXAMPLES = ("generate", "stream", "chat", "chat_stream", "cancel")


def documented(kind: str) -> set[str]:
    """Names the API doc lists as `edgespec.X` (kind "edgespec") or `Engine.X` / `TextStream.X`."""
    return {n for n in re.findall(rf"`{kind}\.([A-Za-z_]+)", API_DOC.read_text()) if not n.startswith("__")}


@pytest.fixture()
def engine(tiny_bundles, tmp_path):
    with load(tiny_bundles["qwen2"], threads=1, ngram_cache=tmp_path / "ngram.npz", history=False) as e:
        yield e


def reference(tiny_bundles, prompt, n: int = 24) -> list[int]:
    """Greedy tokens of a fresh, plain engine (no drafter): what every speculative run must reproduce."""
    return load(tiny_bundles["qwen2"], threads=1, drafter=None, history=False).generate(
        prompt, max_new_tokens=n, ignore_eos=True).token_ids


# ---- the surface --------------------------------------------------------------------------------------------------


def test_the_public_surface_is_exactly_the_documented_one(engine):
    names = set(edgespec.__all__) - {"__version__"}
    assert names == documented("edgespec"), "edgespec.__all__ and docs/api.md disagree"
    for name in names:
        assert getattr(edgespec, name) is not None
    members = documented("Engine")
    public = {n for n in dir(engine) if not n.startswith("_")}
    assert public == members, f"undocumented: {sorted(public - members)}, missing: {sorted(members - public)}"
    stream = engine.stream("x", max_new_tokens=1)
    stream.close()
    assert {n for n in dir(stream) if not n.startswith("_")} == documented("TextStream")


def test_public_callables_have_docstrings_examples_and_type_hints():
    callables = [edgespec.load] + [getattr(edgespec.Engine, n) for n in documented("Engine")
                                   if callable(getattr(edgespec.Engine, n, None))]  # instance attributes: None
    callables += [getattr(TextStream, n) for n in documented("TextStream") if callable(getattr(TextStream, n))]
    assert len(callables) >= 14
    for fn in callables:
        assert inspect.getdoc(fn), f"{fn.__qualname__} has no docstring"
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            assert p.annotation is not inspect.Parameter.empty, f"{fn.__qualname__}: {p.name} has no type"
        assert sig.return_annotation is not inspect.Signature.empty, f"{fn.__qualname__} has no return type"
    for name in WITH_EXAMPLES:
        assert ">>>" in inspect.getdoc(getattr(edgespec, name)), f"edgespec.{name} has no example"
    for name in ENGINE_METHODS_WITH_EXAMPLES:
        assert ">>>" in inspect.getdoc(getattr(edgespec.Engine, name)), f"Engine.{name} has no example"
    assert (ROOT / "edgespec" / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()


def test_speculation_config_is_the_same_as_the_arguments(tiny_bundles):
    spec = SpeculationConfig(drafter="ngram", draft_budget=6, tree="chain:3", ngram_cache=False)
    a = load(tiny_bundles["qwen2"], threads=1, speculation=spec, history=False)
    b = load(tiny_bundles["qwen2"], threads=1, drafter="ngram", draft_budget=6, tree="chain:3", ngram_cache=False,
             history=False)
    assert a.speculation == b.speculation == SpeculationConfig("ngram", 6, "chain:3", None, False, None)
    ra, rb = (e.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True) for e in (a, b))
    assert ra.token_ids == rb.token_ids and ra.stats.drafted_tokens == rb.stats.drafted_tokens
    with pytest.raises(TypeError, match="not both.*draft_budget"):
        load(tiny_bundles["qwen2"], speculation=spec, draft_budget=3)
    with pytest.raises(TypeError, match="SpeculationConfig"):
        load(tiny_bundles["qwen2"], speculation={"drafter": "ngram"})
    a.set_drafter(None)
    assert a.speculation.drafter is None and a.speculation.draft_budget == 6


# ---- the example scripts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script, args, expect", [
    ("embed.py", ["--device", "none", "--max-new-tokens", "12"], r"tokens per step, finish: (length|stop)"),
    ("stream_ui.py", ["--max-new-tokens", "12"], r"\[(length|stop): \d+ tokens"),
    ("chat_session.py", ["--max-new-tokens", "12"], r"turn 3: \d+ prompt tokens \(\d+ reused\)"),
])
def test_example_scripts_run(script, args, expect, tiny_bundles, tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / script), "--bundle", str(tiny_bundles["qwen2"]), "--threads", "1"]
    if script == "chat_session.py":
        args = args + ["--cache", str(tmp_path / "session.npz")]
    done = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(expect, done.stdout), done.stdout
    if script == "chat_session.py":
        assert (tmp_path / "session.npz").is_file()  # the session's n-grams persist for the next one
        reused = [int(n) for n in re.findall(r"\((\d+) reused\)", done.stdout)]
        assert reused[0] == 0 and reused[1] > 0 and reused[2] > reused[1]  # later turns prefill only what is new


# ---- cancellation -------------------------------------------------------------------------------------------------


def test_a_cancel_flag_stops_the_generation_and_keeps_the_engine_exact(engine, tiny_bundles):
    full = reference(tiny_bundles, PROMPTS[0], 40)
    flag = threading.Event()
    stream = engine.stream(PROMPTS[0], max_new_tokens=40, ignore_eos=True, cancel=flag)
    for i, _ in enumerate(stream):
        if i == 4:
            flag.set()
    result = stream.result
    assert result.finish_reason == "cancelled" and result.stats.stopped_early
    assert 5 <= len(result.token_ids) < 40 and result.token_ids == full[:len(result.token_ids)]
    after = engine.generate(PROMPTS[0], max_new_tokens=40, ignore_eos=True)
    assert after.finish_reason == "length" and after.token_ids == full


def test_engine_cancel_from_another_thread(engine, tiny_bundles):
    assert engine.cancel() is False  # nothing running
    started = threading.Event()
    out: dict = {}

    def consume():
        stream = engine.stream(PROMPTS[1], max_new_tokens=480, ignore_eos=True)
        for _ in stream:
            started.set()
            time.sleep(0.002)
        out["result"] = stream.result

    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(60)
    assert engine.cancel() is True
    worker.join(60)
    result = out["result"]
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 480
    assert result.token_ids == reference(tiny_bundles, PROMPTS[1], len(result.token_ids))


class CountingFlag:
    """A cancel flag that turns True on its `n`-th look (deterministic: no timing)."""

    def __init__(self, n: int):
        self.n, self.looks = n, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


def test_cancel_during_prefill_keeps_the_fed_chunks(engine, tiny_bundles):
    ids = engine.encode(" ".join(["alpha beta gamma delta"] * 60))[:300]
    assert len(ids) == 300  # two prefill chunks of 256 and 44
    result = engine.generate(ids, max_new_tokens=8, ignore_eos=True, cancel=CountingFlag(2))
    assert result.finish_reason == "cancelled" and result.token_ids == [] and result.stats.steps == 0
    again = engine.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert again.stats.reused_prompt_tokens == 256  # the first chunk stayed cached and is consistent
    assert again.token_ids == reference(tiny_bundles, ids, 8)


def test_cancel_flag_must_have_is_set(engine):
    with pytest.raises(TypeError, match="is_set"):
        engine.generate("x", max_new_tokens=2, cancel=True)


def test_closing_a_stream_early_gives_a_cancelled_result(engine):
    with engine.stream(PROMPTS[2], max_new_tokens=30, ignore_eos=True) as stream:
        first = next(stream)
    assert first and stream.result.finish_reason == "cancelled" and len(stream.result.token_ids) >= 1
    unused = engine.stream(PROMPTS[2], max_new_tokens=30)
    unused.close()  # never iterated: nothing ran, the engine is free
    assert unused.result.token_ids == [] and engine.generate(PROMPTS[2], max_new_tokens=3).token_ids


# ---- threads --------------------------------------------------------------------------------------------------------


def test_one_engine_serves_several_threads_one_at_a_time(tiny_bundles, tmp_path):
    """4 threads x 6 generations on one speculative engine: every output is the plain greedy output, no errors,
    and the persistent n-gram cache saved at close loads again."""
    expected = {p: reference(tiny_bundles, p) for p in PROMPTS}
    cache = tmp_path / "shared.npz"
    engine = load(tiny_bundles["qwen2"], threads=1, ngram_cache=cache, history=False)
    results: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []
    active = []  # generations running at once, sampled from inside each stream

    def work(k: int) -> None:
        try:
            for j in range(6):
                prompt = PROMPTS[(k + j) % len(PROMPTS)]
                stream = engine.stream(prompt, max_new_tokens=24, ignore_eos=True)
                for _ in stream:
                    active.append(engine._owner)
                results.append((prompt, stream.result.token_ids))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 24
    assert all(ids == expected[p] for p, ids in results)
    assert len(set(active)) == 4  # all four threads ran (each while holding the engine)
    engine.close()
    with _no_warning():
        again = load(tiny_bundles["qwen2"], threads=1, ngram_cache=cache, history=False)
    assert again.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True).token_ids == expected[PROMPTS[0]]


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [str(w.message) for w in self.records], "loading the saved cache warned"


def test_a_second_generation_on_the_same_thread_errors_instead_of_deadlocking(engine):
    stream = engine.stream(PROMPTS[0], max_new_tokens=20, ignore_eos=True)
    next(stream)
    with pytest.raises(RuntimeError, match="still has a generation open"):
        engine.generate(PROMPTS[1], max_new_tokens=4)
    with pytest.raises(RuntimeError, match="still has a generation open"):
        engine.reset()
    stream.close()
    assert engine.generate(PROMPTS[1], max_new_tokens=4).token_ids


def test_other_threads_wait_for_an_open_stream(engine, tiny_bundles):
    stream = engine.stream(PROMPTS[0], max_new_tokens=20, ignore_eos=True)
    next(stream)
    done: dict = {}
    waiter = threading.Thread(target=lambda: done.setdefault(
        "r", engine.generate(PROMPTS[1], max_new_tokens=8, ignore_eos=True)))
    resetter = threading.Thread(target=engine.reset)
    waiter.start()
    resetter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and resetter.is_alive() and "r" not in done  # both wait for the open stream
    rest = list(stream)
    waiter.join(60)
    resetter.join(60)
    assert len(rest) >= 1 and stream.result.finish_reason == "length"
    assert done["r"].token_ids == reference(tiny_bundles, PROMPTS[1], 8)



def test_cli_chat_ctrl_c_stops_the_answer_and_frees_the_engine(tiny_bundles, monkeypatch):
    """Ctrl-C while an answer streams (raised in the consumer, as a terminal does) ends that answer; the next turn
    runs on the same engine instead of finding it held by the abandoned stream."""
    import io

    from edgespec.cli import main

    inputs = iter(["first question", "second question", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))

    class Terminal(io.StringIO):
        writes = 0

        def write(self, text):
            Terminal.writes += 1
            if Terminal.writes == 3:  # the user presses Ctrl-C during the first answer
                raise KeyboardInterrupt
            return super().write(text)

    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["chat", "--bundle", str(tiny_bundles["qwen2"]), "--threads", "1", "--device", "none",
                 "--no-history", "--no-ngram-cache", "--max-new-tokens", "12"]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" [stopped]") and len(lines) == 2 and lines[1]  # the second answer came in full
