"""Crash-safety driver for tests/test_crash_safety.py (run as a script; prints one JSON object).

    python tests/crash_driver.py files  FOLDER SEED ROUNDS
    python tests/crash_driver.py bundle FOLDER SEED ROUNDS TARGET_HF_FOLDER DRAFTER_HF_FOLDER

It imports everything once, then per round forks a worker that writes in a loop (n-gram cache saves, cross-vocabulary
cache saves, device profile saves, history appends; or whole bundle exports, or drafter replacements in a bundle),
SIGKILLs it at a random moment, and checks what is on disk: the file is absent or loads cleanly (and holds one of
the versions written), the bundle folder is absent or loads with a complete manifest whose every model opens in ONNX
Runtime. Heavy work (torch) only ever runs in the forked workers, never in this process, so forking stays safe.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

VOCAB, FP = 200, "0123456789abcdef"


def fork(body) -> int:
    """Run body() in a forked child (exit 0 when it returns, 1 when it raises); returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            body()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def kill_at(pid: int, delay: float) -> bool:
    """SIGKILL the child after `delay` seconds (unless it ended); True when it was killed while running."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
        time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return True


def run_to_end(body) -> tuple[int, float]:
    t0 = time.monotonic()
    pid = fork(body)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), time.monotonic() - t0


def leftovers(folder: Path, name: str) -> int:
    """Temporary files of interrupted atomic writes (garbage beside the target, never the target itself)."""
    return sum(1 for p in folder.iterdir() if p.name != name and name in p.name and p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------------ files
def record_check(result: dict, check, path: Path) -> None:
    """After a kill: run `check(path)`; count the file valid (with its note) or record why it is corrupt."""
    try:
        result["notes"].append(check(path))
        result["valid"] += 1
    except BaseException as exc:  # noqa: BLE001 (a corrupt file may fail in any way)
        result["corrupt"].append(f"{type(exc).__name__}: {exc}"[:500])


def files(folder: Path, seed: int, rounds: int) -> dict:
    from edgespec.drafters.crossvocab import CrossVocabCache, open_cache
    from edgespec.devices.profile import DeviceProfile, load_profile
    from edgespec.history import HistoryWarning, SessionLog, read_history
    from edgespec.drafters.cachefile import NGramCacheWarning, load_cache
    from edgespec.drafters.ngram import NGramDrafter

    rng = random.Random(seed)
    results = {}

    def ngram_worker(path: Path):
        def body():
            drafter = NGramDrafter(VOCAB, FP, persistent_path=path, persistent_cap=8_000)
            r = np.random.default_rng(os.getpid())
            while True:
                drafter.finish(r.integers(0, VOCAB, 1000).tolist())

        return body

    def ngram_check(path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("error", NGramCacheWarning)
            header, arrays = load_cache(path, ("persistent",), 4, VOCAB, FP)
        return f"clock {header['clock']}, {len(arrays['entry_key'])} entries"

    def crossvocab_worker(path: Path):
        def body():
            cache = CrossVocabCache()
            r = np.random.default_rng(os.getpid())
            version = 0
            while True:
                version += 1
                for _ in range(500):
                    cache.add(r.integers(0, 50, r.integers(1, 4)).tolist(), r.integers(0, 60, r.integers(1, 4)).tolist())
                cache.add([1], [2], count=1)  # the count of (1,) -> (2,) numbers the versions
                cache.save(path, FP, 50, 60)

        return body

    def crossvocab_check(path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("error", NGramCacheWarning)
            cache = open_cache(path, FP, 50, 60)
        return f"version {cache.table[(1,)][(2,)]}, {len(cache)} keys"

    def profile_worker(path: Path):
        def body():
            k = 0
            while True:
                k += 1
                DeviceProfile(
                    name="p", created="2026-01-01T00:00:00+00:00", device={"device_id": "test-cpu"}, threads=2,
                    bundle={"model": "m", "key": "0123456789abcdef"},
                    verify_ms={"contexts": list(range(1, 2001)), "sizes": [1, 2],
                               "ms": [[1.0 + k, 2.0 + k]] * 2000},
                    load_s=float(k)).save(path)

        return body

    def profile_check(path: Path):
        profile = load_profile(path)
        k = profile.load_s
        assert k == int(k) and profile.verify_ms["ms"][-1] == [1.0 + k, 2.0 + k], "mixed versions"
        return f"version {int(k)}"

    def history_worker(path: Path):
        def body():
            log = SessionLog(path, max_bytes=20_000)
            i = 0
            while True:
                i += 1
                log.append(f"prompt {i} " + "x" * (i % 700), f"output {i}", list(range(i % 50)), [i % 1000], "m")

        return body

    def history_check(path: Path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = read_history(path)
            total = len(path.read_bytes().split(b"\n"))
        numbers = [int(r["output"].split()[1]) for r in records]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else True, \
            f"records out of order or missing: {numbers[:5]}..."
        for r, n in zip(records, numbers):
            assert r["prompt"] == f"prompt {n} " + "x" * (n % 700) and r["prompt_ids"] == list(range(n % 50))
        torn = [w for w in caught if issubclass(w.category, HistoryWarning)]
        assert len(torn) <= 1, [str(w.message) for w in torn]
        assert all(f":{total}:" in str(w.message) or f":{total - 1}:" in str(w.message) for w in torn), \
            f"a line other than the last is broken: {[str(w.message) for w in torn]}"
        # the next append after a torn line still reads back
        SessionLog(path, max_bytes=20_000).append("after", "output 0", [1], [2], "m")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = read_history(path)
        assert again and again[-1]["prompt"] == "after", "the record after a torn line was lost"
        return f"{len(records)} records, {len(torn)} torn line"

    kinds = {"ngram": (ngram_worker, ngram_check, "cache.npz", 0.6),
             "crossvocab": (crossvocab_worker, crossvocab_check, "cv.npz", 0.4),
             "profile": (profile_worker, profile_check, "profile.json", 0.3),
             "history": (history_worker, history_check, "history.jsonl", 0.3)}
    for kind, (worker, check, name, span) in kinds.items():
        sub = folder / kind
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / name
        result = {"rounds": 0, "absent": 0, "valid": 0, "corrupt": [], "notes": []}
        for round_ in range(rounds):
            if kind == "history":  # each round its own log: the records of one writer are numbered 1, 2, ...
                path = sub / f"{round_}-{name}"
            pid = fork(worker(path))
            kill_at(pid, rng.uniform(0.0, span))
            result["rounds"] += 1
            if not path.exists():
                result["absent"] += 1
                continue
            record_check(result, check, path)
        result["leftover_temp_files"] = sum(leftovers(sub, p.name) for p in sub.iterdir() if not p.name.endswith(".tmp"))
        results[kind] = result
    return results


# ------------------------------------------------------------------------------------------------------ bundles
def bundles(folder: Path, seed: int, rounds: int, target_src: str, drafter_src: str) -> dict:
    from edgespec.export.bundle import ModelRequest, export_bundle, replace_model
    from edgespec.runtimes.manifest import load_manifest
    from edgespec.runtimes.runner import ModelRunner

    import onnx  # noqa: F401  imported once here (imports start no threads), not again in every worker
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    from edgespec.export import graph, reference  # noqa: F401

    rng = random.Random(seed)
    quiet = dict(parity=False, threads=1, log=lambda m: None)

    def torch_one_thread():
        import torch

        torch.set_num_threads(1)

    def check(bundle: Path) -> str:
        manifest = load_manifest(bundle)
        for entry in manifest.models.values():
            ModelRunner(entry, threads=1, max_context=16)  # graph and weights complete
        return ",".join(sorted(f"{m.name}@{m.graph_path.parent.name}" for m in manifest.models.values()))

    results = {}
    # 1. whole exports over an existing bundle (overwrite=True), killed anywhere
    out = folder / "exported"

    def export_loop():
        torch_one_thread()
        while True:
            export_bundle(target_src, out, overwrite=True, name="tiny", **quiet)

    def export_once():
        torch_one_thread()
        export_bundle(target_src, out, overwrite=True, name="tiny", **quiet)

    code, seconds = run_to_end(export_once)
    result = {"first_export_exit": code, "export_seconds": round(seconds, 2), "rounds": 0, "absent": 0, "valid": 0,
              "corrupt": [], "notes": []}
    for _ in range(rounds):
        pid = fork(export_loop)
        kill_at(pid, rng.uniform(0.05, 1.8) * seconds)
        result["rounds"] += 1
        if not out.exists():
            result["absent"] += 1
            result["corrupt"].append("the bundle folder vanished (it existed before the export)")
            continue
        record_check(result, check, out)
    result["aside_folders"] = sorted(p.name for p in folder.iterdir() if ".old-" in p.name)
    results["export"] = result

    # 2. drafter replacements in a bundle (what `edgespec adapt` and `add-drafter` commit), killed anywhere
    bundle = folder / "edited"

    def make_bundle():
        torch_one_thread()
        export_bundle(target_src, bundle, [ModelRequest(drafter_src, "drafter", name="small")], name="tiny", **quiet)

    def replace_once():
        torch_one_thread()
        replace_model(bundle, drafter_src, "small", role="drafter", **quiet)

    def replace_loop():
        torch_one_thread()
        while True:
            replace_model(bundle, drafter_src, "small", role="drafter", **quiet)

    code, _ = run_to_end(make_bundle)
    code2, seconds = run_to_end(replace_once)
    result = {"setup_exit": [code, code2], "replace_seconds": round(seconds, 2), "rounds": 0, "valid": 0,
              "corrupt": [], "notes": []}
    for _ in range(rounds):
        pid = fork(replace_loop)
        kill_at(pid, rng.uniform(0.05, 1.8) * seconds)
        result["rounds"] += 1
        record_check(result, check, bundle)
    code, _ = run_to_end(replace_once)  # still editable after all that; stale work folders cleaned
    result["final_replace_exit"] = code
    try:
        result["final"] = check(bundle)
    except BaseException as exc:  # noqa: BLE001
        result["corrupt"].append(f"after a last replacement: {type(exc).__name__}: {exc}"[:500])
    result["work_folders_left"] = sorted(p.name for p in bundle.iterdir() if p.name.startswith("."))
    used = {m.graph_path.parent.name for m in load_manifest(bundle).models.values()}
    result["orphan_folders"] = sorted(p.name for p in bundle.iterdir() if p.is_dir() and not p.name.startswith(".")
                                      and p.name not in used)
    results["replace"] = result
    return results


def main(argv: list[str]) -> int:
    kind, folder, seed, rounds = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "files":
        result = files(folder, seed, rounds)
    else:
        result = bundles(folder, seed, rounds, argv[4], argv[5])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
