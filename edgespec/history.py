"""A log of what the target produced (prompt and output, as text and as token ids), for later adaptation.

One JSON object per line (JSON Lines), appended after each generation:

    {"v": 1, "time": "2026-11-23T23:00:00+00:00", "model": "<target name>", "prompt": "...", "output": "...",
     "prompt_ids": [...], "output_ids": [...]}

`edgespec adapt` (package `edgespec.export.adapt`) trains a drafter on these records. Logging is off unless asked
for: ``edgespec.load(bundle, history=True)`` (or a file path), the CLI's ``--history``, or ``EDGESPEC_HISTORY=1``
(``on`` / ``true`` / ``yes``). The default file is one per bundle and target under ``$EDGESPEC_HISTORY_DIR``
(default ``~/.cache/edgespec/history``).

Privacy: the log holds every prompt and output in clear text. Folders it creates are mode 0700 and the file 0600;
an existing log file readable by others is tightened to 0600 on the next append (modes are never loosened). A path
that exists but is not a regular file (a FIFO, a device, a folder) is refused, never opened for reading or writing.

Robustness: each record is written with one ``write`` in append mode, then flushed and fsynced, so a crash leaves at
most one torn last line, which `read_history` skips with a warning (as it does any corrupt line). The file is capped:
when an append would take it over ``max_bytes``, the file is first cut to its newest whole lines that fill at most
half the cap (`trim_start`), copied by streaming from that offset into a temporary file in the same folder that
replaces the log atomically (``os.replace``): a log of any size (4 GB, or a sparse file) costs one read of at most
half the cap, never the whole file in memory.

Standard library only (the runtime must not need torch).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Iterable

from .runtimes.files import atomic_writer, check_regular_file, open_regular

HISTORY_VERSION = 1
DEFAULT_MAX_BYTES = 64 << 20  # 64 MiB
MAX_LINE_BYTES = 16 << 20  # one record (prompt and output of one generation); longer lines are skipped unread
MAX_TOKEN_ID = (1 << 31) - 1  # ids above it are no token of any tokenizer (and overflow tokenizers' u32)
_ON_VALUES = ("1", "on", "true", "yes")
_OFF_VALUES = ("", "0", "off", "false", "no")
COPY_CHUNK = 1 << 20  # bytes per read while trimming (memory held at once)
FILE_MODE, FOLDER_MODE = 0o600, 0o700
# field -> type every record must have (the writer writes all of them)
_RECORD_FIELDS = {"v": int, "time": str, "model": str, "prompt": str, "output": str, "prompt_ids": list,
                  "output_ids": list}


HOW_TO_TURN_ON = (
    "history is off by default; turn it on where the bundle generates, with `--history` on `edgespec generate`, "
    "`edgespec chat` or `edgespec serve`, with edgespec.load(bundle, history=True) (or history=PATH), or with the "
    "environment variable EDGESPEC_HISTORY=1; EDGESPEC_HISTORY_DIR moves the default folder")


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


def history_enabled(environ=None) -> bool:
    """Whether EDGESPEC_HISTORY asks for logging: True for "1", "on", "true" or "yes", False when unset, empty,
    "0", "off", "false" or "no" (any case, spaces ignored); any other value raises ValueError naming them."""
    value = (os.environ if environ is None else environ).get("EDGESPEC_HISTORY", "").strip().lower()
    if value in _ON_VALUES:
        return True
    if value in _OFF_VALUES:
        return False
    raise ValueError(f"EDGESPEC_HISTORY={value[:40]!r} is neither on ({', '.join(_ON_VALUES)}) nor off "
                     f"({', '.join(v for v in _OFF_VALUES if v)} or unset)")


def make_private_dirs(folder: str | os.PathLike) -> None:
    """Create `folder` and its missing parents, each with mode 0700 (Path.mkdir(parents=True) would give the
    parents the default mode). Existing folders are left as they are."""
    folder = Path(folder)
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=FOLDER_MODE)
        except FileExistsError:  # another process made it meanwhile
            pass


def check_not_special(path: str | os.PathLike) -> None:
    """Raise ValueError when `path` exists and is not a regular file (a FIFO would block a reader or writer
    forever, a device or a folder is no log); a missing path is fine."""
    check_regular_file(path, "history")


def tighten_mode(fd: int) -> None:
    """Make an open file mode 0600 when group or others may read or write it (never loosens a mode; a file of
    another owner is left alone)."""
    info = os.fstat(fd)
    if info.st_mode & 0o077:
        try:
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & FILE_MODE)
        except PermissionError:
            pass


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


def trim_start(f, size: int, keep: int) -> int:
    """The offset in the binary file `f` (of `size` bytes) from which its newest whole lines fill at most `keep`
    bytes: the first line start at or after size - keep (`size` when no line fits). Reads at most `keep` bytes, in
    chunks of COPY_CHUNK."""
    if keep >= size:
        return 0
    position = size - keep
    if position == 0:
        return 0
    f.seek(position - 1)
    if f.read(1) == b"\n":
        return position
    while position < size:
        chunk = f.read(min(COPY_CHUNK, size - position))
        if not chunk:
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(chunk)
    return size


def copy_tail(src, dst, start: int, size: int) -> int:
    """Copy bytes start..size of `src` to `dst` in COPY_CHUNK pieces, ending with a newline (a torn last line is
    closed); returns the bytes written."""
    src.seek(start)
    written, last = 0, b"\n"
    while start + written < size:
        chunk = src.read(min(COPY_CHUNK, size - start - written))
        if not chunk:
            break
        dst.write(chunk)
        written += len(chunk)
        last = chunk[-1:]
    if written and last != b"\n":
        dst.write(b"\n")
        written += 1
    return written


class SessionLog:
    """Appends one JSON line per generation to `path` (see the module docstring), capped at `max_bytes`.

    Raises ValueError when `path` exists and is not a regular file."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = Path(path).expanduser()
        self.max_bytes = int(max_bytes)
        check_not_special(self.path)

    def append(self, prompt_text: str, output_text: str, prompt_ids: Iterable[int], output_ids: Iterable[int],
               model: str) -> None:
        """Append one record (one write, flushed and fsynced); first trims the file when it would pass the cap.
        The folder is created 0700 and the file 0600 (an existing file open to others is tightened). Raises
        OSError when the file cannot be written or is not a regular file."""
        line = _record_line(prompt_text, output_text, prompt_ids, output_ids, model)
        make_private_dirs(self.path.parent)
        fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            tighten_mode(fd)
            size = os.fstat(fd).st_size
            if size and size + len(line) > self.max_bytes:
                os.close(fd)
                fd = -1
                self._trim(len(line))
                fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
                size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn last line (crash mid-write) must not swallow this record
            view = memoryview(line)
            while view:  # one write in practice; a short write (a full disk) is continued or raises
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _trim(self, incoming: int) -> int:
        """Atomically replace the file by its newest whole lines that fill at most half the cap and leave room for
        `incoming` more bytes (nothing when no line fits), streamed (see `trim_start`); returns the new size."""
        keep = max(0, min(self.max_bytes // 2, self.max_bytes - incoming - 1))  # (-1: a newline closing a torn line)
        fd = open_regular(self.path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            start = trim_start(src, size, keep)
            with atomic_writer(self.path) as dst:
                return copy_tail(src, dst, start, size)


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
    FileNotFoundError saying how logging is turned on (`HOW_TO_TURN_ON`); a path that is not a regular file (a
    FIFO, ...) raises ValueError without blocking.
    """
    path = Path(path).expanduser()
    try:
        f = os.fdopen(open_regular(path, os.O_RDONLY), "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"no generation history at {path}: {HOW_TO_TURN_ON}") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ValueError(f"history path {path} is not a regular file (a FIFO, device or folder): "
                             f"refused") from None
        raise
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
