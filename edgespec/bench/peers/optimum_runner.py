"""The optimum peer's generation process: run by the optimum virtual environment's Python (`python -I
optimum_runner.py --model DIR --threads N`), never imported by edgespec (only the standard library at the top; this
environment has optimum-onnx, transformers < 4.58, torch and ONNX Runtime, and no edgespec).

It loads DIR with optimum's `ORTModelForCausalLM` (the int4 ONNX model, ONNX Runtime CPU, `threads` intra-op
threads), then answers JSON lines: the first line it writes is {"ready": true, ...} (load time, memory, versions) or
{"error": ...}; then for each request line {"ids": [...], "n": N} read from stdin it runs `generate` (greedy,
exactly N new tokens: no EOS, `min_new_tokens`) and writes {"output_ids": [...], "stats": {...}} with the time to
the first token and the total time, as the Hugging Face peer measures them. It exits at the end of its input; a
request it cannot run gets {"error": ...} and ends it. The protocol goes over a copy of the original stdout: the
real stdout is pointed at stderr, so that nothing a library prints can break a line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

MAX_REQUEST_BYTES = 16 * 2**20  # one request line: token ids of a prompt (a 1M-token prompt is about 8 MB)
MAX_NEW_TOKENS = 1 << 20  # new tokens of one request (edgespec's own limit, cliargs.MAX_TOKENS)
MAX_THREADS = 1024  # --threads


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float | None:
    """This process's resident memory now in MiB (/proc/self/statm), None where unreadable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class TimingStreamer:
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


def parse_request(line: str) -> tuple[list[int], int]:
    """(prompt ids, new tokens) of one request line; ValueError when it is not {"ids": [int, ...], "n": int} with n
    from 1 to MAX_NEW_TOKENS, or the line is longer than MAX_REQUEST_BYTES."""
    if len(line) > MAX_REQUEST_BYTES:
        raise ValueError(f"request line over {MAX_REQUEST_BYTES} bytes")
    request = json.loads(line)  # JSONDecodeError is a ValueError
    if not isinstance(request, dict):
        raise ValueError("a request must be a JSON object")
    ids, n = request.get("ids"), request.get("n")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise ValueError("request 'ids' must be a non-empty list of token ids")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
        raise ValueError(f"request 'n' must be an integer from 1 to {MAX_NEW_TOKENS}")
    return ids, n


def load(model_dir: str, threads: int):
    """optimum's ORTModelForCausalLM on `model_dir` (CPU, `threads` intra-op threads, one inter-op thread): the
    model, its load time and a line of versions."""
    import onnxruntime as ort
    import optimum.version
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(threads)  # the logits processing between steps
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(model_dir, session_options=options, provider="CPUExecutionProvider",
                                                use_cache=True)
    load_seconds = time.perf_counter() - t
    from importlib import metadata

    version = (f"optimum-onnx {metadata.version('optimum-onnx')} (optimum {optimum.version.__version__}), "
               f"transformers {transformers.__version__}, onnxruntime {ort.__version__}, torch {torch.__version__}")
    return model, load_seconds, version


def generate(model, ids: list[int], n: int, pad_token_id: int) -> tuple[list[int], dict]:
    """Greedy generation of exactly `n` tokens after `ids`: the new ids and their timings."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=pad_token_id, use_cache=True)
    input_ids = torch.tensor([ids], dtype=torch.long)
    streamer = TimingStreamer()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                             streamer=streamer)
        total = time.perf_counter() - t0
    new = [int(t) for t in out[0, input_ids.shape[1]:].tolist()]
    ttft = (streamer.first_token_time - t0) if streamer.first_token_time else total
    return new, {"prompt_tokens": len(ids), "new_tokens": len(new), "time_to_first_token": ttft,
                 "total_seconds": total}


def serve(model, pad_token_id: int, requests, reply) -> None:
    """Answer each request line of `requests` through `reply(dict)`; an invalid request or a failed generation
    ends it with an error."""
    for line in requests:
        if not line.strip():
            continue
        try:
            ids, n = parse_request(line)
        except ValueError as exc:
            reply({"error": f"bad request: {exc}"})
            return
        try:
            output_ids, stats = generate(model, ids, n, pad_token_id)
        except Exception as exc:  # reported to the bench as the peer's failure
            reply({"error": f"generation failed: {type(exc).__name__}: {exc}"})
            return
        reply({"output_ids": output_ids, "stats": stats, "peak_rss_mb": peak_rss_mb()})


def thread_count(text: str) -> int:
    """--threads: an integer from 1 to MAX_THREADS (argparse type)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threads must be an integer, not {text!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"threads must be from 1 to {MAX_THREADS}, not {value}")
    return value


def main(argv=None) -> int:
    """Load the model, say so, then answer requests until stdin ends."""
    import argparse

    p = argparse.ArgumentParser(prog="optimum_runner.py", description="the optimum bench peer's generation process")
    p.add_argument("--model", required=True, help="folder of the int4 ONNX model (prepared by tools/optimum_peer)")
    p.add_argument("--threads", type=thread_count, required=True,
                   help=f"intra-op threads (1 to {MAX_THREADS})")
    p.add_argument("--pad-token-id", type=int, default=0, help="pad token id (the bundle's)")
    args = p.parse_args(argv)
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # whatever a library prints goes to stderr

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        model, load_seconds, version = load(args.model, args.threads)
    except Exception as exc:  # reported to the bench as the peer's failure
        reply({"error": f"cannot load {args.model}: {type(exc).__name__}: {exc}"})
        return 1
    reply({"ready": True, "load_seconds": load_seconds, "load_rss_mb": current_rss_mb(), "version": version,
           "threads": args.threads})
    serve(model, args.pad_token_id, sys.stdin, reply)
    return 0


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # this folder has optimum.py (the peer), which would shadow the optimum package
    sys.exit(main())
