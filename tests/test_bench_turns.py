"""`edgespec bench` second turns and per-step costs: MT-bench follow-ups run right after the first answer on the same
engine (prefix and session caches carried over), exact against plain, summarized apart; the costs table reports
prefill tokens/s and the drafter's time on the steps it drafted nothing."""

from __future__ import annotations

import json

from edgespec import bench
from edgespec.bench.report import costs_table, turn_table
from edgespec.bench.summary import make_row, summarize_rows


def _write_jsonl(path, items):
    path.write_text("\n".join(json.dumps(d) for d in items) + "\n", encoding="utf-8")
    return path


def test_loader_keeps_the_second_turn(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "a", "turns": ["one", "two"]},
                                               {"question_id": 2, "category": "b", "turns": ["only"]}])
    first, second = bench.read_spec_bench(path)
    assert first["prompt"] == "one" and first["second_turn"] == "two"
    assert second["prompt"] == "only" and "second_turn" not in second


def test_second_turns_run_on_the_same_engine_exactly_and_are_summarized_apart(tiny_bundles, tmp_path):
    from edgespec import cli

    items = [{"question_id": 0, "category": "writing",
              "turns": ["def f(x): return x + 1\ndef f(x):", "Again: def f(x): return x + 1\ndef f(x):"]},
             {"question_id": 1, "category": "qa", "turns": ["The quick brown fox"]}]
    data = _write_jsonl(tmp_path / "q.jsonl", items)
    out = tmp_path / "r.json"
    args = cli.build_parser().parse_args(
        ["bench", "-b", str(tiny_bundles["qwen2"]), "--data", str(data), "--per-category", "1", "--max-new-tokens",
         "8", "--threads", "1", "--no-peers", "--in-process", "--interleave", "--mode", "plain,ngram", "--trees",
         "chain:3", "--json", str(out)])
    assert args.turns == 2  # the default
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    turns = {(r["system"], r["question_id"], r.get("turn", 1)) for r in rows}
    assert turns == {(s, q, t) for s in ("plain", "ngram@chain:3") for q, t in ((0, 1), (0, 2), (1, 1))}
    first = next(r for r in rows if r["system"] == "plain" and r["question_id"] == 0 and r.get("turn", 1) == 1)
    second = next(r for r in rows if r["system"] == "plain" and r.get("turn") == 2)
    assert second["prompt_tokens"] > first["prompt_tokens"]
    # the first turn's prompt is still cached: the follow-up feeds only what is new
    assert second["stats"]["reused_prompt_tokens"] >= first["prompt_tokens"] - 1
    assert all(r["agreement"] == 1.0 for r in rows)  # exact on both turns
    summary = result["summary"]
    assert summary["overall"]["plain"]["prompts"] == 2  # first turns only
    assert summary["per_turn"]["1"]["plain"]["prompts"] == 1 and summary["per_turn"]["2"]["plain"]["prompts"] == 1
    header, table = turn_table(result)
    assert header[-1] == "turn 2 / turn 1 speedup" and [row[0] for row in table] == ["plain", "ngram@chain:3"]
    assert "Second turns" in bench.render_markdown(result)

    args = cli.build_parser().parse_args(
        ["bench", "-b", str(tiny_bundles["qwen2"]), "--data", str(data), "--max-new-tokens", "4", "--threads", "1",
         "--no-peers", "--in-process", "--mode", "plain", "--turns", "1", "--json", str(out)])
    assert args.func(args) == 0
    assert all(r.get("turn", 1) == 1 for r in json.loads(out.read_text())["rows"])


def _row(system, qid, seconds, steps, **stats):
    stats = {"new_tokens": 11, "total_seconds": seconds, "time_to_first_token": 0.5, "steps": steps,
             "prompt_tokens": 100, "reused_prompt_tokens": 0, **stats}
    return make_row(system, "mode", {"question_id": qid, "category": "a"}, list(range(11)), stats)


def test_costs_summary_following_cost_against_the_plain_step():
    rows = [_row("plain", 0, 1.5, 11),  # 10 decoded tokens in 1.0 s: 100 ms per plain step
            _row("ngram", 0, 1.0, 6, draft_seconds=0.05, verify_seconds=0.4, drafted_tokens=10,
                 accepted_tokens=5, idle_steps=2, idle_draft_seconds=0.004, sat_out_steps=1,
                 sat_out_draft_seconds=0.0005)]
    summary = summarize_rows(rows)
    ngram = summary["overall"]["ngram"]
    assert ngram["decode_steps"] == 5 and ngram["draft_ms_per_step"] == 10.0 and ngram["verify_ms_per_step"] == 80.0
    assert ngram["idle_steps"] == 2 and ngram["idle_draft_ms_per_step"] == 2.0
    assert abs(ngram["idle_cost"] - 0.02) < 1e-12 and abs(ngram["draft_cost_per_step"] - 0.1) < 1e-12
    assert ngram["sat_out_steps"] == 1 and abs(ngram["following_cost"] - 0.005) < 1e-12
    assert summary["overall"]["plain"]["prefill_tokens_per_second"] == 200.0  # 100 tokens until the first, 0.5 s
    header, table = costs_table({"systems": {"plain": {}, "ngram": {}}, "summary": summary})
    cells = dict(zip(header, table[1]))
    assert cells["draft ms/idle step"] == "2.0" and cells["draft ms/sat-out step"] == "0.50"
    assert cells["sat-out cost vs plain step"] == "0.5%"
    assert dict(zip(header, table[0]))["draft ms/step"] == "–"  # plain decoding drafts nothing


def test_prefill_rate_counts_only_the_tokens_fed():
    row = _row("plain", 0, 1.0, 5, reused_prompt_tokens=60)
    assert row["prefill_tokens_per_second"] == 80.0  # 40 fed tokens in 0.5 s


def test_drafter_cost_table_splits_model_time_from_the_rest():
    from edgespec.bench.report import drafter_cost_table

    plain = _row("plain", 0, 1.5, 11)
    cross = _row("crossvocab", 0, 1.0, 6, draft_seconds=0.2, drafter_counters={
        "forwards": 20, "nodes": 40, "model_seconds": 0.15, "model_calls": 20})
    summary = summarize_rows([plain, cross])
    header, rows = drafter_cost_table({"systems": {"plain": {}, "crossvocab": {}}, "summary": summary,
                                       "rows": [plain, cross]})
    cells = dict(zip(header, rows[0]))
    assert len(rows) == 1 and cells["system"] == "crossvocab"
    assert cells["drafter ms/forward"] == "10.0" and cells["model ms/forward"] == "7.5"
    assert cells["outside the model"] == "25%" and cells["ms/drafted node"] == "5.0"
    assert cells["plain step ms"] == "100.0"
