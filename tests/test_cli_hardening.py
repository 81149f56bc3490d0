"""The command line refuses bad input cleanly (issue 19): every numeric option has a stated range and a value past it
exits 2 with argparse's message naming the option; FIFOs and devices are refused before anything opens them; expected
errors print one `edgespec: error: ...` line, never a traceback; a missing optional dependency names its extra; and the
session history is opt-in (`--history`)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import pytest

from edgespec import cli
from edgespec.cliargs import (MAX_SEED, MAX_TOKENS, at_most, bounded_float, bounded_int, int_list, max_threads,
                              new_or_regular_file, regular_file)

BIG = "9" * 100  # a number too long to be read


def refused(argv, capsys) -> str:
    """Run the CLI on `argv`, expecting argparse's refusal (exit status 2); return stderr."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def names_option(err: str, option: str) -> bool:
    """Whether argparse's message `... error: argument -o/--output: ...` names `option`."""
    return "argument " in err and option in err.split("argument ", 1)[1].split(": ", 1)[0].split("/")


def parse(argv) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return str(path)


# ---- numeric options: a stated range, refused past it with the option's name -------------------------------------

def _cases(text_file):
    """(argv prefix, option, values refused, values accepted at the limits, namespace attribute)."""
    gen = ["generate", "-b", "B"]
    threads = max_threads()
    return [
        (gen, "--threads", ["100000", "-1", "0", str(threads + 1), BIG], ["1", str(threads)], "threads"),
        (gen, "--max-context", ["0", str(MAX_TOKENS + 1)], ["1", str(MAX_TOKENS)], "max_context"),
        (gen, "--max-new-tokens", ["0", "-5", str(MAX_TOKENS + 1), "1.5"], ["1", str(MAX_TOKENS)], "max_new_tokens"),
        (gen, "--draft-budget", ["-1", "257"], ["0", "256"], "draft_budget"),
        (gen, "--top-k", ["-1", str(MAX_TOKENS + 1)], ["0", str(MAX_TOKENS)], "top_k"),
        (gen, "--top-p", ["0", "-0.5", "1.01", "nan"], ["1e-9", "1"], "top_p"),
        (gen, "--temperature", ["-0.1", "nan", "inf", "100.5"], ["0", "100"], "temperature"),
        (gen, "--seed", ["-1", str(MAX_SEED + 1)], ["0", str(MAX_SEED)], "seed"),
        (["chat", "-b", "B"], "--threads", ["-1"], [str(threads)], "threads"),
        (["export", "x.gguf", "-o", "out"], "--threads", ["0", str(threads + 1)], ["1", str(threads)], "threads"),
        (["add-drafter", "B", "m.gguf"], "--threads", ["0"], [str(threads)], "threads"),
        (["adapt", "B"], "--holdout", ["1", "-0.1"], ["0", "0.99"], "holdout"),
        (["adapt", "B"], "--steps", ["0", "100001"], ["1", "100000"], "steps"),
        (["adapt", "B"], "--rank", ["0", "1025"], ["1", "1024"], "rank"),
        (["adapt", "B"], "--alpha", ["0", "10001"], ["1e-6", "10000"], "alpha"),
        (["adapt", "B"], "--lr", ["0", "1.5"], ["1e-9", "1"], "lr"),
        (["adapt", "B"], "--mapped-weight", ["-0.1", "1.1"], ["0", "1"], "mapped_weight"),
        (["adapt", "B"], "--seed", ["-1", str(MAX_SEED + 1)], ["0", str(MAX_SEED)], "seed"),
        (["adapt", "B"], "--threads", ["0"], [str(threads)], "threads"),
        (["profile"], "--threads", ["0", str(threads + 1)], [str(threads)], "threads"),
        (["profile"], "--repeats", ["0", "101"], ["1", "100"], "repeats"),
        (["profile"], "--sizes", ["0", "1,1025", ",".join(["1"] * 65), "a"], ["1,1024", ",".join(["2"] * 64)],
         "sizes"),
        (["profile"], "--contexts", ["0", str(MAX_TOKENS + 1)], [f"1,{MAX_TOKENS}"], "contexts"),
        (["ngram", "build", text_file, "-o", "c.npz", "-b", "B"], "--max-n", ["0", "65"], ["1", "64"], "max_n"),
        (["ngram", "build", text_file, "-o", "c.npz", "-b", "B"], "--max-entries", ["-1", str((1 << 22) + 1)],
         ["0", str(1 << 22)], "max_entries"),
        (["bench", "-b", "B"], "--threads", ["0"], [str(threads)], "threads"),
        (["bench", "-b", "B"], "--per-category", ["-1", "1000001"], ["0", "1000000"], "per_category"),
        (["bench", "-b", "B"], "--limit", ["0", "1000001"], ["1", "1000000"], "limit"),
        (["bench", "-b", "B"], "--max-new-tokens", ["0"], [str(MAX_TOKENS)], "max_new_tokens"),
        (["bench", "-b", "B"], "--max-context", ["0"], [str(MAX_TOKENS)], "max_context"),
        (["bench", "-b", "B"], "--warmup", ["-1", "1001"], ["0", "1000"], "warmup"),
        (["bench", "-b", "B"], "--draft-budget", ["-1", "257"], ["0", "256"], "draft_budget"),
        (["serve-bench"], "--clients", ["0", "1025"], ["1", "1024"], "clients"),
        (["serve-bench"], "--requests", ["0", "100001"], ["1", "100000"], "requests"),
        (["serve-bench"], "--max-tokens", ["0", str(MAX_TOKENS + 1)], ["1", str(MAX_TOKENS)], "max_tokens"),
        (["serve-bench"], "--server-pid", ["0", str((1 << 22) + 1)], ["1", str(1 << 22)], "server_pid"),
        (["serve-bench"], "--timeout", ["0", "-1", "86401", "inf"], ["0.001", "86400"], "timeout"),
    ]


def test_numeric_options_refused_past_their_limits(text_file, capsys):
    for prefix, option, bad, _, _ in _cases(text_file):
        for value in bad:
            err = refused([*prefix, option, value], capsys)
            assert names_option(err, option), (option, value, err)
            assert "must be" in err or "at most" in err, (option, value, err)


def test_numeric_options_accepted_at_their_limits(text_file):
    for prefix, option, _, good, attr in _cases(text_file):
        for value in good:
            got = getattr(parse([*prefix, option, value]), attr)
            expected = tuple(int(v) for v in value.split(",")) if option in ("--sizes", "--contexts") else \
                type(got)(value)
            assert got == expected, (option, value, got)


def test_refusal_states_the_range(capsys):
    err = refused(["generate", "-b", "B", "--threads", "100000"], capsys)
    assert f"from 1 to {max_threads()}" in err and "100000" in err
    err = refused(["generate", "-b", "B", "--max-context", "0"], capsys)
    assert f"from 1 to {MAX_TOKENS}" in err


def test_stop_strings_are_bounded(capsys):
    five = [arg for i in range(5) for arg in ("--stop", f"s{i}")]
    assert "at most 4" in refused(["generate", "-b", "B", *five], capsys)
    assert "1 to 1000 characters" in refused(["generate", "-b", "B", "--stop", "x" * 1001], capsys)
    assert "1 to 1000 characters" in refused(["generate", "-b", "B", "--stop", ""], capsys)
    assert parse(["generate", "-b", "B", *five[:8]]).stop == ["s0", "s1", "s2", "s3"]
    assert parse(["generate", "-b", "B", "--stop", "x" * 1000]).stop == ["x" * 1000]  # the library's MAX_STOP_CHARS


def test_factories_at_their_edges():
    assert bounded_int(-3, 3)("-3") == -3 and bounded_int(-3, 3)(" 3 ") == 3
    for text in ("4", "-4", "1.0", "", "x", "9" * 5000):
        with pytest.raises(argparse.ArgumentTypeError):
            bounded_int(-3, 3)(text)
    assert bounded_float(0, 1, lo_open=True, hi_open=True)("0.5") == 0.5
    for text in ("0", "1", "nan", "-inf", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            bounded_float(0, 1, lo_open=True, hi_open=True)(text)
    assert int_list(1, 9, 3)("1, 2,3") == (1, 2, 3)
    for text in ("1,2,3,4", "", ",", "0", "10", "1" * 1000):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(1, 9, 3)(text)
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", action=at_most(2))
    parser.add_argument("files", nargs="*", action=at_most(3))
    assert parser.parse_args(["--x", "a", "--x", "b", "1", "2", "3"]).x == ["a", "b"]
    for argv in (["--x", "a", "--x", "b", "--x", "c"], ["1", "2", "3", "4"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_ngram_build_takes_at_most_10000_files(text_file, capsys, monkeypatch):
    monkeypatch.setattr("edgespec.drafters.ngram_static.MAX_BUILD_FILES", 3)
    assert len(parse(["ngram", "build", *[text_file] * 3, "-o", "c.npz", "-b", "B"]).files) == 3
    assert "at most 3" in refused(["ngram", "build", *[text_file] * 4, "-o", "c.npz", "-b", "B"], capsys)


# ---- FIFOs and devices: refused before anything opens them --------------------------------------------------------

def test_fifo_and_special_files_are_refused_at_argument_validation(fifo, text_file, tmp_path, capsys):
    cases = [
        (["generate", "-b", str(tmp_path), "--ngram-cache", fifo], "--ngram-cache"),
        (["generate", "-b", str(tmp_path), "--ngram-static", fifo], "--ngram-static"),
        (["chat", "-b", str(tmp_path), "--ngram-static", fifo], "--ngram-static"),
        (["generate", "-b", str(tmp_path), "--device", fifo], "--device"),
        (["generate", "-b", str(tmp_path), "--ngram-cache", "/dev/zero"], "--ngram-cache"),
        (["export", fifo, "-o", str(tmp_path / "out")], "target"),
        (["export", text_file, "-o", str(tmp_path / "out"), "--drafter", fifo], "--drafter"),
        (["add-drafter", str(tmp_path), fifo], "model"),
        (["adapt", str(tmp_path), "--history", fifo], "--history"),
        (["ngram", "build", text_file, fifo, "-o", "c.npz", "-b", "B"], "files"),
        (["ngram", "build", text_file, "-o", fifo, "-b", "B"], "--output"),
        (["bench", "-b", "B", "--data", fifo], "--data"),
        (["bench", "-b", "B", "--ngram-static", fifo], "--ngram-static"),
        (["bench", "-b", "B", "--json", fifo], "--json"),
        (["bench", "-b", "B", "--device", f"none,{fifo}"], "--device"),
        (["profile", "-o", fifo], "--output"),
        (["serve-bench", "--json", fifo], "--json"),
    ]
    for argv, option in cases:
        err = refused(argv, capsys)
        assert names_option(err, option) and "not a regular file" in err, (argv, err)
    assert "a FIFO" in refused(["generate", "-b", "B", "--ngram-cache", fifo], capsys)
    assert "a folder" in refused(["generate", "-b", "B", "--ngram-static", str(tmp_path)], capsys)
    assert "no such file" in refused(["generate", "-b", "B", "--ngram-static", str(tmp_path / "none.npz")], capsys)


def test_path_options_accept_regular_and_new_files(text_file, tmp_path):
    assert regular_file(text_file) == text_file
    assert new_or_regular_file(str(tmp_path / "new.npz")) == str(tmp_path / "new.npz")
    args = parse(["generate", "-b", "B", "--ngram-cache", str(tmp_path / "new.npz"), "--ngram-static", text_file])
    assert (args.ngram_cache, args.ngram_static) == (str(tmp_path / "new.npz"), text_file)
    with pytest.raises(argparse.ArgumentTypeError, match="1 to 4096 characters"):
        new_or_regular_file("x" * 4097)
    assert parse(["serve-bench", "--json", "-"]).json == "-"


def test_fifo_ngram_cache_does_not_hang_a_real_generate(tiny_bundles, fifo):
    """The reproduction itself: before, `generate` blocked forever opening the FIFO."""
    proc = subprocess.run([sys.executable, "-m", "edgespec.cli", "generate", "Hi", "-b", str(tiny_bundles["qwen2"]),
                           "--device", "none", "--threads", "1", "--max-new-tokens", "2", "--ngram-cache", fifo],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--ngram-cache" in proc.stderr and "FIFO" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- expected errors: one line, never a traceback -----------------------------------------------------------------

def one_line_error(argv, capsys) -> str:
    """Run the CLI on `argv`, expecting exit status 2 and exactly one `edgespec: error:` line on stderr."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgespec: error: "), err
    return lines[0]


def test_export_of_a_missing_or_non_gguf_file_is_one_clean_line(tmp_path, capsys):
    out = str(tmp_path / "bundle")
    assert "no such file" in one_line_error(["export", str(tmp_path / "missing.gguf"), "-o", out], capsys)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert "not a GGUF file" in one_line_error(["export", str(bad), "-o", out], capsys)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert "not a .gguf file" in one_line_error(["export", str(text), "-o", out], capsys)
    assert not (tmp_path / "bundle").exists()


def test_other_subcommands_report_bad_bundles_and_names_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert "does not exist" in one_line_error(["generate", "-b", missing, "--device", "none"], capsys)
    assert "does not exist" in one_line_error(["info", missing], capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    assert str(corrupt) in one_line_error(["info", str(corrupt)], capsys)
    assert "unknown model" in one_line_error(["models", "--fetch", "no-such-model"], capsys)


def test_info_shows_a_dash_for_missing_accuracy_fields():
    assert cli._perplexity({"perplexity": 5}) == "5.00 (-)"
    assert cli._perplexity({"perplexity": "x", "reference_perplexity": 4}) == "- (4.00)"
    assert cli._perplexity({}) == "-" and cli._percent([1]) == "-" and cli._percent(0.5) == "50.0%"


def test_adapt_without_history_is_a_clean_error(monkeypatch, capsys):
    from edgespec.export import adapt

    def no_history(*args, **kwargs):
        raise adapt.AdaptError("no generation history to train on: generate with --history (or EDGESPEC_HISTORY=1)")

    monkeypatch.setattr(adapt, "adapt_drafter", no_history)
    assert "--history" in one_line_error(["adapt", "B"], capsys)


def test_missing_extra_names_the_pip_install():
    advice = cli.missing_extra(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert advice and "pip install 'edgespec[export]'" in advice and "'torch'" in advice
    assert "edgespec[serve]" in cli.missing_extra(ModuleNotFoundError(name="uvicorn"))
    assert cli.missing_extra(ModuleNotFoundError(name="numpy")) is None
    assert cli.missing_extra(ImportError("cannot import name x")) is None


BLOCKER = textwrap.dedent("""
    import sys

    BLOCKED = {"torch", "transformers", "gguf", "onnx", "onnx_ir", "accelerate", "peft", "safetensors"}

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    from edgespec.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_export_without_the_export_extra_names_it(tmp_path):
    for argv in (["export", "qwen2.5-coder-0.5b", "-o", str(tmp_path / "b")],
                 ["add-drafter", str(tmp_path), "smollm2-135m"]):
        proc = subprocess.run([sys.executable, "-c", BLOCKER, *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "pip install 'edgespec[export]'" in proc.stderr
        assert "Traceback" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr


# ---- history: opt-in --------------------------------------------------------------------------------------------

def test_history_choice():
    assert cli.history_choice(True, False, {}) is True
    assert cli.history_choice(False, False, {}) is False
    assert cli.history_choice(False, True, {"EDGESPEC_HISTORY": "1"}) is False
    assert cli.history_choice(False, False, {"EDGESPEC_HISTORY": "1"}) is None  # the library reads it
    assert cli.history_choice(False, False, {"EDGESPEC_HISTORY": " "}) is False


def test_history_flag_help_says_where_it_is_stored(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--history" in out and "~/.cache/edgespec/history" in out and "off by default" in out
    assert "--no-history" not in out  # still accepted (old scripts), no longer documented
    err = refused(["generate", "-b", "B", "--history", "--no-history"], capsys)
    assert "not allowed with" in err


def test_generate_records_history_only_when_asked(tiny_bundles, tmp_path, monkeypatch, capsys):
    history = tmp_path / "history"
    monkeypatch.setenv("EDGESPEC_HISTORY_DIR", str(history))
    monkeypatch.delenv("EDGESPEC_HISTORY", raising=False)
    base = ["generate", "Hi", "-b", str(tiny_bundles["qwen2"]), "--device", "none", "--threads", "1",
            "--max-new-tokens", "2", "--no-ngram-cache"]
    assert cli.main(base) == 0
    assert not history.exists() or not list(history.iterdir())  # private by default
    assert cli.main([*base, "--no-history"]) == 0
    assert not history.exists() or not list(history.iterdir())
    assert cli.main([*base, "--history"]) == 0
    files = list(history.iterdir())
    assert len(files) == 1 and files[0].read_text().count("\n") == 1
    monkeypatch.setenv("EDGESPEC_HISTORY", "1")  # the environment turns it on too
    assert cli.main(base) == 0
    assert files[0].read_text().count("\n") == 2
    capsys.readouterr()
