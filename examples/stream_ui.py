"""Stream a generation to a user interface, with a Stop button.

    python examples/stream_ui.py --bundle bundles/default --stop-after 2.0

A UI must never block on the model. The generation runs on a worker thread and hands each text piece to the UI
through a queue; the UI thread draws pieces as they arrive (here: prints them) and can cancel at any moment with
`stream.cancel()` (thread-safe; also stops a long prompt's prefill between chunks). `--stop-after` plays the user
pressing Stop after that many seconds.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time

import edgespec

DONE = object()


def generate_in_background(engine: edgespec.Engine, messages: list[dict], pieces: queue.Queue,
                           **config) -> edgespec.TextStream:
    """Start `engine.chat_stream(messages)` on a worker thread that puts each piece (then DONE) on `pieces`."""
    stream = engine.chat_stream(messages, **config)

    def work() -> None:
        try:
            for piece in stream:
                pieces.put(piece)
        finally:
            pieces.put(DONE)

    threading.Thread(target=work, name="edgespec-worker", daemon=True).start()
    return stream


def run_ui(stream: edgespec.TextStream, pieces: queue.Queue, stop_after: float | None) -> None:
    """The UI loop: draw pieces as they come, press Stop after `stop_after` seconds."""
    started = time.monotonic()
    while True:
        try:
            piece = pieces.get(timeout=0.05)  # a real UI would poll in its event loop instead
        except queue.Empty:
            piece = None
        if piece is DONE:
            break
        if piece:
            print(piece, end="", flush=True)
        if stop_after is not None and time.monotonic() - started > stop_after:
            stream.cancel()  # the Stop button
            stop_after = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundles/default", help="a bundle folder from `edgespec export`")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt", default="Explain, with a short Python example, what a generator is.")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--stop-after", type=float, default=None, help="press Stop after this many seconds")
    args = parser.parse_args(argv)
    with edgespec.load(args.bundle, threads=args.threads, history=False) as engine:
        pieces: queue.Queue = queue.Queue()
        stream = generate_in_background(engine, [{"role": "user", "content": args.prompt}], pieces,
                                        max_new_tokens=args.max_new_tokens)
        run_ui(stream, pieces, args.stop_after)
        result = stream.result
        print(f"\n[{result.finish_reason}: {result.stats.new_tokens} tokens, "
              f"{result.stats.tokens_per_second:.1f} tok/s, {result.stats.mean_accepted_tokens:.2f} tokens per step]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
