"""The peers: other runtimes on the same weights, from the same prompt token ids, each in its own module (`hf`:
Hugging Face transformers; `llamacpp`: llama.cpp; `optimum`: optimum-onnx's ORTModelForCausalLM in its own virtual
environment). A peer module has `missing()` (why it cannot run here), `unsuitable(path)` (why the source weights
do not suit it) and its job function."""

from __future__ import annotations

from pathlib import Path

from . import hf, llamacpp, optimum
from .base import PeerUnavailable, run_peer_prompts
from .hf import run_hf_job
from .llamacpp import run_llama_cpp_job
from .optimum import run_optimum_job

PEERS = ("hf", "llama.cpp", "optimum")
PEER_MODULES = {"hf": hf, "llama.cpp": llamacpp, "optimum": optimum}
PEER_JOBS = {"hf": run_hf_job, "llama.cpp": run_llama_cpp_job, "optimum": run_optimum_job}

__all__ = ["PEERS", "PEER_JOBS", "PEER_MODULES", "PeerUnavailable", "peer_job", "run_hf_job", "run_llama_cpp_job",
           "run_optimum_job", "run_peer_prompts"]


def peer_job(peer: str, args, prompts: list[dict], threads: int, model_info: dict, context_length: int) -> dict | str:
    """The job of one peer, or the reason it cannot run here."""
    module = PEER_MODULES[peer]
    reason = module.missing()
    if reason:
        return reason
    source = model_info.get("source") or {}
    path = args.peer_model or source.get("path")
    if not path:
        return "the bundle's manifest names no source weights (pass --peer-model PATH)"
    if not Path(path).exists():
        return f"source weights {path} not found (pass --peer-model PATH)"
    reason = module.unsuitable(path)
    if reason:
        return reason
    n_ctx = max([len(p["ids"]) for p in prompts] + [0]) + args.max_new_tokens + 8
    return {"kind": peer, "system": peer, "source_path": str(path), "threads": threads,
            "max_new_tokens": args.max_new_tokens, "warmup": args.warmup, "prompts": prompts,
            "n_ctx": max(n_ctx, min(context_length, args.max_context or context_length)),
            "pad_token_id": model_info.get("pad_token_id")}
