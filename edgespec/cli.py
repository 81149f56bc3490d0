"""The `edgespec` command line: export, generate, chat, bench, info, models, ngram, adapt, add-drafter."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cliargs import (MAX_SEED, MAX_TOKENS, at_most, bounded_float, bounded_int, bounded_text, new_or_regular_file,
                      not_special_file, regular_file, threads_arg)
from .drafters.config import DEFAULT_DRAFT_BUDGET, SpeculationConfig
from .text import MAX_STOP_CHARS

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime, with a short docstring."
MAX_DRAFT_BUDGET = 256  # draft tree nodes per step: a verify forward of 257 tokens at most
MAX_TEMPERATURE = 100.0
MAX_EXPORT_DRAFTERS = 16
MAX_STOPS = 4  # --stop strings (4 as OpenAI's API), each at most text.MAX_STOP_CHARS characters
EXTRAS = {"export": ("torch", "transformers", "gguf", "onnx", "onnx_ir", "accelerate", "peft", "safetensors", "tqdm"),
          "serve": ("starlette", "uvicorn"), "bench": ("psutil",)}  # optional dependencies: pyproject's extras


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def cmd_export(args) -> int:
    """`edgespec export TARGET -o BUNDLE`: export a target (and drafters) into a bundle folder."""
    from .export.bundle import ModelRequest, export_bundle

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = _console()
    target = ModelRequest(args.target, "target", name=args.name, quant=args.quant)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=console, transient=True)
    tasks = {}

    def progress(done: int, total: int, label: str) -> None:
        if not tasks:  # the bar shows from the first download on: an early error prints nothing but its line
            bar.start()
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total or None)
        bar.update(tasks[label], completed=done, total=total or None)

    drafters = [ModelRequest(d, "drafter", quant=args.quant) for d in args.drafter or ()]
    try:
        report = export_bundle(target, args.output, drafters, accuracy_level=args.accuracy_level,
                               self_speculative=args.self_speculative, drafter_kernels=args.drafter_kernels,
                               eight_bit=args.eight_bit, fused_ops=not args.no_fused_ops, threads=args.threads,
                               parity=not args.no_parity, overwrite=args.force, log=lambda m: console.print(m),
                               progress=progress)
    finally:
        if tasks:
            bar.stop()
    console.print(f"[bold green]bundle written:[/] {report.bundle} in {report.seconds:.1f} s")
    for name, stats in report.models.items():
        console.print(f"  {name}: {stats['graph_bytes'] / 1e6:.0f} MB, {stats['seconds']:.1f} s")
    return 0


def _gen_config(args) -> dict:
    config = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "seed": args.seed, "truncate_prompt": args.truncate_prompt}
    if args.stop:
        config["stop"] = tuple(args.stop)
    return config


def _load_engine(args):
    """The engine for `generate`/`chat`, with the drafting options."""
    from .engine import load

    if args.device == "auto":
        _announce_profiling(args)
    speculation = SpeculationConfig(drafter=None if args.drafter == "none" else args.drafter,
                                    draft_budget=args.draft_budget, tree=args.tree,
                                    device=None if args.device == "none" else args.device,
                                    ngram_cache=False if args.no_ngram_cache else args.ngram_cache,
                                    ngram_static=args.ngram_static)
    return load(args.bundle, threads=args.threads, max_context=args.max_context,
                history=history_choice(args.history, args.no_history, os.environ), speculation=speculation)


def history_choice(on: bool, off: bool, environ) -> "bool | None":
    """The `history` argument of `load` for the CLI flags: True with `--history`, False with the hidden
    `--no-history`; with neither, None (the library reads EDGESPEC_HISTORY) when that variable is set, else False:
    the CLI records nothing unless asked."""
    if on:
        return True
    if off or not environ.get("EDGESPEC_HISTORY", "").strip():
        return False
    return None


def _announce_profiling(args) -> None:
    """Say so (on stderr) when `--device auto` is about to measure this device for the first time."""
    from .devices.profile import find_profile
    from .runtimes.manifest import load_manifest
    from .runtimes.runner import default_threads

    manifest = load_manifest(args.bundle)
    if find_profile(manifest, args.threads or default_threads()) is None:
        _console().print("[dim]measuring this device for the bundle (first use; cached, see `edgespec profile "
                         "--list`)...[/]", highlight=False)


def _stats_line(stats) -> str:
    line = (f"{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, first token "
            f"{stats.time_to_first_token * 1000:.0f} ms, prompt {stats.prompt_tokens} tokens")
    if stats.drafter != "none":
        line += (f"; {stats.drafter}: {stats.mean_accepted_tokens:.2f} tokens/step, "
                 f"{stats.accepted_tokens}/{stats.drafted_tokens} drafts accepted")
    return line


def cmd_generate(args) -> int:
    """`edgespec generate [PROMPT] -b BUNDLE`: stream one completion to stdout, its stats to stderr."""
    engine = _load_engine(args)
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    stream = engine.chat_stream([{"role": "user", "content": prompt}], **_gen_config(args)) if args.chat else \
        engine.stream(prompt, **_gen_config(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = engine.last_stats
    if args.json_stats:
        print(json.dumps(stats.to_dict()))
    else:
        _console().print(f"[dim]{_stats_line(stats)}[/]")
    return 0


def cmd_chat(args) -> int:
    """`edgespec chat -b BUNDLE`: an interactive multi-turn chat on the terminal."""
    console = _console()
    engine = _load_engine(args)
    if not engine.entry.chat_template:
        console.print("[yellow]this model has no chat template (a base model): using a plain-text fallback[/]")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    console.print("[dim]/reset clears the history, /stats shows the last answer's stats, /quit exits; "
                  "Ctrl-C stops an answer[/]")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            messages = messages[:1] if args.system else []
            engine.reset()
            console.print("[dim]history cleared[/]")
            continue
        if text == "/stats":
            console.print(json.dumps(engine.last_stats.to_dict() if engine.last_stats else {}, indent=2))
            continue
        messages.append({"role": "user", "content": text})
        answer = []
        try:
            with engine.chat_stream(messages, **_gen_config(args)) as stream:  # Ctrl-C closes it: the engine is free
                for piece in stream:
                    answer.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})


def cmd_info(args) -> int:
    """`edgespec info BUNDLE [--json]`: describe a bundle's models."""
    from .runtimes.manifest import load_manifest

    manifest = load_manifest(args.bundle)
    if args.json:
        print(json.dumps(manifest.raw, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bundle {manifest.root}")
    for col in ("model", "role", "arch", "layers", "heads/kv", "vocab", "quant", "top-1 vs ref", "ppl (ref)", "size MB"):
        table.add_column(col)
    for name, m in manifest.models.items():
        acc = m.accuracy
        size = sum(f.stat().st_size for f in m.graph_path.parent.iterdir()) / 1e6
        table.add_row(name, m.role, m.architecture, str(m.num_layers), f"{m.num_heads}/{m.num_kv_heads}",
                      str(m.vocab_size), m.quantization.get("mode", "?"),
                      _percent(acc.get("top1_agreement")), _perplexity(acc), f"{size:.0f}")
    Console().print(table)
    return 0


def _percent(value) -> str:
    """`value` as a percentage, or "-" when it is not a number."""
    return f"{value:.1%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _perplexity(acc: dict) -> str:
    """The "ppl (ref)" cell of `edgespec info`: "-" for what the manifest lacks (never a KeyError)."""
    def num(value) -> str:
        return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"

    if "perplexity" not in acc:
        return "-"
    return f"{num(acc.get('perplexity'))} ({num(acc.get('reference_perplexity'))})"


def cmd_models(args) -> int:
    """`edgespec models [--fetch NAME]`: list the known model sources, or fetch one."""
    from .export import sources

    if args.fetch:
        path = sources.resolve(args.fetch)
        print(path.path)
        return 0
    for name in sources.known_names():
        src = sources.MODELS[name]
        print(f"{name:22s} {src.size / 1e6:8.0f} MB  {src.description}")
    return 0


def cmd_bench(args) -> int:
    """`edgespec bench`: see edgespec.bench."""
    from .bench import main as bench_main

    return bench_main(args)


def _add_generation_args(p) -> None:
    """The sampling, context, drafting and history options of `generate` and `chat` (each bounded)."""
    p.add_argument("--max-new-tokens", type=bounded_int(1, MAX_TOKENS), default=128,
                   help=f"tokens to generate, 1 to {MAX_TOKENS}")
    p.add_argument("--temperature", type=bounded_float(0.0, MAX_TEMPERATURE), default=0.0,
                   help=f"0 = greedy (default), at most {MAX_TEMPERATURE:g}")
    p.add_argument("--top-k", type=bounded_int(0, MAX_TOKENS), default=0,
                   help=f"0 = off (default), at most {MAX_TOKENS}")
    p.add_argument("--top-p", type=bounded_float(0.0, 1.0, lo_open=True), default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=None, help="0 to 2**64-1 (default: fresh)")
    p.add_argument("--stop", action=at_most(MAX_STOPS), type=bounded_text(MAX_STOP_CHARS),
                   help=f"stop string (repeatable, at most {MAX_STOPS}, 1 to {MAX_STOP_CHARS} characters each)")
    p.add_argument("--threads", type=threads_arg(), default=None,
                   help="intra-op threads, 1 to 4x the CPU count (default: the physical cores)")
    p.add_argument("--max-context", type=bounded_int(1, MAX_TOKENS), default=4096,
                   help=f"tokens of context, 1 to {MAX_TOKENS} (capped at the model's)")
    p.add_argument("--truncate-prompt", action="store_true", help="keep the tail of a prompt over the context length")
    p.add_argument("--drafter", default="ngram", metavar="SPEC",
                   help="speculative drafter: ngram (default), draft[:NAME] (the bundle's drafter model), "
                        "self[:exit=E|skip=a,b|layers=a-b] (the target with layers skipped), cross[:NAME] (a drafter "
                        "with another tokenizer), stages joined by '>' (ngram>draft, ngram>cross), or none (plain "
                        "decoding). Output is the same either way")
    p.add_argument("--draft-budget", type=bounded_int(0, MAX_DRAFT_BUDGET), default=DEFAULT_DRAFT_BUDGET,
                   help=f"most draft tree nodes per step, 0 to {MAX_DRAFT_BUDGET} (0: no drafting)")
    _add_device_args(p)
    p.add_argument("--ngram-cache", type=new_or_regular_file, default=None, metavar="PATH",
                   help="persistent n-gram cache file, a regular file (default: one per bundle under "
                        "~/.cache/edgespec/ngram)")
    p.add_argument("--no-ngram-cache", action="store_true", help="no persistent n-gram cache")
    p.add_argument("--ngram-static", type=regular_file, default=None, metavar="CACHE",
                   help="a cache built by `edgespec ngram build` (a regular file)")
    history = p.add_mutually_exclusive_group()
    history.add_argument("--history", action="store_true",
                         help="record each prompt and output (for `edgespec adapt`) in the bundle's history file "
                              "under ~/.cache/edgespec/history or $EDGESPEC_HISTORY_DIR, mode 0600; off by default "
                              "(EDGESPEC_HISTORY=1 turns it on too)")
    history.add_argument("--no-history", action="store_true", help=argparse.SUPPRESS)  # the old default, kept


def _add_device_args(p) -> None:
    """--device and --tree (shared by generate, chat and bench)."""
    p.add_argument("--device", type=not_special_file, default="auto", metavar="NAME|auto|FILE|none",
                   help="device profile sizing the draft trees: auto (this device's profile for the bundle and thread "
                        "count; measured quickly on first use and cached, see `edgespec profile`), a profile name or "
                        "file, or none (costs measured while generating)")
    p.add_argument("--tree", default="auto", metavar="POLICY",
                   help="draft tree sizing: auto (plan from the device profile), plan, scores (cut by the drafter's "
                        "estimates), or a fixed shape chain:K / tree:WxD")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="edgespec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a target (+ drafters) into a bundle folder")
    p.add_argument("target", type=not_special_file, help="short model name, .gguf file or Hugging Face folder")
    p.add_argument("-o", "--output", type=not_special_file, required=True, help="bundle folder to write")
    p.add_argument("--drafter", action=at_most(MAX_EXPORT_DRAFTERS), type=not_special_file,
                   help=f"drafter model (repeatable, at most {MAX_EXPORT_DRAFTERS})")
    p.add_argument("--drafter-kernels", choices=["fast", "exact"], default="fast",
                   help="drafters' 4/8-bit kernels: fast (int8 activations, 8-bit blocks as MatMulNBits; default: a "
                        "drafter's rounding never changes the output) or exact (the target's settings)")
    p.add_argument("--self-speculative", action="store_true",
                   help="export the target with layer gates (and a reduced draft head) so it can draft for itself")
    p.add_argument("--quant", choices=["gguf", "fp32", "int8", "int4"], default=None,
                   help="default: gguf (exact GGUF blocks) for GGUF sources, fp32 for HF folders")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy level: 4 int8 activations (default: fast, speculation exact to itself, "
                        "fidelity to the fp32 reference measured into the manifest), 0 fp32 math (bit-faithful to "
                        "the reference, slower)")
    p.add_argument("--eight-bit", choices=["fp32", "split", "nbits"], default="nbits",
                   help="form of 8-bit GGUF blocks (Q6_K/Q5_0/Q8_0): nbits one 8-bit MatMulNBits (default), fp32 "
                        "exact dense weights (use with --accuracy-level 0), split exact 4-bit halves (compact)")
    p.add_argument("--no-fused-ops", action="store_true",
                   help="standard ONNX operators instead of ORT's fused ones (for measuring their benefit)")
    p.add_argument("--name", default=None, help="name of the target inside the bundle")
    p.add_argument("--threads", type=threads_arg(), default=2, help="1 to 4x the CPU count (default 2)")
    p.add_argument("--no-parity", action="store_true", help="skip the torch reference check")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate a completion")
    p.add_argument("prompt", nargs="?", default=None, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--bundle", "-b", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--json-stats", action="store_true")
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    p.add_argument("--bundle", "-b", required=True)
    p.add_argument("--system", default=None)
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=512)

    p = sub.add_parser("info", help="describe a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the known model sources, or fetch one")
    p.add_argument("--fetch", metavar="NAME")
    p.set_defaults(func=cmd_models)

    from .bench import add_arguments as bench_arguments

    p = sub.add_parser("bench", help="benchmark on Spec-Bench against peers")
    bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    from .drafters.ngram_static import register_cli as ngram_cli

    ngram_cli(sub)
    from .export.adapt import register_cli as adapt_cli  # adapt, add-drafter (torch only when they run)

    adapt_cli(sub)
    from .devices.profile import register_cli as profile_cli

    profile_cli(sub)
    from .server import register_cli as serve_cli  # serve, serve-bench (starlette only when they run)

    serve_cli(sub)
    return parser


def missing_extra(exc: ImportError) -> "str | None":
    """The `pip install` advice for an ImportError of an optional dependency (see EXTRAS), or None for any other."""
    top = (exc.name or "").split(".")[0]
    for extra, modules in EXTRAS.items():
        if top in modules:
            return f"this command needs the optional package {top!r}, which is not installed: " \
                   f"pip install 'edgespec[{extra}]'"
    return None


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input or a bad file (reported in one line), not a bug (a traceback)."""
    from .export.sources import SourceError
    from .drafters.cachefile import CacheFileError

    return ValueError, OSError, RuntimeError, SourceError, CacheFileError


def _fail(message: str, code: int) -> int:
    """Print `edgespec: error: MESSAGE` on stderr (argparse's form) and return `code`."""
    print(f"edgespec: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    """Entry point of the `edgespec` command: bad options exit 2 (argparse), expected errors print one line
    `edgespec: error: ...` and return 2, a missing optional dependency names its extra; EDGESPEC_DEBUG=1 re-raises."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except ImportError as exc:
        advice = missing_extra(exc)
        if advice is None or os.environ.get("EDGESPEC_DEBUG"):
            raise
        return _fail(advice, 2)
    except _expected_errors() as exc:
        if os.environ.get("EDGESPEC_DEBUG"):
            raise
        return _fail(str(exc) or type(exc).__name__, 2)


if __name__ == "__main__":
    sys.exit(main())
