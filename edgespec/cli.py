"""The `edgespec` command line (its subcommands are listed by `edgespec --help`, built from the registered parsers).

Conventions: `--version`; help shows each option's default and groups the options (sampling, context, speculation,
device, history, output); llama.cpp's short forms (-n, -c, -t, --temp); a prompt of `-` (or none, when stdin is not
a terminal) is read from stdin; messages are plain text (no markup eats `[serve]`); errors name the CLI's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .cliargs import (MAX_SEED, MAX_STDIN_BYTES, MAX_TOKENS, Parser, at_most, bounded_float, bounded_int,
                      bounded_text, new_or_regular_file, not_special_file, read_stdin_text, regular_file,
                      stdin_is_terminal, threads_arg)
from .drafters.config import DEFAULT_DRAFT_BUDGET, SpeculationConfig
from .sampling import MAX_REPETITION_PENALTY
from .text import MAX_STOP_CHARS

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime, with a short docstring."
MAX_DRAFT_BUDGET = 256  # draft tree nodes per step: a verify forward of 257 tokens at most
MAX_TEMPERATURE = 100.0
MAX_EXPORT_DRAFTERS = 16
MAX_STOPS = 4  # --stop strings (4 as OpenAI's API), each at most text.MAX_STOP_CHARS characters
MAX_SYSTEM_CHARS = 1 << 20  # --system (a chat message's limit, repl.MAX_MESSAGE_CHARS)
SUMMARY = "edgespec: on-device LLM inference with exact speculative decoding on ONNX Runtime."
EXTRAS = {"export": ("torch", "transformers", "gguf", "onnx", "onnx_ir", "accelerate", "peft", "safetensors"),
          "serve": ("starlette", "uvicorn"), "bench": ("psutil",),
          "plot": ("matplotlib",), "metrics": ("prometheus_client",)}  # optional dependencies: pyproject's extras


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _say(text: str, style: "str | None" = None) -> None:
    """Print `text` verbatim on stderr (rich's Text: brackets such as `[serve]` are never read as markup), styled
    with `style` on a terminal."""
    from rich.text import Text

    _console().print(Text(text, style=style or ""), soft_wrap=True)


def cmd_export(args) -> int:
    """`edgespec export TARGET -o BUNDLE`: export a target (and drafters) into a bundle folder, showing each
    model's phases on stderr (one live row on a terminal, one plain line per phase elsewhere)."""
    from .export.bundle import ModelRequest, export_bundle
    from .export.progress import export_display

    console = _console()
    target = ModelRequest(args.target, "target", name=args.name, quant=args.quant)
    drafters = [ModelRequest(d, "drafter", quant=args.quant) for d in args.drafter or ()]

    def log(message: str) -> None:  # verbatim: "[name]" is the model's name, not rich markup
        console.print(message, markup=False, emoji=False, soft_wrap=True)

    with export_display(console) as progress:
        report = export_bundle(target, args.output, drafters, accuracy_level=args.accuracy_level,
                               self_speculative=args.self_speculative, drafter_kernels=args.drafter_kernels,
                               eight_bit=args.eight_bit, fused_ops=not args.no_fused_ops, threads=args.threads,
                               parity=not args.no_parity, overwrite=args.force, log=log, progress=progress)
    _say(f"bundle written: {report.bundle} in {report.seconds:.1f} s", "bold green")
    for name, stats in report.models.items():
        _say(f"  {name}: {stats['graph_bytes'] / 1e6:.0f} MB, {stats['seconds']:.1f} s")
    return 0


def _gen_config(args) -> dict:
    config = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "seed": args.seed, "truncate_prompt": args.truncate_prompt,
              "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
              "min_new_tokens": args.min_new_tokens}
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
                history=history_choice(args.history, args.no_history, os.environ), speculation=speculation,
                providers=args.provider)


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
    if find_profile(manifest, args.threads or default_threads(), providers=args.provider) is None:
        _say("measuring this device for the bundle (first use; cached, see `edgespec profile --list`)...", "dim")


def _stats_line(stats) -> str:
    """One line of a generation's statistics (repl.stats_line)."""
    from .repl import stats_line

    return stats_line(stats)


def read_prompt(argument: "str | None", stdin, default: "str | None") -> "str | None":
    """The prompt of `generate` / `run`: `argument` itself; for "-", the text on stdin (at most MAX_STDIN_BYTES,
    StdinError when empty); with no argument, stdin's text when stdin is not a terminal and holds some, else
    `default`."""
    from .cliargs import StdinError

    if argument == "-":
        text = read_stdin_text(stdin, MAX_STDIN_BYTES)
        if not text.strip():
            raise StdinError("the prompt on stdin is empty (a prompt of - reads stdin)")
        return text
    if argument is not None or default is None or stdin_is_terminal(stdin):
        return argument if argument is not None else default
    try:
        text = read_stdin_text(stdin, MAX_STDIN_BYTES)
    except OSError:  # a stream that cannot be read (closed, or a test runner's placeholder): the default
        return default
    return text if text.strip() else default


def cmd_generate(args) -> int:
    """`edgespec generate [PROMPT|-] -b BUNDLE`: stream one completion to stdout, its stats to stderr (with a
    marker when the token limit cut it)."""
    from .repl import cut_marker

    prompt = read_prompt(args.prompt, sys.stdin, DEFAULT_PROMPT)
    engine = _load_engine(args)
    stream = engine.chat_stream([{"role": "user", "content": prompt}], **_gen_config(args)) if args.chat else \
        engine.stream(prompt, **_gen_config(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = engine.last_stats
    if args.json_stats:
        print(json.dumps({**stats.to_dict(), "finish_reason": stream.result.finish_reason}))
    else:
        _say(_stats_line(stats) + cut_marker(stream.result, args.max_new_tokens), "dim")
    return 0


def chat_bundle(model: "str | None", bundle: "str | None") -> str:
    """The bundle folder of `edgespec chat` / `edgespec run`: --bundle as given, or MODEL resolved through the
    managed store (edgespec.store.ensure_bundle: a bundle folder as is, a model name pulled and exported once).
    ValueError when neither or both are given."""
    if model and bundle:
        raise ValueError("give a MODEL or --bundle, not both")
    if bundle:
        return bundle
    if not model:
        raise ValueError("name a MODEL (a model name or a bundle folder) or --bundle BUNDLE")
    try:
        from .store import ensure_bundle
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.store":
            raise
        if os.path.isdir(model):
            return model
        raise ValueError(f"{model!r} is not a bundle folder, and this install has no model store to fetch it") from None
    return str(ensure_bundle(model))


def cmd_chat(args) -> int:
    """`edgespec chat [MODEL] [-b BUNDLE]` and `edgespec run MODEL [PROMPT|-]`: the interactive chat (edgespec.repl),
    or one answer to PROMPT."""
    from .repl import chat_command

    args.bundle = chat_bundle(getattr(args, "model", None), args.bundle)
    prompt = read_prompt(getattr(args, "prompt", None), sys.stdin, None)
    engine = _load_engine(args)
    try:
        return chat_command(args, engine, _gen_config(args), prompt)
    finally:
        engine.close()


def cmd_info(args) -> int:
    """`edgespec info BUNDLE [--json]`: describe a bundle's models."""
    from .runtimes.manifest import load_manifest

    manifest = load_manifest(args.bundle)
    if args.json:
        print(json.dumps(manifest.raw, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"bundle {manifest.root}"))  # Text: names and paths are never read as markup
    for col in ("model", "role", "arch", "layers", "heads/kv", "vocab", "quant", "top-1 vs ref", "ppl (ref)", "size MB"):
        table.add_column(col)
    for name, m in manifest.models.items():
        acc = m.accuracy
        size = sum(f.stat().st_size for f in m.graph_path.parent.iterdir()) / 1e6
        cells = (name, m.role, m.architecture, str(m.num_layers), f"{m.num_heads}/{m.num_kv_heads}",
                 str(m.vocab_size), str(m.quantization.get("mode", "?")),
                 _percent(acc.get("top1_agreement")), _perplexity(acc), f"{size:.0f}")
        table.add_row(*(Text(cell) for cell in cells))
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


def cmd_bench(args) -> int:
    """`edgespec bench`: see edgespec.bench."""
    from .bench import main as bench_main

    return bench_main(args)


GENERATION_GROUPS = (("sampling", "how each token is chosen"),
                     ("context", "what the model sees"),
                     ("speculation", "drafting; the output is the same with any drafter"),
                     ("device", "where and how it runs"),
                     ("history", "what is kept after the run (nothing by default)"),
                     ("output", "how much is generated and how it is shown"))


def _add_generation_args(p) -> dict:
    """The sampling, context, speculation, device, history and output options of `generate`, `chat` and `run`
    (each bounded), in argument groups; returns the groups by name for the command's own options."""
    groups = {name: p.add_argument_group(name, what) for name, what in GENERATION_GROUPS}
    sampling = groups["sampling"]
    sampling.add_argument("--temperature", "--temp", type=bounded_float(0.0, MAX_TEMPERATURE), default=0.0,
                          help=f"0 = greedy; at most {MAX_TEMPERATURE:g}")
    sampling.add_argument("--top-k", type=bounded_int(0, MAX_TOKENS), default=0, help=f"0 = off; at most {MAX_TOKENS}")
    sampling.add_argument("--top-p", type=bounded_float(0.0, 1.0, lo_open=True), default=1.0, help="in (0, 1]; 1 = off")
    sampling.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=None, help="0 to 2**64-1 (default: fresh)")
    sampling.add_argument("--min-p", type=bounded_float(0.0, 1.0), default=0.0,
                          help="keep the tokens at least MIN_P times as likely as the top one; 0 = off, at most 1")
    sampling.add_argument("--repetition-penalty", type=bounded_float(0.0, MAX_REPETITION_PENALTY, lo_open=True),
                          default=1.0, help=f"Hugging Face's penalty on tokens already in the prompt or output; "
                                            f"1 = off, in (0, {MAX_REPETITION_PENALTY:g}]")
    sampling.add_argument("--min-new-tokens", type=bounded_int(0, MAX_TOKENS), default=0,
                          help="no EOS or stop string before this many new tokens; at most --max-new-tokens")
    context = groups["context"]
    context.add_argument("--max-context", "-c", type=bounded_int(1, MAX_TOKENS), default=4096,
                         help=f"tokens of context, 1 to {MAX_TOKENS} (capped at the model's)")
    context.add_argument("--truncate-prompt", action="store_true",
                         help="keep the tail of a prompt over the context length (instead of an error)")
    speculation = groups["speculation"]
    speculation.add_argument("--drafter", default="auto", metavar="SPEC",
                             help="speculative drafter: auto (n-grams, staged in front of a bundled drafter model "
                                  "when its measured cost makes it pay), ngram, draft[:NAME] (the bundle's drafter model), "
                                  "self[:exit=E|skip=a,b|layers=a-b] (the target with layers skipped), cross[:NAME] "
                                  "(a drafter with another tokenizer), stages joined by '>' (ngram>draft, "
                                  "ngram>cross), or none (plain decoding). Output is the same either way")
    speculation.add_argument("--draft-budget", type=bounded_int(0, MAX_DRAFT_BUDGET), default=DEFAULT_DRAFT_BUDGET,
                             help=f"most draft tree nodes per step, 0 to {MAX_DRAFT_BUDGET} (0: no drafting)")
    speculation.add_argument("--ngram-cache", type=new_or_regular_file, default=None, metavar="PATH",
                             help="persistent n-gram cache file, a regular file (default: one per bundle under "
                                  "~/.cache/edgespec/ngram)")
    speculation.add_argument("--no-ngram-cache", action="store_true", help="no persistent n-gram cache")
    speculation.add_argument("--ngram-static", type=regular_file, default=None, metavar="CACHE",
                             help="a cache built by `edgespec ngram build` (a regular file)")
    device = groups["device"]
    device.add_argument("--threads", "-t", type=threads_arg(), default=None,
                        help="intra-op threads, 1 to 4x the CPU count (default: the physical cores)")
    _add_device_args(device)
    history = groups["history"].add_mutually_exclusive_group()
    history.add_argument("--history", action="store_true",
                         help="record each prompt and output (for `edgespec adapt`) in the bundle's history file "
                              "under ~/.cache/edgespec/history or $EDGESPEC_HISTORY_DIR, mode 0600; off by default "
                              "(EDGESPEC_HISTORY=1 turns it on too)")
    history.add_argument("--no-history", action="store_true", help=argparse.SUPPRESS)  # the old default, kept
    output = groups["output"]
    output.add_argument("--max-new-tokens", "-n", type=bounded_int(1, MAX_TOKENS), default=128,
                        help=f"tokens to generate, 1 to {MAX_TOKENS}")
    output.add_argument("--stop", action=at_most(MAX_STOPS), type=bounded_text(MAX_STOP_CHARS),
                        help=f"stop string (repeatable, at most {MAX_STOPS}, 1 to {MAX_STOP_CHARS} characters each)")
    return groups


def _add_chat_args(p) -> None:
    """The options of `chat` and `run`: the generation options, --system and --input-history."""
    groups = _add_generation_args(p)
    groups["context"].add_argument("--system", type=bounded_text(MAX_SYSTEM_CHARS), default=None, metavar="TEXT",
                                   help=f"system prompt: sent first in every conversation, kept by /reset and when "
                                        f"old turns are dropped to fit the context (1 to {MAX_SYSTEM_CHARS} "
                                        "characters)")
    groups["history"].add_argument("--input-history", action="store_true",
                                   help="keep the lines you type (arrow-up recall) across sessions in "
                                        "chat-input.txt under ~/.cache/edgespec/history or $EDGESPEC_HISTORY_DIR, mode "
                                        "0600; off by default (no file is written)")
    p.set_defaults(func=cmd_chat, max_new_tokens=512)


def _add_device_args(p) -> None:
    """--device and --tree (shared by generate, chat and bench)."""
    p.add_argument("--device", type=not_special_file, default="auto", metavar="NAME|auto|FILE|none",
                   help="device profile sizing the draft trees: auto (this device's profile for the bundle and thread "
                        "count; measured quickly on first use and cached, see `edgespec profile`), a profile name or "
                        "file, or none (costs measured while generating)")
    p.add_argument("--tree", default="auto", metavar="POLICY",
                   help="draft tree sizing: auto (plan from the device profile), plan, scores (cut by the drafter's "
                        "estimates), or a fixed shape chain:K / tree:WxD")
    from .devices.profile import add_provider_option

    add_provider_option(p)  # --provider NAME (repeatable)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every subcommand (help with defaults, see cliargs.Parser); the description lists
    every registered subcommand."""
    parser = Parser(prog="edgespec", description=SUMMARY)
    parser.add_argument("--version", action="version", version=f"edgespec {version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

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
    p.add_argument("--threads", "-t", type=threads_arg(), default=2, help="1 to 4x the CPU count")
    p.add_argument("--no-parity", action="store_true", help="skip the torch reference check")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate a completion")
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT",
                   help=f"prompt text, or - to read it from stdin (at most {MAX_STDIN_BYTES >> 20} MiB); without it, "
                        f"stdin when that is not a terminal, else an example: {DEFAULT_PROMPT!r}")
    p.add_argument("--bundle", "-b", required=True, type=not_special_file, help="bundle folder")
    output = _add_generation_args(p)["output"]
    output.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    output.add_argument("--json-stats", action="store_true", help="the stats as one JSON line on stdout")
    p.set_defaults(func=cmd_generate)

    chat_help = ("interactive chat: /help lists its commands, \"\"\" starts a multi-line message,\nCtrl-C stops an "
                 "answer, Ctrl-D leaves; the oldest turns are dropped when the\nconversation outgrows the context")
    p = sub.add_parser("chat", help="interactive multi-turn chat", description=chat_help)
    p.add_argument("model", nargs="?", default=None, type=not_special_file, metavar="MODEL",
                   help="a model name (pulled and exported once into the managed store) or a bundle folder")
    p.add_argument("--bundle", "-b", default=None, type=not_special_file, help="bundle folder (instead of MODEL)")
    _add_chat_args(p)

    p = sub.add_parser("run", help="chat with a model by name (fetched on first use), or answer one prompt",
                       description=chat_help + ";\nwith PROMPT, one answer and exit")
    p.add_argument("model", type=not_special_file, metavar="MODEL",
                   help="a model name (pulled and exported once into the managed store) or a bundle folder")
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT",
                   help=f"answer this one message and exit (- reads it from stdin, at most {MAX_STDIN_BYTES >> 20} "
                        "MiB); without it, the interactive chat")
    _add_chat_args(p)
    p.set_defaults(bundle=None)

    p = sub.add_parser("info", help="describe a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    from .store import register_cli as store_cli  # pull, models, rm

    store_cli(sub)

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
    parser.description = _describe_commands(sub)
    return parser


def _describe_commands(sub) -> str:
    """The top-level description: SUMMARY and the names of every registered subcommand (whichever module added
    it, read from the subparsers: the list never goes stale), wrapped to the terminal's width."""
    import shutil
    import textwrap

    width = max(40, min(100, shutil.get_terminal_size().columns) - 2)
    names = ", ".join(sub.choices)
    listing = textwrap.fill(f"commands: {names}. `edgespec COMMAND --help` describes one.", width,
                            break_on_hyphens=False)
    return f"{SUMMARY}\n\n{listing}"


def version() -> str:
    """The installed distribution's version (importlib.metadata), else edgespec.__version__."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("edgespec")
    except PackageNotFoundError:
        from . import __version__

        return __version__


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
        return _fail(error_message(exc), 2)


def error_message(exc: BaseException) -> str:
    """The one line printed for an expected error: its text, where a context overflow names the CLI's flags
    (--max-context, --truncate-prompt) instead of the Python API's argument (truncate_prompt=True)."""
    from .runtimes.runner import ContextOverflow

    text = str(exc) or type(exc).__name__
    if isinstance(exc, ContextOverflow):
        text = re.sub(r"\s*\(pass truncate_prompt=True[^)]*\)", "", text)
        text += ": raise --max-context (up to the model's context length) or pass --truncate-prompt to keep the " \
                "prompt's tail"
    return text


if __name__ == "__main__":
    sys.exit(main())
