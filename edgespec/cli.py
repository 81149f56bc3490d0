"""The `edgespec` command line: export, generate, chat, bench, info, models, ngram, adapt, add-drafter."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime, with a short docstring."


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def cmd_export(args) -> int:
    from .export.bundle import ModelRequest, export_bundle

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = _console()
    target = ModelRequest(args.target, "target", name=args.name, quant=args.quant)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=console, transient=True)
    tasks = {}

    def progress(done: int, total: int, label: str) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total or None)
        bar.update(tasks[label], completed=done, total=total or None)

    drafters = [ModelRequest(d, "drafter", quant=args.quant) for d in args.drafter or ()]
    with bar:
        report = export_bundle(target, args.output, drafters, accuracy_level=args.accuracy_level,
                               self_speculative=args.self_speculative, drafter_kernels=args.drafter_kernels,
                               eight_bit=args.eight_bit, fused_ops=not args.no_fused_ops, threads=args.threads,
                               parity=not args.no_parity, overwrite=args.force, log=lambda m: console.print(m),
                               progress=progress)
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

    cache = False if args.no_ngram_cache else args.ngram_cache
    if args.device == "auto":
        _announce_profiling(args)
    return load(args.bundle, threads=args.threads, max_context=args.max_context,
                drafter=None if args.drafter == "none" else args.drafter, draft_budget=args.draft_budget,
                ngram_cache=cache, ngram_static=args.ngram_static, history=False if args.no_history else None,
                device=None if args.device == "none" else args.device, tree=args.tree)


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
                      f"{acc['top1_agreement']:.1%}" if "top1_agreement" in acc else "-",
                      f"{acc['perplexity']:.2f} ({acc['reference_perplexity']:.2f})" if "perplexity" in acc else "-",
                      f"{size:.0f}")
    Console().print(table)
    return 0


def cmd_models(args) -> int:
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
    from .bench import main as bench_main

    return bench_main(args)


def _add_generation_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--truncate-prompt", action="store_true", help="keep the tail of a prompt over the context length")
    p.add_argument("--drafter", default="ngram", metavar="SPEC",
                   help="speculative drafter: ngram (default), draft[:NAME] (the bundle's drafter model), "
                        "self[:exit=E|skip=a,b|layers=a-b] (the target with layers skipped), cross[:NAME] (a drafter "
                        "with another tokenizer), stages joined by '>' (ngram>draft, ngram>cross), or none (plain "
                        "decoding). Output is the same either way")
    p.add_argument("--draft-budget", type=int, default=16, help="most draft tree nodes per step")
    _add_device_args(p)
    p.add_argument("--ngram-cache", default=None, metavar="PATH",
                   help="persistent n-gram cache file (default: one per bundle under ~/.cache/edgespec/ngram)")
    p.add_argument("--no-ngram-cache", action="store_true", help="no persistent n-gram cache")
    p.add_argument("--ngram-static", default=None, metavar="CACHE", help="a cache built by `edgespec ngram build`")
    p.add_argument("--no-history", action="store_true",
                   help="do not log prompts and outputs for `edgespec adapt` (also: EDGESPEC_HISTORY=0)")


def _add_device_args(p) -> None:
    """--device and --tree (shared by generate, chat and bench)."""
    p.add_argument("--device", default="auto", metavar="NAME|auto|FILE|none",
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
    p.add_argument("target", help="short model name, .gguf file or Hugging Face folder")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument("--drafter", action="append", help="drafter model (repeatable)")
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
    p.add_argument("--threads", type=int, default=2)
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

    from .ngram import register_cli as ngram_cli

    ngram_cli(sub)
    from .export.adapt import register_cli as adapt_cli  # adapt, add-drafter (torch only when they run)

    adapt_cli(sub)
    from .devices.profile import register_cli as profile_cli

    profile_cli(sub)
    from .server import register_cli as serve_cli  # serve, serve-bench (starlette only when they run)

    serve_cli(sub)
    return parser


def main(argv=None) -> int:
    """Entry point of the `edgespec` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if os.environ.get("EDGESPEC_DEBUG"):
            raise
        _console().print(f"[bold red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
