"""Pictures of a bench result and of a device profile, written as SVG or PNG (chosen by the file's suffix).

matplotlib is optional (`pip install 'edgespec[plot]'`) and imported only when a picture is drawn. Figures are built
with matplotlib's object API (`matplotlib.figure.Figure`, drawn by the Agg / SVG renderers), so pyplot's global
state and the user's chosen backend are never touched; SVG text stays text (searchable) and SVG files carry no date
(the same input gives the same file).

* `plot_bench(result, path)`: a result of `edgespec bench` (the dict written by `--json`): (a) decode speedup of
  every speculative mode over the baseline per Spec-Bench category and over all prompts, with the 95% bootstrap
  interval of `bench.summary.paired_speed`; (b) tokens per second of every system, edgespec's modes next to the
  peers (llama.cpp, transformers), end-to-end and in decoding; (c) τ, tokens per target step, per mode.
* `plot_profile(profile, path)`: a device profile's verification cost curve (forward ms against tokens scored, one
  line per measured context) with the trees the planner chooses on it marked (see `planned_trees`).

The data of each panel comes from a small pure function (`category_speedups`, `system_rates`, `mode_taus`,
`verify_curves`, `planned_trees`) that needs no matplotlib.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

PLOT_FORMATS = {".svg": "svg", ".png": "png"}  # the only pictures written, by suffix
MISSING_MATPLOTLIB = "pictures need matplotlib, which is not installed: pip install 'edgespec[plot]'"
ALL_PROMPTS = "all"  # the last group of the speedup panel: every prompt of the run
MAX_NOTE_CHARS = 90  # a failed system's note as shown under the bench picture
PNG_DPI = 150
SVG_SALT = "edgespec"  # fixed ids inside SVG files (reproducible output)
MAX_PLANNED_NODES = 64  # the most nodes the engine lets the planner plan (`Engine._make_planner`)


# ---- paths and the optional dependency -----------------------------------------------------------------------------
def plot_format(path: str | os.PathLike) -> str:
    """"svg" or "png" from the suffix of `path` (any case); ValueError naming both for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise ValueError(f"{path}: a picture must be a .svg or .png file (got {suffix or 'no suffix'!r})")
    return PLOT_FORMATS[suffix]


def plot_path(text: str) -> str:
    """An argparse type for `--plot PATH`: a new or regular file (as `cliargs.new_or_regular_file`) ending in .svg or
    .png."""
    from .cliargs import new_or_regular_file

    new_or_regular_file(text)
    try:
        plot_format(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def require_matplotlib():
    """The matplotlib module, or ImportError (name "matplotlib") naming `pip install 'edgespec[plot]'`."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MISSING_MATPLOTLIB, name="matplotlib") from None
    return matplotlib


def new_figure(width: float, height: float):
    """An empty matplotlib Figure (constrained layout), not registered with pyplot."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Render `figure` in the format of `path`'s suffix and write it atomically; returns the path."""
    from .runtimes.files import write_bytes_atomic

    fmt = plot_format(path)
    matplotlib = require_matplotlib()
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": SVG_SALT}):
        if fmt == "svg":
            figure.savefig(buffer, format="svg", metadata={"Date": None})
        else:
            figure.savefig(buffer, format="png", dpi=PNG_DPI)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


# ---- bench: the data of each panel ---------------------------------------------------------------------------------
def _measured(result: dict, kind: str) -> list[str]:
    """Systems of `kind` ("mode" or "peer") that have rows, in the summary's order."""
    summary = result["summary"]
    return [s for s in summary["systems"] if summary["kinds"].get(s) == kind and s in summary["overall"]]


def category_speedups(result: dict) -> dict[str, list[dict]]:
    """Per speculative mode (every measured mode but the baseline): its decode speed over the baseline's on the same
    prompts, per category in the result's order and then over all prompts (`ALL_PROMPTS`), each
    {category, ratio, low, high, prompts} with the 95% bootstrap interval of `paired_speed`. Empty without a
    measured baseline."""
    from .bench.summary import paired_speed

    summary, rows = result["summary"], result["rows"]
    baseline = summary["baseline"]
    if baseline not in summary["overall"]:
        return {}
    groups = [*summary["categories"], ALL_PROMPTS]

    def rows_of(system: str, category: str) -> list[dict]:
        return [r for r in rows if r["system"] == system and category in (ALL_PROMPTS, r["category"])]

    out = {}
    for mode in _measured(result, "mode"):
        if mode == baseline:
            continue
        bars = []
        for category in groups:
            pair = paired_speed(rows_of(mode, category), rows_of(baseline, category))
            if pair is not None:
                bars.append({"category": category, "ratio": pair["ratio"], "low": pair["low"], "high": pair["high"],
                             "prompts": pair["prompts"]})
        out[mode] = bars
    return out


def system_label(system: str, kind: str) -> str:
    """How a system is named in the pictures: "edgespec MODE" for a mode, the peer's own name for a peer."""
    return f"edgespec {system}" if kind == "mode" else system


def system_rates(result: dict) -> list[dict]:
    """Every measured system, modes first then peers: {system, label, kind, tokens_per_second (end-to-end, sum of
    tokens over sum of time), decode_tokens_per_second (the same after the first token)}."""
    overall = result["summary"]["overall"]
    return [{"system": s, "label": system_label(s, kind), "kind": kind,
             "tokens_per_second": overall[s].get("tokens_per_second_agg"),
             "decode_tokens_per_second": overall[s].get("decode_tokens_per_second_agg")}
            for kind in ("mode", "peer") for s in _measured(result, kind)]


def mode_taus(result: dict) -> list[dict]:
    """Every measured mode with its τ over all prompts (tokens per target forward; 1 for plain decoding) and its
    acceptance rate (accepted over drafted nodes; None without drafting)."""
    overall = result["summary"]["overall"]
    return [{"system": s, "tau": overall[s].get("mean_accepted_tokens"),
             "acceptance_rate": overall[s].get("acceptance_rate")} for s in _measured(result, "mode")]


def unmeasured_notes(result: dict) -> list[str]:
    """One line per system of the run that has no rows (skipped or failed), with its reason shortened."""
    overall = result["summary"]["overall"]
    lines = []
    for name, info in (result.get("systems") or {}).items():
        if name in overall:
            continue
        note = str(info.get("note") or "").strip().rstrip(":")
        note = note if len(note) <= MAX_NOTE_CHARS else note[:MAX_NOTE_CHARS - 1] + "…"
        lines.append(f"{name}: {info.get('status') or 'not measured'}" + (f" ({note})" if note else ""))
    return lines


def bench_title(result: dict) -> str:
    """The bench picture's title: model, prompts, tokens, threads, CPU and date."""
    config, machine = result.get("config") or {}, result.get("machine") or {}
    baseline = result["summary"]["baseline"]
    prompts = result["summary"]["overall"].get(baseline, {}).get("prompts") or len(result.get("questions") or [])
    parts = [f"edgespec bench: {config.get('model') or config.get('bundle') or 'model'}",
             f"Spec-Bench, {prompts} prompts", f"{config.get('max_new_tokens', '?')} new tokens each",
             f"{config.get('threads', '?')} threads", machine.get("cpu_model") or "unknown CPU"]
    created = str(result.get("created_at") or "")[:10]
    return ", ".join(parts) + (f" ({created})" if created else "")


# ---- bench: drawing ------------------------------------------------------------------------------------------------
def _draw_speedups(ax, result: dict) -> None:
    """Panel (a): grouped bars of decode speedup per category with their 95% intervals, a line at 1."""
    import numpy as np

    speedups = category_speedups(result)
    baseline = result["summary"]["baseline"]
    ax.set_title(f"(a) decode speedup over {baseline} per Spec-Bench category (95% bootstrap interval over prompts)",
                 loc="left", fontsize=10)
    if not speedups:
        ax.text(0.5, 0.5, f"no speculative mode measured next to {baseline}", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    groups = [*result["summary"]["categories"], ALL_PROMPTS]
    width = 0.8 / len(speedups)
    for i, (mode, bars) in enumerate(speedups.items()):
        at = {b["category"]: b for b in bars}
        x = np.array([groups.index(c) for c in at]) - 0.4 + width * (i + 0.5)
        ratios = np.array([b["ratio"] for b in at.values()])
        errors = np.array([[b["ratio"] - b["low"] for b in at.values()], [b["high"] - b["ratio"] for b in at.values()]])
        ax.bar(x, ratios - 1.0, width, bottom=1.0, yerr=errors, capsize=2, label=mode, error_kw={"linewidth": 0.8})
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axvline(len(groups) - 1.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(f"× {baseline} decode speed")
    ax.legend(title="mode", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)


def _draw_rates(ax, result: dict) -> None:
    """Panel (b): end-to-end and decode tokens per second of every system; peers hatched."""
    import numpy as np

    rates = system_rates(result)
    ax.set_title("(b) tokens per second (sum of tokens / sum of time):\nedgespec and peer runtimes on the same weights",
                 loc="left", fontsize=10)
    if not rates:
        ax.text(0.5, 0.5, "no system measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    x = np.arange(len(rates))
    hatches = ["//" if r["kind"] == "peer" else "" for r in rates]
    for offset, key, label, colour in ((-0.2, "tokens_per_second", "end-to-end (prefill included)", "#4c72b0"),
                                       (0.2, "decode_tokens_per_second", "decoding (after the first token)",
                                        "#dd8452")):
        values = [r[key] or 0.0 for r in rates]
        bars = ax.bar(x + offset, values, 0.4, label=label, color=colour, hatch=hatches, edgecolor="white")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [r["label"] for r in rates], rotation=30, ha="right")
    ax.set_ylabel("tokens / s")
    if any(r["kind"] == "peer" for r in rates):
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="//"))
        labels.append("peer runtime (hatched)")
        ax.legend(handles, labels, fontsize=8, loc="upper left", ncols=3)
    else:
        ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.margins(y=0.3)  # room for the legend above the bars
    ax.grid(axis="y", alpha=0.3)


def _draw_taus(ax, result: dict) -> None:
    """Panel (c): τ per mode, with the acceptance rate under each drafting mode's bar."""
    taus = mode_taus(result)
    ax.set_title("(c) τ: tokens per target step", loc="left", fontsize=10)
    if not taus:
        ax.text(0.5, 0.5, "no mode measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    bars = ax.bar(range(len(taus)), [t["tau"] or 0.0 for t in taus], 0.6, color="#55a868")
    ax.bar_label(bars, labels=[f"{t['tau']:.2f}" if t["tau"] else "–" for t in taus], fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(taus)),
                  [t["system"] + (f"\n{t['acceptance_rate']:.0%} accepted" if t["acceptance_rate"] is not None else "")
                   for t in taus], rotation=30, ha="right")
    ax.set_ylabel("τ (tokens / step)")
    ax.grid(axis="y", alpha=0.3)


def bench_figure(result: dict):
    """The bench picture (a Figure): speedups per category on top, rates and τ below, notes on unmeasured systems."""
    figure = new_figure(13, 9.5)
    grid = figure.add_gridspec(2, 2, height_ratios=(1.1, 1), width_ratios=(1.4, 1))
    _draw_speedups(figure.add_subplot(grid[0, :]), result)
    _draw_rates(figure.add_subplot(grid[1, 0]), result)
    _draw_taus(figure.add_subplot(grid[1, 1]), result)
    figure.suptitle(bench_title(result), fontsize=11)
    notes = unmeasured_notes(result)
    if notes:
        figure.supxlabel("not measured: " + "; ".join(notes), fontsize=8, color="#a33")
    return figure


def plot_bench(result: dict, path: str | os.PathLike) -> Path:
    """Write the bench picture of `result` (the dict `edgespec bench --json` writes) to `path` (.svg or .png)."""
    plot_format(path)
    return save_figure(bench_figure(result), path)


# ---- device profile --------------------------------------------------------------------------------------------------
def verify_curves(profile) -> list[dict]:
    """The profile's measured target forward times: per context {context, sizes, ms} (ms as measured)."""
    verify = profile.verify_ms
    return [{"context": context, "sizes": list(verify["sizes"]), "ms": list(row)}
            for context, row in zip(verify["contexts"], verify["ms"])]


def planned_trees(profile, draft_budget: int | None = None) -> list[dict]:
    """The trees the planner chooses on this profile at each measured context, before any acceptance evidence: one
    `Planner` over the profile's verify cost (drafting free, as for n-gram drafting), each confidence bucket with its
    prior acceptance rates. Per (context, bucket): {context, bucket, nodes, tokens (1 + nodes, the forward's size),
    ms (the profile's interpolated time for it), widths, tokens_per_step, speedup (predicted, over plain)}.
    `draft_budget`: the most nodes a plan may have, 1 to MAX_PLANNED_NODES (default: the engine's)."""
    from .drafters.config import DEFAULT_DRAFT_BUDGET
    from .planner import Planner

    budget = DEFAULT_DRAFT_BUDGET if draft_budget is None else draft_budget
    if not 1 <= budget <= MAX_PLANNED_NODES:
        raise ValueError(f"draft budget {budget}: the planner plans 1 to {MAX_PLANNED_NODES} nodes")
    planner = Planner(profile.verify_seconds, None, max_nodes=budget)
    marks = []
    for context in profile.verify_ms["contexts"]:
        for plan in planner.describe(context):
            tokens = 1 + plan["nodes"]
            marks.append({"context": context, "bucket": plan["bucket"], "nodes": plan["nodes"], "tokens": tokens,
                          "ms": profile.verify_seconds(tokens, context) * 1000.0, "widths": plan["widths"],
                          "tokens_per_step": plan["tokens_per_step"], "speedup": plan["speedup"]})
    return marks


def plan_lines(marks: list[dict]) -> list[str]:
    """One line per context: each confidence bucket's planned tree (nodes; its shape: "chain" or the nodes per
    level) and its predicted speedup over plain decoding."""
    lines: dict[int, list[str]] = {}
    for m in marks:
        shape = "chain" if set(m["widths"]) == {1} else "-".join(str(w) for w in m["widths"])
        tree = "plain" if m["nodes"] == 0 else \
            f"{m['nodes']} node{'s' * (m['nodes'] != 1)} ({shape}) ×{m['speedup']:.2f}"
        lines.setdefault(m["context"], []).append(f"{m['bucket']}: {tree}")
    return [f"context {context}: " + "; ".join(parts) for context, parts in lines.items()]


def profile_title(profile) -> str:
    """The profile picture's title: model, device, threads, profile name and date."""
    device = profile.device
    return (f"{profile.bundle.get('model') or 'model'} on {device.get('device_id')} "
            f"({device.get('cpu_model') or 'unknown CPU'}), {profile.threads} thread{'s' * (profile.threads != 1)}: "
            f"target forward time\nprofile {profile.name}, measured {str(profile.created)[:10]}")


def profile_figure(profile, draft_budget: int | None = None):
    """The profile picture (a Figure): ms against tokens per context, the planner's choices marked."""
    figure = new_figure(10, 6.5)
    ax = figure.add_subplot()
    curves = verify_curves(profile)
    colours, star_sizes = {}, {}
    for i, curve in enumerate(curves):
        (line,) = ax.plot(curve["sizes"], curve["ms"], marker=".", label=f"context {curve['context']}")
        colours[curve["context"]] = line.get_color()
        star_sizes[curve["context"]] = max(16 - 3 * i, 6)  # the later contexts' stars drawn smaller, on top
    marks = planned_trees(profile, draft_budget)
    for i, mark in enumerate(marks):
        ax.plot([mark["tokens"]], [mark["ms"]], marker="*", markersize=star_sizes[mark["context"]],
                color=colours[mark["context"]], markeredgecolor="black", linestyle="none",
                label="the planner's tree (1 + nodes) per confidence bucket" if i == 0 else None)
    ax.text(0.02, 0.72, "planned trees (shape, predicted speedup over plain):\n" + "\n".join(plan_lines(marks)),
            transform=ax.transAxes, ha="left", va="top", fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "#bbb", "alpha": 0.9})
    sizes = profile.verify_ms["sizes"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("tokens scored in one target forward (the pending token + draft nodes)")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("the planner's trees: prior acceptance per confidence bucket (before any evidence), drafting free "
                 "(n-gram)", fontsize=8, loc="left")
    figure.suptitle(profile_title(profile), fontsize=10)
    return figure


def plot_profile(profile, path: str | os.PathLike, draft_budget: int | None = None) -> Path:
    """Write the verification cost picture of a `DeviceProfile` to `path` (.svg or .png); `draft_budget`: the most
    nodes the planner may plan (default: the engine's)."""
    plot_format(path)
    return save_figure(profile_figure(profile, draft_budget), path)
