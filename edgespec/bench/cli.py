"""`edgespec bench`: its options and its command (run, print the tables, write the JSON, Markdown and picture; or
report a saved result again with `--from`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..drafters.config import DEFAULT_DRAFT_BUDGET
from .dataset import DEFAULT_DATA
from .modes import BASELINE, MODES
from .peers import PEERS
from .report import print_tables, render_markdown
from .run import RESULT_FORMAT, RESULT_VERSION, run_bench
from .summary import summarize_rows

MAX_QUESTIONS = 1_000_000  # --per-category and --limit (Spec-Bench has 480 questions)
MAX_WARMUP = 1000
MAX_DRAFT_BUDGET = 256  # as `edgespec generate`
MAX_RESULT_BYTES = 1 << 30  # a saved result read by --from (a full 480-question run of every mode is ~100 MB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `edgespec bench` (numbers bounded, files regular: see edgespec.cliargs)."""
    from ..cliargs import (MAX_TOKENS, bounded_int, comma_items, new_or_regular_file, not_special_file, regular_file,
                           threads_arg)

    parser.add_argument("--bundle", "-b", default=None, help="bundle folder (required unless --from)")
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
    parser.add_argument("--turns", type=int, choices=[1, 2], default=2,
                        help="2 (default): questions with a follow-up (MT-bench's) also run their second turn on the "
                             "same engine right after the first, reported apart (turn 2 against turn 1); 1: first "
                             "turns only. Peers run first turns only")
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
    from ..plot import plot_path

    parser.add_argument("--plot", type=plot_path, default=None, metavar="PATH.svg|PATH.png",
                        help="draw the result here (speedup per category with 95%% intervals, tokens/s against "
                             "the peers, τ per mode); needs matplotlib: pip install 'edgespec[plot]'")
    parser.add_argument("--from", dest="from_path", type=regular_file, default=None, metavar="RESULT.json",
                        help="report a saved result (a --json file, at most 1 GiB) instead of running: the tables, "
                             "and --markdown / --plot / --json from it; the run's options are then ignored")
    parser.add_argument("--interleave", action="store_true",
                        help="run the modes side by side in one worker, prompt by prompt in rotating order (the "
                             "target loaded once), so the machine's drift over minutes hits every mode alike; the "
                             "default runs each mode over all prompts in its own worker, one after another")
    parser.add_argument("--replay", type=regular_file, default=None, metavar="RESULT.json",
                        help="instead of measuring: replay the modes on the greedy outputs recorded in a bench "
                             "result (--json of an earlier run with the plain mode), the real engine, planner and "
                             "drafters with the target's forwards costed by the device profile (--device; none means "
                             "auto here); prints replayed against measured τ and speedups; --json writes the replay")
    parser.add_argument("--in-process", action="store_true",
                        help="run the modes in this process (debugging; peers still get their own process)")


def load_result(path) -> dict:
    """A result saved by `edgespec bench --json`, checked, with its summary computed again from its rows (so it
    matches them). ValueError naming the file when it is not such a result (or newer than this edgespec reads)."""
    from ..runtimes.files import read_json_capped

    data = read_json_capped(Path(path), MAX_RESULT_BYTES, ValueError, "a bench result")
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise ValueError(f"{path} is not an edgespec bench result (no \"format\": \"{RESULT_FORMAT}\"; write one "
                         f"with `edgespec bench --json PATH`)")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= RESULT_VERSION:
        raise ValueError(f"{path}: bench result version {version!r}; this edgespec reads versions 1 to "
                         f"{RESULT_VERSION}")
    for key, kind in (("config", dict), ("systems", dict), ("rows", list)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{path}: field {key!r} must be a{'n object' if kind is dict else ' list'}")
    for i, row in enumerate(data["rows"]):
        _check_row(row, f"{path}: rows[{i}]")
    try:
        data["summary"] = summarize_rows(data["rows"], data["config"].get("baseline") or BASELINE)
        for key, empty in (("machine", {}), ("questions", []), ("skipped_questions", [])):
            data.setdefault(key, empty)
        render_markdown(data)  # every table renders, or the file is incomplete
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: incomplete bench result ({type(exc).__name__}: {str(exc)[:200]})") from None
    return data


def _check_row(row, where: str) -> None:
    """ValueError unless `row` has a measurement row's identifying fields and finite non-negative times and counts."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} must be an object")
    for key in ("system", "kind", "category"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: {key!r} must be a string")
    if isinstance(row.get("question_id"), bool) or not isinstance(row.get("question_id"), (int, str)):
        raise ValueError(f"{where}: 'question_id' must be an integer or a string")
    for key in ("new_tokens", "total_seconds", "time_to_first_token"):
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{where}: {key!r} must be a finite number >= 0")


def main(args) -> int:
    """`edgespec bench`: returns 1 when a mode failed, else 0 (skipped or failed peers are only reported). With
    `--from RESULT` a saved result is reported instead of running one."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    if args.plot:
        from ..plot import require_matplotlib

        require_matplotlib()  # before a run, not after it
    if args.from_path and (args.bundle or getattr(args, "replay", None)):
        raise ValueError("--from reports a saved result: leave out --bundle and --replay (nothing is run)")
    if not args.from_path and not args.bundle:
        raise ValueError("edgespec bench needs --bundle BUNDLE (or --from RESULT.json to report a saved result)")
    if getattr(args, "replay", None):
        return replay_main(args, err)
    result = load_result(args.from_path) if args.from_path else \
        run_bench(args, echo=lambda line: err.print(line, markup=False, style="dim"))
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
    if args.plot:
        from ..plot import plot_bench

        plot_bench(result, args.plot)
        err.print(f"Picture written to {args.plot}", markup=False)
    failed = [n for n, s in result["systems"].items() if s.get("kind") == "mode" and s.get("status") == "failed"]
    return 1 if failed else 0


def replay_main(args, err) -> int:
    """`edgespec bench --replay RESULT.json`: replay the modes, print replayed against measured figures, write the
    replay's JSON with --json."""
    from rich.console import Console
    from rich.table import Table

    from .replay import replay_table, run_replay, write_replay

    replay = run_replay(args, echo=lambda line: err.print(line, markup=False, style="dim"))
    header, rows = replay_table(replay)
    table = Table(title=f"replay of {replay['recording']} (target costed by {replay['device_profile']})")
    for i, h in enumerate(header):
        table.add_column(h, justify="right" if i and h != "status" else "left")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    if args.json_path:
        write_replay(replay, args.json_path)
        err.print(f"JSON written to {args.json_path}", markup=False)
    return 0
