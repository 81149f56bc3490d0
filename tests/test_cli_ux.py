"""Everyday use of the command line (issue 20): --version, help with defaults and groups, llama.cpp's short flags, a
description listing every subcommand, plain-text messages (brackets kept), CLI flag names in a context overflow,
prompts from stdin (bounded), and a chat people can live in (edgespec.repl): multi-line blocks, local commands,
/save and /load, a marker on cut answers, and old turns dropped when the conversation outgrows the context."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import pytest

from edgespec import cli, repl
from edgespec.cliargs import StdinError, read_stdin_text

COMMON = ["--device", "none", "--threads", "1", "--no-ngram-cache"]


def parse(argv):
    return cli.build_parser().parse_args(argv)


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


class Stdin:
    """A stand-in for sys.stdin: bytes behind .buffer, and a chosen isatty()."""

    def __init__(self, data: bytes, tty: bool = False):
        self.buffer = io.BytesIO(data)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def lines_reader(lines):
    """A read_line(prompt) over `lines`, raising EOFError at their end (and KeyboardInterrupt for the item
    KeyboardInterrupt)."""
    items = iter(lines)

    def read_line(prompt: str) -> str:
        item = next(items, EOFError)
        if item in (EOFError, KeyboardInterrupt):
            raise item
        return item

    return read_line


# ---- conventions: version, help, aliases, the command list ---------------------------------------------------------

def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"edgespec {cli.version()}" and cli.version()[0].isdigit()


def test_description_lists_every_registered_subcommand(capsys):
    parser = cli.build_parser()
    names = next(a for a in parser._actions if a.dest == "command").choices
    assert {"export", "generate", "chat", "run", "serve", "profile", "ngram", "adapt", "add-drafter"} <= set(names)
    description = " ".join(parser.description.split())
    for name in names:
        assert f" {name}," in description or f" {name}." in description, name
    top = help_text([], capsys)
    assert "serve-bench" in top.split("options:")[0]  # in the description, before the options


def test_help_shows_defaults_and_groups(capsys):
    text = " ".join(help_text(["generate"], capsys).split())
    for group in ("sampling:", "context:", "speculation:", "device:", "history:", "output:"):
        assert group in text
    assert "tokens to generate, 1 to 1048576 (default: 128)" in text
    assert "(default: 4096)" in text and "0 = greedy; at most 100 (default: 0.0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    chat = " ".join(help_text(["chat"], capsys).split())
    assert "--system TEXT system prompt" in chat and "(default: 512)" in chat and "--input-history" in chat


def test_llama_cpp_short_flags():
    args = parse(["generate", "-b", "B", "-n", "5", "-c", "64", "-t", "1", "--temp", "0.5"])
    assert (args.max_new_tokens, args.max_context, args.threads, args.temperature) == (5, 64, 1, 0.5)
    args = parse(["chat", "-b", "B", "-n", "7", "--system", "Be brief."])
    assert (args.max_new_tokens, args.system) == (7, "Be brief.")
    assert parse(["export", "x.gguf", "-o", "out", "-t", "1"]).threads == 1


def test_short_flags_keep_the_limits(capsys):
    for argv in (["-n", "0"], ["-c", "0"], ["-t", "0"], ["--temp", "101"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["generate", "-b", "B", *argv])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "error: argument" in err and argv[0] in err


def test_system_prompt_is_bounded(capsys, monkeypatch):
    assert parse(["chat", "-b", "B", "--system", "x" * cli.MAX_SYSTEM_CHARS]).system == "x" * cli.MAX_SYSTEM_CHARS
    with pytest.raises(SystemExit):
        cli.main(["chat", "-b", "B", "--system", "x" * (cli.MAX_SYSTEM_CHARS + 1)])
    assert "--system" in capsys.readouterr().err


# ---- plain-text messages: brackets survive -------------------------------------------------------------------------

def test_missing_extra_message_keeps_its_brackets(monkeypatch, capsys):
    def needs_uvicorn(args):
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")

    monkeypatch.setattr(cli, "cmd_info", needs_uvicorn)
    assert cli.main(["info", "B"]) == 2
    assert "pip install 'edgespec[serve]'" in capsys.readouterr().err


def test_say_prints_brackets_verbatim(capsys):
    cli._say("pip install 'edgespec[serve]' [bold]not markup[/bold]", "dim")
    assert "pip install 'edgespec[serve]' [bold]not markup[/bold]" in capsys.readouterr().err


# ---- context overflow names the CLI flags ------------------------------------------------------------------------

def test_context_overflow_names_the_cli_flags(tiny_bundles, capsys):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 8
    argv = ["generate", long_prompt, "-b", str(tiny_bundles["qwen2"]), "-c", "16", "-n", "2", *COMMON]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgespec: error: prompt has ")
    assert "--max-context" in lines[0] and "--truncate-prompt" in lines[0]
    assert "truncate_prompt=True" not in lines[0]
    assert cli.main([*argv, "--truncate-prompt", "--json-stats"]) == 0  # the flag it names works
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["prompt_tokens"] < 16


def test_error_message_translation_keeps_other_errors():
    from edgespec import ContextOverflow

    text = cli.error_message(ContextOverflow("prompt has 99 tokens; the context length is 16 (pass "
                                             "truncate_prompt=True to keep the prompt's tail)"))
    assert text.startswith("prompt has 99 tokens; the context length is 16: raise --max-context")
    assert cli.error_message(ValueError("bad [thing]")) == "bad [thing]"


# ---- prompts from stdin ------------------------------------------------------------------------------------------

def test_read_stdin_text_at_its_limit():
    assert read_stdin_text(Stdin(b"x" * 10), 10) == "x" * 10
    assert read_stdin_text(Stdin(b"hi\n"), 10) == "hi"  # echo's newline
    assert read_stdin_text(Stdin(b"a\n\n"), 10) == "a\n"  # only one
    with pytest.raises(StdinError, match="over the limit of 10 bytes"):
        read_stdin_text(Stdin(b"x" * 11), 10)
    with pytest.raises(StdinError, match="not UTF-8"):
        read_stdin_text(Stdin(b"\xff\xfe"), 10)


def test_read_prompt_rules(monkeypatch):
    assert cli.read_prompt("given", Stdin(b"ignored"), "default") == "given"
    assert cli.read_prompt("-", Stdin(b"from stdin\n"), "default") == "from stdin"
    assert cli.read_prompt(None, Stdin(b"piped\n"), "default") == "piped"
    assert cli.read_prompt(None, Stdin(b"piped", tty=True), "default") == "default"  # a terminal is never read
    assert cli.read_prompt(None, Stdin(b""), "default") == "default"  # /dev/null
    assert cli.read_prompt(None, Stdin(b"piped"), None) is None  # chat: stdin is the conversation
    with pytest.raises(StdinError, match="empty"):
        cli.read_prompt("-", Stdin(b"\n"), "default")
    monkeypatch.setattr(cli, "MAX_STDIN_BYTES", 8)
    assert cli.read_prompt("-", Stdin(b"12345678"), None) == "12345678"
    with pytest.raises(StdinError, match="over the limit of 8 bytes"):
        cli.read_prompt("-", Stdin(b"123456789"), None)
    with pytest.raises(StdinError, match="over the limit"):
        cli.read_prompt(None, Stdin(b"123456789"), "default")


def _generate_stats(argv, stdin, monkeypatch, capsys) -> tuple[str, int, int, str]:
    """(text, prompt tokens, new tokens, finish reason) of `edgespec generate ARGV --json-stats` on `stdin`."""
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main([*argv, "--json-stats"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(out[-1])
    return "\n".join(out[:-1]), stats["prompt_tokens"], stats["new_tokens"], stats["finish_reason"]


def test_generate_reads_the_prompt_from_stdin(tiny_bundles, monkeypatch, capsys):
    from edgespec import load

    bundle = str(tiny_bundles["qwen2"])
    base = ["generate", "-b", bundle, "-n", "6", *COMMON]
    given = _generate_stats([*base[:1], "Hello there", *base[1:]], Stdin(b""), monkeypatch, capsys)
    dashed = _generate_stats([*base[:1], "-", *base[1:]], Stdin(b"Hello there\n"), monkeypatch, capsys)
    implicit = _generate_stats(base, Stdin(b"Hello there\n"), monkeypatch, capsys)
    assert given == dashed == implicit
    engine = load(bundle)
    assert given[1] == len(engine.encode("Hello there"))
    tty = _generate_stats(base, Stdin(b"Hello there\n", tty=True), monkeypatch, capsys)
    assert tty[1] == len(engine.encode(cli.DEFAULT_PROMPT))
    chat_given = _generate_stats([*base, "--chat", "Hello there"], Stdin(b""), monkeypatch, capsys)
    chat_stdin = _generate_stats([*base, "--chat", "-"], Stdin(b"Hello there\n"), monkeypatch, capsys)
    assert chat_given == chat_stdin
    assert chat_given[1] == len(engine.encode(engine.render_chat(
        [{"role": "user", "content": "Hello there"}])))


def test_generate_refuses_a_prompt_over_the_stdin_limit(tiny_bundles, monkeypatch, capsys):
    monkeypatch.setattr(cli, "MAX_STDIN_BYTES", 16)
    monkeypatch.setattr(sys, "stdin", Stdin(b"x" * 17))
    assert cli.main(["generate", "-", "-b", str(tiny_bundles["qwen2"]), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "edgespec: error: the prompt on stdin is over the limit of 16 bytes" in err


def test_echo_pipe_into_generate(tiny_bundles):
    """The shell form itself: `echo hi | edgespec generate - ...` in a subprocess."""
    argv = [sys.executable, "-m", "edgespec.cli", "generate", "-", "-b", str(tiny_bundles["qwen2"]), "-n", "3",
            "--json-stats", *COMMON]
    proc = subprocess.run(argv, input="hi\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["new_tokens"] >= 1


# ---- the chat: reading input -------------------------------------------------------------------------------------

def test_one_line_messages_and_blocks():
    notices = io.StringIO()
    read = lines_reader(["  hello  ", '"""', "def f():", "    return 1", '"""', '"""one line"""',
                         '"""first', "  second", 'third"""', "multi\n  pasted\nlines"])
    assert repl.read_message(read, notices) == "hello"
    assert repl.read_message(read, notices) == "def f():\n    return 1"  # kept as typed, indentation included
    assert repl.read_message(read, notices) == "one line"
    assert repl.read_message(read, notices) == "first\n  second\nthird"
    assert repl.read_message(read, notices) == "multi\n  pasted\nlines"  # a bracketed paste: one message
    assert repl.read_message(read, notices) is None
    assert notices.getvalue() == ""


def test_block_limits_and_interruptions():
    notices = io.StringIO()
    at_limit = lines_reader(['"""', "x" * 9, '"""'])
    assert repl.read_message(at_limit, notices, max_chars=10) == "x" * 9
    over = lines_reader(['"""', "x" * 9, "y", '"""', "after"])
    assert repl.read_message(over, notices, max_chars=10) == ""
    assert "over the limit of 10 characters: not sent" in notices.getvalue()
    assert repl.read_message(over, notices, max_chars=10) == "after"  # the rest of the block was consumed
    assert repl.read_message(lines_reader(["x" * 10]), notices, max_chars=10) == "x" * 10
    assert repl.read_message(lines_reader(["x" * 11]), notices, max_chars=10) == ""
    assert repl.read_message(lines_reader(['"""', "open"]), notices) is None
    assert "ended inside a \"\"\" block" in notices.getvalue()
    assert repl.read_message(lines_reader(['"""', "a", KeyboardInterrupt]), notices) == ""
    assert repl.read_message(lines_reader([KeyboardInterrupt]), notices) == ""


def test_fit_conversation_drops_the_oldest_turns_and_keeps_the_system_prompt():
    def count(messages):
        return sum(len(m["content"]) for m in messages)

    system = {"role": "system", "content": "S" * 2}
    turns = [{"role": "user", "content": "u1" * 3}, {"role": "assistant", "content": "a1" * 3},
             {"role": "user", "content": "u2" * 3}, {"role": "assistant", "content": "a2" * 3},
             {"role": "user", "content": "u3" * 3}]
    assert repl.fit_conversation([system, *turns], count, 100) == ([system, *turns], 0)
    kept, dropped = repl.fit_conversation([system, *turns], count, 20)
    assert kept == [system, *turns[2:]] and dropped == 2  # the whole first turn, its answer too
    kept, dropped = repl.fit_conversation([system, *turns], count, 8)
    assert kept == [system, turns[-1]] and dropped == 4
    assert repl.fit_conversation([system, *turns], count, 7) is None  # not even the last message fits
    assert repl.fit_conversation(turns, count, 6) == ([turns[-1]], 4)


# ---- the chat: conversation files --------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi [there]"},
                {"role": "assistant", "content": "Hello."}]
    path = tmp_path / "conversation.json"
    repl.save_conversation(path, messages)
    assert repl.load_conversation(path) == messages
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conversation.json"]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["format"] == "edgespec-chat" and data["version"] == 1
    assert repl.validate_conversation(messages) == messages  # a bare list is accepted too


@pytest.mark.parametrize("data, match", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content of type int"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "only the first"),
    ({"messages": ["hi"]}, "message 0 is a str"),
    ({"format": "other", "messages": []}, "format is 'other'"),
    ({"version": 2, "messages": []}, "version 2 is not supported"),
    ({"messages": None}, "not a conversation"),
    ("text", "not a conversation"),
])
def test_validate_conversation_names_the_fault(data, match):
    with pytest.raises(repl.ChatFileError, match=match):
        repl.validate_conversation(data)


def test_load_limits(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"role": "user", "content": "x"}]))
    size = path.stat().st_size
    assert repl.load_conversation(path, max_bytes=size) == [{"role": "user", "content": "x"}]
    with pytest.raises(repl.ChatFileError, match=f"over the limit of {size - 1} bytes"):
        repl.load_conversation(path, max_bytes=size - 1)
    monkeypatch.setattr(repl, "MAX_CONVERSATION_MESSAGES", 2)
    assert len(repl.validate_conversation([{"role": "user", "content": "a"}] * 2)) == 2
    with pytest.raises(repl.ChatFileError, match="3 messages, over the limit of 2"):
        repl.validate_conversation([{"role": "user", "content": "a"}] * 3)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(repl.ChatFileError, match="cannot be read"):
        repl.load_conversation(fifo)  # refused without blocking
    with pytest.raises(repl.ChatFileError, match="not JSON"):
        (tmp_path / "bad.json").write_text("{not json")
        repl.load_conversation(tmp_path / "bad.json")
    with pytest.raises(repl.ChatFileError, match="cannot be written"):
        repl.save_conversation(fifo, [])


# ---- the chat: the loop on a tiny bundle -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_bundles):
    from edgespec import load

    with load(tiny_bundles["qwen2"], threads=1, max_context=512, ngram_cache=False) as engine:
        yield engine


def run_chat(engine, lines, config=None, system=None):
    """Drive chat_loop with `lines`; returns (session, stdout text, notices text)."""
    out, notices = io.StringIO(), io.StringIO()
    session = repl.ChatSession(engine, {"max_new_tokens": 6, **(config or {})}, out, notices, system=system)
    assert repl.chat_loop(session, lines_reader(lines)) == 0
    return session, out.getvalue(), notices.getvalue()


def test_chat_commands_are_answered_locally(engine):
    session, out, notices = run_chat(engine, ["/help", "/nope", "/usr/bin is a folder", "/stats", "/quit",
                                              "never read"])
    assert out == "" and session.messages == []  # nothing went to the model
    for usage, _ in repl.COMMANDS:
        assert usage in notices
    assert "unknown command /nope: not sent to the model" in notices
    assert "unknown command /usr/bin" in notices and "conversation: 0 messages" in notices


def test_chat_answers_match_the_engine_and_survive_save_and_load(engine, tmp_path):
    path = tmp_path / "conv[1].json"
    config = {"max_new_tokens": 6}
    session, out, notices = run_chat(engine, ["Hello", f"/save {path}", "/reset", f"/load {path}",
                                              '"""', "Tell me", "  more", '"""'], config, system="Be brief.")
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    result1 = engine.chat(first, **config)
    second = first + [{"role": "assistant", "content": result1.text}, {"role": "user", "content": "Tell me\n  more"}]
    result2 = engine.chat(second, **config)
    assert session.messages == second + [{"role": "assistant", "content": result2.text}]
    assert out == "".join(r.text + repl.cut_marker(r, 6) + "\n" for r in (result1, result2))
    assert f"saved 3 messages to {path}" in notices and f"loaded 3 messages from {path}" in notices  # brackets kept
    assert "new conversation: the system prompt is kept" in notices


def test_a_bad_load_leaves_the_conversation_as_it_was(engine, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}))
    session, out, notices = run_chat(engine, ["Hi", f"/load {bad}", f"/load {tmp_path / 'missing[2].json'}",
                                              "/load"])
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"] == "Hi"
    assert "not loaded, the conversation is unchanged" in notices and "role 'tool'" in notices
    assert "missing[2].json" in notices and "usage: /load FILE" in notices


def test_a_cut_answer_is_marked(engine):
    session, out, notices = run_chat(engine, ["Hello"], {"max_new_tokens": 3, "ignore_eos": True})
    assert out.rstrip("\n").endswith(" [cut: --max-new-tokens 3 reached]")
    result = engine.chat([{"role": "user", "content": "Hello"}], max_new_tokens=3, ignore_eos=True)
    assert repl.cut_marker(result, 3) == " [cut: --max-new-tokens 3 reached]"
    assert repl.cut_marker(result, 10) == " [cut: the context is full, see --max-context]"
    result.finish_reason = "stop"
    assert repl.cut_marker(result, 3) == ""
    result.finish_reason = "cancelled"
    assert repl.cut_marker(result, 3) == " [stopped]"


def test_the_conversation_drops_old_turns_instead_of_overflowing(tiny_bundles):
    from edgespec import load

    config = {"max_new_tokens": 4, "ignore_eos": True}
    with load(tiny_bundles["qwen2"], threads=1, max_context=64, ngram_cache=False) as small:
        text = "The quick brown fox jumps over the lazy dog."
        lines = [f"{text} {i}" for i in range(5)]
        session, out, notices = run_chat(small, lines, config, system="Be brief.")
        assert "outgrew the context of 64 tokens: dropped the" in notices and "kept the system prompt" in notices
        assert out.count("\n") == 5  # every message was answered
        assert session.messages[0] == {"role": "system", "content": "Be brief."}
        assert session.messages[-2]["content"] == lines[-1]
        kept = session.messages[:-1]
        assert session.count_tokens(kept) <= session.prompt_limit()
        assert small.chat(kept, **config).text == session.messages[-1]["content"]  # the answer to what was kept

        before = list(session.messages)
        too_long = " ".join([text] * 10)
        session.ask(too_long)
        assert session.messages == before  # refused, the conversation unchanged
        assert "does not fit in the context of 64 tokens" in session.notices.getvalue()
        assert "--max-context" in session.notices.getvalue()
        session.config["truncate_prompt"] = True  # with --truncate-prompt the engine keeps its tail
        assert session.ask(too_long) is not None and session.messages[-2]["content"] == too_long


def test_cli_chat_and_run_share_the_loop(tiny_bundles, monkeypatch, capsys):
    bundle = str(tiny_bundles["qwen2"])
    inputs = iter(["Hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))
    assert cli.main(["chat", bundle, "-n", "4", *COMMON]) == 0
    chat_out = capsys.readouterr().out
    assert cli.main(["run", bundle, "Hello", "-n", "4", *COMMON]) == 0
    one_shot = capsys.readouterr()
    assert one_shot.out == chat_out  # the same answer, one-shot
    assert "4 tokens" in one_shot.err and "tok/s" in one_shot.err  # then its statistics, on stderr
    monkeypatch.setattr(sys, "stdin", Stdin(b"Hello\n"))
    assert cli.main(["run", bundle, "-", "-n", "4", *COMMON]) == 0
    assert capsys.readouterr().out == chat_out


def test_chat_needs_one_model(capsys, tmp_path):
    assert cli.main(["chat", *COMMON]) == 2
    assert "name a MODEL" in capsys.readouterr().err
    assert cli.main(["chat", str(tmp_path), "-b", str(tmp_path), *COMMON]) == 2
    assert "not both" in capsys.readouterr().err


def test_input_history_is_written_only_when_asked(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    notices = io.StringIO()
    monkeypatch.setenv("EDGESPEC_HISTORY_DIR", str(tmp_path / "history"))
    readline.clear_history()
    try:
        save = repl._line_editing(None, notices)
        readline.add_history("private line")
        save()
        assert not (tmp_path / "history").exists()  # no file by default
        path = repl.input_history_path()
        save = repl._line_editing(path, notices)
        readline.add_history("second line")
        save()
        assert path.read_text().splitlines() == ["private line", "second line"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        readline.clear_history()
        repl._line_editing(path, notices)  # the next session recalls them
        assert readline.get_history_item(readline.get_current_history_length()) == "second line"
        path.write_bytes(b"x\n" * (repl.MAX_INPUT_HISTORY_BYTES // 2 + 1))
        repl._line_editing(path, notices)
        assert "input history not loaded" in notices.getvalue() and "over" in notices.getvalue()
    finally:
        readline.clear_history()
