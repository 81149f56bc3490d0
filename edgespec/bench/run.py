"""Running the bench: the jobs one worker process runs (a mode over every prompt, the modes interleaved prompt by
prompt, a peer), the worker processes themselves, and the orchestration of a whole run (`run_bench`).

Each system runs in its own fresh subprocess (`python -m edgespec.bench --worker JOB --result OUT`), so its peak RSS
and its threads are its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Callable

from ..drafters.config import DEFAULT_DRAFT_BUDGET
from .dataset import load_spec_bench
from .machine import current_rss_mb, load_average, machine_info, peak_rss_mb, reset_peak_rss
from .modes import BASELINE, MODES, WARMUP_TOKENS, BenchSystem, ModeUnavailable, bench_gen_config, expand_modes, \
    split_system
from .peers import PEER_JOBS, PEERS, PeerUnavailable, peer_job
from .report import log, progress
from .summary import add_agreement, make_row, summarize_rows

RESULT_FORMAT = "edgespec-bench"
RESULT_VERSION = 1


# ---- mode jobs (what one worker process runs) -----------------------------------------------------------------------
def _load_system(job: dict, system: str | None, base=None) -> BenchSystem:
    """The engine of one system: the bundle loaded with the system's tree policy and device profile (`base`: a
    variant over that engine's loaded target instead, see `Engine.variant`), with the job's static n-gram cache."""
    from ..engine import load

    _, tree, device = split_system(system) if system else (None, None, None)
    device = device or job.get("device")
    device = None if device in (None, "none") else device
    tree = tree or job.get("tree") or "auto"
    if base is None:
        engine = load(job["bundle"], threads=job["threads"], max_context=job["max_context"], drafter=None,
                      draft_budget=job.get("draft_budget", DEFAULT_DRAFT_BUDGET), history=False, device=device,
                      tree=tree)
    else:
        engine = base.variant(None, device=device, tree=tree)
    return BenchSystem(engine, ngram_static=job.get("ngram_static"))


def _mode_result(system: str | None, engine, load_seconds: float) -> dict:
    """A system's result before any prompt ran: the model, load time and memory, the profile and tree policy."""
    entry = engine.entry
    profile = getattr(engine, "profile", None)  # test doubles of the engine may lack the speculation attributes
    return {"system": system, "kind": "mode", "status": "ok", "note": None, "load_seconds": load_seconds,
            "load_rss_mb": current_rss_mb(), "threads": engine.threads, "context_length": engine.context_length,
            "model": {"name": entry.name, "architecture": entry.architecture, "source": dict(entry.source),
                      "quantization": dict(entry.quantization), "pad_token_id": entry.pad_token_id},
            "rows": [], "prompts": [], "skipped": [],
            "device_profile": profile.name if profile is not None else None,
            "device_threads": profile.threads if profile is not None else None,
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


def _warm_up(state: BenchSystem, system: str, job: dict, text: str) -> None:
    """Untimed short generations of `system` on one prompt (raises ModeUnavailable)."""
    fn = MODES[split_system(system)[0]]
    for _ in range(job.get("warmup", 1)):
        state.engine.reset()
        fn(state, text, {**bench_gen_config(job["max_new_tokens"]),
                         "max_new_tokens": min(job["max_new_tokens"], WARMUP_TOKENS)})


def _measure(state: BenchSystem, system: str, job: dict, prompt: tuple[dict, str, list[int]]) -> list[dict]:
    """Measured generations of `system` on a prepared prompt, from a fresh conversation: its row, then, when the job
    asks for two turns and the question has a second, the follow-up's row (the same engine right after the first
    answer, as in a chat: its prefix and session n-gram caches carry over)."""
    q, text, ids = prompt
    engine = state.engine
    engine.reset()
    mode = MODES[split_system(system)[0]]
    config = bench_gen_config(job["max_new_tokens"])
    token_ids, stats = mode(state, text, config)
    rows = [make_row(system, "mode", {**q, "ids": ids}, token_ids, stats)]
    if int(job.get("turns", 1)) >= 2 and q.get("second_turn"):
        text2 = second_turn_prompt(engine, q, engine.tokenizer.decode(token_ids))
        ids2 = engine.encode(text2)
        if len(ids2) + job["max_new_tokens"] <= engine.context_length:
            token_ids, stats = mode(state, text2, config)
            rows.append(make_row(system, "mode", {**q, "ids": ids2, "turn": 2}, token_ids, stats))
    return rows


def second_turn_prompt(engine, question: dict, answer: str) -> str:
    """The chat prompt of a question's second turn: the first question, the first answer, the follow-up."""
    return engine.render_chat([{"role": "user", "content": question["prompt"]},
                               {"role": "assistant", "content": answer},
                               {"role": "user", "content": question["second_turn"]}])


def run_mode_job(job: dict, engine=None) -> dict:
    """Load the bundle, chat-template and encode every question, then run mode `job['system']` over them.

    With `system` None only the prompts are prepared (their token ids feed the peers). The result carries the rows,
    the prompt ids, the questions skipped because they do not fit the context, and load time / memory. `engine`: a
    given engine instead of loading the bundle.
    """
    system = job.get("system")
    t = time.perf_counter()
    state = _load_system(job, system) if engine is None else BenchSystem(engine, ngram_static=job.get("ngram_static"))
    engine = state.engine
    result = _mode_result(system, engine, time.perf_counter() - t)
    prompts = _prepare_prompts(engine, job, result)
    if system is None or not prompts:
        return result
    try:
        _warm_up(state, system, job, prompts[0][1])
        for i, prompt in enumerate(prompts, 1):
            result["rows"].extend(_measure(state, system, job, prompt))
            progress(system, i, len(prompts), result["rows"][-1])
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
    states = {system: BenchSystem(engine, ngram_static=job.get("ngram_static"))
              for system, engine in (engines or {}).items()}
    for system in systems:
        t = time.perf_counter()
        if system not in states:
            base = next(iter(states.values()), None)
            states[system] = _load_system(job, system, base=None if base is None else base.engine)
        results[system] = _mode_result(system, states[system].engine, time.perf_counter() - t)
    first = results[systems[0]]
    prompts = _prepare_prompts(states[systems[0]].engine, job, first)
    for system in systems[1:]:
        results[system].update(prompts=first["prompts"], skipped=first["skipped"])

    live = list(systems)
    for system in systems if prompts else []:
        try:
            _warm_up(states[system], system, job, prompts[0][1])
        except Exception as exc:  # one system's failure must not take the others down
            results[system].update(_failure(exc))
            live.remove(system)
    for i, prompt in enumerate(prompts):
        order = live[i % len(live):] + live[:i % len(live)] if live else []
        for system in order:  # only a system's own failure removes it from `live`
            try:
                results[system]["rows"].extend(_measure(states[system], system, job, prompt))
            except Exception as exc:
                results[system].update(_failure(exc))
                live.remove(system)
                continue
            progress(system, i + 1, len(prompts), results[system]["rows"][-1])
    for state in states.values():
        state.engine.reset()
    return {"kind": "interleave", "status": "ok", "results": results}


# ---- workers --------------------------------------------------------------------------------------------------------
JOBS = {"mode": run_mode_job, "interleave": run_interleaved_job, **PEER_JOBS}


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
    result.setdefault("peak_rss_mb", peak_rss_mb())  # a job that ran in its own process (optimum) reports that one
    return result


def run_subprocess(job: dict, echo: Callable[[str], None] = log) -> dict:
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


def worker_main(argv=None) -> int:
    """`python -m edgespec.bench --worker JOB --result OUT`: run one job, write its result as JSON."""
    p = argparse.ArgumentParser(prog="python -m edgespec.bench", description="internal bench worker")
    p.add_argument("--worker", required=True, help="job JSON")
    p.add_argument("--result", required=True, help="result JSON to write")
    a = p.parse_args(argv)
    job = json.loads(Path(a.worker).read_text(encoding="utf-8"))
    result = run_job(job)
    Path(a.result).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ---- the bench ------------------------------------------------------------------------------------------------------
def split_list(value: str | None) -> list[str]:
    """The items of a comma-separated option (blanks dropped)."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def prepare_device(bundle, device: str, threads: int) -> str:
    """Resolve a device profile once (measuring it when `auto` finds none); a line describing it."""
    from ..devices.profile import resolve_device
    from ..runtimes.manifest import load_manifest

    manifest = load_manifest(bundle)
    profile = resolve_device(device, manifest, threads, entry=manifest.target_model)
    if profile is None:
        return "none"
    return (f"{profile.name} ({profile.threads} threads; one token "
            f"{profile.verify_seconds(1, 512) * 1000:.0f} ms, 8 tokens {profile.verify_seconds(8, 512) * 1000:.0f} ms "
            f"at 512 tokens of context)")


def run_bench(args, echo: Callable[[str], None] = log) -> dict:
    """Run every mode and peer and return the full result (the dict --json writes)."""
    from ..runtimes.runner import default_threads

    modes = expand_modes(split_list(args.mode), split_list(getattr(args, "trees", None)),
                         split_list(getattr(args, "device", None)))
    unknown = [m for m in modes if split_system(m)[0] not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; available: {', '.join(MODES)}")
    peers = [] if args.no_peers else split_list(args.peers)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; available: {', '.join(PEERS)}")
    if not modes and not peers:
        raise ValueError("nothing to run: give --mode and/or --peers")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    categories = split_list(args.categories) or None
    questions = load_spec_bench(args.data, args.per_category, categories, args.limit)
    if not questions:
        raise ValueError("no Spec-Bench questions selected")
    threads = args.threads or default_threads()
    devices = [d for d in split_list(getattr(args, "device", None)) if d != "none"]
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
                "draft_budget": getattr(args, "draft_budget", DEFAULT_DRAFT_BUDGET),
                "ngram_static": getattr(args, "ngram_static", None), "turns": getattr(args, "turns", 1),
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
        job = peer_job(peer, args, prepared["prompts"], threads, model_info, prepared.get("context_length") or 0)
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
              "interleave": interleave, "turns": getattr(args, "turns", 1),
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
