"""The llama.cpp peer: llama-cpp-python on the source GGUF (optional: skipped when not installed)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from ..machine import current_rss_mb
from .base import PeerUnavailable, run_peer_prompts


def missing() -> str | None:
    """Why this peer cannot run here (llama-cpp-python not installed), or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    return None


def unsuitable(path: str) -> str | None:
    """Why the source weights at `path` do not suit llama.cpp (it needs a GGUF file), or None."""
    if not (Path(path).is_file() and str(path).lower().endswith(".gguf")):
        return f"llama.cpp needs a GGUF file; the source is {path} (pass --peer-model FILE.gguf)"
    return None


def run_llama_cpp_job(job: dict) -> dict:
    """llama.cpp through llama-cpp-python on the source GGUF: greedy, exactly N tokens from the same prompt ids."""
    try:
        import llama_cpp
    except ImportError:
        raise PeerUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    threads = job["threads"]
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
    return run_peer_prompts("llama.cpp", run, job, result)
