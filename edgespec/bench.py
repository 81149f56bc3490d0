"""`edgespec bench`: Spec-Bench prompts through the engine's decoding modes and through peer runtimes.

Every system generates greedily, batch 1, from the same chat-templated prompt token ids, with the same thread count,
for exactly `--max-new-tokens` tokens (EOS never stops anyone: `ignore_eos=True` for the engine, no EOS id plus
`min_new_tokens` for transformers, a token counter for llama.cpp), so the rates are comparable.

Systems
* modes (`--mode plain,...`): decoding strategies of the engine, registered in `MODES`. A mode is a function
  `(engine, prompt_text, gen_config) -> (token_ids, stats)` where `stats` has GenerationStats' keys. `plain` is the
  baseline of every ratio. Later modes register themselves with `@register_mode("name")`; a mode that cannot run
  on a bundle (no drafter, say) raises `ModeUnavailable` and is reported as skipped.
* peers (`--peers hf,llama.cpp`): Hugging Face transformers `generate` (torch CPU, float32) on the bundle's source
  weights, and llama.cpp through llama-cpp-python on the source GGUF (optional: skipped when not installed).

Each system runs in its own fresh subprocess (`python -m edgespec.bench --worker JOB --result OUT`), so its peak RSS
and its threads are its own. Rates: end-to-end tokens/s = new tokens / total seconds (prefill included), decode
tokens/s = (new tokens - 1) / (total - time to first token); per category the medians over prompts; overall both
the aggregate (sum of tokens / sum of seconds) and the median. The summary functions are small and pure, over
lists of row dicts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .devices.memory import process_peak_rss_mb as peak_rss_mb, process_rss_mb as current_rss_mb

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
BASELINE = "plain"
PEERS = ("hf", "llama.cpp")
WARMUP_TOKENS = 16
RESULT_FORMAT = "edgespec-bench"
RESULT_VERSION = 1


# ---- Spec-Bench questions -------------------------------------------------------------------------------------------
def read_spec_bench(path: str | os.PathLike = DEFAULT_DATA) -> list[dict]:
    """Every question of a Spec-Bench `question.jsonl`: [{question_id, category, prompt}] (prompt = first turn)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Spec-Bench questions not found at {path} (pass --data PATH)")
    questions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            turns = d.get("turns") if isinstance(d, dict) else None
            if not turns or not isinstance(turns[0], str) or not isinstance(d.get("category"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with 'category' and a non-empty 'turns' list")
            questions.append({"question_id": d.get("question_id", lineno), "category": d["category"],
                              "prompt": turns[0]})
    return questions


def select_questions(questions: list[dict], per_category: int | None = 2, categories: Iterable[str] | None = None,
                     limit: int | None = None) -> list[dict]:
    """The first `per_category` questions of each wanted category (0/None = all), in file order, then `limit`."""
    known = list(dict.fromkeys(q["category"] for q in questions))
    wanted = None
    if categories:
        wanted = set(categories)
        unknown = sorted(wanted - set(known))
        if unknown:
            raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"this Spec-Bench file has: {', '.join(known)}")
    counts: dict[str, int] = {}
    out = []
    for q in questions:
        cat = q["category"]
        if wanted is not None and cat not in wanted:
            continue
        if per_category and counts.get(cat, 0) >= per_category:
            continue
        counts[cat] = counts.get(cat, 0) + 1
        out.append(q)
    return out[:limit] if limit else out


def load_spec_bench(path: str | os.PathLike = DEFAULT_DATA, per_category: int | None = 2,
                    categories: Iterable[str] | None = None, limit: int | None = None) -> list[dict]:
    """`read_spec_bench` then `select_questions`."""
    return select_questions(read_spec_bench(path), per_category, categories, limit)


# ---- modes ----------------------------------------------------------------------------------------------------------
ModeFn = Callable[[object, str, dict], "tuple[list[int], dict]"]
MODES: dict[str, ModeFn] = {}


class ModeUnavailable(RuntimeError):
    """A mode cannot run on this bundle (reported as skipped, not as a failure)."""


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (not installed, no suitable weights): skipped with a note."""


def register_mode(name: str):
    """Decorator: register `fn(engine, prompt_text, gen_config) -> (token_ids, stats dict)` as bench mode `name`."""
    def deco(fn: ModeFn) -> ModeFn:
        MODES[name] = fn
        return fn
    return deco


def _run(engine, prompt: str, gen_config: dict):
    result = engine.generate(prompt, **gen_config)
    stats = {**result.stats.to_dict(), "finish_reason": result.finish_reason}
    plans = engine.plans() if hasattr(engine, "plans") else []
    if plans:
        stats["plans"] = plans  # the plan per confidence bucket at the end of this prompt
    return result.token_ids, stats


def split_system(system: str) -> tuple[str, str | None, str | None]:
    """`mode[@tree][~device]` -> (mode, tree policy or None, device profile or None)."""
    rest, _, device = system.partition("~")
    mode, _, tree = rest.partition("@")
    return mode, tree or None, device or None


@register_mode("plain")
def plain_mode(engine, prompt: str, gen_config: dict):
    """Ordinary autoregressive decoding: one target forward per token."""
    if getattr(engine, "drafter", None) is not None:
        engine.set_drafter(None)
    return _run(engine, prompt, gen_config)


@register_mode("ngram")
def ngram_mode(engine, prompt: str, gen_config: dict):
    """Speculative decoding with the n-gram drafter: context and recycling tiers (the session tier is cleared
    between prompts by the bench's reset; no persistent cache, so prompts do not learn from each other; a static
    cache when the job names one)."""
    if getattr(engine.drafter, "name", None) != "ngram":
        engine.set_drafter("ngram", ngram_cache=False, ngram_static=getattr(engine, "bench_ngram_static", None))
    counters = engine.drafter.counters
    before = {tier: (counters["drafted"][tier], counters["accepted"][tier]) for tier in counters["drafted"]}
    token_ids, stats = _run(engine, prompt, gen_config)
    stats["tiers"] = {tier: [counters["drafted"][tier] - d, counters["accepted"][tier] - a]
                      for tier, (d, a) in before.items()}  # nodes proposed and accepted per tier
    return token_ids, stats


def _model_drafter_mode(spec: str, doc: str) -> ModeFn:
    """A mode that decodes with drafter `spec` (see `edgespec.engine.make_drafter`); skipped when the bundle lacks
    what the spec needs (a drafter model, a self-speculative export)."""
    def mode(engine, prompt: str, gen_config: dict):
        from .runtimes.manifest import BundleError

        current = getattr(engine, "bench_drafter", (None, None))
        if current[0] != spec or engine.drafter is not current[1]:
            try:
                engine.set_drafter(spec, ngram_cache=False, ngram_static=getattr(engine, "bench_ngram_static", None))
            except BundleError as exc:
                raise ModeUnavailable(str(exc)) from None
            engine.bench_drafter = (spec, engine.drafter)
        drafter = engine.drafter
        before = dict(drafter.counters)
        token_ids, stats = _run(engine, prompt, gen_config)
        stats["drafter_counters"] = {k: v - before.get(k, 0) for k, v in drafter.counters.items()}
        if getattr(drafter, "layer_search", None) is not None:
            stats["layers"] = drafter.layer_search.describe()
        if getattr(drafter, "cache", None) is not None and hasattr(drafter.cache, "sizes"):
            stats["learned_cache"] = drafter.cache.sizes()  # cross-vocabulary mappings learned so far
        return token_ids, stats
    mode.__doc__ = doc
    return mode


register_mode("draft")(_model_drafter_mode(
    "draft", "Speculative decoding with the bundle's same-vocabulary drafter model (tree drafts)."))
register_mode("staged")(_model_drafter_mode(
    "ngram>draft", "Staged speculation: the n-gram caches draft for the drafter model, which drafts for the target."))
register_mode("self")(_model_drafter_mode(
    "self", "Self-speculation: the target drafts with a subset of its layers, chosen online."))
register_mode("crossvocab")(_model_drafter_mode(
    "cross", "Cross-vocabulary drafting: a drafter model with another tokenizer, translated through text and learned "
             "mappings (OmniDraft-style)."))
register_mode("crossstaged")(_model_drafter_mode(
    "ngram>cross", "Staged cross-vocabulary drafting: n-grams (in the drafter's vocabulary) draft for the "
                   "cross-vocabulary drafter, which drafts for the target."))


def drafter_details(result: dict) -> list[str]:
    """One line per model-drafter mode: its counters summed over prompts (forwards, nodes, accepted), the share
    of drafted tokens that came from learned cross-vocabulary mappings, the learned cache's size at the end, and
    the layer sets self-speculation chose (with how many prompts ended on each)."""
    lines = []
    for system in result["systems"]:
        rows = [r for r in result["rows"] if r["system"] == system and "drafter_counters" in r.get("stats", {})]
        if not rows:
            continue
        total: dict[str, float] = {}
        for r in rows:
            for k, v in r["stats"]["drafter_counters"].items():
                if isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        parts = [f"{k} {int(total[k])}" for k in ("proposals", "forwards", "nodes", "accepted") if k in total]
        if total.get("nodes") and "learned_nodes" in total:
            parts.append(f"drafted via learned mappings {total['learned_nodes'] / total['nodes']:.1%}")
            if total.get("accepted"):
                parts.append(f"accepted via learned mappings {total.get('accepted_learned', 0) / total['accepted']:.1%}")
        if total.get("stage_fed"):
            parts.append(f"stage tokens fed {int(total['stage_fed'])}, used {int(total.get('stage_used', 0))}")
        cache = rows[-1]["stats"].get("learned_cache")
        if cache:
            parts.append("learned cache " + ", ".join(f"{k} {v}" for k, v in cache.items()))
        layers = [r["stats"].get("layers") for r in rows if r["stats"].get("layers")]
        if layers:
            seen: dict[str, int] = {}
            for value in layers:
                seen[value] = seen.get(value, 0) + 1
            parts.append("layer sets " + ", ".join(f"{k} ({n})" for k, n in seen.items()))
        lines.append(f"- {system}: " + "; ".join(parts))
    return lines


def bench_gen_config(max_new_tokens: int) -> dict:
    """GenerationConfig fields every mode gets: greedy, exactly `max_new_tokens` tokens (EOS ignored)."""
    return {"max_new_tokens": int(max_new_tokens), "temperature": 0.0, "ignore_eos": True}


# ---- rows and summaries (pure) --------------------------------------------------------------------------------------
def make_row(system: str, kind: str, question: dict, token_ids: list[int], stats: dict) -> dict:
    """One (system, prompt) measurement from a stats dict with GenerationStats' keys (missing ones tolerated)."""
    new = int(stats.get("new_tokens", len(token_ids)))
    total = float(stats.get("total_seconds") or 0.0)
    ttft = float(stats.get("time_to_first_token") or 0.0)
    steps = stats.get("steps")
    decode_time = total - ttft
    return {
        "system": system,
        "kind": kind,
        "question_id": question["question_id"],
        "category": question["category"],
        "prompt_tokens": int(stats.get("prompt_tokens") or len(question.get("ids") or ())),
        "new_tokens": new,
        "steps": int(steps) if steps else None,
        "time_to_first_token": ttft,
        "total_seconds": total,
        "prefill_seconds": stats.get("prefill_seconds"),
        "tokens_per_second": new / total if total > 0 else None,
        "decode_tokens_per_second": (new - 1) / decode_time if new > 1 and decode_time > 0 else None,
        "mean_accepted_tokens": new / steps if steps else None,
        "output_ids": [int(t) for t in token_ids],
        "stats": {k: v for k, v in stats.items() if k not in ("new_tokens", "total_seconds", "time_to_first_token")},
    }


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    return a / b if a is not None and b else None


def summarize(rows: list[dict]) -> dict:
    """Medians and aggregates over the rows of one system (and one category)."""
    new = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["total_seconds"] for r in rows)
    decode_new = sum(max(r["new_tokens"] - 1, 0) for r in rows)
    decode_seconds = sum(r["total_seconds"] - r["time_to_first_token"] for r in rows)
    spec = [r for r in rows if r.get("steps")]
    return {
        "prompts": len(rows),
        "new_tokens": new,
        "total_seconds": seconds,
        "tokens_per_second": _median(r["tokens_per_second"] for r in rows),
        "tokens_per_second_agg": new / seconds if seconds > 0 else None,
        "decode_tokens_per_second": _median(r["decode_tokens_per_second"] for r in rows),
        "decode_tokens_per_second_agg": decode_new / decode_seconds if decode_seconds > 0 else None,
        "time_to_first_token": _median(r["time_to_first_token"] for r in rows),
        "time_to_first_token_mean": _mean(r["time_to_first_token"] for r in rows),
        # Spec-Bench's metric over all steps: new tokens / target forward passes
        "mean_accepted_tokens": (sum(r["new_tokens"] for r in spec) / sum(r["steps"] for r in spec)) if spec else None,
        "agreement": _mean(r.get("agreement") for r in rows),
        **speculation_summary(rows),
    }


def speculation_summary(rows: list[dict]) -> dict:
    """Drafted and accepted tokens, the acceptance rate and where decoding time went (drafting, verifying,
    bookkeeping), summed over the rows of one system."""
    def total(key):
        return sum(float((r.get("stats") or {}).get(key) or 0.0) for r in rows)

    drafted, accepted = total("drafted_tokens"), total("accepted_tokens")
    return {"drafted_tokens": int(drafted), "accepted_tokens": int(accepted),
            "acceptance_rate": accepted / drafted if drafted else None,
            "draft_seconds": total("draft_seconds"), "verify_seconds": total("verify_seconds"),
            "bookkeeping_seconds": total("bookkeeping_seconds")}


def add_ratios(by_system: dict[str, dict], kinds: dict[str, str], baseline: str = BASELINE) -> None:
    """Ratios against the baseline, in place: `speedup` (mode / baseline) for modes, `plain_over_peer` for peers.

    `speedup` and `plain_over_peer` compare median tokens/s; the `_agg` forms compare aggregate tokens/s.
    """
    base = by_system.get(baseline)
    for system, s in by_system.items():
        for suffix in ("", "_agg"):
            key = "tokens_per_second" + suffix
            b = base.get(key) if base else None
            if kinds.get(system) == "peer":
                s["plain_over_peer" + suffix] = ratio(b, s.get(key))
            else:
                s["speedup" + suffix] = ratio(s.get(key), b)


def summarize_rows(rows: list[dict], baseline: str = BASELINE) -> dict:
    """Per-category and overall summaries of every system, with ratios against `baseline`."""
    systems = list(dict.fromkeys(r["system"] for r in rows))
    kinds = {r["system"]: r["kind"] for r in rows}
    categories = list(dict.fromkeys(r["category"] for r in rows))
    per_category = {}
    for cat in categories:
        by_system = {}
        for system in systems:
            subset = [r for r in rows if r["system"] == system and r["category"] == cat]
            if subset:
                by_system[system] = summarize(subset)
        add_ratios(by_system, kinds, baseline)
        per_category[cat] = by_system
    overall = {system: summarize([r for r in rows if r["system"] == system]) for system in systems}
    add_ratios(overall, kinds, baseline)
    return {"baseline": baseline, "systems": systems, "kinds": kinds, "categories": categories,
            "per_category": per_category, "overall": overall}


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    from .text import common_prefix_length

    return common_prefix_length(a, b)


def add_agreement(rows: list[dict], baseline: str = BASELINE) -> None:
    """Per row, in place: `agreement` = common prefix with the baseline's output / tokens (None without baseline).

    Greedy speculative modes must reach 1.0 (exactness); peers differ where their arithmetic differs.
    """
    base = {r["question_id"]: r["output_ids"] for r in rows if r["system"] == baseline}
    for r in rows:
        ref = base.get(r["question_id"])
        r["agreement"] = (common_prefix(r["output_ids"], ref) / max(len(ref), 1)) if ref is not None else None


# ---- tables ---------------------------------------------------------------------------------------------------------
def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "tps":
        return f"{value:.1f}"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "ms":
        return f"{value * 1000:.0f}"
    if kind == "tau":
        return f"{value:.2f}"
    if kind == "pct":
        return f"{value:.0%}"
    return str(value)


def category_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-category table: categories (median over prompts), then the overall rows."""
    baseline, kinds = summary["baseline"], summary["kinds"]
    modes = [s for s in summary["systems"] if kinds[s] != "peer"]
    peers = [s for s in summary["systems"] if kinds[s] == "peer"]
    header = ["category", "n"]
    for m in modes:
        header.append(f"{m} tok/s")
        if m != baseline:
            header.append(f"{m} vs {baseline}")
        header += [f"{m} τ", f"{m} TTFT ms"]
    for p in peers:
        header += [f"{p} tok/s", f"{baseline}/{p}", f"{p} TTFT ms"]

    def line(label: str, by_system: dict, agg: bool) -> list[str]:
        suffix = "_agg" if agg else ""
        n = max((s["prompts"] for s in by_system.values()), default=0)
        cells = [label, str(n)]
        for m in modes:
            s = by_system.get(m, {})
            cells.append(_fmt(s.get("tokens_per_second" + suffix), "tps"))
            if m != baseline:
                cells.append(_fmt(s.get("speedup" + suffix), "ratio"))
            cells += [_fmt(s.get("mean_accepted_tokens"), "tau"), _fmt(s.get("time_to_first_token"), "ms")]
        for p in peers:
            s = by_system.get(p, {})
            cells += [_fmt(s.get("tokens_per_second" + suffix), "tps"),
                      _fmt(s.get("plain_over_peer" + suffix), "ratio"), _fmt(s.get("time_to_first_token"), "ms")]
        return cells

    rows = [line(cat, summary["per_category"][cat], agg=False) for cat in summary["categories"]]
    rows.append(line("overall (sum)", summary["overall"], agg=True))
    rows.append(line("overall (median)", summary["overall"], agg=False))
    return header, rows


def systems_table(result: dict, notes: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-system table: overall rates, TTFT, τ, agreement with plain, peak RSS, load time.

    `notes` False leaves the reasons of skipped/failed systems out of the status cells (see `system_notes`).
    """
    header = ["system", "kind", "prompts", "tok/s (sum)", "tok/s (median)", "decode tok/s", "TTFT ms", "τ",
              "accepted/drafted", "draft/verify/other s", f"same tokens as {result['summary']['baseline']}",
              "peak RSS MB", "load s", "status"]
    rows = []
    overall = result["summary"]["overall"]
    for name, info in result["systems"].items():
        s = overall.get(name, {})
        rows.append([name, info.get("kind", ""), str(s.get("prompts", 0)), _fmt(s.get("tokens_per_second_agg"), "tps"),
                     _fmt(s.get("tokens_per_second"), "tps"), _fmt(s.get("decode_tokens_per_second"), "tps"),
                     _fmt(s.get("time_to_first_token"), "ms"), _fmt(s.get("mean_accepted_tokens"), "tau"),
                     (f"{s['accepted_tokens']}/{s['drafted_tokens']} ({_fmt(s.get('acceptance_rate'), 'pct')})"
                      if s.get("drafted_tokens") else "–"),
                     (f"{s['draft_seconds']:.1f}/{s['verify_seconds']:.1f}/{s['bookkeeping_seconds']:.1f}"
                      if s.get("drafted_tokens") else "–"),
                     _fmt(s.get("agreement"), "pct"),
                     f"{info['peak_rss_mb']:.0f}" if info.get("peak_rss_mb") else "–",
                     f"{info['load_seconds']:.1f}" if info.get("load_seconds") is not None else "–",
                     info.get("status", "") + (f": {info['note']}" if notes and info.get("note") else "")])
    return header, rows


def system_notes(result: dict) -> list[str]:
    """One line per system that has a note (why it was skipped or failed)."""
    return [f"{name} {info.get('status')}: {info['note']}" for name, info in result["systems"].items()
            if info.get("note")]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    right = [i > 0 for i in range(len(header))]
    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def render_markdown(result: dict) -> str:
    """The Markdown report of a bench result (the dict written by --json)."""
    c, m = result["config"], result["machine"]
    baseline = result["summary"]["baseline"]
    n_prompts = result["summary"]["overall"].get(baseline, {}).get("prompts", len(result["questions"]))
    lines = [
        f"# edgespec bench: {c.get('model') or c['bundle']}",
        "",
        f"Spec-Bench, {n_prompts} prompts "
        f"({c['per_category'] or 'all'} per category), greedy, batch 1, exactly {c['max_new_tokens']} new tokens "
        f"(EOS ignored), {c['threads']} threads, on {m.get('cpu_model') or 'unknown CPU'} "
        f"({m.get('physical_cores') or '?'} cores / {m.get('logical_cores') or '?'} threads)"
        + (f"; load average before / after: {m['load_average_before'][0]:.2f} / {m['load_average'][0]:.2f}."
           if m.get("load_average_before") and m.get("load_average") else "."),
        "",
        "tok/s = new tokens / total time, prefill included (category rows: median over prompts; "
        "`overall (sum)`: sum of tokens / sum of time). "
        f"`vs {result['summary']['baseline']}` = speedup of a mode over plain decoding; "
        f"`{result['summary']['baseline']}/peer` = edgespec plain tokens/s over the peer's. "
        "τ = mean accepted tokens per target forward (Spec-Bench). TTFT = median time to first token."
        + (" Modes interleaved: one process ran every prompt on each mode in turn, in rotating order (the target "
           "loaded once), so drift of the machine hits all modes alike; memory is that process's."
           if c.get("interleave") else ""),
        "",
        _md_table(*category_table(result["summary"])),
        "",
        _md_table(*systems_table(result)),
        "",
    ]
    header, crossed = cross_evaluation_table(result)
    if crossed:
        lines += ["Cross-evaluation of the device profiles (decode time of the other system over this one's, summed "
                  "over the same prompts; above 1: this one is faster; own = profiled at this run's thread count):",
                  "", _md_table(header, crossed), ""]
    header, planned = planner_table(result)
    if planned:
        lines += ["Planner predictions against measurements (over the steps it planned; tok/s of those steps):", "",
                  _md_table(header, planned), ""]
    details = drafter_details(result)
    if details:
        lines += ["Drafters (summed over prompts):", "", *details, ""]
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    if versions:
        lines += [f"Versions: {versions}.", ""]
    return "\n".join(lines)


def print_tables(result: dict, console=None) -> None:
    """Both tables on a rich console."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or redirected: no 80-column wrapping of the wide tables
            console = Console(width=200)
    for title, (header, rows) in (("Spec-Bench per category", category_table(result["summary"])),
                                  ("systems (overall)", systems_table(result, notes=False)),
                                  ("planner predictions", planner_table(result)),
                                  ("cross-evaluation of the device profiles", cross_evaluation_table(result))):
        if not rows:
            continue
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="right" if i and h != "status" else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in system_notes(result):
        console.print(note, markup=False, style="yellow")


# ---- machine info and memory ----------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU model, core counts, memory and the versions of everything measured (without importing torch)."""
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "hardware", "cpu model") and ":" in line:
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": cpu or platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
            "physical_cores": None, "memory_gb": None, "platform": platform.platform(),
            "python": platform.python_version(), "load_average": load_average()}
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info["versions"] = {name: _version(dist) for name, dist in (
        ("edgespec", "edgespec"), ("onnxruntime", "onnxruntime"), ("numpy", "numpy"), ("tokenizers", "tokenizers"),
        ("torch", "torch"), ("transformers", "transformers"), ("llama_cpp", "llama_cpp_python"))}
    return info


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (other work on the machine skews every rate; compare with the thread count)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def reset_peak_rss() -> bool:
    """Restart the peak RSS count (Linux: /proc/self/clear_refs); False when it cannot (in-process runs only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- jobs (what one worker process runs) ----------------------------------------------------------------------------
def _progress(system: str, i: int, n: int, row: dict) -> None:
    _log(f"[{system}] {i}/{n} {row['category']} #{row['question_id']}: {row['prompt_tokens']}+{row['new_tokens']} "
         f"tokens, {_fmt(row['tokens_per_second'], 'tps')} tok/s, TTFT {_fmt(row['time_to_first_token'], 'ms')} ms")


def _load_mode_engine(job: dict, system: str | None, base=None):
    """The engine of one system: the bundle loaded with the system's tree policy and device profile (`base`: a
    variant over that engine's loaded target instead, see `Engine.variant`)."""
    from .engine import load

    _, tree, device = split_system(system) if system else (None, None, None)
    device = device or job.get("device")
    device = None if device in (None, "none") else device
    tree = tree or job.get("tree") or "auto"
    if base is None:
        engine = load(job["bundle"], threads=job["threads"], max_context=job["max_context"], drafter=None,
                      draft_budget=job.get("draft_budget", 16), history=False, device=device, tree=tree)
    else:
        engine = base.variant(None, device=device, tree=tree)
    engine.bench_ngram_static = job.get("ngram_static")
    return engine


def _mode_result(system: str | None, engine, load_seconds: float) -> dict:
    """A system's result before any prompt ran: the model, load time and memory, the profile and tree policy."""
    entry = engine.entry
    return {"system": system, "kind": "mode", "status": "ok", "note": None, "load_seconds": load_seconds,
            "load_rss_mb": current_rss_mb(), "threads": engine.threads, "context_length": engine.context_length,
            "model": {"name": entry.name, "architecture": entry.architecture, "source": dict(entry.source),
                      "quantization": dict(entry.quantization), "pad_token_id": entry.pad_token_id},
            "rows": [], "prompts": [], "skipped": [],
            "device_profile": engine.profile.name if getattr(engine, "profile", None) is not None else None,
            "device_threads": engine.profile.threads if getattr(engine, "profile", None) is not None else None,
            "tree_policy": getattr(engine, "tree_policy", None)}


def _prepare_prompts(engine, job: dict, result: dict) -> list[tuple[dict, str, list[int]]]:
    """Chat-template and encode every question: (question, text, ids) for those that fit the context; the others
    go to `result['skipped']` with the reason, the ids of the rest to `result['prompts']`."""
    n_new = job["max_new_tokens"]
    prompts = []
    for q in job["questions"]:
        text = engine.render_chat([{"role": "user", "content": q["prompt"]}])
        ids = engine.encode(text)
        if len(ids) + n_new > engine.context_length:
            result["skipped"].append({"question_id": q["question_id"], "category": q["category"],
                                      "reason": f"{len(ids)} prompt tokens + {n_new} do not fit the context of "
                                                f"{engine.context_length} (raise --max-context)"})
            continue
        prompts.append((q, text, ids))
        result["prompts"].append({"question_id": q["question_id"], "category": q["category"], "ids": ids})
    return prompts


def _warm_up(engine, system: str, job: dict, text: str) -> None:
    """Untimed short generations of `system` on one prompt (raises ModeUnavailable)."""
    fn = MODES[split_system(system)[0]]
    for _ in range(job.get("warmup", 1)):
        engine.reset()
        fn(engine, text, {**bench_gen_config(job["max_new_tokens"]),
                          "max_new_tokens": min(job["max_new_tokens"], WARMUP_TOKENS)})


def _measure(engine, system: str, job: dict, prompt: tuple[dict, str, list[int]]) -> dict:
    """One measured generation of `system` on a prepared prompt, from a fresh conversation: its row."""
    q, text, ids = prompt
    engine.reset()
    token_ids, stats = MODES[split_system(system)[0]](engine, text, bench_gen_config(job["max_new_tokens"]))
    return make_row(system, "mode", {**q, "ids": ids}, token_ids, stats)


def run_mode_job(job: dict, engine=None) -> dict:
    """Load the bundle, chat-template and encode every question, then run mode `job['system']` over them.

    With `system` None only the prompts are prepared (their token ids feed the peers). The result carries the rows,
    the prompt ids, the questions skipped because they do not fit the context, and load time / memory.
    """
    system = job.get("system")
    t = time.perf_counter()
    if engine is None:
        engine = _load_mode_engine(job, system)
    result = _mode_result(system, engine, time.perf_counter() - t)
    prompts = _prepare_prompts(engine, job, result)
    if system is None or not prompts:
        return result
    try:
        _warm_up(engine, system, job, prompts[0][1])
        for i, prompt in enumerate(prompts, 1):
            result["rows"].append(_measure(engine, system, job, prompt))
            _progress(system, i, len(prompts), result["rows"][-1])
    except ModeUnavailable as exc:
        result.update(status="skipped", note=str(exc), rows=[])
    engine.reset()
    return result


def run_interleaved_job(job: dict, engines: dict | None = None) -> dict:
    """Run every system of `job['systems']` in one process, prompt by prompt: each prompt runs on every system in
    turn, the order rotated by one system per prompt, so the machine's drift over minutes (other tenants, heat)
    falls on all systems alike. The target is loaded once; the other systems are variants sharing its session.

    Returns {"results": {system: what `run_mode_job` returns for it}}; a system whose mode is unavailable is
    skipped, one that fails is marked failed, and the others go on. `engines`: given engines per system (tests)."""
    systems = list(job["systems"])
    results: dict[str, dict] = {}
    engines = dict(engines or {})
    for system in systems:
        t = time.perf_counter()
        if system not in engines:
            base = next(iter(engines.values()), None)
            engines[system] = _load_mode_engine(job, system, base=base)
        results[system] = _mode_result(system, engines[system], time.perf_counter() - t)
    first = results[systems[0]]
    prompts = _prepare_prompts(engines[systems[0]], job, first)
    for system in systems[1:]:
        results[system].update(prompts=first["prompts"], skipped=first["skipped"])

    live = list(systems)
    for system in systems if prompts else []:
        try:
            _warm_up(engines[system], system, job, prompts[0][1])
        except Exception as exc:  # one system's failure must not take the others down
            results[system].update(_failure(exc))
            live.remove(system)
    for i, prompt in enumerate(prompts):
        order = live[i % len(live):] + live[:i % len(live)] if live else []
        for system in order:  # only a system's own failure removes it from `live`
            try:
                results[system]["rows"].append(_measure(engines[system], system, job, prompt))
            except Exception as exc:
                results[system].update(_failure(exc))
                live.remove(system)
                continue
            _progress(system, i + 1, len(prompts), results[system]["rows"][-1])
    for engine in engines.values():
        engine.reset()
    return {"kind": "interleave", "status": "ok", "results": results}


class _TimingStreamer:
    """A transformers streamer that only notes when the first new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.first_token_time = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf_job(job: dict) -> dict:
    """Hugging Face transformers `generate` (torch CPU, float32) on the source weights, from the same prompt ids."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig
    except ImportError as exc:
        raise PeerUnavailable(f"transformers/torch not importable ({exc}); pip install 'edgespec[export]'") from None
    threads = job["threads"]
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    source = Path(job["source_path"])
    t = time.perf_counter()
    if source.is_file():  # a GGUF file: transformers dequantizes it to float32
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, use_safetensors=True)
    model.eval()
    load_seconds = time.perf_counter() - t
    n_new = job["max_new_tokens"]
    pad = job.get("pad_token_id")

    def config(n):  # a fresh config: no EOS (never stops early), no repetition penalty or sampling from the model's
        return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=pad if pad is not None else 0, use_cache=True)

    def run(ids, n):
        input_ids = torch.tensor([ids], dtype=torch.long)
        streamer = _TimingStreamer()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config(n),
                                 streamer=streamer)
            total = time.perf_counter() - t0
        new = out[0, input_ids.shape[1]:].tolist()
        ttft = (streamer.first_token_time - t0) if streamer.first_token_time else total
        return new, {"prompt_tokens": len(ids), "new_tokens": len(new), "time_to_first_token": ttft,
                     "total_seconds": total}

    result = {"system": "hf", "kind": "peer", "status": "ok", "note": None, "load_seconds": load_seconds,
              "load_rss_mb": current_rss_mb(), "threads": torch.get_num_threads(),
              "version": f"transformers {transformers.__version__}, torch {torch.__version__}", "rows": []}
    return _run_peer_prompts("hf", run, job, result)


def _run_peer_prompts(system: str, run, job: dict, result: dict) -> dict:
    """Warm up, then run every prompt of `job` through `run(ids, n)` and add its rows to `result`."""
    prompts, n_new = job["prompts"], job["max_new_tokens"]
    for _ in range(job.get("warmup", 1)):
        run(prompts[0]["ids"], min(n_new, WARMUP_TOKENS))
    for i, p in enumerate(prompts, 1):
        token_ids, stats = run(p["ids"], n_new)
        row = make_row(system, "peer", p, token_ids, stats)
        result["rows"].append(row)
        _progress(system, i, len(prompts), row)
    return result


def run_llama_cpp_job(job: dict) -> dict:
    """llama.cpp through llama-cpp-python on the source GGUF: greedy, exactly N tokens from the same prompt ids."""
    try:
        import llama_cpp
    except ImportError:
        raise PeerUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    threads = job["threads"]
    n_new = job["max_new_tokens"]
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["source_path"], n_threads=threads, n_threads_batch=threads,
                          n_ctx=job["n_ctx"], n_batch=512, seed=0, verbose=False)
    load_seconds = time.perf_counter() - t

    def run(ids, n):
        llm.reset()  # forget the previous prompt: no prefix reuse between prompts
        out = []
        t0 = time.perf_counter()
        first = None
        # temp 0 -> greedy; EOS is not checked by Llama.generate itself, so the counter alone stops it
        # (generate mutates the list it is given: pass a copy)
        for token in llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0,
                                  repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            out.append(int(token))
            if len(out) >= n:
                break
        total = time.perf_counter() - t0
        return out, {"prompt_tokens": len(ids), "new_tokens": len(out), "time_to_first_token": first - t0,
                     "total_seconds": total}

    result = {"system": "llama.cpp", "kind": "peer", "status": "ok", "note": None, "load_seconds": load_seconds,
              "load_rss_mb": current_rss_mb(), "threads": threads,
              "version": f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}", "rows": []}
    return _run_peer_prompts("llama.cpp", run, job, result)


JOBS = {"mode": run_mode_job, "interleave": run_interleaved_job, "hf": run_hf_job,
        "llama.cpp": run_llama_cpp_job}


def _failure(exc: Exception) -> dict:
    """The status of a system stopped by `exc`: skipped when its mode or peer is unavailable here, else failed
    (with the traceback on stderr); no rows either way."""
    if isinstance(exc, (PeerUnavailable, ModeUnavailable)):
        return {"status": "skipped", "note": str(exc), "rows": []}
    traceback.print_exc()
    return {"status": "failed", "note": f"{type(exc).__name__}: {exc}", "rows": []}


def run_job(job: dict) -> dict:
    """Run one job in this process; unavailability and errors become a status, never an exception."""
    try:
        result = JOBS[job["kind"]](job)
    except Exception as exc:  # a failed system must not take the others down
        result = _failure(exc)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_subprocess(job: dict, echo: Callable[[str], None] = _log) -> dict:
    """Run one job in a fresh `python -m edgespec.bench --worker` process; its stderr is echoed as it comes."""
    with tempfile.TemporaryDirectory(prefix="edgespec-bench-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        env = dict(os.environ)
        threads = str(job["threads"])
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "edgespec.bench", "--worker", str(job_path), "--result", str(result_path)]
        tail: deque[str] = deque(maxlen=20)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                errors="replace")
        try:
            for line in proc.stderr:
                line = line.rstrip("\n")
                tail.append(line)
                echo(line)
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if result_path.is_file():
            return json.loads(result_path.read_text(encoding="utf-8"))
        last = " | ".join(l for l in tail if l.strip())[-500:]
        return {"status": "failed", "note": f"worker exited with code {proc.returncode}: {last}", "rows": []}


# ---- the bench ------------------------------------------------------------------------------------------------------
def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _peer_job(peer: str, args, prompts: list[dict], threads: int, model_info: dict, context_length: int) -> dict | str:
    """The job of one peer, or the reason it cannot run here."""
    if peer == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if peer == "hf" and (importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None):
        return "torch/transformers are not installed (pip install 'edgespec[export]')"
    source = model_info.get("source") or {}
    path = args.peer_model or source.get("path")
    if not path:
        return "the bundle's manifest names no source weights (pass --peer-model PATH)"
    if not Path(path).exists():
        return f"source weights {path} not found (pass --peer-model PATH)"
    if peer == "llama.cpp" and not (Path(path).is_file() and str(path).lower().endswith(".gguf")):
        return f"llama.cpp needs a GGUF file; the source is {path} (pass --peer-model FILE.gguf)"
    n_ctx = max([len(p["ids"]) for p in prompts] + [0]) + args.max_new_tokens + 8
    return {"kind": peer, "system": peer, "source_path": str(path), "threads": threads,
            "max_new_tokens": args.max_new_tokens, "warmup": args.warmup, "prompts": prompts,
            "n_ctx": max(n_ctx, min(context_length, args.max_context or context_length)),
            "pad_token_id": model_info.get("pad_token_id")}


def run_bench(args, echo: Callable[[str], None] = _log) -> dict:
    """Run every mode and peer and return the full result (the dict --json writes)."""
    from .runtimes.runner import default_threads

    modes = expand_modes(_split(args.mode), _split(getattr(args, "trees", None)),
                         _split(getattr(args, "device", None)))
    unknown = [m for m in modes if split_system(m)[0] not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; available: {', '.join(MODES)}")
    peers = [] if args.no_peers else _split(args.peers)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; available: {', '.join(PEERS)}")
    if not modes and not peers:
        raise ValueError("nothing to run: give --mode and/or --peers")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    categories = _split(args.categories) or None
    questions = load_spec_bench(args.data, args.per_category, categories, args.limit)
    if not questions:
        raise ValueError("no Spec-Bench questions selected")
    threads = args.threads or default_threads()
    devices = [d for d in _split(getattr(args, "device", None)) if d != "none"]
    for device in devices:  # measured (or found) once here, so the workers find it cached
        profile = prepare_device(args.bundle, device, threads)
        echo(f"device profile {device}: {profile}")
    load_before = load_average()
    busy = load_before[0] - max((os.cpu_count() or threads) - threads, 0) if load_before else 0.0
    if busy >= 1.0:
        echo(f"warning: load average {load_before[0]:.2f} on {os.cpu_count()} CPUs: other work will share the "
             f"{threads} threads measured here, so the rates will be low and noisy")
    echo(f"bench: {len(questions)} prompts, modes {', '.join(modes) or '-'}, peers {', '.join(peers) or '-'}, "
         f"{args.max_new_tokens} new tokens, {threads} threads")

    base_job = {"kind": "mode", "bundle": str(args.bundle), "threads": threads, "max_context": args.max_context,
                "max_new_tokens": args.max_new_tokens, "warmup": args.warmup, "questions": questions,
                "draft_budget": getattr(args, "draft_budget", 16), "ngram_static": getattr(args, "ngram_static", None),
                "device": devices[0] if len(devices) == 1 else None}
    systems: dict[str, dict] = {}
    rows: list[dict] = []
    prepared = None  # a mode result with the prompt ids

    def record(name: str, kind: str, res: dict) -> None:
        info = {k: v for k, v in res.items() if k not in ("rows", "prompts", "skipped", "questions", "system")}
        info["kind"] = kind
        systems[name] = info
        rows.extend(res.get("rows") or [])
        if res.get("status") != "ok":
            echo(f"[{name}] {res.get('status')}: {res.get('note')}")

    interleave = bool(getattr(args, "interleave", False)) and len(modes) > 1
    if interleave:  # one worker runs every mode, prompt by prompt
        if args.in_process:
            reset_peak_rss()
        job = {**base_job, "kind": "interleave", "systems": modes}
        res = run_job(job) if args.in_process else run_subprocess(job, echo)
        missing = {"status": res.get("status", "failed"), "note": res.get("note"), "rows": []}
        mode_results = [(mode, {**res.get("results", {}).get(mode, missing), "peak_rss_mb": res.get("peak_rss_mb"),
                                "interleaved": True}) for mode in modes]
    else:
        mode_results = []
        for mode in modes:
            job = {**base_job, "system": mode}
            if args.in_process:
                reset_peak_rss()
            mode_results.append((mode, run_job(job) if args.in_process else run_subprocess(job, echo)))
    for mode, res in mode_results:
        record(mode, "mode", res)
        if prepared is None and res.get("prompts"):
            prepared = res
    if peers and prepared is None:  # no mode ran (or all failed): prepare the prompt ids alone
        res = run_job({**base_job, "system": None}) if args.in_process else run_subprocess({**base_job, "system": None},
                                                                                          echo)
        prepared = res if res.get("prompts") else None
        if prepared is None:
            echo(f"cannot prepare prompts: {res.get('note')}")
    model_info = dict((prepared or {}).get("model") or {})
    for peer in peers:
        if prepared is None:
            record(peer, "peer", {"status": "skipped", "note": "no prompt token ids (the bundle could not be loaded)"})
            continue
        job = _peer_job(peer, args, prepared["prompts"], threads, model_info, prepared.get("context_length") or 0)
        if isinstance(job, str):
            record(peer, "peer", {"status": "skipped", "note": job})
            continue
        record(peer, "peer", run_subprocess(job, echo))

    add_agreement(rows, BASELINE)
    for r in rows:  # the peers' sanity check: every system must have produced exactly N tokens
        if r["new_tokens"] != args.max_new_tokens:
            echo(f"warning: {r['system']} produced {r['new_tokens']} tokens (not {args.max_new_tokens}) "
                 f"for question {r['question_id']}")
    config = {"bundle": str(args.bundle), "model": model_info.get("name"), "source": model_info.get("source"),
              "quantization": model_info.get("quantization"), "data": str(args.data),
              "per_category": args.per_category, "categories": categories, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "threads": threads, "max_context": args.max_context,
              "modes": modes, "peers": peers, "devices": devices, "peer_model": args.peer_model, "warmup": args.warmup,
              "greedy": True, "batch_size": 1, "ignore_eos": True, "in_process": bool(args.in_process),
              "interleave": interleave,
              "baseline": BASELINE}
    return {
        "format": RESULT_FORMAT, "version": RESULT_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "machine": {**machine_info(), "load_average_before": load_before},
        "questions": [{"question_id": q["question_id"], "category": q["category"]} for q in questions],
        "skipped_questions": (prepared or {}).get("skipped", []),
        "systems": systems,
        "rows": rows,
        "summary": summarize_rows(rows, BASELINE),
    }


def expand_modes(modes: list[str], trees: list[str], devices: list[str]) -> list[str]:
    """Systems to run: each speculative mode once per tree policy (`mode@tree`) and, with several device profiles,
    once per profile (`mode@tree~device`); plain decoding once. Policies are checked here."""
    from .engine import check_tree_policy

    out: list[str] = []
    for tree in trees:
        check_tree_policy(tree)
    for mode in modes:
        base, tree, device = split_system(mode)
        if tree is not None:
            check_tree_policy(tree)
        if base == BASELINE or tree is not None or not trees:
            variants = [mode]
        else:
            variants = [f"{mode}@{t}" for t in trees]
        if len(devices) > 1 and base != BASELINE and device is None:
            variants = [f"{v}~{d}" for v in variants for d in devices]
        out += [v for v in variants if v not in out]
    return out


def prepare_device(bundle, device: str, threads: int) -> str:
    """Resolve a device profile once (measuring it when `auto` finds none); a line describing it."""
    from .devices.profile import resolve_device
    from .runtimes.manifest import load_manifest

    manifest = load_manifest(bundle)
    profile = resolve_device(device, manifest, threads, entry=manifest.target_model)
    if profile is None:
        return "none"
    return (f"{profile.name} ({profile.threads} threads; one token "
            f"{profile.verify_seconds(1, 512) * 1000:.0f} ms, 8 tokens {profile.verify_seconds(8, 512) * 1000:.0f} ms "
            f"at 512 tokens of context)")


def paired_speed(rows_a: list[dict], rows_b: list[dict], resamples: int = 2000, seed: int = 0) -> dict | None:
    """Decode speed of system A over system B on the prompts both ran (same new tokens each): B's summed decode
    time over A's (above 1: A is faster), a 95% bootstrap interval over prompts, and on how many prompts A was
    faster. None without common prompts."""
    decode = lambda r: r["total_seconds"] - r["time_to_first_token"]  # noqa: E731
    a = {r["question_id"]: decode(r) for r in rows_a}
    b = {r["question_id"]: decode(r) for r in rows_b}
    common = [q for q in a if q in b]
    if not common:
        return None
    time_a, time_b = np.array([a[q] for q in common]), np.array([b[q] for q in common])
    picks = np.random.default_rng(seed).integers(0, len(common), size=(resamples, len(common)))
    boots = np.sort(time_b[picks].sum(axis=1) / time_a[picks].sum(axis=1))
    return {"ratio": float(time_b.sum() / time_a.sum()), "low": float(boots[int(0.025 * resamples)]),
            "high": float(boots[int(0.975 * resamples) - 1]), "faster": int((time_a < time_b).sum()),
            "prompts": len(common)}


def cross_evaluation_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Systems that differ only in their device profile (`--device P1,P2`), compared pairwise on the same prompts:
    decode speed of each over the other with a 95% bootstrap interval. A profile measured at this run's thread
    count is marked "own" (the cross-evaluation: each plan should be at least as fast as the others on its own
    setting)."""
    header = ["system", "profile", "against", "decode speed ratio [95% CI]", "faster on"]
    groups: dict[tuple, list[str]] = {}
    for system in result["systems"]:
        mode, tree, device = split_system(system)
        if device is not None and result["systems"][system].get("status") == "ok":
            groups.setdefault((mode, tree), []).append(system)
    threads = result["config"].get("threads")
    rows = []
    for members in groups.values():
        for a in members:
            for b in members:
                if a == b:
                    continue
                pair = paired_speed([r for r in result["rows"] if r["system"] == a],
                                    [r for r in result["rows"] if r["system"] == b])
                if pair is None:
                    continue
                own = result["systems"][a].get("device_threads") == threads
                rows.append([a, "own" if own else "other", split_system(b)[2],
                             f"{pair['ratio']:.3f} [{pair['low']:.3f}, {pair['high']:.3f}]",
                             f"{pair['faster']}/{pair['prompts']}"])
    return header, rows


def planner_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Per planned system: the planner's predicted tokens per step and tokens/s against the measured ones (over the
    steps it planned), and the plans it ended with."""
    header = ["system", "planned steps", "predicted τ", "measured τ", "predicted tok/s", "measured tok/s",
              "last plans (bucket: nodes, widths)"]
    rows = []
    for system in result["systems"]:
        mine = [r for r in result["rows"] if r["system"] == system and (r.get("stats") or {}).get("predicted_steps")]
        if not mine:
            continue

        def total(key):
            return sum(float(r["stats"].get(key) or 0.0) for r in mine)

        steps = total("predicted_steps")
        plans = (mine[-1]["stats"].get("plans") or [])
        rows.append([system, str(int(steps)), _fmt(total("predicted_tokens") / steps, "tau"),
                     _fmt(total("observed_tokens") / steps, "tau"),
                     _fmt(ratio(total("predicted_tokens"), total("predicted_seconds")), "tps"),
                     _fmt(ratio(total("observed_tokens"), total("observed_seconds")), "tps"),
                     "; ".join(f"{p['bucket']}: {p['nodes']} {p['widths']}" for p in plans)])
    return header, rows


MAX_QUESTIONS = 1_000_000  # --per-category and --limit (Spec-Bench has 480 questions)
MAX_WARMUP = 1000
MAX_DRAFT_BUDGET = 256  # as `edgespec generate`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `edgespec bench` (numbers bounded, files regular: see edgespec.cliargs)."""
    from .cliargs import MAX_TOKENS, bounded_int, comma_items, new_or_regular_file, not_special_file, threads_arg

    parser.add_argument("--bundle", "-b", required=True, help="bundle folder")
    parser.add_argument("--mode", "--modes", dest="mode", default=BASELINE,
                        help=f"comma-separated decoding modes (available: {', '.join(MODES)}; baseline: {BASELINE})")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers on the same weights (default: {','.join(PEERS)})")
    parser.add_argument("--no-peers", action="store_true", help="measure the modes only")
    parser.add_argument("--peer-model", type=not_special_file, default=None,
                        help="source weights for the peers (GGUF file or HF folder; default: the manifest's source)")
    parser.add_argument("--data", type=new_or_regular_file, default=str(DEFAULT_DATA),
                        help="Spec-Bench question.jsonl (a regular file)")
    parser.add_argument("--per-category", type=bounded_int(0, MAX_QUESTIONS), default=2,
                        help=f"first N questions of each category (0 = all; at most {MAX_QUESTIONS})")
    parser.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    parser.add_argument("--limit", type=bounded_int(1, MAX_QUESTIONS), default=None,
                        help=f"at most this many questions in all (1 to {MAX_QUESTIONS})")
    parser.add_argument("--max-new-tokens", type=bounded_int(1, MAX_TOKENS), default=128,
                        help=f"tokens every system generates (exactly; 1 to {MAX_TOKENS})")
    parser.add_argument("--threads", type=threads_arg(), default=None,
                        help="threads for every system, 1 to 4x the CPU count (default: the engine's)")
    parser.add_argument("--max-context", type=bounded_int(1, MAX_TOKENS), default=4096,
                        help=f"engine context (prompt + new tokens must fit; 1 to {MAX_TOKENS})")
    parser.add_argument("--warmup", type=bounded_int(0, MAX_WARMUP), default=1,
                        help=f"untimed short generations before measuring (0 to {MAX_WARMUP})")
    parser.add_argument("--draft-budget", type=bounded_int(0, MAX_DRAFT_BUDGET), default=16,
                        help=f"most draft tree nodes per step (speculative modes; 0 to {MAX_DRAFT_BUDGET})")
    parser.add_argument("--device", type=comma_items(not_special_file), default="none", metavar="NAME|auto|FILE[,...]",
                        help="device profile(s) sizing the draft trees (default none: costs measured while running); "
                             "several: every speculative mode runs once per profile (cross-evaluation)")
    parser.add_argument("--trees", default=None, metavar="POLICY[,...]",
                        help="tree policies to compare, each speculative mode once per policy (auto, plan, scores, "
                             "chain:K, tree:WxD); a mode can also name one itself: ngram@chain:4")
    parser.add_argument("--ngram-static", type=new_or_regular_file, default=None, metavar="CACHE",
                        help="a static n-gram cache (edgespec ngram build) for the ngram mode")
    parser.add_argument("--json", dest="json_path", type=new_or_regular_file, default=None, metavar="PATH",
                        help="write the full result here")
    parser.add_argument("--markdown", type=new_or_regular_file, default=None, metavar="PATH",
                        help="write the Markdown report here")
    parser.add_argument("--interleave", action="store_true",
                        help="run the modes side by side in one worker, prompt by prompt in rotating order (the "
                             "target loaded once), so the machine's drift over minutes hits every mode alike; the "
                             "default runs each mode over all prompts in its own worker, one after another")
    parser.add_argument("--in-process", action="store_true",
                        help="run the modes in this process (debugging; peers still get their own process)")


def main(args) -> int:
    """`edgespec bench`: returns 1 when a mode failed, else 0 (skipped or failed peers are only reported)."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    result = run_bench(args, echo=lambda line: err.print(line, markup=False, style="dim"))
    print_tables(result)
    if result["skipped_questions"]:
        err.print(f"[yellow]{len(result['skipped_questions'])} question(s) skipped: "
                  f"{result['skipped_questions'][0]['reason']}[/]")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
        err.print(f"JSON written to {args.json_path}")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(result), encoding="utf-8")
        err.print(f"Markdown written to {args.markdown}")
    failed = [n for n, s in result["systems"].items() if s.get("kind") == "mode" and s.get("status") == "failed"]
    return 1 if failed else 0


def _worker_main(argv=None) -> int:
    """`python -m edgespec.bench --worker JOB --result OUT`: run one job, write its result as JSON."""
    p = argparse.ArgumentParser(prog="python -m edgespec.bench", description="internal bench worker")
    p.add_argument("--worker", required=True, help="job JSON")
    p.add_argument("--result", required=True, help="result JSON to write")
    a = p.parse_args(argv)
    job = json.loads(Path(a.worker).read_text(encoding="utf-8"))
    result = run_job(job)
    Path(a.result).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    # run through the imported module, so modes registered into `edgespec.bench.MODES` by other modules are seen
    from edgespec.bench import _worker_main as _main

    sys.exit(_main())
