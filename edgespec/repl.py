"""The interactive chat of `edgespec chat` and `edgespec run`: a loop people can live in.

Typing: one line is one message; a line starting with `\"\"\"` opens a multi-line block that a line ending with
`\"\"\"` closes (as in ollama), kept exactly as typed or pasted; a pasted block that arrives as one line (a terminal's
bracketed paste) is kept whole too. Lines starting with `/` are commands, answered here and never sent to the model
(`/help` lists them; an unknown one is refused). Line editing comes from `readline` when Python has it; the lines
typed are kept in a file across sessions only with `--input-history` (privacy by default: no file otherwise).

Answers stream to `out`; a marker follows an answer cut by the token limit (` [cut: ...]`) or by Ctrl-C
(` [stopped]`). Everything else (notices, command replies, errors) goes to `notices`, as plain text (no markup, so
brackets stay). When the conversation outgrows the context, its oldest turns are dropped (the system prompt is
kept) with a notice, and the chat goes on.

`chat_loop` is the loop itself, driven by a `read_line(prompt)` callable (raising EOFError at the end) and two text
streams, so tests run it with a list of lines; `chat_command` wires it to the terminal for the CLI.

Limits: a message (a block included) at most MAX_MESSAGE_CHARS characters; a `/load` file at most
MAX_CONVERSATION_BYTES bytes and MAX_CONVERSATION_MESSAGES messages; the input history file at most
MAX_INPUT_HISTORY_BYTES bytes (INPUT_HISTORY_LINES lines kept).
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from .runtimes.files import check_regular_file, open_regular, write_bytes_atomic, write_json_atomic
from .runtimes.runner import ContextOverflow

__all__ = ["BLOCK_MARK", "COMMANDS", "CONVERSATION_FORMAT", "ChatFileError", "ChatSession", "MAX_MESSAGE_CHARS",
           "MAX_CONVERSATION_BYTES", "MAX_CONVERSATION_MESSAGES", "MAX_INPUT_HISTORY_BYTES", "chat_command",
           "chat_loop", "cut_marker", "fit_conversation", "input_history_path", "load_conversation",
           "read_message", "save_conversation", "stats_line", "validate_conversation"]

MAX_MESSAGE_CHARS = 1 << 20  # one message typed or pasted, a block included
MAX_CONVERSATION_BYTES = 16 << 20  # a /load file
MAX_CONVERSATION_MESSAGES = 10_000  # messages in a /load file
MAX_INPUT_HISTORY_BYTES = 1 << 20  # the --input-history file (read at start)
INPUT_HISTORY_LINES = 1000  # lines kept in it
INPUT_HISTORY_NAME = "chat-input.txt"  # in the history folder (default ~/.cache/edgespec/history)
BLOCK_MARK = '"""'
ROLES = ("system", "user", "assistant")
CONVERSATION_FORMAT = "edgespec-chat"
CONVERSATION_VERSION = 1
PROMPT, CONTINUATION = "you> ", "... "
QUIT_COMMANDS = ("/quit", "/exit", "/bye")
COMMANDS = (
    ("/help", "list these commands"),
    ("/reset", "start a new conversation (the --system prompt is kept)"),
    ("/stats", "the last answer's statistics and the conversation's size"),
    ("/save FILE", "write the conversation to FILE as JSON"),
    ("/load FILE", "replace the conversation by one saved with /save (a JSON file)"),
    ("/quit", "leave (also /exit, /bye or Ctrl-D)"),
)
_COMMAND = re.compile(r"/[A-Za-z?][^\s]*")


class ChatFileError(ValueError):
    """A conversation file cannot be read, written or is not a valid conversation."""


# ---- reading what the user types --------------------------------------------------------------------------------

def _block_body(first: str) -> "str | None":
    """The text after an opening `\"\"\"` on `first`, or None when `first` does not open a block."""
    stripped = first.lstrip()
    return stripped[len(BLOCK_MARK):] if stripped.startswith(BLOCK_MARK) else None


def _closes_block(line: str) -> bool:
    """Whether `line` ends a `\"\"\"` block."""
    return line.rstrip().endswith(BLOCK_MARK)


def _without_close(line: str) -> str:
    """`line` without its closing `\"\"\"` (and the spaces after it)."""
    return line.rstrip()[:-len(BLOCK_MARK)]


def read_message(read_line: Callable[[str], str], notices: TextIO,
                 max_chars: int = MAX_MESSAGE_CHARS) -> "str | None":
    """The next message or command the user typed: one line (stripped), a `\"\"\"` block (kept as typed, the
    markers removed) or a pasted multi-line line (kept whole). Returns "" for a line to ignore (blank, a block or
    message over `max_chars` characters, a block cut by Ctrl-C), None at the end of input. `read_line(prompt)`
    returns one line and raises EOFError at the end (KeyboardInterrupt discards what is being typed)."""
    try:
        line = read_line(PROMPT)
    except EOFError:
        return None
    except KeyboardInterrupt:
        _say(notices, "(Ctrl-C: line discarded; /quit or Ctrl-D leaves)")
        return ""
    body = _block_body(line)
    if body is None:
        text = line.strip("\r\n") if "\n" in line.strip("\r\n") else line.strip()
        return _capped(text, max_chars, notices)
    if _closes_block(body) and body.rstrip() != "":  # """one line"""
        return _capped(_without_close(body), max_chars, notices)
    return _read_block(read_line, body, notices, max_chars)


def _read_block(read_line: Callable[[str], str], body: str, notices: TextIO, max_chars: int) -> "str | None":
    """The rest of a `\"\"\"` block whose first line held `body`; the lines kept exactly (an empty first or last
    marker line adds nothing). Over `max_chars` characters: the block is read to its end, then refused."""
    parts = [body] if body.strip() else []
    size = len(body) if parts else 0  # characters of the message so far (newlines between parts included)
    while True:
        try:
            line = read_line(CONTINUATION)
        except EOFError:
            _say(notices, f"(the input ended inside a {BLOCK_MARK} block: not sent)")
            return None
        except KeyboardInterrupt:
            _say(notices, "(Ctrl-C: block discarded)")
            return ""
        closing = _closes_block(line)
        piece = _without_close(line) if closing else line
        if piece.strip() or not closing:  # a closing marker alone on its line adds nothing
            size += len(piece) + (1 if size or parts else 0)
            if size <= max_chars:
                parts.append(piece)
        if closing:
            break
    if size > max_chars:
        _say(notices, f"(message over the limit of {max_chars} characters: not sent)")
        return ""
    return "\n".join(parts)


def _capped(text: str, max_chars: int, notices: TextIO) -> str:
    """`text`, or "" with a notice when it is over `max_chars` characters."""
    if len(text) > max_chars:
        _say(notices, f"(message over the limit of {max_chars} characters: not sent)")
        return ""
    return text


def _say(stream: TextIO, text: str) -> None:
    """Write one plain-text line to `stream` (no markup: brackets stay) and flush it."""
    stream.write(text + "\n")
    stream.flush()


# ---- the conversation ---------------------------------------------------------------------------------------------

def fit_conversation(messages: list[dict], count_tokens: Callable[[list[dict]], int],
                     limit: int) -> "tuple[list[dict], int] | None":
    """The newest part of `messages` whose prompt (`count_tokens`) is at most `limit` tokens: the oldest turns are
    dropped one at a time (a turn: a user message with the answers after it), a leading system message and the last
    message are always kept. Returns (kept messages, number dropped), or None when even the system message and the
    last message do not fit."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    dropped = 0
    while True:
        kept = system + rest
        if count_tokens(kept) <= limit:
            return kept, dropped
        if len(rest) <= 1:
            return None
        cut = 1
        while cut < len(rest) - 1 and rest[cut]["role"] != "user":  # the whole turn: its answers too
            cut += 1
        rest = rest[cut:]
        dropped += cut


def validate_conversation(data) -> list[dict]:
    """The messages of a loaded conversation ({"format": "edgespec-chat", "messages": [...]} or a bare list):
    each a {"role", "content"} dict with a role of system/user/assistant (system only first) and a string content;
    at most MAX_CONVERSATION_MESSAGES. Other keys are dropped. ChatFileError naming the first fault."""
    if isinstance(data, dict):
        if data.get("format", CONVERSATION_FORMAT) != CONVERSATION_FORMAT:
            raise ChatFileError(f"format is {str(data.get('format'))[:60]!r}, not {CONVERSATION_FORMAT!r}")
        version = data.get("version", CONVERSATION_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CONVERSATION_VERSION:
            raise ChatFileError(f"version {str(version)[:20]} is not supported (this edgespec reads version "
                                f"{CONVERSATION_VERSION})")
        data = data.get("messages")
    if not isinstance(data, list):
        raise ChatFileError("not a conversation: expected a list of messages or {\"messages\": [...]}")
    if len(data) > MAX_CONVERSATION_MESSAGES:
        raise ChatFileError(f"{len(data)} messages, over the limit of {MAX_CONVERSATION_MESSAGES}")
    messages = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ChatFileError(f"message {i} is a {type(item).__name__}, not an object with role and content")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ChatFileError(f"message {i} has role {str(role)[:40]!r}; roles are {', '.join(ROLES)}")
        if role == "system" and i:
            raise ChatFileError(f"message {i} is a system message; only the first message may be one")
        if not isinstance(content, str):
            raise ChatFileError(f"message {i} ({role}) has a content of type {type(content).__name__}, not text")
        messages.append({"role": role, "content": content})
    return messages


def load_conversation(path: "str | os.PathLike", max_bytes: int = MAX_CONVERSATION_BYTES) -> list[dict]:
    """The validated messages of the conversation file `path` (at most `max_bytes` bytes, a regular file: a FIFO
    is refused without blocking). ChatFileError for every fault, naming the file."""
    try:
        fd = open_regular(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError) as exc:
        raise ChatFileError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if len(data) > max_bytes:
        raise ChatFileError(f"{path} is over the limit of {max_bytes} bytes")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ChatFileError(f"{path} is not JSON: {str(exc)[:200]}") from None
    try:
        return validate_conversation(parsed)
    except ChatFileError as exc:
        raise ChatFileError(f"{path}: {exc}") from None


def save_conversation(path: "str | os.PathLike", messages: list[dict]) -> None:
    """Write `messages` to `path` as {"format": "edgespec-chat", "version": 1, "messages": [...]}, atomically
    (mode 0600: it holds the conversation). A path that is not a regular file is refused."""
    try:
        check_regular_file(path, "conversation")
        write_json_atomic(path, {"format": CONVERSATION_FORMAT, "version": CONVERSATION_VERSION,
                                 "messages": messages})
    except (OSError, ValueError) as exc:
        raise ChatFileError(f"{path}: cannot be written ({getattr(exc, 'strerror', None) or exc})") from None


def stats_line(stats) -> str:
    """One line of a generation's statistics (speed, first token, drafting)."""
    line = (f"{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, first token "
            f"{stats.time_to_first_token * 1000:.0f} ms, prompt {stats.prompt_tokens} tokens")
    if stats.drafter != "none":
        line += (f"; {stats.drafter}: {stats.mean_accepted_tokens:.2f} tokens/step, "
                 f"{stats.accepted_tokens}/{stats.drafted_tokens} drafts accepted")
    return line


def cut_marker(result, max_new_tokens: int) -> str:
    """The marker after an answer: " [cut: ...]" naming the limit that cut it (--max-new-tokens or the context),
    " [stopped]" when it was cancelled, "" when it ended by itself."""
    if result is None or result.finish_reason == "cancelled":
        return " [stopped]"
    if result.finish_reason != "length":
        return ""
    if len(result.token_ids) >= max_new_tokens:
        return f" [cut: --max-new-tokens {max_new_tokens} reached]"
    return " [cut: the context is full, see --max-context]"


@dataclass
class ChatSession:
    """One conversation with an engine: the messages, the generation options, and where text goes."""

    engine: object
    config: dict  # keyword arguments of Engine.chat_stream (max_new_tokens, temperature, ...)
    out: TextIO
    notices: TextIO
    system: "str | None" = None
    messages: list = field(default_factory=list, init=False)

    def __post_init__(self):
        self.messages = self._fresh()

    def _fresh(self) -> list[dict]:
        """A new conversation: the system prompt alone, or nothing."""
        return [{"role": "system", "content": self.system}] if self.system else []

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the prompt `messages` render to under the model's chat template."""
        return len(self.engine.encode(self.engine.render_chat(messages)))

    def prompt_limit(self) -> int:
        """Most tokens a prompt may have: the context less the room kept for the answer (as truncate_prompt
        does: max_new_tokens, at most half the context)."""
        context = self.engine.context_length
        return context - max(1, min(self.config.get("max_new_tokens", 128), context // 2))

    def ask(self, text: str) -> "object | None":
        """Send the user message `text` and stream the answer to `out`; returns the GenerationResult (None when the
        message was not sent). Old turns are dropped first when the conversation would outgrow the context."""
        candidate = self.messages + [{"role": "user", "content": text}]
        fitted = fit_conversation(candidate, self.count_tokens, self.prompt_limit())
        if fitted is None and not self.config.get("truncate_prompt"):
            _say(self.notices, f"(this message does not fit in the context of {self.engine.context_length} tokens "
                               "with room for an answer: not sent; raise --max-context or pass --truncate-prompt)")
            return None
        if fitted is None:  # --truncate-prompt: the engine keeps the tail of the newest message
            candidate = candidate[:1] + candidate[-1:] if candidate[0]["role"] == "system" else candidate[-1:]
        elif fitted[1]:
            candidate = fitted[0]
            kept_system = ", kept the system prompt" if candidate[0]["role"] == "system" else ""
            _say(self.notices, f"(the conversation outgrew the context of {self.engine.context_length} tokens: "
                               f"dropped the {fitted[1]} oldest messages{kept_system})")
        return self._answer(candidate)

    def _answer(self, candidate: list[dict]):
        """Stream the answer to the conversation `candidate` (ending with the user's message) and keep both."""
        pieces, stream = [], None
        try:
            with self.engine.chat_stream(candidate, **self.config) as stream:  # Ctrl-C closes it: the engine is free
                for piece in stream:
                    pieces.append(piece)
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:
            pass
        except ContextOverflow as exc:
            message = str(exc).split(" (pass truncate_prompt")[0]
            _say(self.notices, f"({message}: not sent; raise --max-context or pass --truncate-prompt)")
            return None
        result = stream.result if stream is not None else None
        self.out.write(cut_marker(result, self.config.get("max_new_tokens", 128)) + "\n")
        self.out.flush()
        self.messages = candidate + [{"role": "assistant", "content": "".join(pieces)}]
        return result

    def command(self, text: str) -> bool:
        """Run the command line `text` (starting with "/"); False when it asks to leave."""
        name, _, argument = text.partition(" ")
        argument = argument.strip()
        if name in QUIT_COMMANDS:
            return False
        handler = {"/help": self._help, "/?": self._help, "/reset": self._reset, "/clear": self._reset,
                   "/stats": self._stats, "/save": self._save, "/load": self._load}.get(name)
        if handler is None:
            _say(self.notices, f"(unknown command {name[:40]}: not sent to the model; /help lists the commands, and a "
                               f"message starting with / can be sent in a {BLOCK_MARK} block)")
            return True
        handler(argument)
        return True

    def _help(self, argument: str) -> None:
        lines = [f"  {usage:<12} {what}" for usage, what in COMMANDS]
        lines.append(f"  {BLOCK_MARK:<12} start or end a multi-line message")
        lines.append(f"  {'Ctrl-C':<12} stop an answer (or discard the line being typed)")
        _say(self.notices, "commands:\n" + "\n".join(lines))

    def _reset(self, argument: str) -> None:
        self.messages = self._fresh()
        self.engine.reset()
        _say(self.notices, "(new conversation" + (": the system prompt is kept)" if self.system else ")"))

    def _stats(self, argument: str) -> None:
        last = getattr(self.engine, "last_stats", None)
        if last is not None:
            _say(self.notices, stats_line(last))
            _say(self.notices, json.dumps(last.to_dict(), indent=2))
        else:
            _say(self.notices, "(no answer yet)")
        tokens = self.count_tokens(self.messages) if self.messages else 0
        _say(self.notices, f"conversation: {len(self.messages)} messages, {tokens} tokens of a context of "
                           f"{self.engine.context_length}")

    def _save(self, argument: str) -> None:
        if not argument:
            _say(self.notices, "(usage: /save FILE)")
            return
        path = Path(argument).expanduser()
        try:
            save_conversation(path, self.messages)
        except ChatFileError as exc:
            _say(self.notices, f"(not saved: {exc})")
            return
        _say(self.notices, f"(saved {len(self.messages)} messages to {path})")

    def _load(self, argument: str) -> None:
        if not argument:
            _say(self.notices, "(usage: /load FILE)")
            return
        path = Path(argument).expanduser()
        try:
            messages = load_conversation(path)
        except ChatFileError as exc:
            _say(self.notices, f"(not loaded, the conversation is unchanged: {exc})")
            return
        self.messages = messages
        _say(self.notices, f"(loaded {len(messages)} messages from {path})")


def chat_loop(session: ChatSession, read_line: Callable[[str], str]) -> int:
    """Read messages and commands with `read_line` until /quit or the end of input; returns 0."""
    while True:
        text = read_message(read_line, session.notices)
        if text is None:
            return 0
        if not text:
            continue
        if "\n" not in text and _COMMAND.fullmatch(text.split(" ", 1)[0]):
            if not session.command(text):
                return 0
            continue
        session.ask(text)


# ---- the terminal ---------------------------------------------------------------------------------------------------

def input_history_path() -> Path:
    """Where `--input-history` keeps the typed lines: INPUT_HISTORY_NAME in the history folder
    ($EDGESPEC_HISTORY_DIR, default ~/.cache/edgespec/history)."""
    from .history import default_history_dir

    return default_history_dir() / INPUT_HISTORY_NAME


def _line_editing(history_file: "Path | None", notices: TextIO) -> Callable[[], None]:
    """Turn on readline's editing for input() when Python has it; with `history_file`, load the lines typed in
    earlier sessions (a regular file of at most MAX_INPUT_HISTORY_BYTES). Returns the function that saves them."""
    try:
        import readline
    except ImportError:
        return lambda: None
    readline.set_history_length(INPUT_HISTORY_LINES)
    if history_file is None:
        return lambda: None
    try:
        if check_regular_file(history_file, "input history"):
            fd = open_regular(history_file, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_INPUT_HISTORY_BYTES + 1)
            if len(data) > MAX_INPUT_HISTORY_BYTES:
                raise ValueError(f"{history_file} is over {MAX_INPUT_HISTORY_BYTES} bytes: not read")
            for line in data.decode("utf-8", "replace").splitlines()[-INPUT_HISTORY_LINES:]:
                readline.add_history(line)
    except (OSError, ValueError) as exc:
        _say(notices, f"(input history not loaded: {exc})")

    def save() -> None:
        count = readline.get_current_history_length()
        lines = [readline.get_history_item(i) or "" for i in range(max(1, count - INPUT_HISTORY_LINES + 1), count + 1)]
        try:
            history_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_regular_file(history_file, "input history")
            write_bytes_atomic(history_file, "".join(line.replace("\n", " ") + "\n" for line in lines).encode())
        except (OSError, ValueError) as exc:
            _say(notices, f"(input history not saved: {exc})")

    return save


def _terminal_reader(interactive: bool) -> Callable[[str], str]:
    """input() with the prompt shown only on a terminal (piped input reads lines silently)."""
    def read_line(prompt: str) -> str:
        return input(prompt if interactive else "")

    return read_line


def chat_command(args, engine, config: dict, prompt: "str | None" = None) -> int:
    """`edgespec chat` / `edgespec run`: the interactive chat on the terminal, or, with `prompt`, one answer to it
    (exit status 2 when it could not be sent). `config`: the generation options (Engine.chat_stream's keywords);
    `args` gives --system and --input-history."""
    from .cliargs import stdin_is_terminal

    session = ChatSession(engine, config, sys.stdout, sys.stderr, system=args.system)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no chat template")
        if not engine.entry.chat_template:
            _say(sys.stderr, "(this model has no chat template (a base model): using a plain-text fallback)")
        if prompt is not None:  # one answer, then its statistics on stderr (as `generate` prints them)
            answered = session.ask(prompt) is not None
            last = getattr(engine, "last_stats", None)
            if answered and last is not None:
                _say(sys.stderr, stats_line(last))
            return 0 if answered else 2
        interactive = stdin_is_terminal(sys.stdin)
        save_history = _line_editing(input_history_path() if args.input_history else None, sys.stderr) \
            if interactive else (lambda: None)
        if interactive:
            _say(sys.stderr, f"(chatting with {engine.entry.name}: /help lists the commands, {BLOCK_MARK} starts a "
                             "multi-line message, Ctrl-C stops an answer, Ctrl-D leaves)")
        try:
            return chat_loop(session, _terminal_reader(interactive))
        finally:
            save_history()
            if interactive:
                _say(sys.stderr, "")  # the shell's prompt on a line of its own after Ctrl-D
