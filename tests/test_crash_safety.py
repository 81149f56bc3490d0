"""Crash safety (docs/hardening.md): writers SIGKILLed at random moments never leave a corrupt file or bundle.

A driver subprocess (tests/crash_driver.py) forks workers that save the n-gram cache, the cross-vocabulary cache and a
device profile in a loop, append to a session history, export a tiny bundle over an existing one, or replace a
bundle's drafter (the commit `edgespec adapt` and `edgespec add-drafter` make), kills each at a random moment, and
checks that the file is absent, old or new and loads cleanly (a history keeps every record but at most a torn last
line, which the next append does not swallow), and that the bundle loads with a complete manifest, old or new."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parent / "crash_driver.py"


def _drive(*args, timeout: float = 150.0) -> dict:
    proc = subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_cache_profile_and_history_writers_leave_old_or_new_files(tmp_path, seed):
    results = _drive("files", tmp_path, seed, 8)
    for kind, result in results.items():
        assert not result["corrupt"], (kind, result["corrupt"])
        assert result["valid"] + result["absent"] == result["rounds"]
        assert result["valid"] >= 1, (kind, result)  # the kills did land after some complete writes


def test_killed_exports_and_bundle_edits_leave_a_loadable_bundle(tiny_models, tmp_path):
    results = _drive("bundle", tmp_path, 3, 10, tiny_models["qwen2"], tiny_models["llama"], timeout=240)
    export, replace = results["export"], results["replace"]
    assert export["first_export_exit"] == 0 and replace["setup_exit"] == [0, 0], results
    assert not export["corrupt"] and export["valid"] == export["rounds"], export
    assert not export["aside_folders"], export  # the swap is atomic: nothing was left moved aside
    assert not replace["corrupt"] and replace["valid"] == replace["rounds"], replace
    assert replace["final_replace_exit"] == 0 and replace["final"].count("small@small") == 1, replace
    assert not [f for f in replace["work_folders_left"] if ".pid" in f], replace  # stale work folders cleaned
