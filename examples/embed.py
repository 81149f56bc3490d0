"""Embed edgespec in an application: load a bundle once, answer many requests, close it on the way out.

    python examples/embed.py --bundle bundles/default

The engine is loaded once (the slow part) and reused; `device="auto"` sizes the draft trees from this device's
profile (measured on first use, then cached). Greedy output is exactly the target's own greedy output, so the
answers do not depend on the drafter; only the speed does.
"""

from __future__ import annotations

import argparse

import edgespec

SNIPPETS = [
    "def is_prime(n: int) -> bool:",
    "def fizzbuzz(n: int) -> list[str]:",
    "def reverse_words(sentence: str) -> str:",
]


class CodeCompleter:
    """What an application keeps: one engine, one method per feature."""

    def __init__(self, bundle: str, threads: int | None = None, device: str | None = "auto"):
        self.engine = edgespec.load(bundle, threads=threads, device=device, history=False)

    def complete(self, code: str, max_new_tokens: int = 64) -> edgespec.GenerationResult:
        """Continue `code` greedily, stopping at the first blank line."""
        return self.engine.generate(code, max_new_tokens=max_new_tokens, stop=["\n\n\n"])

    def close(self) -> None:
        """Persist the n-gram cache and release the ONNX Runtime sessions."""
        self.engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundles/default", help="a bundle folder from `edgespec export`")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", help='device profile: "auto", a name, a file or "none"')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    completer = CodeCompleter(args.bundle, args.threads, None if args.device == "none" else args.device)
    try:
        for code in SNIPPETS:
            result = completer.complete(code, args.max_new_tokens)
            stats = result.stats
            print(f"--- {code}\n{code}{result.text}")
            print(f"[{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
                  f"{stats.mean_accepted_tokens:.2f} tokens per step, finish: {result.finish_reason}]")
    finally:
        completer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
