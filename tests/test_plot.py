"""Pictures (edgespec.plot): the data behind each panel, SVG / PNG files from a synthetic bench result and from the
shipped device profiles, `edgespec bench --plot [--from RESULT]` and `edgespec profile --plot [--from PROFILE]`,
their limits and errors, and the message when matplotlib is missing."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgespec import plot
from edgespec.bench import cli as bench_cli
from edgespec.bench import make_row, render_markdown, summarize_rows
from edgespec.bench.run import RESULT_FORMAT, RESULT_VERSION
from edgespec.cli import main
from edgespec.devices import load_profile

pytest.importorskip("matplotlib")

SHIPPED_PROFILES = sorted((Path(__file__).resolve().parents[1] / "devices").glob("*.json"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CATEGORIES = ("writing", "coding")
NEW_TOKENS = 9
HF_NOTE = "transformers is not installed " + "x" * 200  # longer than plot.MAX_NOTE_CHARS


def _row(system: str, kind: str, qid: int, category: str, decode_seconds: float, steps: int | None) -> dict:
    """One measurement: NEW_TOKENS tokens, 0.5 s to the first token, then `decode_seconds`."""
    stats = {"new_tokens": NEW_TOKENS, "total_seconds": 0.5 + decode_seconds, "time_to_first_token": 0.5,
             "steps": steps}
    if steps and steps < NEW_TOKENS:  # drafted: 12 nodes offered, the tokens beyond one per step accepted
        stats.update(drafted_tokens=12, accepted_tokens=NEW_TOKENS - steps)
    return make_row(system, kind, {"question_id": qid, "category": category, "ids": [1, 2, 3]},
                    list(range(NEW_TOKENS)), stats)


def synthetic_result() -> dict:
    """Three prompts per category: ngram decodes exactly 2x as fast as plain on writing and 1.25x on coding (3 steps
    for 9 tokens: τ 3), llama.cpp 1.6x; hf failed."""
    rows = []
    for i in range(6):
        category = CATEGORIES[i // 3]
        plain = 1.0 + 0.1 * i
        rows.append(_row("plain", "mode", i, category, plain, NEW_TOKENS))
        rows.append(_row("ngram", "mode", i, category, plain / (2.0 if category == "writing" else 1.25), 3))
        rows.append(_row("llama.cpp", "peer", i, category, plain / 1.6, None))
    systems = {"plain": {"kind": "mode", "status": "ok", "note": None},
               "ngram": {"kind": "mode", "status": "ok", "note": None},
               "llama.cpp": {"kind": "peer", "status": "ok", "note": None},
               "hf": {"kind": "peer", "status": "failed", "note": HF_NOTE}}
    config = {"bundle": "bundles/tiny", "model": "tiny-model", "per_category": 3, "max_new_tokens": NEW_TOKENS,
              "threads": 2, "baseline": "plain"}
    return {"format": RESULT_FORMAT, "version": RESULT_VERSION, "created_at": "2026-01-02T03:04:05+00:00",
            "config": config, "machine": {"cpu_model": "Test CPU"}, "questions": [], "skipped_questions": [],
            "systems": systems, "rows": rows, "summary": summarize_rows(rows, "plain")}


def svg_texts(path) -> list[str]:
    """Every text of an SVG file (parsed as XML: the file must be well-formed)."""
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return ["".join(node.itertext()) for node in root.iter("{http://www.w3.org/2000/svg}text")]


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG file's header (which must be a PNG's)."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ---- the data of the bench panels ------------------------------------------------------------------------------------
def test_category_speedups_are_the_paired_decode_ratios_with_intervals():
    speedups = plot.category_speedups(synthetic_result())
    assert list(speedups) == ["ngram"]  # the baseline is not compared with itself; peers are not modes
    bars = {b["category"]: b for b in speedups["ngram"]}
    assert list(bars) == [*CATEGORIES, plot.ALL_PROMPTS]
    assert bars["writing"]["ratio"] == pytest.approx(2.0)
    assert bars["writing"]["low"] == pytest.approx(2.0) and bars["writing"]["high"] == pytest.approx(2.0)
    assert bars["coding"]["ratio"] == pytest.approx(1.25)
    everything = bars[plot.ALL_PROMPTS]
    assert everything["prompts"] == 6
    assert 1.25 <= everything["low"] < everything["ratio"] < everything["high"] <= 2.0


def test_category_speedups_need_the_baseline():
    result = synthetic_result()
    result["rows"] = [r for r in result["rows"] if r["system"] != "plain"]
    result["summary"] = summarize_rows(result["rows"], "plain")
    assert plot.category_speedups(result) == {}


def test_rates_taus_and_notes():
    result = synthetic_result()
    rates = plot.system_rates(result)
    assert [r["label"] for r in rates] == ["edgespec plain", "edgespec ngram", "llama.cpp"]
    overall = result["summary"]["overall"]
    assert rates[2]["tokens_per_second"] == overall["llama.cpp"]["tokens_per_second_agg"]
    assert rates[0]["decode_tokens_per_second"] == overall["plain"]["decode_tokens_per_second_agg"]
    taus = {t["system"]: t for t in plot.mode_taus(result)}
    assert taus["plain"]["tau"] == pytest.approx(1.0) and taus["plain"]["acceptance_rate"] is None
    assert taus["ngram"]["tau"] == pytest.approx(3.0)
    assert taus["ngram"]["acceptance_rate"] == pytest.approx(6 / 12)
    (note,) = plot.unmeasured_notes(result)
    assert note.startswith("hf: failed (transformers is not installed") and note.endswith("…)")
    assert len(note) == len("hf: failed ()") + plot.MAX_NOTE_CHARS


# ---- bench pictures ----------------------------------------------------------------------------------------------
def test_bench_svg_has_every_series_and_is_reproducible(tmp_path):
    result = synthetic_result()
    path = plot.plot_bench(result, tmp_path / "bench.svg")
    texts = svg_texts(path)
    for label in ("ngram", "edgespec plain", "edgespec ngram", "llama.cpp", *CATEGORIES, plot.ALL_PROMPTS,
                  "end-to-end (prefill included)", "decoding (after the first token)", "peer runtime (hatched)",
                  "3.00"):
        assert label in texts, label
    assert any(t.startswith("(a) decode speedup over plain") for t in texts)
    assert any(t.startswith("(c) τ") for t in texts)
    assert any("tiny-model" in t and "Test CPU" in t for t in texts)
    assert any(t.startswith("not measured: hf: failed") for t in texts)
    again = plot.plot_bench(result, tmp_path / "again.svg")
    assert again.read_bytes() == path.read_bytes()  # no date, fixed ids


def test_bench_png(tmp_path):
    path = plot.plot_bench(synthetic_result(), tmp_path / "bench.PNG")  # the suffix in any case
    width, height = png_size(path)
    assert (width, height) == (13 * plot.PNG_DPI, int(9.5 * plot.PNG_DPI))


def test_bench_picture_without_speculative_modes(tmp_path):
    result = synthetic_result()
    result["rows"] = [r for r in result["rows"] if r["system"] == "plain"]
    result["summary"] = summarize_rows(result["rows"], "plain")
    texts = svg_texts(plot.plot_bench(result, tmp_path / "plain.svg"))
    assert "no speculative mode measured next to plain" in texts
    assert "edgespec plain" in texts and "llama.cpp" not in texts


@pytest.mark.parametrize("name", ["out.pdf", "out", "out.svg.gz", "out.jpeg"])
def test_only_svg_and_png(tmp_path, name):
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        plot.plot_bench(synthetic_result(), tmp_path / name)
    assert not (tmp_path / name).exists()


# ---- edgespec bench --plot / --from ------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """The synthetic result saved as `edgespec bench --json` writes it."""
    path = tmp_path / "result.json"
    path.write_text(json.dumps(synthetic_result(), indent=1), encoding="utf-8")
    return path


def test_bench_from_saved_result_writes_picture_and_markdown(saved, tmp_path, capsys):
    svg, md, png = tmp_path / "b.svg", tmp_path / "b.md", tmp_path / "b.png"
    assert main(["bench", "--from", str(saved), "--plot", str(svg), "--markdown", str(md)]) == 0
    assert "llama.cpp" in svg_texts(svg)
    assert md.read_text(encoding="utf-8") == render_markdown(bench_cli.load_result(saved))
    assert "Picture written to" in capsys.readouterr().err
    assert main(["bench", "--from", str(saved), "--plot", str(png)]) == 0
    assert png_size(png)[0] == 13 * plot.PNG_DPI


def test_load_result_recomputes_the_summary(saved):
    data = json.loads(saved.read_text(encoding="utf-8"))
    data["summary"] = {"stale": True}
    saved.write_text(json.dumps(data), encoding="utf-8")
    assert bench_cli.load_result(saved)["summary"] == synthetic_result()["summary"]


def test_bench_plot_option_limits(saved, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--from", str(saved), "--plot", str(tmp_path / "b.pdf")])
    assert exc.value.code == 2
    assert "a picture must be a .svg or .png file" in capsys.readouterr().err
    assert main(["bench", "--from", str(saved), "--bundle", "B"]) == 2
    assert "leave out --bundle" in capsys.readouterr().err
    assert main(["bench"]) == 2
    assert "needs --bundle BUNDLE (or --from" in capsys.readouterr().err


def _edited(path, change) -> Path:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    change(data)
    Path(path).write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="something-else"), "is not an edgespec bench result"),
    (lambda d: d.update(version=RESULT_VERSION + 1), "bench result version"),
    (lambda d: d.update(version=True), "bench result version"),
    (lambda d: d.pop("rows"), "field 'rows' must be a list"),
    (lambda d: d.update(systems=[]), "field 'systems' must be an object"),
    (lambda d: d["rows"][3].update(total_seconds=-1.0), r"rows\[3\]: 'total_seconds' must be a finite number"),
    (lambda d: d["rows"][0].update(question_id=[1]), r"rows\[0\]: 'question_id'"),
    (lambda d: d["rows"][1].pop("category"), r"rows\[1\]: 'category' must be a string"),
    (lambda d: d["rows"][2].pop("tokens_per_second"), "incomplete bench result"),
    (lambda d: d["config"].pop("max_new_tokens"), "incomplete bench result"),
])
def test_load_result_refuses_bad_files(saved, change, message):
    with pytest.raises(ValueError, match=message):
        bench_cli.load_result(_edited(saved, change))


def test_load_result_size_limit(saved, monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "MAX_RESULT_BYTES", saved.stat().st_size)
    assert bench_cli.load_result(saved)["format"] == RESULT_FORMAT  # at the limit
    monkeypatch.setattr(bench_cli, "MAX_RESULT_BYTES", saved.stat().st_size - 1)
    assert main(["bench", "--from", str(saved)]) == 2
    assert "not a bench result" in capsys.readouterr().err
    saved.write_text("{not json", encoding="utf-8")
    assert main(["bench", "--from", str(saved)]) == 2


# ---- device profiles ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED_PROFILES, ids=lambda p: p.stem)
def test_planned_trees_on_shipped_profiles(path):
    profile = load_profile(path)
    marks = plot.planned_trees(profile)
    contexts = profile.verify_ms["contexts"]
    assert [m["context"] for m in marks] == [c for c in contexts for _ in range(3)]  # three confidence buckets
    for m in marks:
        assert 0 <= m["nodes"] <= 16 and m["tokens"] == 1 + m["nodes"] and sum(m["widths"]) == m["nodes"]
        assert m["ms"] == pytest.approx(profile.verify_seconds(m["tokens"], m["context"]) * 1000)
        assert m["speedup"] >= 1.0 or m["nodes"] == 0
    for context in contexts:  # a more confident bucket never plans a smaller tree
        nodes = [m["nodes"] for m in marks if m["context"] == context]
        assert nodes == sorted(nodes) and nodes[-1] > 0
    assert all(m["nodes"] <= 2 for m in plot.planned_trees(profile, draft_budget=2))
    assert max(m["nodes"] for m in plot.planned_trees(profile, draft_budget=1)) == 1  # the limits
    assert plot.planned_trees(profile, draft_budget=plot.MAX_PLANNED_NODES)
    for budget in (0, plot.MAX_PLANNED_NODES + 1):
        with pytest.raises(ValueError, match="the planner plans 1 to 64 nodes"):
            plot.planned_trees(profile, draft_budget=budget)


@pytest.mark.parametrize("path", SHIPPED_PROFILES[:1], ids=lambda p: p.stem)
def test_profile_svg_and_png(path, tmp_path):
    profile = load_profile(path)
    texts = svg_texts(plot.plot_profile(profile, tmp_path / "p.svg"))
    for context in profile.verify_ms["contexts"]:
        assert f"context {context}" in texts
    assert "the planner's tree (1 + nodes) per confidence bucket" in texts
    assert "planned trees (shape, predicted speedup over plain):" in texts
    for line in plot.plan_lines(plot.planned_trees(profile)):
        assert line in texts
    assert profile.name in " ".join(texts)
    assert png_size(plot.plot_profile(profile, tmp_path / "p.png")) == (10 * plot.PNG_DPI, int(6.5 * plot.PNG_DPI))


def test_profile_command_plot(tmp_path, capsys):
    out = tmp_path / "profile.svg"
    assert main(["profile", "--from", str(SHIPPED_PROFILES[0]), "--plot", str(out)]) == 0
    assert "context 128" in svg_texts(out)
    captured = capsys.readouterr()
    assert "profile read:" in captured.out and "picture written" in captured.err
    assert main(["profile", "--list", "--plot", str(out)]) == 2
    assert main(["profile", "--from", str(SHIPPED_PROFILES[0]), "--bundle", "B"]) == 2
    assert "leave out --bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--from", str(SHIPPED_PROFILES[0]), "--plot", str(tmp_path / "p.gif")])
    with pytest.raises(SystemExit):
        main(["profile", "--from", str(tmp_path / "missing.json")])


# ---- matplotlib missing --------------------------------------------------------------------------------------------
def test_missing_matplotlib_names_the_extra(monkeypatch, saved, tmp_path, capsys):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'edgespec\[plot\]'"):
        plot.plot_bench(synthetic_result(), tmp_path / "b.svg")
    # checked before anything runs: the bundle is never looked at
    assert main(["bench", "--bundle", str(tmp_path / "no-bundle"), "--plot", str(tmp_path / "b.svg")]) == 2
    assert main(["profile", "--bundle", str(tmp_path / "no-bundle"), "--plot", str(tmp_path / "p.svg")]) == 2
    err = capsys.readouterr().err
    assert err.count("pip install 'edgespec[plot]'") == 2 and "no-bundle" not in err
    assert not (tmp_path / "b.svg").exists()
