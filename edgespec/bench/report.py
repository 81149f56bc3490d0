"""What a bench result looks like to a reader: the tables (per category, per system, planner predictions,
cross-evaluation of device profiles, drafter counters), the Markdown report, the rich console tables, and the
progress lines the workers print."""

from __future__ import annotations

import sys

from .modes import split_system
from .summary import paired_speed, ratio


def log(message: str) -> None:
    """One line on stderr (the workers' progress; the default `echo` of the orchestration)."""
    print(message, file=sys.stderr, flush=True)


def progress(system: str, i: int, n: int, row: dict) -> None:
    """The progress line of a measured prompt."""
    log(f"[{system}] {i}/{n} {row['category']} #{row['question_id']}: {row['prompt_tokens']}+{row['new_tokens']} "
        f"tokens, {fmt(row['tokens_per_second'], 'tps')} tok/s, TTFT {fmt(row['time_to_first_token'], 'ms')} ms")


def fmt(value, kind: str) -> str:
    """A table cell: `value` shown as `kind` (tps, ratio, ms, ms1, ms2, tau, pct, pct1), "–" when missing."""
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
    if kind == "pct1":
        return f"{value:.1%}"
    if kind == "ms1":
        return f"{value:.1f}"
    if kind == "ms2":
        return f"{value:.2f}"
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
            cells.append(fmt(s.get("tokens_per_second" + suffix), "tps"))
            if m != baseline:
                cells.append(fmt(s.get("speedup" + suffix), "ratio"))
            cells += [fmt(s.get("mean_accepted_tokens"), "tau"), fmt(s.get("time_to_first_token"), "ms")]
        for p in peers:
            s = by_system.get(p, {})
            cells += [fmt(s.get("tokens_per_second" + suffix), "tps"),
                      fmt(s.get("plain_over_peer" + suffix), "ratio"), fmt(s.get("time_to_first_token"), "ms")]
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
        rows.append([name, info.get("kind", ""), str(s.get("prompts", 0)), fmt(s.get("tokens_per_second_agg"), "tps"),
                     fmt(s.get("tokens_per_second"), "tps"), fmt(s.get("decode_tokens_per_second"), "tps"),
                     fmt(s.get("time_to_first_token"), "ms"), fmt(s.get("mean_accepted_tokens"), "tau"),
                     (f"{s['accepted_tokens']}/{s['drafted_tokens']} ({fmt(s.get('acceptance_rate'), 'pct')})"
                      if s.get("drafted_tokens") else "–"),
                     (f"{s['draft_seconds']:.1f}/{s['verify_seconds']:.1f}/{s['bookkeeping_seconds']:.1f}"
                      if s.get("drafted_tokens") else "–"),
                     fmt(s.get("agreement"), "pct"),
                     f"{info['peak_rss_mb']:.0f}" if info.get("peak_rss_mb") else "–",
                     f"{info['load_seconds']:.1f}" if info.get("load_seconds") is not None else "–",
                     info.get("status", "") + (f": {info['note']}" if notes and info.get("note") else "")])
    return header, rows


def system_notes(result: dict) -> list[str]:
    """One line per system that has a note (why it was skipped or failed)."""
    return [f"{name} {info.get('status')}: {info['note']}" for name, info in result["systems"].items()
            if info.get("note")]


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
        rows.append([system, str(int(steps)), fmt(total("predicted_tokens") / steps, "tau"),
                     fmt(total("observed_tokens") / steps, "tau"),
                     fmt(ratio(total("predicted_tokens"), total("predicted_seconds")), "tps"),
                     fmt(ratio(total("observed_tokens"), total("observed_seconds")), "tps"),
                     "; ".join(f"{p['bucket']}: {p['nodes']} {p['widths']}" for p in plans)])
    return header, rows


def costs_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Per system: prefill tokens/s (prompt tokens fed per second until the first token) and, for drafting modes,
    where a decoding step's time goes: the drafter's ms per step, the target's verify ms per step, and the drafter's
    ms on the steps it drafted nothing (it sat out or found nothing: the cost of following the text), also as a share
    of a plain decoding step."""
    header = ["system", "prefill tok/s", "decode steps", "draft ms/step", "verify ms/step", "idle steps",
              "draft ms/idle step", "sat-out steps", "draft ms/sat-out step", "sat-out cost vs plain step",
              "draft cost vs plain step"]
    rows = []
    overall = result["summary"]["overall"]
    for name in result["systems"]:
        s = overall.get(name)
        if not s:
            continue
        drafting = bool(s.get("decode_steps")) and s.get("draft_ms_per_step") is not None and (
            s.get("drafted_tokens") or s.get("idle_steps"))
        rows.append([name, fmt(s.get("prefill_tokens_per_second"), "tps"),
                     str(s.get("decode_steps") or "–") if drafting else "–",
                     fmt(s.get("draft_ms_per_step"), "ms1") if drafting else "–",
                     fmt(s.get("verify_ms_per_step"), "ms1") if drafting else "–",
                     str(s.get("idle_steps", "–")) if drafting else "–",
                     fmt(s.get("idle_draft_ms_per_step"), "ms1") if drafting else "–",
                     str(s.get("sat_out_steps", "–")) if drafting else "–",
                     fmt(s.get("sat_out_draft_ms_per_step"), "ms2") if drafting else "–",
                     fmt(s.get("following_cost"), "pct1") if drafting else "–",
                     fmt(s.get("draft_cost_per_step"), "pct1") if drafting else "–"])
    return header, rows


def turn_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Per system, on the questions with a second turn: tokens/s, speedup over the baseline and τ of turn 1 and of
    turn 2 (run right after turn 1 on the same engine), and turn 2's speedup over turn 1's."""
    per_turn = result["summary"].get("per_turn") or {}
    if "2" not in per_turn:
        return [], []
    header = ["system", "prompts", "turn 1 tok/s", "turn 1 speedup", "turn 1 τ", "turn 2 tok/s", "turn 2 speedup",
              "turn 2 τ", "turn 2 / turn 1 speedup"]
    rows = []
    for name in per_turn["2"]:
        one, two = per_turn["1"].get(name, {}), per_turn["2"][name]
        rows.append([name, str(two.get("prompts", 0)), fmt(one.get("tokens_per_second_agg"), "tps"),
                     fmt(one.get("speedup_agg"), "ratio"), fmt(one.get("mean_accepted_tokens"), "tau"),
                     fmt(two.get("tokens_per_second_agg"), "tps"), fmt(two.get("speedup_agg"), "ratio"),
                     fmt(two.get("mean_accepted_tokens"), "tau"),
                     fmt(ratio(two.get("speedup_agg"), one.get("speedup_agg")), "ratio")])
    return header, rows


def drafter_cost_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Per model-drafter mode, where its drafting time goes, next to the target's step: the drafter's time per
    forward (everything: following the text, re-encoding, translating, Python), its model's own ONNX Runtime time per
    forward, the share of drafting time outside the model, and its time per drafted node; the target's step is the
    baseline's time per decoded token."""
    header = ["system", "forwards", "drafter ms/forward", "model ms/forward", "outside the model", "ms/drafted node",
              "plain step ms"]
    base = result["summary"]["overall"].get(result["summary"]["baseline"], {})
    plain_ms = 1000.0 / base["decode_tokens_per_second_agg"] if base.get("decode_tokens_per_second_agg") else None
    rows = []
    for system in result["systems"]:
        mine = [r for r in result["rows"] if r["system"] == system and "drafter_counters" in r.get("stats", {})]
        if not mine:
            continue

        def total(key, where="drafter_counters"):
            return sum(float((r["stats"].get(where) if where else r["stats"]).get(key) or 0.0) for r in mine)

        forwards, draft = total("forwards"), total("draft_seconds", None)
        model, calls, nodes = total("model_seconds"), total("model_calls"), total("nodes")
        rows.append([system, str(int(forwards)), fmt(ratio(draft, forwards) and 1000 * draft / forwards, "ms1"),
                     fmt(1000 * model / calls if calls else None, "ms1"),
                     fmt(1 - model / draft if calls and draft else None, "pct"),
                     fmt(1000 * draft / nodes if nodes else None, "ms1"), fmt(plain_ms, "ms1")])
    return header, rows


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
    header, turns = turn_table(result)
    if turns:
        lines += ["Second turns (MT-bench's follow-ups, run right after the first answer on the same engine; rates "
                  "summed over those prompts; speedups against the baseline's same turn):", "",
                  _md_table(header, turns), ""]
    lines += ["Costs (prefill: prompt tokens fed per second until the first token; draft and verify per decoding "
              "step; idle steps drafted nothing; sat-out steps are the idle steps the drafter sat out because "
              "drafting was losing, so their drafter time is the cost of following the text; shares are of the "
              "baseline's time per decoded token):", "", _md_table(*costs_table(result)), ""]
    header, costs = drafter_cost_table(result)
    if costs:
        lines += ["Drafting cost (drafter ms/forward: all the drafter's time over its forwards; model ms/forward: its "
                  "ONNX Runtime time alone; plain step: the baseline's time per decoded token):", "",
                  _md_table(header, costs), ""]
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
                                  ("second turns", turn_table(result)),
                                  ("costs per step", costs_table(result)),
                                  ("drafting cost", drafter_cost_table(result)),
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
