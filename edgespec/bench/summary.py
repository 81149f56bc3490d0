"""Rows and their summaries (pure): one row per (system, prompt) measurement, then per-category and overall rates,
ratios against the baseline, agreement with it, and paired speed comparisons.

Rates: end-to-end tokens/s = new tokens / total seconds (prefill included), decode tokens/s = (new tokens - 1) /
(total - time to first token); per category the medians over prompts; overall both the aggregate (sum of tokens /
sum of seconds) and the median. The functions are small and pure, over lists of row dicts.
"""

from __future__ import annotations

import statistics

import numpy as np

from .modes import BASELINE


def make_row(system: str, kind: str, question: dict, token_ids: list[int], stats: dict) -> dict:
    """One (system, prompt) measurement from a stats dict with GenerationStats' keys (missing ones tolerated)."""
    new = int(stats.get("new_tokens", len(token_ids)))
    total = float(stats.get("total_seconds") or 0.0)
    ttft = float(stats.get("time_to_first_token") or 0.0)
    steps = stats.get("steps")
    decode_time = total - ttft
    fed = int(stats.get("prompt_tokens") or len(question.get("ids") or ())) - int(stats.get("reused_prompt_tokens") or 0)
    row_turn = {"turn": int(question["turn"])} if question.get("turn", 1) != 1 else {}
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
        # prompt tokens actually fed (a cached prefix is not) per second until the first token
        "prefill_tokens_per_second": fed / ttft if fed > 0 and ttft > 0 else None,
        "tokens_per_second": new / total if total > 0 else None,
        "decode_tokens_per_second": (new - 1) / decode_time if new > 1 and decode_time > 0 else None,
        "mean_accepted_tokens": new / steps if steps else None,
        "prompt_ids": [int(t) for t in question.get("ids") or ()],  # what `bench --replay` feeds again
        "output_ids": [int(t) for t in token_ids],
        "stats": {k: v for k, v in stats.items() if k not in ("new_tokens", "total_seconds", "time_to_first_token")},
        **row_turn,
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
        "prefill_tokens_per_second": _median(r.get("prefill_tokens_per_second") for r in rows),
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
    decode_steps = sum(max(int(r.get("steps") or 0) - 1, 0) for r in rows)  # the prefill's step drafts nothing
    idle_steps = total("idle_steps")
    per_step = lambda seconds, steps: seconds / steps * 1000 if steps else None  # noqa: E731
    return {"drafted_tokens": int(drafted), "accepted_tokens": int(accepted),
            "acceptance_rate": accepted / drafted if drafted else None,
            "draft_seconds": total("draft_seconds"), "verify_seconds": total("verify_seconds"),
            "bookkeeping_seconds": total("bookkeeping_seconds"),
            "decode_steps": decode_steps,
            # the drafter's time per decoding step (propose + observe), and per target forward of the same steps
            "draft_ms_per_step": per_step(total("draft_seconds"), decode_steps),
            "verify_ms_per_step": per_step(total("verify_seconds"), decode_steps),
            # steps that drafted nothing (the drafter sat out or found nothing): what following the text costs
            "idle_steps": int(idle_steps),
            "idle_draft_ms_per_step": per_step(total("idle_draft_seconds"), idle_steps),
            # of those, the steps the drafter sat out (no work at all while drafting loses): its following cost
            "sat_out_steps": int(total("sat_out_steps")),
            "sat_out_draft_ms_per_step": per_step(total("sat_out_draft_seconds"), total("sat_out_steps"))}


def add_ratios(by_system: dict[str, dict], kinds: dict[str, str], baseline: str = BASELINE) -> None:
    """Ratios against the baseline, in place: `speedup` (mode / baseline) for modes, `plain_over_peer` for peers.

    `speedup` and `plain_over_peer` compare median tokens/s; the `_agg` forms compare aggregate tokens/s.
    """
    base = by_system.get(baseline)
    plain_step_ms = None  # the baseline's time per decoded token: what a drafter's following cost is held against
    if base and base.get("decode_tokens_per_second_agg"):
        plain_step_ms = 1000.0 / base["decode_tokens_per_second_agg"]
    for system, s in by_system.items():
        if kinds.get(system) != "peer" and s.get("idle_draft_ms_per_step") is not None and plain_step_ms:
            s["idle_cost"] = s["idle_draft_ms_per_step"] / plain_step_ms
            if s.get("sat_out_draft_ms_per_step") is not None:
                s["following_cost"] = s["sat_out_draft_ms_per_step"] / plain_step_ms
            s["draft_cost_per_step"] = (s["draft_ms_per_step"] or 0.0) / plain_step_ms
        for suffix in ("", "_agg"):
            key = "tokens_per_second" + suffix
            b = base.get(key) if base else None
            if kinds.get(system) == "peer":
                s["plain_over_peer" + suffix] = ratio(b, s.get(key))
            else:
                s["speedup" + suffix] = ratio(s.get(key), b)


def row_key(row: dict) -> tuple:
    """What identifies one measurement across systems: the question and its turn (1 unless a second turn)."""
    return row["question_id"], int(row.get("turn", 1))


def turn_summary(rows: list[dict], baseline: str = BASELINE) -> dict:
    """Turn 2 against turn 1 on the questions that have a second turn (Spec-Bench's MT-bench ones): the overall
    summary of every system per turn, with ratios against `baseline` ({} when no row is a second turn). Turn 2 runs
    on the same engine right after turn 1, so the session n-gram cache and the prefix cache are what a chat user
    gets."""
    second = [r for r in rows if int(r.get("turn", 1)) == 2]
    if not second:
        return {}
    asked = {r["question_id"] for r in second}
    kinds = {r["system"]: r["kind"] for r in rows}
    out = {}
    for turn, subset in (("1", [r for r in rows if int(r.get("turn", 1)) == 1 and r["question_id"] in asked]),
                         ("2", second)):
        systems = list(dict.fromkeys(r["system"] for r in subset))
        by_system = {system: summarize([r for r in subset if r["system"] == system]) for system in systems}
        add_ratios(by_system, kinds, baseline)
        out[turn] = by_system
    return out


def summarize_rows(rows: list[dict], baseline: str = BASELINE) -> dict:
    """Per-category and overall summaries of every system over the first turns, with ratios against `baseline`,
    and the first turn against the second where questions have one (`per_turn`, see `turn_summary`)."""
    all_rows, rows = rows, [r for r in rows if int(r.get("turn", 1)) == 1]
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
            "per_category": per_category, "overall": overall, "per_turn": turn_summary(all_rows, baseline)}


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    from ..text import common_prefix_length

    return common_prefix_length(a, b)


def add_agreement(rows: list[dict], baseline: str = BASELINE) -> None:
    """Per row, in place: `agreement` = common prefix with the baseline's output / tokens (None without baseline).

    Greedy speculative modes must reach 1.0 (exactness); peers differ where their arithmetic differs.
    """
    base = {row_key(r): r["output_ids"] for r in rows if r["system"] == baseline}
    for r in rows:
        ref = base.get(row_key(r))
        r["agreement"] = (common_prefix(r["output_ids"], ref) / max(len(ref), 1)) if ref is not None else None


def paired_speed(rows_a: list[dict], rows_b: list[dict], resamples: int = 2000, seed: int = 0) -> dict | None:
    """Decode speed of system A over system B on the prompts both ran (same new tokens each): B's summed decode
    time over A's (above 1: A is faster), a 95% bootstrap interval over prompts, and on how many prompts A was
    faster. None without common prompts."""
    decode = lambda r: r["total_seconds"] - r["time_to_first_token"]  # noqa: E731
    a = {row_key(r): decode(r) for r in rows_a}
    b = {row_key(r): decode(r) for r in rows_b}
    common = [q for q in a if q in b]
    if not common:
        return None
    time_a, time_b = np.array([a[q] for q in common]), np.array([b[q] for q in common])
    picks = np.random.default_rng(seed).integers(0, len(common), size=(resamples, len(common)))
    boots = np.sort(time_b[picks].sum(axis=1) / time_a[picks].sum(axis=1))
    return {"ratio": float(time_b.sum() / time_a.sum()), "low": float(boots[int(0.025 * resamples)]),
            "high": float(boots[int(0.975 * resamples) - 1]), "faster": int((time_a < time_b).sum()),
            "prompts": len(common)}
