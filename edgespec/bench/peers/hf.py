"""The Hugging Face transformers peer: `generate` (torch CPU, float32) on the bundle's source weights."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from ..machine import current_rss_mb
from .base import PeerUnavailable, run_peer_prompts


def missing() -> str | None:
    """Why this peer cannot run here (torch or transformers not installed), or None."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return "torch/transformers are not installed (pip install 'edgespec[export]')"
    return None


def unsuitable(path: str) -> str | None:
    """Why the source weights at `path` do not suit this peer (any HF folder or GGUF file does): None."""
    return None


class _TimingStreamer:
    """A transformers streamer that only notes when the first new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.first_token_time = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf_job(job: dict) -> dict:
    """Hugging Face transformers `generate` (torch CPU, float32) on the source weights, from the same prompt ids."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig
    except ImportError as exc:
        raise PeerUnavailable(f"transformers/torch not importable ({exc}); pip install 'edgespec[export]'") from None
    threads = job["threads"]
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    source = Path(job["source_path"])
    t = time.perf_counter()
    if source.is_file():  # a GGUF file: transformers dequantizes it to float32
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, use_safetensors=True)
    model.eval()
    load_seconds = time.perf_counter() - t
    pad = job.get("pad_token_id")

    def config(n):  # a fresh config: no EOS (never stops early), no repetition penalty or sampling from the model's
        return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=pad if pad is not None else 0, use_cache=True)

    def run(ids, n):
        input_ids = torch.tensor([ids], dtype=torch.long)
        streamer = _TimingStreamer()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config(n),
                                 streamer=streamer)
            total = time.perf_counter() - t0
        new = out[0, input_ids.shape[1]:].tolist()
        ttft = (streamer.first_token_time - t0) if streamer.first_token_time else total
        return new, {"prompt_tokens": len(ids), "new_tokens": len(new), "time_to_first_token": ttft,
                     "total_seconds": total}

    result = {"system": "hf", "kind": "peer", "status": "ok", "note": None, "load_seconds": load_seconds,
              "load_rss_mb": current_rss_mb(), "threads": torch.get_num_threads(),
              "version": f"transformers {transformers.__version__}, torch {torch.__version__}", "rows": []}
    return run_peer_prompts("hf", run, job, result)
