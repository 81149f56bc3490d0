"""Argument types for the command line: bounded numbers, bounded lists and safe file paths; the help layout
(`Parser`, `HelpFormatter`: defaults shown) and the bounded read of a prompt from stdin (`read_stdin_text`).

Each factory returns an argparse ``type=`` callable (or ``action=`` class) that refuses a bad value with an
``argparse.ArgumentTypeError``; argparse then prints ``edgespec CMD: error: argument --OPTION: MESSAGE`` and exits
with status 2, so no out-of-range option ever reaches the engine. Reusable by every subcommand::

    p.add_argument("--threads", type=threads_arg(), default=None)
    p.add_argument("--port", type=bounded_int(1, 65535), default=8000)
"""

from __future__ import annotations

import argparse
import math
import os
import stat
from typing import Callable

__all__ = ["MAX_ARG_CHARS", "MAX_PATH_CHARS", "MAX_SEED", "MAX_STDIN_BYTES", "MAX_TOKENS", "THREAD_FACTOR",
           "HelpFormatter", "Parser", "StdinError", "at_most", "bounded_float", "bounded_int", "bounded_text",
           "comma_items", "int_list", "max_threads", "new_or_regular_file", "not_special_file", "read_stdin_text",
           "regular_file", "stdin_is_terminal", "threads_arg"]

MAX_ARG_CHARS = 64  # a number written with more characters than this is refused unread
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_TOKENS = 1 << 20  # --max-new-tokens, --max-context, --top-k: 1,048,576 (above every model's context/vocabulary)
MAX_SEED = 2 ** 64 - 1  # what numpy's and torch's generators take
THREAD_FACTOR = 4  # --threads may be at most this many times the CPU count
MAX_STDIN_BYTES = 8 << 20  # a prompt read from stdin: 8 MiB (the chat template's render cap is 8 Mi characters)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default appended ("(default: 128)") unless its help already states one or the default
    is None or False (flags, "unset"); descriptions keep their line breaks (the command list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or any(action.default is v for v in (None, False)) or \
                action.default == argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults (HelpFormatter); its subparsers, registered by any module,
    are Parsers too (argparse makes them with the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class StdinError(ValueError):
    """The prompt on stdin is over its limit, not UTF-8 or empty."""


def stdin_is_terminal(stream) -> bool:
    """Whether `stream` (sys.stdin) is an interactive terminal; a closed or replaced stream without isatty counts as
    one (nothing is read from it)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return True


def read_stdin_text(stream, max_bytes: int = MAX_STDIN_BYTES) -> str:
    """The UTF-8 text of `stream` (sys.stdin) up to its end, at most `max_bytes` bytes, one trailing newline (what
    `echo` adds) removed. Reads at most `max_bytes + 1` bytes; StdinError when it is longer or not UTF-8."""
    source = getattr(stream, "buffer", stream)
    data = source.read(max_bytes + 1)
    if isinstance(data, str):  # a text stream without a buffer (tests, wrappers)
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > max_bytes:
        raise StdinError(f"the prompt on stdin is over the limit of {max_bytes} bytes ({max_bytes >> 20} MiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StdinError(f"the prompt on stdin is not UTF-8 text (byte {exc.start})") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def max_threads() -> int:
    """The largest `--threads` accepted: THREAD_FACTOR times this machine's CPU count."""
    return THREAD_FACTOR * (os.cpu_count() or 1)


def _number_text(text: str, kind: str, bounds: str) -> str:
    """`text` stripped, or an ArgumentTypeError when it is too long to be a number."""
    if not isinstance(text, str) or len(text) > MAX_ARG_CHARS:
        raise argparse.ArgumentTypeError(f"must be {kind} {bounds}, got a value of over {MAX_ARG_CHARS} characters")
    return text.strip()


def bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer `lo <= value <= hi` (both inclusive)."""
    bounds = f"from {lo} to {hi}"

    def parse(text: str) -> int:
        text = _number_text(text, "an integer", bounds)
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value

    parse.__name__ = f"integer {bounds}"
    return parse


def bounded_float(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from `lo` to `hi`; `lo_open`/`hi_open` exclude that end."""
    bounds = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        text = _number_text(text, "a number", bounds)
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text!r}") from None
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text}")
        return value

    parse.__name__ = f"number {bounds}"
    return parse


def threads_arg() -> Callable[[str], int]:
    """An argparse type for `--threads`: 1 to max_threads() (THREAD_FACTOR times the CPU count)."""
    return bounded_int(1, max_threads())


def int_list(lo: int, hi: int, max_items: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: 1 to `max_items` comma-separated integers, each `lo <= value <= hi`."""
    one = bounded_int(lo, hi)

    def parse(text: str) -> tuple[int, ...]:
        if len(text) > max_items * (MAX_ARG_CHARS + 1):
            raise argparse.ArgumentTypeError(f"must be at most {max_items} comma-separated integers")
        items = [item for item in text.replace(" ", "").split(",") if item]
        if not 1 <= len(items) <= max_items:
            raise argparse.ArgumentTypeError(f"must be 1 to {max_items} comma-separated integers from {lo} to {hi}, "
                                             f"got {len(items)}")
        return tuple(one(item) for item in items)

    parse.__name__ = "integer list"
    return parse


def bounded_text(max_chars: int, min_chars: int = 1) -> Callable[[str], str]:
    """An argparse type: a string of `min_chars` to `max_chars` characters."""

    def parse(text: str) -> str:
        if not min_chars <= len(text) <= max_chars:
            raise argparse.ArgumentTypeError(f"must have {min_chars} to {max_chars} characters, got {len(text)}")
        return text

    parse.__name__ = "text"
    return parse


def _stat(text: str):
    """os.stat of the path `text` (following links), None when nothing is there; ArgumentTypeError when the path
    itself is unusable."""
    if not text or len(text) > MAX_PATH_CHARS or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a path of 1 to {MAX_PATH_CHARS} characters without NUL")
    try:
        return os.stat(text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # permission, a file used as a folder, a name too long...
        raise argparse.ArgumentTypeError(f"{text}: cannot be used ({getattr(exc, 'strerror', None) or exc})") from None


def _kind(mode: int) -> str:
    """A word for a non-regular file type (for error messages)."""
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a regular file"


def regular_file(text: str) -> str:
    """An argparse type: an existing regular file (a FIFO, device or folder is refused: reading it could hang)."""
    st = _stat(text)
    if st is None:
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not stat.S_ISREG(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} is {_kind(st.st_mode)}, not a regular file")
    return text


def new_or_regular_file(text: str) -> str:
    """An argparse type: a path where nothing is yet, or a regular file (a FIFO or device is refused: opening it
    could hang)."""
    st = _stat(text)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} is {_kind(st.st_mode)}, not a regular file")
    return text


def not_special_file(text: str) -> str:
    """An argparse type for a value that may be a name, a file or a folder (a model source, a device profile): if it
    names something on disk, that must be a regular file or a folder, never a FIFO, socket or device."""
    if len(text) > MAX_PATH_CHARS or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_PATH_CHARS} characters without NUL")
    try:
        st = os.stat(text)
    except (OSError, ValueError):
        return text  # not a path on this machine: a name, judged by the command
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise argparse.ArgumentTypeError(f"{text} is {_kind(st.st_mode)}, not a regular file or folder")
    return text


def at_most(count: int) -> type[argparse.Action]:
    """An argparse action for a repeatable (`append`) or multi-value (`nargs`) option: at most `count` values."""

    class AtMost(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            if isinstance(values, list):  # nargs: the values of one occurrence
                items = list(values)
            else:  # append: the values so far plus this one
                items = list(getattr(namespace, self.dest, None) or []) + [values]
            if len(items) > count:
                raise argparse.ArgumentError(self, f"at most {count} values, got {len(items)}")
            setattr(namespace, self.dest, items)

    return AtMost


def comma_items(check: Callable[[str], str], max_items: int = 64) -> Callable[[str], str]:
    """An argparse type for a comma-separated value: 1 to `max_items` items, each passed through `check` (which
    raises ArgumentTypeError); the text is returned unchanged."""

    def parse(text: str) -> str:
        items = text.split(",")
        if len(items) > max_items:
            raise argparse.ArgumentTypeError(f"at most {max_items} comma-separated values, got {len(items)}")
        for item in items:
            if item.strip():
                check(item.strip())
        return text

    parse.__name__ = "comma-separated list"
    return parse
