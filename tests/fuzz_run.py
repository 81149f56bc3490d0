"""Long fuzz runs: `python -m tests.fuzz_run --examples 10000` (from the repository root).

Runs every target of tests/fuzz_targets.py (or those named with --targets) on N mutated inputs each, one child
process per target (--jobs at a time), and prints per target: inputs, accepted, clean errors by type, crashes by
type, hangs (an input over --timeout seconds) and how long it took. The first input of each crash type is saved in
--crash-dir (default .fuzz-crashes/<target>/<type>.bin, with a .txt beside it saying what happened); a child that
dies (a segfault, the memory limit) leaves the input it was on there too. Inputs are reproducible: input i of a
target is generated from random.Random(f"{seed}-{target}-{i}"). Exit status 1 when anything crashed.

Each child runs under a 4 GiB address-space limit (--memory-mb), so an allocation sized from an unchecked field
fails as a MemoryError (a crash) instead of swapping the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fuzz_targets as ft  # noqa: E402


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def run_child(target_name: str, examples: int, seed: int, timeout: float, crash_dir: Path, memory_mb: int,
              start: int = 0) -> dict:
    """Fuzz one target in this process; returns the counts (also written as JSON on stdout by `--child`)."""
    if memory_mb:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def on_alarm(signum, frame):
        raise ft.FuzzTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    target = ft.get_target(target_name)
    counts: Counter = Counter()
    errors: Counter = Counter()
    crashes: Counter = Counter()
    saved = {}
    t0 = time.perf_counter()
    folder = crash_dir / target_name
    current = folder / "current-input.bin"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target_name}-") as tmp:
        workdir = Path(tmp)
        for i in range(start, start + examples):
            rng = ft.RandomRng(f"{seed}-{target_name}-{i}")
            data = ft.mutate(target, rng)
            current.write_bytes(data)  # what a child that dies was on
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                outcome = ft.run_one(target, data, workdir)
            except ft.FuzzTimeout:
                outcome = ft.Outcome("crash", "hang", f"over {timeout} s")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[outcome.kind] += 1
            if outcome.kind == "error":
                errors[outcome.type] += 1
            elif outcome.kind == "crash":
                crashes[outcome.type] += 1
                if outcome.type not in saved:
                    folder.mkdir(parents=True, exist_ok=True)
                    stem = folder / _safe(outcome.type)
                    stem.with_suffix(".bin").write_bytes(data)
                    stem.with_suffix(".txt").write_text(
                        f"target {target_name}, input {i} (random.Random('{seed}-{target_name}-{i}'))\n"
                        f"{outcome.type}: {outcome.message}\n")
                    saved[outcome.type] = str(stem.with_suffix(".bin"))
    current.unlink(missing_ok=True)
    return {"target": target_name, "inputs": examples, "accepted": counts["accepted"], "errors": dict(errors),
            "crashes": dict(crashes), "saved": saved, "seconds": round(time.perf_counter() - t0, 1)}


def _spawn(name: str, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.fuzz_run", "--child", name, "--examples", str(args.examples), "--seed",
           str(args.seed), "--timeout", str(args.timeout), "--crash-dir", str(args.crash_dir), "--memory-mb",
           str(args.memory_mb)]
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per target (default %(default)s)")
    parser.add_argument("--targets", default=",".join(ft.TARGET_NAMES), help="comma-separated (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input before it counts as a hang")
    parser.add_argument("--jobs", type=int, default=2, help="targets fuzzed at once")
    parser.add_argument("--crash-dir", type=Path, default=Path(".fuzz-crashes"))
    parser.add_argument("--memory-mb", type=int, default=4096, help="address-space limit per child (0: none)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.crash_dir = args.crash_dir.resolve()
    if args.child:
        result = run_child(args.child, args.examples, args.seed, args.timeout, args.crash_dir, args.memory_mb)
        print(json.dumps(result), flush=True)
        return 0
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(names) - set(ft.TARGET_NAMES)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(ft.TARGET_NAMES)}")
    results, pending, running = [], list(names), {}
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            name = pending.pop(0)
            running[name] = _spawn(name, args)
        time.sleep(0.2)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[name]
            try:
                results.append(json.loads(out.strip().splitlines()[-1]))
            except (IndexError, ValueError):  # the child died: keep the input it was on
                results.append({"target": name, "inputs": None, "accepted": None, "errors": {},
                                "crashes": {f"child died (exit {proc.returncode})": 1},
                                "saved": {"child died": str(args.crash_dir / name / "current-input.bin")},
                                "stderr": err[-2000:]})
    results.sort(key=lambda r: names.index(r["target"]))
    print(f"{'target':<11} {'inputs':>7} {'accepted':>8} {'errors':>7} {'crashes':>7}  clean errors / crashes")
    for r in results:
        n_err, n_crash = sum(r["errors"].values()), sum(r["crashes"].values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items(), key=lambda kv: -kv[1]))
        print(f"{r['target']:<11} {r['inputs']!s:>7} {r['accepted']!s:>8} {n_err:>7} {n_crash:>7}  {detail}"
              f"  [{r.get('seconds', '?')} s]")
        for kind, count in r["crashes"].items():
            print(f"{'':<11} CRASH {kind}: {count} (first input: {r['saved'].get(kind, r['saved'].get('child died'))})")
        if r.get("stderr"):
            print(r["stderr"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
