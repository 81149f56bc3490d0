"""`edgespec bench`: Spec-Bench loading, the summary functions, the Markdown report, the mode loop (fake engine)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from edgespec import bench

SPEC_BENCH = bench.DEFAULT_DATA
needs_spec_bench = pytest.mark.skipif(not SPEC_BENCH.is_file(), reason=f"Spec-Bench data absent at {SPEC_BENCH}")


# ---- Spec-Bench loader ----------------------------------------------------------------------------------------------
@needs_spec_bench
def test_real_spec_bench_categories_and_sampling():
    everything = bench.read_spec_bench(SPEC_BENCH)
    assert len(everything) == 480
    cats = list(dict.fromkeys(q["category"] for q in everything))
    assert len(cats) == 13
    assert {"writing", "coding", "translation", "summarization", "qa", "math_reasoning", "rag"} <= set(cats)
    assert all(isinstance(q["prompt"], str) and q["prompt"] for q in everything)

    two = bench.load_spec_bench(SPEC_BENCH)  # default: 2 per category
    assert len(two) == 26
    assert list(dict.fromkeys(q["category"] for q in two)) == cats  # file order kept
    for cat in cats:
        firsts = [q["question_id"] for q in everything if q["category"] == cat][:2]
        assert [q["question_id"] for q in two if q["category"] == cat] == firsts

    assert len(bench.load_spec_bench(SPEC_BENCH, per_category=0)) == 480
    some = bench.load_spec_bench(SPEC_BENCH, per_category=3, categories=["rag", "coding"])
    assert [q["category"] for q in some] == ["coding"] * 3 + ["rag"] * 3
    assert len(bench.load_spec_bench(SPEC_BENCH, per_category=2, limit=5)) == 5


def _write_jsonl(path, items):
    path.write_text("\n".join(json.dumps(d) for d in items) + "\n\n", encoding="utf-8")
    return path


def test_loader_first_turn_and_selection(tmp_path):
    items = [{"question_id": i, "category": "a" if i < 3 else "b", "turns": [f"first {i}", f"second {i}"]}
             for i in range(6)]
    path = _write_jsonl(tmp_path / "q.jsonl", items)
    qs = bench.read_spec_bench(path)
    assert [q["prompt"] for q in qs] == [f"first {i}" for i in range(6)]
    assert [q["question_id"] for q in bench.select_questions(qs, per_category=2)] == [0, 1, 3, 4]
    assert [q["question_id"] for q in bench.select_questions(qs, per_category=None, categories=["b"])] == [3, 4, 5]
    assert [q["question_id"] for q in bench.select_questions(qs, per_category=2, limit=3)] == [0, 1, 3]
    with pytest.raises(ValueError, match="unknown category c"):
        bench.select_questions(qs, categories=["c"])


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        bench.read_spec_bench(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "a", "turns": ["x"]}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        bench.read_spec_bench(bad)
    bad.write_text('{"category": "a", "turns": []}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="turns"):
        bench.read_spec_bench(bad)


# ---- rows and summaries ---------------------------------------------------------------------------------------------
def _row(system, kind, qid, cat, new, total, ttft, steps=None, out=None):
    stats = {"new_tokens": new, "total_seconds": total, "time_to_first_token": ttft, "prompt_tokens": 10}
    if steps is not None:
        stats["steps"] = steps
    return bench.make_row(system, kind, {"question_id": qid, "category": cat}, out or list(range(new)), stats)


def _rows():
    return [
        # plain: cat x tok/s 10 and 20, cat y 40
        _row("plain", "mode", 1, "x", 10, 1.0, 0.1, steps=9),
        _row("plain", "mode", 2, "x", 10, 0.5, 0.1, steps=9),
        _row("plain", "mode", 3, "y", 10, 0.25, 0.05, steps=9),
        # a speculative mode twice as fast, 2 tokens per step
        _row("spec", "mode", 1, "x", 10, 0.5, 0.1, steps=5),
        _row("spec", "mode", 2, "x", 10, 0.25, 0.1, steps=5),
        _row("spec", "mode", 3, "y", 10, 0.125, 0.05, steps=5),
        # a peer at half the plain speed
        _row("peer", "peer", 1, "x", 10, 2.0, 0.2),
        _row("peer", "peer", 2, "x", 10, 1.0, 0.2),
        _row("peer", "peer", 3, "y", 10, 0.5, 0.1),
    ]


def test_make_row_rates():
    r = _row("plain", "mode", 7, "x", 11, 2.0, 1.0, steps=10)
    assert r["tokens_per_second"] == pytest.approx(5.5)
    assert r["decode_tokens_per_second"] == pytest.approx(10.0)  # (11 - 1) / (2 - 1)
    assert r["mean_accepted_tokens"] == pytest.approx(1.1)
    assert r["prompt_tokens"] == 10 and r["question_id"] == 7 and r["steps"] == 10
    peer = _row("p", "peer", 7, "x", 1, 0.0, 0.0)
    assert peer["tokens_per_second"] is None and peer["decode_tokens_per_second"] is None
    assert peer["mean_accepted_tokens"] is None


def test_summarize_medians_and_aggregates():
    s = bench.summarize(_rows()[:3])
    assert s["prompts"] == 3 and s["new_tokens"] == 30
    assert s["tokens_per_second"] == pytest.approx(20.0)  # median of 10, 20, 40
    assert s["tokens_per_second_agg"] == pytest.approx(30 / 1.75)
    assert s["time_to_first_token"] == pytest.approx(0.1)
    assert s["decode_tokens_per_second_agg"] == pytest.approx(27 / (1.75 - 0.25))
    assert s["mean_accepted_tokens"] == pytest.approx(30 / 27)
    assert bench.summarize(_rows()[6:])["mean_accepted_tokens"] is None  # peers have no step count


def test_summarize_rows_ratios():
    summary = bench.summarize_rows(_rows())
    assert summary["systems"] == ["plain", "spec", "peer"]
    assert summary["categories"] == ["x", "y"]
    x = summary["per_category"]["x"]
    assert x["plain"]["tokens_per_second"] == pytest.approx(15.0)  # median of 10 and 20
    assert x["plain"]["speedup"] == pytest.approx(1.0)
    assert x["spec"]["speedup"] == pytest.approx(2.0)
    assert x["spec"]["mean_accepted_tokens"] == pytest.approx(2.0)
    assert x["peer"]["plain_over_peer"] == pytest.approx(2.0)
    assert "speedup" not in x["peer"]
    overall = summary["overall"]
    assert overall["spec"]["speedup_agg"] == pytest.approx(2.0)
    assert overall["spec"]["speedup"] == pytest.approx(2.0)
    assert overall["peer"]["plain_over_peer_agg"] == pytest.approx(2.0)
    assert overall["plain"]["tokens_per_second_agg"] == pytest.approx(30 / 1.75)


def test_ratios_without_baseline():
    summary = bench.summarize_rows([r for r in _rows() if r["system"] != "plain"])
    assert summary["overall"]["spec"]["speedup"] is None
    assert summary["overall"]["peer"]["plain_over_peer"] is None
    assert bench.ratio(1.0, 0.0) is None and bench.ratio(None, 2.0) is None and bench.ratio(3.0, 2.0) == 1.5


def test_agreement_with_plain():
    rows = [_row("plain", "mode", 1, "x", 4, 1.0, 0.1, out=[1, 2, 3, 4]),
            _row("spec", "mode", 1, "x", 4, 1.0, 0.1, out=[1, 2, 3, 4]),
            _row("peer", "peer", 1, "x", 4, 1.0, 0.1, out=[1, 2, 9, 4]),
            _row("peer", "peer", 2, "x", 4, 1.0, 0.1, out=[1, 2, 3, 4])]
    bench.add_agreement(rows)
    assert [r["agreement"] for r in rows] == [1.0, 1.0, 0.5, None]
    assert bench.common_prefix([1, 2], [1, 2, 3]) == 2


# ---- Markdown -------------------------------------------------------------------------------------------------------
def _result(rows):
    bench.add_agreement(rows)
    return {
        "config": {"bundle": "b", "model": "m", "per_category": 2, "max_new_tokens": 10, "threads": 4},
        "machine": {"cpu_model": "Test CPU", "physical_cores": 4, "logical_cores": 8, "versions": {"onnxruntime": "1"}},
        "questions": [{"question_id": i, "category": c} for i, c in ((1, "x"), (2, "x"), (3, "y"))],
        "systems": {"plain": {"kind": "mode", "status": "ok", "peak_rss_mb": 512.0, "load_seconds": 1.0},
                    "spec": {"kind": "mode", "status": "ok", "peak_rss_mb": 600.0, "load_seconds": 1.5},
                    "peer": {"kind": "peer", "status": "ok", "peak_rss_mb": 900.0, "load_seconds": 3.0},
                    "other": {"kind": "peer", "status": "skipped", "note": "not installed"}},
        "rows": rows,
        "summary": bench.summarize_rows(rows),
    }


def _tables(md: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return tables


def test_markdown_shape():
    md = bench.render_markdown(_result(_rows()))
    assert md.startswith("# edgespec bench: m")
    cats, systems, costs = _tables(md)
    assert costs[0][:2] == ["system", "prefill tok/s"] and len(costs) == 2 + 3
    header = cats[0]
    assert header == ["category", "n", "plain tok/s", "plain τ", "plain TTFT ms", "spec tok/s", "spec vs plain",
                      "spec τ", "spec TTFT ms", "peer tok/s", "plain/peer", "peer TTFT ms"]
    assert all(len(r) == len(header) for r in cats)
    assert set(cats[1]) <= {"---", "---:"}
    body = cats[2:]
    assert [r[0] for r in body] == ["x", "y", "overall (sum)", "overall (median)"]
    x = dict(zip(header, body[0]))
    assert x["n"] == "2" and x["plain tok/s"] == "15.0" and x["spec vs plain"] == "2.00×"
    assert x["plain/peer"] == "2.00×" and x["spec τ"] == "2.00" and x["plain TTFT ms"] == "100"
    assert len(systems) == 2 + 4 and all(len(r) == len(systems[0]) for r in systems)
    assert systems[-1][0] == "other" and "not installed" in systems[-1][-1]
    assert "peak RSS MB" in systems[0]


def test_markdown_modes_only():
    rows = [r for r in _rows() if r["system"] == "plain"]
    result = _result(rows)
    result["systems"] = {"plain": result["systems"]["plain"]}
    cats, systems, _costs = _tables(bench.render_markdown(result))
    assert cats[0] == ["category", "n", "plain tok/s", "plain τ", "plain TTFT ms"]
    assert len(systems) == 3


# ---- the mode loop and the command, on a fake engine ----------------------------------------------------------------
class FakeEngine:
    """Just enough of edgespec.engine.Engine: 1 token per character of the prompt, a tiny context."""

    def __init__(self, context_length=64):
        self.context_length = context_length
        self.threads = 2
        self.entry = SimpleNamespace(name="fake", architecture="qwen2", source={"kind": "hf", "path": "/nowhere"},
                                     quantization={"mode": "fp32"}, pad_token_id=0)
        self.resets = 0
        self.calls = []

    def render_chat(self, messages):
        return f"<u>{messages[0]['content']}</u>"

    def encode(self, text):
        return [ord(c) % 50 for c in text]

    def reset(self):
        self.resets += 1

    def generate(self, prompt, **config):
        self.calls.append(config)
        n = config["max_new_tokens"]
        stats = {"prompt_tokens": len(self.encode(prompt)), "new_tokens": n, "steps": n - 1, "prefill_seconds": 0.01,
                 "decode_seconds": 0.09, "time_to_first_token": 0.01, "total_seconds": 0.1}
        return SimpleNamespace(token_ids=list(range(n)), finish_reason="length",
                               stats=SimpleNamespace(to_dict=lambda: dict(stats)))


def test_run_mode_job_fake_engine():
    engine = FakeEngine(context_length=40)
    questions = [{"question_id": 1, "category": "a", "prompt": "short"},
                 {"question_id": 2, "category": "a", "prompt": "x" * 100},  # does not fit
                 {"question_id": 3, "category": "b", "prompt": "also short"}]
    job = {"system": "plain", "max_new_tokens": 8, "warmup": 1, "questions": questions}
    res = bench.run_mode_job(job, engine=engine)
    assert res["status"] == "ok"
    assert [r["question_id"] for r in res["rows"]] == [1, 3]
    assert [s["question_id"] for s in res["skipped"]] == [2]
    assert [p["ids"] for p in res["prompts"]] == [engine.encode(engine.render_chat([{"content": q["prompt"]}]))
                                                for q in (questions[0], questions[2])]
    # warmup (short) + 2 measured, greedy, EOS ignored, reset before each
    assert engine.calls[0]["max_new_tokens"] == 8 and len(engine.calls) == 3
    assert all(c == {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True} for c in engine.calls)
    assert engine.resets >= 3
    assert res["rows"][0]["tokens_per_second"] == pytest.approx(80.0)
    assert res["model"]["name"] == "fake"


def test_unavailable_mode_is_skipped(monkeypatch):
    def needs_drafter(engine, prompt, gen):
        raise bench.ModeUnavailable("no drafter in this bundle")

    monkeypatch.setitem(bench.MODES, "needs_drafter", needs_drafter)
    job = {"system": "needs_drafter", "max_new_tokens": 4, "warmup": 0,
           "questions": [{"question_id": 1, "category": "a", "prompt": "hi"}]}
    res = bench.run_mode_job(job, engine=FakeEngine())
    assert res["status"] == "skipped" and "drafter" in res["note"] and res["rows"] == []


def test_cli_options_and_in_process_run(tmp_path, monkeypatch):
    from edgespec import cli, engine as engine_module

    items = [{"question_id": i, "category": c, "turns": [f"q{i}"]} for i, c in enumerate("aabbb")]
    data = _write_jsonl(tmp_path / "q.jsonl", items)
    monkeypatch.setattr(engine_module, "load", lambda *a, **k: FakeEngine())
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    args = cli.build_parser().parse_args(
        ["bench", "-b", str(tmp_path), "--data", str(data), "--per-category", "2", "--max-new-tokens", "5",
         "--threads", "2", "--no-peers", "--in-process", "--json", str(out_json), "--markdown", str(out_md)])
    assert args.func(args) == 0
    result = json.loads(out_json.read_text())
    assert result["format"] == "edgespec-bench"
    assert result["config"]["ignore_eos"] is True and result["config"]["threads"] == 2
    assert result["config"]["modes"] == ["plain"] and result["config"]["peers"] == []
    assert [r["question_id"] for r in result["rows"]] == [0, 1, 2, 3]
    assert result["summary"]["categories"] == ["a", "b"]
    assert result["systems"]["plain"]["status"] == "ok"
    assert "cpu_model" in result["machine"] and "onnxruntime" in result["machine"]["versions"]
    assert out_md.read_text().count("\n| ") >= 4


def test_unknown_mode_and_peer(tmp_path):
    from edgespec import cli

    for extra, match in ((["--mode", "nope"], "unknown mode"), (["--peers", "vllm"], "unknown peer")):
        args = cli.build_parser().parse_args(["bench", "-b", str(tmp_path), *extra])
        with pytest.raises(ValueError, match=match):
            bench.run_bench(args, echo=lambda line: None)


def test_add_arguments_defaults():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args(["-b", "x"])
    assert (a.mode, a.per_category, a.max_new_tokens, a.peers, a.no_peers) == ("plain", 2, 128, "hf,llama.cpp,optimum",
                                                                                 False)
    assert p.parse_args(["-b", "x", "--modes", "plain,ngram"]).mode == "plain,ngram"


def test_drafter_details_sum_counters_and_name_layer_sets():
    from edgespec.bench import drafter_details

    def row(system, counters, **extra):
        return {"system": system, "stats": {"drafter_counters": counters, **extra}}

    result = {"systems": {"plain": {}, "crossvocab": {}, "self": {}},
              "rows": [{"system": "plain", "stats": {}},
                       row("crossvocab", {"proposals": 10, "forwards": 30, "nodes": 40, "accepted": 20,
                                          "learned_nodes": 10, "accepted_learned": 5},
                           learned_cache={"entries": 7, "direct": 5}),
                       row("crossvocab", {"proposals": 10, "forwards": 30, "nodes": 40, "accepted": 20,
                                          "learned_nodes": 30, "accepted_learned": 15},
                           learned_cache={"entries": 9, "direct": 6}),
                       row("self", {"proposals": 5, "forwards": 2, "nodes": 3, "accepted": 1}, layers="skip=7,8"),
                       row("self", {"proposals": 5, "forwards": 2, "nodes": 3, "accepted": 1}, layers="skip=7,8")]}
    lines = drafter_details(result)
    assert len(lines) == 2
    assert lines[0].startswith("- crossvocab: proposals 20; forwards 60; nodes 80; accepted 40")
    assert "drafted via learned mappings 50.0%" in lines[0] and "accepted via learned mappings 50.0%" in lines[0]
    assert "learned cache entries 9, direct 6" in lines[0]
    assert lines[1].endswith("layer sets skip=7,8 (2)")


def test_tree_policy_systems_expand_and_parse():
    assert bench.split_system("ngram@chain:4~dev1") == ("ngram", "chain:4", "dev1")
    assert bench.split_system("plain") == ("plain", None, None)
    assert bench.expand_modes(["plain", "ngram"], ["plan", "chain:2"], []) == [
        "plain", "ngram@plan", "ngram@chain:2"]
    assert bench.expand_modes(["plain", "ngram@tree:2x2"], ["plan"], ["a", "b"]) == [
        "plain", "ngram@tree:2x2~a", "ngram@tree:2x2~b"]
    assert bench.expand_modes(["ngram"], [], []) == ["ngram"]
    with pytest.raises(ValueError, match="chain:K or tree:WxD"):
        bench.expand_modes(["ngram"], ["chain:x"], [])
    with pytest.raises(ValueError):
        bench.expand_modes(["ngram@widest"], [], [])


def test_planner_table_compares_predictions_with_measurements():
    rows = _rows()
    for r in rows:
        if r["system"] == "spec":
            r["stats"] = {"predicted_steps": 10, "predicted_tokens": 15.0, "predicted_seconds": 2.0,
                          "observed_tokens": 12, "observed_seconds": 2.4,
                          "plans": [{"bucket": "0.7-1.0", "nodes": 3, "widths": [1, 1, 1]}]}
    result = _result(rows)
    header, table = bench.planner_table(result)
    assert [row[0] for row in table] == ["spec"]
    spec_rows = sum(1 for r in rows if r["system"] == "spec")
    steps = 10 * spec_rows
    assert table[0][1] == str(steps) and table[0][2] == "1.50" and table[0][3] == "1.20"
    assert table[0][4] == "7.5" and table[0][5] == "5.0" and "0.7-1.0: 3 [1, 1, 1]" in table[0][6]
    assert "Planner predictions" in bench.render_markdown(result)


def test_paired_speed_ratio_interval_and_prompt_count():
    a = [_row("a", "mode", q, "x", 10, 1.0 + t, 0.0) for q, t in enumerate([1.0, 2.0, 3.0, 4.0])]
    b = [_row("b", "mode", q, "x", 10, 1.0 + t, 0.0) for q, t in enumerate([1.5, 2.0, 3.5, 3.0])]
    pair = bench.paired_speed(a, b)
    assert pair["ratio"] == pytest.approx((2.5 + 3 + 4.5 + 4) / (2 + 3 + 4 + 5))  # B's decode time over A's
    assert pair["low"] <= pair["ratio"] <= pair["high"] and pair["low"] < pair["high"]
    assert pair["faster"] == 2 and pair["prompts"] == 4  # A faster on prompts 0 and 2 (a tie is not faster)
    assert bench.paired_speed(a, b) == pair  # seeded: the same interval every time
    assert bench.paired_speed(a, []) is None
    same = bench.paired_speed(a, a)
    assert same["ratio"] == same["low"] == same["high"] == pytest.approx(1.0)


def test_cross_evaluation_table_pairs_systems_that_differ_only_in_profile():
    rows = _rows()[:3]  # plain
    for system, times in (("ngram@plan~p1t", [0.6, 0.3, 0.2]), ("ngram@plan~p2t", [0.5, 0.35, 0.15]),
                          ("ngram@chain:2~p1t", [0.6, 0.3, 0.2])):
        rows += [_row(system, "mode", q, c, 10, t, 0.05, steps=5) for q, c, t in zip((1, 2, 3), "xxy", times)]
    result = _result(rows)
    result["systems"] = {"plain": {"kind": "mode", "status": "ok"},
                         "ngram@plan~p1t": {"kind": "mode", "status": "ok", "device_threads": 1},
                         "ngram@plan~p2t": {"kind": "mode", "status": "ok", "device_threads": 4},
                         "ngram@chain:2~p1t": {"kind": "mode", "status": "ok", "device_threads": 1}}
    header, table = bench.cross_evaluation_table(result)  # the run used 4 threads: p2t is "own"
    assert [(r[0], r[1], r[2]) for r in table] == [("ngram@plan~p1t", "other", "p2t"),
                                                    ("ngram@plan~p2t", "own", "p1t")]
    own = table[1]
    assert own[3].startswith(f"{(0.55 + 0.25 + 0.15) / (0.45 + 0.3 + 0.1):.3f} [") and own[4] == "2/3"
    assert "Cross-evaluation of the device profiles" in bench.render_markdown(result)


def test_planned_rows_carry_the_last_plans(tiny_bundles):
    """A planned system's rows keep the engine's plan per bucket (the planner table's last column)."""
    from edgespec.engine import load

    engine = load(tiny_bundles["qwen2"], threads=1, drafter="ngram", history=False, tree="plan")
    try:
        _, stats = bench.ngram_mode(engine, "def f(x): return x + 1\ndef f(x):", bench.bench_gen_config(12))
        assert stats["plans"] and {"bucket", "nodes", "widths"} <= set(stats["plans"][0])
        engine.set_drafter(None)
        _, plain = bench.plain_mode(engine, "hello", bench.bench_gen_config(4))
        assert "plans" not in plain
    finally:
        engine.close()


class _LabelledEngine(FakeEngine):
    """A fake engine that logs which system ran each prompt (one shared log across engines)."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def generate(self, prompt, **config):
        if config["max_new_tokens"] == 40:  # measured runs only (warm-ups are shorter)
            self.log.append((self.name, prompt))
        return super().generate(prompt, **config)


def test_interleaved_job_runs_every_prompt_on_each_system_in_rotating_order(monkeypatch):
    def broken(engine, prompt, gen):
        raise RuntimeError("kaput")

    monkeypatch.setitem(bench.MODES, "broken", broken)
    log = []
    systems = ["plain", "ngram@chain:2", "broken"]
    engines = {s: _LabelledEngine(s, log) for s in systems}
    engines["ngram@chain:2"].drafter = SimpleNamespace(name="ngram", counters={"drafted": {}, "accepted": {}})
    questions = [{"question_id": i, "category": "a", "prompt": f"p{i}"} for i in range(3)]
    job = {"systems": systems, "max_new_tokens": 40, "warmup": 1, "questions": questions}
    res = bench.run_interleaved_job(job, engines=engines)["results"]
    assert res["broken"]["status"] == "failed" and "kaput" in res["broken"]["note"]  # the others go on
    assert [r["question_id"] for r in res["plain"]["rows"]] == [0, 1, 2]
    assert [r["question_id"] for r in res["ngram@chain:2"]["rows"]] == [0, 1, 2]
    assert res["ngram@chain:2"]["prompts"] == res["plain"]["prompts"]
    # prompt by prompt, every live system once per prompt, the first system rotating
    prompts = [engines["plain"].render_chat([{"content": q["prompt"]}]) for q in questions]
    assert log == [("plain", prompts[0]), ("ngram@chain:2", prompts[0]),
                   ("ngram@chain:2", prompts[1]), ("plain", prompts[1]),
                   ("plain", prompts[2]), ("ngram@chain:2", prompts[2])]


def test_interleaved_bench_matches_the_sequential_one_on_a_real_bundle(tiny_bundles, tmp_path):
    """`--interleave` on a real tiny bundle: the variants share the target's session, every system gives the plain
    target's tokens, and the result says it was interleaved."""
    from edgespec import cli

    items = [{"question_id": i, "category": c, "turns": [f"def f{i}(x): return x + {i}\ndef f{i}(x):"]}
             for i, c in enumerate("ab")]
    data = _write_jsonl(tmp_path / "q.jsonl", items)
    out = tmp_path / "r.json"
    args = cli.build_parser().parse_args(
        ["bench", "-b", str(tiny_bundles["qwen2"]), "--data", str(data), "--per-category", "1", "--max-new-tokens",
         "6", "--threads", "1", "--no-peers", "--in-process", "--interleave", "--mode", "plain,ngram",
         "--trees", "chain:2,plan", "--json", str(out)])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["config"]["interleave"] is True
    assert result["config"]["modes"] == ["plain", "ngram@chain:2", "ngram@plan"]
    assert all(s["status"] == "ok" and s["interleaved"] for s in result["systems"].values())
    by_system = {}
    for r in result["rows"]:
        by_system.setdefault(r["system"], []).append(r)
    assert {s: len(rs) for s, rs in by_system.items()} == {"plain": 2, "ngram@chain:2": 2, "ngram@plan": 2}
    assert all(r["agreement"] == 1.0 for r in result["rows"])  # exact: the plain target's tokens
    assert result["systems"]["ngram@plan"]["tree_policy"] == "plan"
