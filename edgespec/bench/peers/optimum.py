"""The optimum peer: what an optimum user runs, on the bundle's weights. optimum-onnx's `ORTModelForCausalLM`
(`generate`, ONNX Runtime CPU) on the source dequantized to a Hugging Face folder, exported by optimum-onnx and
quantized to int4 by ONNX Runtime's own MatMulNBitsQuantizer (block 32, accuracy level 4): the stock ONNX Runtime
pipeline in the same table as edgespec and llama.cpp.

optimum-onnx pins transformers below 4.58 while edgespec's exporter needs 5.x, so the peer lives in its own
virtual environment ($EDGESPEC_OPTIMUM_VENV, default ~/.cache/edgespec/optimum-venv) with its prepared model under
$EDGESPEC_OPTIMUM_MODELS/<name>/int4 (default ~/.cache/edgespec/peers/optimum; <name>: the GGUF file's name without
`.gguf`, or the folder's name), both made by `tools/optimum_peer/setup.sh SOURCE`. The bench's worker starts
`optimum_runner.py` with that environment's Python and sends it the prompts one by one (JSON lines, see
optimum_runner), so the prompts, the warm-up and the rows are the other peers' (`run_peer_prompts`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ...runtimes.files import read_json_capped
from .base import PeerUnavailable, run_peer_prompts

MARKER = "edgespec-optimum.json"  # written last by tools/optimum_peer/prepare.py: the export is complete
MAX_MARKER_BYTES = 1 << 20
RUNNER = Path(__file__).with_name("optimum_runner.py")
SETUP = "tools/optimum_peer/setup.sh"


def venv_dir() -> Path:
    """The optimum virtual environment: $EDGESPEC_OPTIMUM_VENV, default ~/.cache/edgespec/optimum-venv."""
    return Path(os.environ.get("EDGESPEC_OPTIMUM_VENV") or Path.home() / ".cache" / "edgespec" / "optimum-venv")


def venv_python() -> Path:
    """The optimum environment's Python."""
    return venv_dir() / "bin" / "python"


def models_dir() -> Path:
    """Where the prepared models are: $EDGESPEC_OPTIMUM_MODELS, default ~/.cache/edgespec/peers/optimum."""
    return Path(os.environ.get("EDGESPEC_OPTIMUM_MODELS") or Path.home() / ".cache" / "edgespec" / "peers" / "optimum")


def model_name(source: str | os.PathLike) -> str:
    """The name a source's prepared model is kept under: a GGUF file's name without `.gguf`, a folder's name."""
    path = Path(source)
    return path.name[:-len(".gguf")] if path.name.lower().endswith(".gguf") else path.name


def export_dir(source: str | os.PathLike) -> Path:
    """The prepared int4 model of `source`."""
    return models_dir() / model_name(source) / "int4"


def missing() -> str | None:
    """Why this peer cannot run here (its virtual environment is not set up), or None."""
    python = venv_python()
    if not python.is_file():
        return f"the optimum environment {venv_dir()} is not set up (run {SETUP} MODEL.gguf)"
    return None


def read_marker(folder: Path) -> dict | None:
    """The prepared model's marker (see tools/optimum_peer/prepare.py), None when the folder has none; ValueError
    when it is unreadable or not an object."""
    path = folder / MARKER
    if not path.is_file():
        return None
    marker = read_json_capped(path, MAX_MARKER_BYTES, ValueError, "optimum peer marker")
    if not isinstance(marker, dict):
        raise ValueError(f"optimum peer marker {path} is not a JSON object")
    return marker


def stale_reason(marker: dict, source: str | os.PathLike) -> str | None:
    """Why the export recorded by `marker` is not of the weights at `source` now (another file, resized or
    rewritten since), or None."""
    recorded = marker.get("source") if isinstance(marker.get("source"), dict) else {}
    path = Path(source)
    info = path.stat()
    now = {"path": str(path.resolve()), "size": info.st_size if path.is_file() else None,
           "mtime_ns": info.st_mtime_ns}
    changed = [key for key in ("path", "size", "mtime_ns") if recorded.get(key) != now[key]]
    if changed:
        return f"was made from other weights ({', '.join(changed)} differ)"
    return None


def unsuitable(path: str) -> str | None:
    """Why the source weights at `path` have no usable optimum export (none prepared, unfinished, or made from
    other weights), or None."""
    folder = export_dir(path)
    redo = f"run {SETUP} {path}"
    try:
        marker = read_marker(folder)
    except ValueError as exc:
        return f"{exc} ({redo})"
    if marker is None:
        return f"no optimum-onnx int4 export of {model_name(path)} at {folder} ({redo})"
    stale = stale_reason(marker, path)
    if stale:
        return f"the optimum export at {folder} {stale} ({redo} -- --force)"
    return None


def runner_command(python: str | os.PathLike, model: str | os.PathLike, threads: int,
                   pad_token_id: int | None) -> list[str]:
    """The command line of the generation process (isolated mode: neither the runner's folder, whose optimum.py
    would shadow the optimum package, nor the user's site packages on its path)."""
    return [str(python), "-I", str(RUNNER), "--model", str(model), "--threads", str(int(threads)),
            "--pad-token-id", str(int(pad_token_id) if pad_token_id is not None else 0)]


class RunnerClient:
    """The bench's side of one generation process: requests out, JSON lines back."""

    def __init__(self, command: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
                                     encoding="utf-8", env=env, bufsize=1)

    def receive(self) -> dict:
        """The process's next message; RuntimeError when it ended or answered with an error."""
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the optimum runner exited with code {code} (its stderr is above)")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise RuntimeError(f"the optimum runner answered {line[:200]!r}")
        if "error" in message:
            raise RuntimeError(f"the optimum runner: {message['error']}")
        return message

    def generate(self, ids: list[int], n: int) -> tuple[list[int], dict, dict]:
        """Greedy generation of exactly `n` tokens after `ids`: (new ids, stats, the whole answer)."""
        self.proc.stdin.write(json.dumps({"ids": [int(t) for t in ids], "n": int(n)}) + "\n")
        self.proc.stdin.flush()
        message = self.receive()
        return [int(t) for t in message["output_ids"]], dict(message["stats"]), message

    def close(self) -> None:
        """End the process (end of input; killed when it does not exit)."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def run_optimum_job(job: dict) -> dict:
    """optimum's ORTModelForCausalLM on the prepared int4 export of the source, in the optimum environment's own
    process: greedy, exactly N tokens from the same prompt ids. Its peak memory is the generation process's."""
    reason = missing() or unsuitable(job["source_path"])
    if reason:
        raise PeerUnavailable(reason)
    command = runner_command(venv_python(), export_dir(job["source_path"]), job["threads"], job.get("pad_token_id"))
    client = RunnerClient(command, env=dict(os.environ))
    try:
        ready = client.receive()
        peak = [ready.get("load_rss_mb") or 0.0]

        def run(ids, n):
            new, stats, message = client.generate(ids, n)
            peak.append(message.get("peak_rss_mb") or 0.0)
            return new, stats

        result = {"system": "optimum", "kind": "peer", "status": "ok", "note": None,
                  "load_seconds": ready.get("load_seconds"), "load_rss_mb": ready.get("load_rss_mb"),
                  "threads": ready.get("threads"), "version": ready.get("version"), "rows": []}
        run_peer_prompts("optimum", run, job, result)
        result["peak_rss_mb"] = max(peak)
        return result
    finally:
        client.close()
