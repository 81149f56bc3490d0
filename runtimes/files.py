"""File helpers shared by the runtime, the drafters' caches, the history, the device profiles and the exporter (a
leaf: the standard library only): the one atomic writer (`atomic_writer`, and `write_bytes_atomic` /
`write_json_atomic` over it) with its stale-temporary-file cleanup, capped JSON reads and regular-file checks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path


def is_regular_file(path: Path) -> bool:
    """path.is_file(), False also when the name cannot even be looked up (too long, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def check_regular_file(path, what: str) -> bool:
    """True when `path` is a regular file, False when nothing is there; ValueError naming `what` when it is
    something else (a FIFO, which would block a reader or writer forever, a device or a folder) or cannot be
    looked up."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} path {path} cannot be examined: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} path {path} is not a regular file (a FIFO, device or folder): refused")
    return True


def open_regular(path, flags: int, mode: int = 0o600) -> int:
    """os.open(path, flags | O_NONBLOCK, mode), then OSError (EINVAL) unless what was opened is a regular file: a
    FIFO is refused without blocking (O_NONBLOCK), a regular file behaves as without the flag."""
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file (a FIFO, device or folder)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_json_capped(path: Path, max_bytes: int, error: type[Exception], what: str):
    """The parsed JSON of a file of at most `max_bytes` bytes. An unreadable or larger file, bad UTF-8, bad JSON,
    an integer too long to read or too deep nesting raise `error` naming the file (never a raw parser error)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path} cannot be read: {exc}") from None
    if len(data) > max_bytes:
        raise error(f"{path} is over {max_bytes >> 20} MiB: not {what}")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise error(f"{path} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON to `path` through a temporary file and an atomic rename."""
    write_bytes_atomic(path, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by `data`: a temporary file in the same folder, fsynced, then os.replace (the old file stays
    intact if anything fails, and no temporary file is left behind). The new file has mode 0600 (mkstemp's)."""
    with atomic_writer(path) as f:
        f.write(data)


# A temporary file of an atomic write that is older than this was left by a writer killed mid-write (kill -9, power
# loss): the next atomic write of the same file removes it. A live writer touches its file far more often.
STALE_TEMP_SECONDS = 60.0


def temp_name_pattern(prefix: str, suffix: str) -> re.Pattern:
    """The names `tempfile.mkstemp(prefix=prefix, suffix=suffix)` gives (its random part: 8 characters of
    [a-z0-9_]), and no other name."""
    return re.compile(re.escape(prefix) + r"[a-z0-9_]{8}" + re.escape(suffix))


def remove_stale_temps(folder: str | os.PathLike, prefix: str, suffix: str,
                       older_than: float = STALE_TEMP_SECONDS, now: float | None = None) -> list[Path]:
    """Remove the temporary files of an atomic write in `folder` (names as `temp_name_pattern`) that were last
    modified over `older_than` seconds ago: what a writer killed mid-write left. Only regular files are removed;
    errors (a file another process removed first, a read-only folder) are ignored. Returns the files removed."""
    pattern = temp_name_pattern(prefix, suffix)
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime > older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, prefix: str | None = None, suffix: str = ".tmp"):
    """A binary file object whose content replaces `path` atomically when the block ends without an exception
    (written to a temporary file `<prefix><random><suffix>` in the same folder, fsynced, then os.replace); on an
    exception the temporary file is removed and `path` is left as it was. Stale temporary files of earlier writers
    of `path` that were killed mid-write (`remove_stale_temps`) are removed first. The file has mode 0600."""
    path = Path(path)
    prefix = path.name + "." if prefix is None else prefix
    remove_stale_temps(path.parent, prefix, suffix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
