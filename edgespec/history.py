"""A log of what the target produced (prompt and output, as text and as token ids), for later adaptation.

One JSON object per line (JSON Lines), appended after each generation:

    {"v": 1, "time": "2026-11-23T23:00:00+00:00", "model": "<target name>", "prompt": "...", "output": "...",
     "prompt_ids": [...], "output_ids": [...]}

`edgespec adapt` (package `edgespec.export.adapt`) trains a drafter on these records. The default file is one per
bundle and target under ``$EDGESPEC_HISTORY_DIR`` (default ``~/.cache/edgespec/history``); ``EDGESPEC_HISTORY=0``
(or ``off`` / ``false``) turns logging off.

Robustness: each record is written with one ``write`` in append mode, then flushed and fsynced, so a crash leaves at
most one torn last line, which `read_history` skips with a warning (as it does any corrupt line). The file is capped:
when an append would take it over ``max_bytes``, the newest half of its lines is first rewritten atomically
(temporary file in the same folder + ``os.replace``).

Standard library only (the runtime must not need torch).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable

from .runtimes.manifest import write_bytes_atomic

HISTORY_VERSION = 1
DEFAULT_MAX_BYTES = 64 << 20  # 64 MiB
MAX_LINE_BYTES = 16 << 20  # one record (prompt and output of one generation); longer lines are skipped unread
MAX_TOKEN_ID = (1 << 31) - 1  # ids above it are no token of any tokenizer (and overflow tokenizers' u32)
_OFF_VALUES = ("0", "off", "false")
# field -> type every record must have (the writer writes all of them)
_RECORD_FIELDS = {"v": int, "time": str, "model": str, "prompt": str, "output": str, "prompt_ids": list,
                  "output_ids": list}


class HistoryWarning(UserWarning):
    """A history line was skipped (torn, not JSON, or not a complete record)."""


def default_history_dir() -> Path:
    """``$EDGESPEC_HISTORY_DIR`` if set, else ``~/.cache/edgespec/history`` (not created here)."""
    env = os.environ.get("EDGESPEC_HISTORY_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgespec" / "history"


def _safe_part(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9._-] replaced by '_' (a file-name part)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"


def default_history_path(bundle_root: str | os.PathLike, target_name: str) -> Path:
    """The history file of a bundle's target: ``<history dir>/<bundle folder name>--<target name>.jsonl``."""
    bundle_name = Path(bundle_root).expanduser().resolve().name
    return default_history_dir() / f"{_safe_part(bundle_name)}--{_safe_part(target_name)}.jsonl"


def history_enabled() -> bool:
    """False when the environment variable EDGESPEC_HISTORY is "0", "off" or "false" (any case); True otherwise."""
    return os.environ.get("EDGESPEC_HISTORY", "").strip().lower() not in _OFF_VALUES


def _record_line(prompt_text: str, output_text: str, prompt_ids: Iterable[int], output_ids: Iterable[int],
                 model: str) -> bytes:
    """One history record as a UTF-8 JSON line ending in a newline."""
    record = {
        "v": HISTORY_VERSION,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": str(model),
        "prompt": str(prompt_text),
        "output": str(output_text),
        "prompt_ids": [int(t) for t in prompt_ids],
        "output_ids": [int(t) for t in output_ids],
    }
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates in the text: escaped JSON is still valid UTF-8
        return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


def newest_half(lines: list[bytes]) -> list[bytes]:
    """The newest half of `lines` (the last len // 2 of them)."""
    return lines[len(lines) - len(lines) // 2:] if len(lines) > 1 else []


class SessionLog:
    """Appends one JSON line per generation to `path` (see the module docstring), capped at `max_bytes`."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = Path(path).expanduser()
        self.max_bytes = int(max_bytes)

    def append(self, prompt_text: str, output_text: str, prompt_ids: Iterable[int], output_ids: Iterable[int],
               model: str) -> None:
        """Append one record (one write, flushed and fsynced); first trims the file when it would pass the cap."""
        line = _record_line(prompt_text, output_text, prompt_ids, output_ids, model)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        if size and size + len(line) > self.max_bytes:
            size = self._trim(len(line))
        if size and not self._ends_with_newline():
            line = b"\n" + line  # a torn last line (crash mid-write) must not swallow this record
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _trim(self, incoming: int) -> int:
        """Atomically rewrite the file with its newest half of lines (repeatedly, until `incoming` more bytes fit
        under the cap or no line is left); returns the new size."""
        lines = self.path.read_bytes().splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        while lines and sum(map(len, lines)) + incoming > self.max_bytes:
            lines = newest_half(lines)
        data = b"".join(lines)
        write_bytes_atomic(self.path, data)
        return len(data)


def _problem(record) -> str | None:
    """Why `record` is not a usable history record, or None when it is."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, kind in _RECORD_FIELDS.items():
        if key not in record:
            return f"missing field {key!r}"
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"field {key!r} is not a {kind.__name__}"
    if record["v"] != HISTORY_VERSION:
        return f"version {record['v']} (this reader knows {HISTORY_VERSION})"
    for key in ("prompt_ids", "output_ids"):
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in record[key]):
            return f"field {key!r} holds something other than token ids"
    return None


def read_history(path: str | os.PathLike) -> list[dict]:
    """Every usable record of a history file, oldest first.

    A torn, non-JSON or incomplete line is skipped with a `HistoryWarning` naming the file and the line number (so
    is a line over `MAX_LINE_BYTES`, never held in memory whole); a broken log never raises. A missing file raises
    FileNotFoundError saying how logging is turned on.
    """
    path = Path(path).expanduser()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no generation history at {path}: it is written while the bundle generates with history logging on "
            f"(the default: edgespec.load(bundle) logs to the default file, history=PATH elsewhere; history=False "
            f"or EDGESPEC_HISTORY=0/off/false turns it off, EDGESPEC_HISTORY_DIR moves the default folder); "
            f"generate with the bundle first, or pass the file explicitly") from None
    records = []
    with f:
        for number, raw in enumerate(_lines(f), start=1):
            if raw is None:
                warnings.warn(f"{path}:{number}: skipped a line over {MAX_LINE_BYTES} bytes", HistoryWarning,
                              stacklevel=2)
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, huge integers, deep nesting
                warnings.warn(f"{path}:{number}: skipped a line that is not valid JSON (torn write?): "
                              f"{type(exc).__name__}: {str(exc)[:200]}", HistoryWarning, stacklevel=2)
                continue
            problem = _problem(record)
            if problem is not None:
                warnings.warn(f"{path}:{number}: skipped a record: {problem}", HistoryWarning, stacklevel=2)
                continue
            records.append(record)
    return records


def _lines(f):
    """The lines of a binary file (split at b"\\n"); None for a line longer than MAX_LINE_BYTES, which is skipped
    without being read into memory whole."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES:
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield None
            continue
        yield line
