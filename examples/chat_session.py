"""A multi-turn chat whose n-gram drafter learns the session: later turns that reuse earlier text draft more.

    python examples/chat_session.py --bundle bundles/default --cache session-ngrams.npz

Each turn sends the whole conversation; the engine reuses the cached prefix (only the new turn is prefilled) and
the n-gram drafter drafts from the prompt, this conversation and a persistent cache file (`--cache`, else the
bundle's default one under ~/.cache/edgespec/ngram) that the next session starts from (saved atomically when the
engine closes). Output is exactly the target's greedy output.
"""

from __future__ import annotations

import argparse

import edgespec

TURNS = [
    "Write a Python function `slugify(title)` that lowercases a title and joins its words with dashes.",
    "Add a docstring and type hints to it, and show the whole function again.",
    "Now also strip punctuation. Show the whole function again.",
]


def chat(engine: edgespec.Engine, turns: list[str], max_new_tokens: int) -> list[edgespec.GenerationResult]:
    """Run `turns` as one conversation; returns each turn's result."""
    messages: list[dict] = []
    results = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        result = engine.chat(messages, max_new_tokens=max_new_tokens)
        messages.append({"role": "assistant", "content": result.text})
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundles/default", help="a bundle folder from `edgespec export`")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", default=None, help="a persistent n-gram cache file (created if missing)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args(argv)
    spec = edgespec.SpeculationConfig(drafter="ngram", ngram_cache=args.cache)
    with edgespec.load(args.bundle, threads=args.threads, history=False, speculation=spec) as engine:
        for turn, (text, result) in enumerate(zip(TURNS, chat(engine, TURNS, args.max_new_tokens)), 1):
            s = result.stats
            print(f"### turn {turn}: {text}\n{result.text}\n")
            print(f"[turn {turn}: {s.prompt_tokens} prompt tokens ({s.reused_prompt_tokens} reused), "
                  f"{s.new_tokens} new, {s.mean_accepted_tokens:.2f} tokens per step, "
                  f"{s.accepted_tokens}/{s.drafted_tokens} drafts accepted, {s.tokens_per_second:.1f} tok/s]\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
