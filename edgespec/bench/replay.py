"""`edgespec bench --replay RESULT.json`: the real engine, planner and drafters run on the greedy outputs a bench
run recorded, with the target replaced by the recording and every target forward costed by a device profile.

The target's greedy choice at every position of the recorded text is known (it is the next recorded token), so
the engine verifies each draft tree exactly as it would have: the accepted paths, τ and what the drafters learn are
those of a real run. What a replay cannot know is the target's ranking below its top choice off the recorded text,
so the n-gram drafter's recycled alternatives (ranks 2 and below) are guesses, and only greedy decoding replays.
Time is simulated: the target's forwards cost what the device profile says for their size and context, the
drafters run for real and their own time counts as measured (their model forwards included), and so does the
engine's bookkeeping. Plain decoding is replayed the same way, so the speedups compare like with like. It answers
planner and drafter questions in minutes instead of a bench run's half hour: which drafter pays, how big a tree,
what a drafter's cost does to the speedup.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .modes import BASELINE, MODES, BenchSystem, ModeUnavailable, bench_gen_config, split_system
from .summary import make_row, summarize_rows

MAX_RESULT_BYTES = 256 * 1024 * 1024  # a bench result JSON to replay (26 prompts x 10 systems is about 2 MB)


class ReplayRunner:
    """Stands in for the target's `ModelRunner`: the logits of every fed token put the recorded next token first,
    and every forward is costed by `cost(tokens, context)` (seconds) instead of being run.

    `vocab_size`: the logits' width; `max_context`: the context length. `record(ids)` sets the recorded text (prompt
    and output) of the next generation."""

    def __init__(self, entry, vocab_size: int, max_context: int, cost):
        self.entry = entry
        self.vocab_size, self.max_context, self.cost = int(vocab_size), int(max_context), cost
        self.recorded: list[int] = []
        self.cached: list[int] = []
        self.staged: list[int] = []  # tokens of the last forward (what `commit` keeps from)
        self.last_seconds = 0.0  # the simulated cost of the last forward
        self.decode_seconds = 0.0  # simulated seconds of the forwards since `record` (prefill apart)
        self.prefill_seconds = 0.0
        self.forwards = 0
        self.session = None  # a replay owns no ONNX Runtime session

    def record(self, ids: list[int]) -> None:
        """The recorded text the next generation follows; resets the simulated clocks."""
        self.recorded = [int(t) for t in ids]
        self.decode_seconds = self.prefill_seconds = 0.0
        self.forwards = 0

    @property
    def length(self) -> int:
        """Committed tokens."""
        return len(self.cached)

    def _next(self, position: int) -> int:
        """The recorded token after `position` (the last recorded one past the end: never accepted there)."""
        return self.recorded[min(position + 1, len(self.recorded) - 1)] if self.recorded else 0

    def _choices(self, tokens, parents) -> list[int]:
        """The token the target chooses after each fed token: the recorded token after its position (its depth in
        the tree on top of the cache). Only on the recorded path does that choice matter: a node off it was already
        rejected at an ancestor, so its children are never accepted whatever it is given."""
        base = len(self.cached)
        depth: list[int] = []
        for i in range(len(tokens)):
            parent = i - 1 if parents is None else int(parents[i])
            depth.append(0 if parent < 0 else depth[parent] + 1)
        return [self._next(base + d) for d in depth]

    def forward(self, tokens, parents=None, logit_positions=None, past_visible=None, positions=None, **_) -> np.ndarray:
        """One-hot logits on the target's choice after each fed token (rows `logit_positions`, default all)."""
        tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
        if len(self.cached) + len(tokens) > self.max_context:
            from ..runtimes.runner import ContextOverflow

            raise ContextOverflow(f"{len(tokens)} tokens on top of {len(self.cached)} exceed the context "
                                  f"length {self.max_context}")
        choice = self._choices(tokens, None if parents is None else np.asarray(parents).reshape(-1))
        rows = range(len(tokens)) if logit_positions is None else [int(p) for p in logit_positions]
        logits = np.zeros((len(rows), self.vocab_size), np.float32)
        for r, i in enumerate(rows):
            logits[r, choice[i]] = 1.0
        self.last_seconds = float(self.cost(len(tokens), len(self.cached)))
        self.decode_seconds += self.last_seconds
        self.forwards += 1
        self.staged = tokens
        return logits

    def commit(self, keep=None) -> None:
        """Keep staged tokens `keep` (all when None), in order: the accepted path."""
        kept = self.staged if keep is None else [self.staged[int(i)] for i in keep]
        self.cached += kept
        self.staged = []

    def rewind(self, length: int) -> None:
        """Drop committed tokens after `length`."""
        del self.cached[int(length):]

    def reset(self) -> None:
        """Empty the cache."""
        self.cached = []

    def prefill(self, tokens, chunk_size: int = 256, stop=None) -> np.ndarray | None:
        """Commit `tokens` in chunks (each costed like a forward of its size); the logits after the last."""
        tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
        if not tokens:
            raise ValueError("prefill() needs at least one token")
        logits = None
        seconds = 0.0
        for start in range(0, len(tokens), chunk_size):
            if stop is not None and stop():
                return None
            chunk = tokens[start:start + chunk_size]
            logits = self.forward(chunk, logit_positions=[len(chunk) - 1])
            seconds += self.last_seconds
            self.commit()
        self.decode_seconds -= seconds
        self.prefill_seconds += seconds
        return logits[-1]


def read_result(path: str | os.PathLike) -> dict:
    """A bench result JSON (`edgespec bench --json`), checked: a clear error for a missing, oversized or foreign
    file, and for one whose baseline rows lack the prompt token ids a replay needs."""
    from ..runtimes.files import read_json_capped

    result = read_json_capped(Path(path), MAX_RESULT_BYTES, ValueError, "bench result")
    if not isinstance(result, dict) or result.get("format") != "edgespec-bench":
        raise ValueError(f"{path}: not an edgespec bench result (written by `edgespec bench --json`)")
    baseline = result.get("summary", {}).get("baseline", BASELINE)
    rows = [r for r in result.get("rows") or () if r.get("system") == baseline]
    if not rows:
        raise ValueError(f"{path}: no {baseline!r} rows to replay (run the bench with --mode {baseline},...)")
    if any(not isinstance(r.get("prompt_ids"), list) or not r["prompt_ids"] for r in rows):
        raise ValueError(f"{path}: the {baseline!r} rows carry no prompt token ids (recorded by an older edgespec): "
                         "run the bench again")
    return result


def recorded_turns(result: dict) -> list[list[dict]]:
    """The baseline's rows grouped by conversation, in order: [turn 1, turn 2 when recorded] per question."""
    baseline = result.get("summary", {}).get("baseline", BASELINE)
    groups: dict = {}
    for r in result["rows"]:
        if r["system"] == baseline:
            groups.setdefault(r["question_id"], []).append(r)
    return [sorted(rows, key=lambda r: int(r.get("turn", 1))) for rows in groups.values()]


def replay_base(bundle, threads: int, device, max_context: int | None = None):
    """The engine whose loaded target and device profile the replayed systems share (`replay_variant`). The device
    profile is required: the simulated clock comes from it."""
    from ..engine import load

    engine = load(bundle, threads=threads, max_context=max_context, drafter=None, history=False, device=device)
    if engine.profile is None:
        engine.close()
        raise ValueError("a replay needs a device profile to cost the target's forwards (--device auto, a profile "
                         "name or file)")
    return engine


def replay_variant(base, tree: str | None):
    """An engine over `base`'s target and profile (tree policy `tree`, default auto) whose target is a
    ReplayRunner costed by the profile; returns (engine, runner)."""
    engine = base.variant(None, device=base.profile, tree=tree or "auto")
    profile = base.profile
    runner = ReplayRunner(engine.entry, engine.entry.vocab_size, engine.context_length,
                          lambda tokens, context: profile.verify_seconds(tokens, context))
    engine._use_target_runner(runner)
    return engine, runner


def replay_system(engine, runner: ReplayRunner, system: str, conversations: list[list[dict]],
                  ngram_static: str | None = None) -> list[dict]:
    """Rows of `system` replayed over the recorded conversations (a bench row each, with simulated times: total =
    recorded prefill cost + the drafter's, the bookkeeping's and the costed target's time)."""
    mode_name = split_system(system)[0]
    if mode_name == "self":
        raise ModeUnavailable("self-speculation drafts with the target's own layers, which a replay replaces")
    state = BenchSystem(engine, ngram_static=ngram_static)
    mode = MODES[mode_name]
    rows = []
    for turns in conversations:
        engine.reset()
        for recorded in turns:
            prompt, output = list(recorded["prompt_ids"]), list(recorded["output_ids"])
            runner.record(prompt + output)
            token_ids, stats = mode(state, prompt, bench_gen_config(len(output)))
            if token_ids != output:
                raise RuntimeError(f"replay of {system} on question {recorded['question_id']} left the recording at "
                                   f"token {next(i for i, (a, b) in enumerate(zip(token_ids, output)) if a != b)}")
            decode = stats["draft_seconds"] + stats["bookkeeping_seconds"] + runner.decode_seconds
            ttft = runner.prefill_seconds
            stats.update(verify_seconds=runner.decode_seconds, prefill_seconds=ttft, time_to_first_token=ttft,
                         total_seconds=ttft + decode, decode_seconds=decode)
            question = {"question_id": recorded["question_id"], "category": recorded["category"],
                        "ids": prompt, "turn": recorded.get("turn", 1)}
            rows.append(make_row(system, "mode", question, token_ids, stats))
    return rows


def run_replay(args, echo=print) -> dict:
    """Replay every mode of `args.mode` (plain first, as the baseline) over the result `args.replay`; returns the
    replay's result: rows, summary and, per system, the recorded run's measured τ and speedup when it ran it."""
    from ..runtimes.runner import default_threads
    from .modes import expand_modes
    from .run import split_list

    result = read_result(args.replay)
    conversations = recorded_turns(result)
    modes = expand_modes(split_list(args.mode), split_list(getattr(args, "trees", None)), [])
    unknown = [m for m in modes if split_system(m)[0] not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; available: {', '.join(MODES)}")
    if BASELINE not in modes:
        modes.insert(0, BASELINE)
    threads = args.threads or result.get("config", {}).get("threads") or default_threads()
    device = None if args.device in (None, "none") else args.device
    device = device or "auto"
    base = replay_base(args.bundle, threads, device, getattr(args, "max_context", None))
    profile_name = base.profile.name
    echo(f"replay: {len(conversations)} recorded conversations of {args.replay}, modes {', '.join(modes)}, "
         f"target costed by device profile {profile_name}")
    rows, systems = [], {}
    try:
        for system in modes:
            engine, runner = replay_variant(base, split_system(system)[1])
            try:
                mine = replay_system(engine, runner, system, conversations, getattr(args, "ngram_static", None))
                systems[system] = {"kind": "mode", "status": "ok", "note": None}
                rows += mine
                echo(f"[{system}] replayed {len(mine)} generations")
            except ModeUnavailable as exc:
                systems[system] = {"kind": "mode", "status": "skipped", "note": str(exc)}
            finally:
                engine.close()
    finally:
        base.close()
    summary = summarize_rows(rows, BASELINE)
    measured = result.get("summary", {}).get("overall", {})
    for system, info in systems.items():
        m = measured.get(system) or {}
        info["measured"] = {"mean_accepted_tokens": m.get("mean_accepted_tokens"),
                            "decode_speedup": _decode_speedup(measured, system)}
    return {"format": "edgespec-bench-replay", "version": 1, "recording": str(args.replay),
            "device_profile": profile_name, "systems": systems, "rows": rows,
            "summary": summary}


def _decode_speedup(overall: dict, system: str) -> float | None:
    """Decode tokens/s (summed) of `system` over the baseline's in a summary's `overall`, or None."""
    base = (overall.get(BASELINE) or {}).get("decode_tokens_per_second_agg")
    mine = (overall.get(system) or {}).get("decode_tokens_per_second_agg")
    return mine / base if mine and base else None


def replay_table(replay: dict) -> tuple[list[str], list[list[str]]]:
    """Per system: replayed τ and decode speedup (simulated) against the recorded run's measured ones, and the
    drafter's ms per step and on idle steps."""
    from .report import fmt

    header = ["system", "replayed τ", "measured τ", "replayed decode tok/s", "replayed decode speedup",
              "measured decode speedup", "draft ms/step", "draft ms/idle step", "status"]
    overall = replay["summary"]["overall"]
    rows = []
    for system, info in replay["systems"].items():
        s = overall.get(system, {})
        rows.append([system, fmt(s.get("mean_accepted_tokens"), "tau"),
                     fmt(info["measured"]["mean_accepted_tokens"], "tau"),
                     fmt(s.get("decode_tokens_per_second_agg"), "tps"),
                     fmt(_decode_speedup(overall, system), "ratio"),
                     fmt(info["measured"]["decode_speedup"], "ratio"),
                     fmt(s.get("draft_ms_per_step"), "ms1"), fmt(s.get("idle_draft_ms_per_step"), "ms1"),
                     info["status"] + (f": {info['note']}" if info.get("note") else "")])
    return header, rows


def write_replay(replay: dict, path) -> None:
    """The replay's result as JSON (atomically)."""
    from ..runtimes.files import write_json_atomic

    write_json_atomic(Path(path), replay)
