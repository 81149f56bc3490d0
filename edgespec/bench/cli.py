"""`edgespec bench`: its options and its command (run, print the tables, write the JSON and Markdown)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..drafters.config import DEFAULT_DRAFT_BUDGET
from .dataset import DEFAULT_DATA
from .modes import BASELINE, MODES
from .peers import PEERS
from .report import print_tables, render_markdown
from .run import run_bench

MAX_QUESTIONS = 1_000_000  # --per-category and --limit (Spec-Bench has 480 questions)
MAX_WARMUP = 1000
MAX_DRAFT_BUDGET = 256  # as `edgespec generate`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `edgespec bench` (numbers bounded, files regular: see edgespec.cliargs)."""
    from ..cliargs import MAX_TOKENS, bounded_int, comma_items, new_or_regular_file, not_special_file, threads_arg

    parser.add_argument("--bundle", "-b", required=True, help="bundle folder")
    parser.add_argument("--mode", "--modes", dest="mode", default=BASELINE,
                        help=f"comma-separated decoding modes (available: {', '.join(MODES)}; baseline: {BASELINE})")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers on the same weights (default: {','.join(PEERS)})")
    parser.add_argument("--no-peers", action="store_true", help="measure the modes only")
    parser.add_argument("--peer-model", type=not_special_file, default=None,
                        help="source weights for the peers (GGUF file or HF folder; default: the manifest's source)")
    parser.add_argument("--data", type=new_or_regular_file, default=str(DEFAULT_DATA),
                        help="Spec-Bench question.jsonl (a regular file)")
    parser.add_argument("--per-category", type=bounded_int(0, MAX_QUESTIONS), default=2,
                        help=f"first N questions of each category (0 = all; at most {MAX_QUESTIONS})")
    parser.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    parser.add_argument("--limit", type=bounded_int(1, MAX_QUESTIONS), default=None,
                        help=f"at most this many questions in all (1 to {MAX_QUESTIONS})")
    parser.add_argument("--max-new-tokens", type=bounded_int(1, MAX_TOKENS), default=128,
                        help=f"tokens every system generates (exactly; 1 to {MAX_TOKENS})")
    parser.add_argument("--threads", type=threads_arg(), default=None,
                        help="threads for every system, 1 to 4x the CPU count (default: the engine's)")
    parser.add_argument("--max-context", type=bounded_int(1, MAX_TOKENS), default=4096,
                        help=f"engine context (prompt + new tokens must fit; 1 to {MAX_TOKENS})")
    parser.add_argument("--warmup", type=bounded_int(0, MAX_WARMUP), default=1,
                        help=f"untimed short generations before measuring (0 to {MAX_WARMUP})")
    parser.add_argument("--draft-budget", type=bounded_int(0, MAX_DRAFT_BUDGET), default=DEFAULT_DRAFT_BUDGET,
                        help=f"most draft tree nodes per step (speculative modes; 0 to {MAX_DRAFT_BUDGET})")
    parser.add_argument("--device", type=comma_items(not_special_file), default="none", metavar="NAME|auto|FILE[,...]",
                        help="device profile(s) sizing the draft trees (default none: costs measured while running); "
                             "several: every speculative mode runs once per profile (cross-evaluation)")
    parser.add_argument("--trees", default=None, metavar="POLICY[,...]",
                        help="tree policies to compare, each speculative mode once per policy (auto, plan, scores, "
                             "chain:K, tree:WxD); a mode can also name one itself: ngram@chain:4")
    parser.add_argument("--ngram-static", type=new_or_regular_file, default=None, metavar="CACHE",
                        help="a static n-gram cache (edgespec ngram build) for the ngram mode")
    parser.add_argument("--json", dest="json_path", type=new_or_regular_file, default=None, metavar="PATH",
                        help="write the full result here")
    parser.add_argument("--markdown", type=new_or_regular_file, default=None, metavar="PATH",
                        help="write the Markdown report here")
    parser.add_argument("--interleave", action="store_true",
                        help="run the modes side by side in one worker, prompt by prompt in rotating order (the "
                             "target loaded once), so the machine's drift over minutes hits every mode alike; the "
                             "default runs each mode over all prompts in its own worker, one after another")
    parser.add_argument("--in-process", action="store_true",
                        help="run the modes in this process (debugging; peers still get their own process)")


def main(args) -> int:
    """`edgespec bench`: returns 1 when a mode failed, else 0 (skipped or failed peers are only reported)."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    result = run_bench(args, echo=lambda line: err.print(line, markup=False, style="dim"))
    print_tables(result)
    if result["skipped_questions"]:
        err.print(f"[yellow]{len(result['skipped_questions'])} question(s) skipped: "
                  f"{result['skipped_questions'][0]['reason']}[/]")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
        err.print(f"JSON written to {args.json_path}")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(result), encoding="utf-8")
        err.print(f"Markdown written to {args.markdown}")
    failed = [n for n, s in result["systems"].items() if s.get("kind") == "mode" and s.get("status") == "failed"]
    return 1 if failed else 0
