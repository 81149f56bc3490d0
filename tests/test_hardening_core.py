"""Hardening of the core library (issue 19, docs/hardening.md): history is opt-in and private, every file the
library reads has a stated cap or is refused when it is not a regular file, stop strings and chat templates cannot
take the machine's memory or time, manifest fields are validated at load, and atomic writes clean up after writers
killed mid-write. Each test reproduces one probe that failed before the change."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import edgespec
from edgespec.runtimes.manifest import BundleError, load_manifest

import fuzz_targets as ft

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ helpers
@contextmanager
def no_hang(seconds: float = 5.0):
    """Fail (TimeoutError) instead of blocking forever: what opening a FIFO for reading did."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"blocked for over {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def peak_mib(fn) -> float:
    """Peak Python-side allocation (numpy included) of fn(), in MiB."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a crash there cannot take this test process with it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"),
                                                                    os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO / "tests")  # (not the root: `-c` puts the cwd first)


def sparse_file(path: Path, size: int, tail: bytes = b"") -> Path:
    """A file of `size` bytes that takes no disk (a hole), ending with `tail`."""
    with open(path, "wb") as f:
        f.truncate(size - len(tail))
        f.seek(size - len(tail))
        f.write(tail)
    return path


def copy_bundle(bundle: Path, to: Path, edit=None) -> Path:
    """A copy of a bundle folder, its target's manifest entry changed by `edit(entry)`."""
    shutil.copytree(bundle, to)
    if edit is not None:
        raw = json.loads((to / "manifest.json").read_text())
        edit(raw["models"][raw["target"]])
        (to / "manifest.json").write_text(json.dumps(raw))
    return to


def records(n: int, size: int = 40) -> bytes:
    from edgespec.history import _record_line

    return b"".join(_record_line(f"p{i}" + "x" * size, f"o{i}", [1, i], [2, i], "m") for i in range(n))


# ------------------------------------------------------------------------------------------------ history
def test_history_is_off_unless_asked_for(tiny_bundles, tmp_path, monkeypatch):
    """Was: every generation logged to ~/.cache/edgespec/history by default."""
    folder = tmp_path / "hist"
    monkeypatch.setenv("EDGESPEC_HISTORY_DIR", str(folder))
    monkeypatch.delenv("EDGESPEC_HISTORY", raising=False)
    engine = edgespec.load(tiny_bundles["qwen2"], threads=1, drafter=None)
    assert engine._history is None
    engine.generate("The quick", max_new_tokens=3, ignore_eos=True)
    assert not folder.exists()  # nothing written, not even the folder
    for switch in ({"history": True}, {"history": tmp_path / "own.jsonl"}, {"env": "1"}, {"env": "yes"}):
        if "env" in switch:
            monkeypatch.setenv("EDGESPEC_HISTORY", switch["env"])
        on = edgespec.load(tiny_bundles["qwen2"], threads=1, drafter=None, history=switch.get("history"))
        on.generate("The quick", max_new_tokens=3, ignore_eos=True)
        assert on._history is not None and on._history.path.is_file(), switch
    monkeypatch.setenv("EDGESPEC_HISTORY", "1")
    assert edgespec.load(tiny_bundles["qwen2"], threads=1, drafter=None, history=False)._history is None
    monkeypatch.setenv("EDGESPEC_HISTORY", "sometimes")
    with pytest.raises(ValueError, match="EDGESPEC_HISTORY"):
        edgespec.load(tiny_bundles["qwen2"], threads=1, drafter=None)


def test_history_files_and_folders_are_private(tmp_path, monkeypatch):
    """Was: the log written 0644 in folders of the default mode."""
    from edgespec.history import SessionLog

    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "a" / "b" / "h.jsonl"
        SessionLog(path).append("secret prompt", "secret output", [1], [2], "m")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
        for mode in (0o644, 0o666, 0o640):  # an existing log open to others is tightened on the next append
            os.chmod(path, mode)
            SessionLog(path).append("p", "o", [1], [2], "m")
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(mode)
        log = SessionLog(path, max_bytes=300)  # the trimmed file (a new file from os.replace) is 0600 too
        for i in range(5):
            log.append("p" * 50, "o", [1], [2], "m")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_trimming_a_huge_history_streams_it(tmp_path):
    """Was: trimming read the whole file into memory (a 4 GB history made every generate raise MemoryError)."""
    from edgespec.history import SessionLog, read_history

    tail = records(20)
    path = sparse_file(tmp_path / "h.jsonl", 256 << 20, tail)  # 256 MiB, a hole then 20 records
    log = SessionLog(path, max_bytes=1 << 20)
    peak = peak_mib(lambda: log.append("new", "one", [3], [4], "m"))
    assert peak < 4, f"trimming took {peak:.1f} MiB"
    assert path.stat().st_size <= 1 << 20
    kept = read_history(path)
    assert [r["prompt"] for r in kept][-3:] == ["p18" + "x" * 40, "p19" + "x" * 40, "new"]
    assert len(kept) == 20  # the hole and the first record form one line (no newline between): cut
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jsonl"]  # no temporary file left


GENERATE_WITH_HUGE_HISTORY = """
    import os, resource, sys
    import edgespec
    bundle, history = sys.argv[1], sys.argv[2]
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
    limit = vm + (1536 << 20)  # room for a tiny engine, far below the 4 GiB history: reading it whole must fail
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    engine = edgespec.load(bundle, threads=1, drafter=None, history=history)
    result = engine.generate("The quick", max_new_tokens=4, ignore_eos=True)
    print("ok", len(result.token_ids), os.path.getsize(history))
"""


def test_generate_with_a_4_gib_history_file(tiny_bundles, tmp_path):
    """The issue's reproduction: a 4 GB history file made every generate raise MemoryError."""
    history = sparse_file(tmp_path / "h.jsonl", 4 << 30, records(3))
    out = run_python(GENERATE_WITH_HUGE_HISTORY, str(tiny_bundles["qwen2"]), str(history))
    assert out.returncode == 0 and out.stdout.startswith("ok 4"), out.stderr[-2000:]
    assert int(out.stdout.split()[2]) <= 64 << 20  # trimmed to the default cap (64 MiB)


def _adapt_bundle(tiny_bundles, tmp_path) -> Path:
    """The tiny bundle with its target listed a second time as a drafter (adapt needs one)."""
    bundle = copy_bundle(tiny_bundles["qwen2"], tmp_path / "b")
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["models"]["d"] = dict(raw["models"][raw["target"]], role="drafter")
    (bundle / "manifest.json").write_text(json.dumps(raw))
    return bundle


def test_adapt_without_history_says_how_to_turn_it_on(tiny_bundles, tmp_path):
    from edgespec.export.adapt import AdaptError, adapt_drafter

    bundle = _adapt_bundle(tiny_bundles, tmp_path)
    for history in (tmp_path / "none.jsonl", None):
        with pytest.raises(AdaptError) as info:
            adapt_drafter(bundle, history=history, dry_run=True)
        message = str(info.value)
        assert "off by default" in message and "--history" in message and "EDGESPEC_HISTORY=1" in message
        assert "history=True" in message
    one = tmp_path / "one.jsonl"
    one.write_bytes(records(1))
    with pytest.raises(AdaptError, match="at least 2 are needed: history is off by default"):
        adapt_drafter(bundle, history=one, dry_run=True)


# ------------------------------------------------------------------------------------------------ FIFOs
def _fifo_cases(tmp_path: Path, fifo: Path):
    from edgespec.drafters.crossvocab import open_cache
    from edgespec.history import SessionLog, read_history
    from edgespec.drafters.cachefile import tokenizer_fingerprint
    from edgespec.drafters.ngram import NGramDrafter
    from edgespec.text import Tokenizer

    return {
        "history log": lambda: SessionLog(fifo),
        "history read": lambda: read_history(fifo),
        "tokenizer": lambda: Tokenizer(fifo),
        "tokenizer fingerprint": lambda: tokenizer_fingerprint(fifo),
        "static n-gram cache": lambda: NGramDrafter(96, static_path=fifo),
        "persistent n-gram cache": lambda: NGramDrafter(96, persistent_path=fifo),
        "cross-vocabulary cache": lambda: open_cache(fifo, "fp", 80, 96),
    }


@pytest.mark.parametrize("case", ["history log", "history read", "tokenizer", "tokenizer fingerprint",
                                  "static n-gram cache", "persistent n-gram cache", "cross-vocabulary cache"])
def test_a_fifo_is_refused_instead_of_hanging(tmp_path, case):
    """Was: a FIFO given as a cache (or history) path blocked the reader forever."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(ValueError, match="not a (regular )?file") as info:
        _fifo_cases(tmp_path, fifo)[case]()
    assert str(fifo) in str(info.value)


def test_the_cache_reader_refuses_a_fifo_itself(tmp_path):
    from edgespec.drafters.cachefile import CacheFileError, read_npz

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(CacheFileError, match="not a regular file"):
        read_npz(fifo)


def test_appending_to_a_log_replaced_by_a_fifo_fails_without_blocking(tmp_path):
    from edgespec.history import SessionLog

    path = tmp_path / "h.jsonl"
    log = SessionLog(path)
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # with a reader, opening for writing would succeed
    try:
        with no_hang(), pytest.raises(OSError, match="not a regular file"):
            log.append("p", "o", [1], [2], "m")
    finally:
        os.close(reader)


# ------------------------------------------------------------------------------------------------ tokenizer size
def test_a_2_gib_tokenizer_is_refused_unread(tmp_path):
    """Was: a 2 GB tokenizer.json took 2.1 GB of memory before its error."""
    big = sparse_file(tmp_path / "tokenizer.json", 2 << 30)
    code = """
        import resource, sys
        from edgespec.text import Tokenizer
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20),) * 2)
        try:
            Tokenizer(sys.argv[1])
        except ValueError as exc:
            print("refused:", exc)
    """
    out = run_python(code, str(big))
    assert out.returncode == 0 and "over the limit of 64 MiB" in out.stdout, (out.stdout, out.stderr[-1000:])
    from edgespec.text import MAX_TOKENIZER_BYTES, Tokenizer

    assert MAX_TOKENIZER_BYTES == 64 << 20
    at_limit = sparse_file(tmp_path / "at-limit.json", MAX_TOKENIZER_BYTES)  # at the limit: read (and not JSON)
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        Tokenizer(at_limit)


def test_a_bundle_with_a_2_gib_tokenizer_is_a_bundle_error(tiny_bundles, tmp_path):
    bundle = copy_bundle(tiny_bundles["qwen2"], tmp_path / "b")
    tokenizer = load_manifest(bundle).target_model.tokenizer_path
    tokenizer.unlink()
    sparse_file(tokenizer, 2 << 30)

    def attempt():
        with pytest.raises(BundleError, match="over the limit of 64 MiB"):
            edgespec.load(bundle, threads=1, drafter=None)

    assert peak_mib(attempt) < 64


# ------------------------------------------------------------------------------------------------ n-gram caches
def _static_cache(path: Path, tokens: int, vocab: int = 5000, seed: int = 0) -> dict:
    from edgespec.drafters.cachefile import make_header, write_cache_file
    from edgespec.drafters.ngram_static import count_ngrams, limit_counts

    seq = (np.random.default_rng(seed).zipf(1.3, size=tokens) % vocab).astype(np.int64)
    arrays = limit_counts(count_ngrams([seq], 4))
    write_cache_file(path, make_header("static", 4, vocab, "fp", 0, arrays), arrays)
    return arrays


def test_a_static_cache_loads_in_memory_near_its_size(tmp_path):
    """Was: a 72 MB static cache took 18 s and 2.9 GB to load (a Python dict entry per n-gram, ~1 kB each)."""
    from edgespec.drafters.ngram import NGramDrafter

    path = tmp_path / "static.npz"
    arrays = _static_cache(path, 100_000)
    size = path.stat().st_size
    assert len(arrays["entry_key"]) > 200_000
    tracemalloc.start()
    t0 = time.perf_counter()
    drafter = NGramDrafter(5000, fingerprint="fp", static_path=path)
    seconds = time.perf_counter() - t0
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 6 * size, f"peak {peak / size:.1f}x the file"  # was 11.9x
    assert retained < 2 * size, f"kept {retained / size:.1f}x the file"  # was 8.1x
    assert seconds < 2.0
    assert drafter.static_table.entries == len(arrays["entry_key"])


def test_the_static_table_answers_as_the_dict_table(tmp_path):
    """The array-backed static tier gives the same continuations (and so the same drafts) as before, also for a
    file with repeated n-grams and entries (merged the same way)."""
    from edgespec.drafters.cachefile import read_cache_file
    from edgespec.drafters.ngram import Thresholds, longest_match
    from edgespec.drafters.ngram_table import NGramTable, StaticTable, concat_arrays, fit_max_n

    path = tmp_path / "static.npz"
    _static_cache(path, 20_000, vocab=300)
    _, arrays = read_cache_file(path, ("static",), 300, "fp")
    arrays = concat_arrays(arrays, {k: v[: len(v) // 3] if k.startswith("key") else v for k, v in
                                    {**arrays, "entry_key": arrays["entry_key"][arrays["entry_key"] <
                                                                                len(arrays["key_len"]) // 3],
                                     **{k: arrays[k][arrays["entry_key"] < len(arrays["key_len"]) // 3]
                                        for k in ("entry_next", "entry_count", "entry_stamp")}}.items()})
    for max_n in (4, 2):
        fitted = fit_max_n(arrays, max_n)
        static, table = StaticTable(fitted, max_n), NGramTable.from_arrays(fitted, max_n)
        assert static.entries == table.entries and len(static.grams) == len(table.grams)
        for key, conts in table.grams.items():
            got = static.grams.get(key)
            assert (got.total, got.best, got.next) == (conts.total, conts.best, conts.next), key
        rng = np.random.default_rng(1)
        limits = Thresholds().static
        tails = [tuple(rng.integers(0, 300, size=n).tolist()) for n in rng.integers(1, 6, size=2000)]
        tails += [key for key in list(table.grams)[:2000]]
        for tail in tails:
            assert longest_match(static, tail, limits, 300) == longest_match(table, tail, limits, 300), tail
            assert (static.grams.get(tail) is None) == (tail not in table.grams)


def test_a_persistent_cache_is_cut_to_its_cap_when_loaded(tmp_path):
    """Was: a persistent file of any size (up to the reader's 4M entries) became a Python table before the next
    save evicted it."""
    from edgespec.drafters.cachefile import make_header, write_cache_file
    from edgespec.drafters.ngram import NGramDrafter
    from edgespec.drafters.ngram_table import NGramTable

    table = NGramTable(4)
    table.add_tokens(list(np.random.default_rng(0).integers(0, 96, size=3000)))
    arrays = table.to_arrays()
    path = tmp_path / "p.npz"
    write_cache_file(path, make_header("persistent", 4, 96, "fp", 3000, arrays), arrays)
    assert len(arrays["entry_key"]) > 1000
    drafter = NGramDrafter(96, fingerprint="fp", persistent_path=path, persistent_cap=100)
    assert drafter.persistent_table.entries == 100


# ------------------------------------------------------------------------------------------------ stop strings
def test_stop_strings_are_capped(tmp_path):
    from edgespec.sampling import GenerationConfig
    from edgespec.text import MAX_STOP_CHARS, MAX_STOP_STRINGS, StopMatcher

    assert (MAX_STOP_STRINGS, MAX_STOP_CHARS) == (16, 1000)
    at_limit = [f"{i:02d}" + "x" * (MAX_STOP_CHARS - 2) for i in range(MAX_STOP_STRINGS)]
    assert len(StopMatcher(at_limit).stop_strings) == MAX_STOP_STRINGS
    GenerationConfig(stop=at_limit).validate()
    for bad, match in (([*at_limit, "17th"], "at most 16 stop strings"),
                       (["y" * (MAX_STOP_CHARS + 1)], "1001 characters, over the limit of 1000"),
                       ((f"s{i}" for i in range(10 ** 12)), "at most 16 stop strings")):  # not consumed further
        with pytest.raises(ValueError, match=match):
            StopMatcher(bad)
    with pytest.raises(ValueError, match="over the limit of 1000"):
        GenerationConfig(stop=("z" * 5000,)).validate()


def test_stop_matcher_memory_is_linear_in_the_stop_length(monkeypatch):
    """Was: a set of every prefix of every stop string (a 40k-character stop peaked at 825 MB, 1 MB took 22 GB)."""
    from edgespec import text

    monkeypatch.setattr(text, "MAX_STOP_CHARS", 100_000, raising=False)  # past the cap, to show the growth
    stop = "ab" * 20_000

    def run():
        matcher = text.StopMatcher([stop])
        for _ in range(1000):
            matcher.push("ab")
        assert matcher.pending == ("ab" * 1000)[: len(stop) - 1] and not matcher.stopped

    assert peak_mib(run) < 8


def test_stop_matcher_emits_what_a_naive_matcher_emits(tmp_path):
    """At every push, against the fuzz target's reference (the longest suffix that is a proper prefix of a stop
    is held back; the first stop to end wins, ties to the longest), on adversarial repetitive texts."""
    import random

    target = ft.get_target("stop")
    for seed in range(300):
        r = random.Random(seed)
        alphabet = r.choice(["ab", "aab", "a\n", "xyz"])
        stops = ["".join(r.choice(alphabet) for _ in range(r.randint(1, 9))) for _ in range(r.randint(0, 5))]
        text_ = "".join(r.choice(alphabet) for _ in range(r.randint(0, 80)))
        cuts = sorted({r.randint(0, len(text_)) for _ in range(r.randint(0, 15))})
        pieces = [text_[i:j] for i, j in zip([0] + cuts, cuts + [len(text_)])]
        outcome = ft.run_one(target, ft.stop_encode(pieces, stops), tmp_path)
        assert outcome.kind == "accepted", (seed, outcome)


# ------------------------------------------------------------------------------------------------ chat templates
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# features the budget rewrites or hooks: loops with loop.*, ~, macros, call blocks, filters, set blocks, format
FEATURES_TEMPLATE = """{% macro item(m, i) -%}
[{{ i }}:{{ m.role|upper }}] {{ m.content|replace('a', 'A')|center(30)|trim }}{{ caller() if caller else '' }}
{%- endmacro %}
{%- set ns = namespace(total=0, text='') -%}
{%- for m in messages if m.content -%}
{%- set ns.total = ns.total + m.content|length -%}
{%- set ns.text = ns.text ~ m.role[0] -%}
{% call item(m, loop.index) %}({{ loop.revindex }}/{{ loop.length }}{{ ', last' if loop.last }}){% endcall %}
{% endfor -%}
{%- set block %}{% for k, v in {'b': 2, 'a': 1}|dictsort %}{{ k }}={{ v }};{% endfor %}{% endset -%}
{{ ns.total }} {{ ns.text }} {{ block }} {{ '%05.1f|%s' % (3.14159, 'x') }} {{ '{:>6}|{}'.format('r', 1) }}
{{ [3, 1, 2]|sort|join(',') }} {{ (messages|map(attribute='role')|list)[:2]|tojson }} {{ 'ab' * 3 }} {{ 2 ** 10 }}
{%- filter upper %} tail {{ messages[-1].content[:5] }}{% endfilter %}{% for x in range(3) recursive %}{{ x }}{% endfor %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about caf\u00e9 \u2615."},
     {"role": "assistant", "content": "Steam rises, bitter"}, {"role": "user", "content": "  again  "}],
    [{"role": "user", "content": "Weather in Z\u00fcrich?"},
     {"role": "assistant", "content": None,
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Z\u00fcrich"}}}]},
     {"role": "tool", "content": '{"temp_c": 21}'}, {"role": "tool", "content": '{"wind": 5}'}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "M\u00e9t\u00e9o",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _reference_render(template: str, messages, **kwargs) -> str:
    """How chat.py rendered before the budget: the plain immutable sandbox with the same settings and globals."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edgespec import chat

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[chat._GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = chat._tojson
    env.globals.update(raise_exception=chat._raise_exception, strftime_now=chat._strftime_now,
                       dict=chat._TemplateDict(), namespace=chat._TemplateNamespace)
    context = {"tools": None, "documents": None, **kwargs, "messages": chat.validate_messages(messages),
               "add_generation_prompt": kwargs.pop("add_generation_prompt", True)}
    context.setdefault("bos_token", "")
    context.setdefault("eos_token", "")
    return env.from_string(template).render(**context)


@pytest.mark.parametrize("name", ["qwen2.5", "gemma3", "features"])
def test_real_templates_render_as_before(name):
    from edgespec.chat import render_chat

    template = {"qwen2.5": QWEN25_TEMPLATE, "gemma3": GEMMA3_TEMPLATE, "features": FEATURES_TEMPLATE}[name]
    for messages in CONVERSATIONS:
        if name == "gemma3" and any(m["role"] == "tool" for m in messages):
            continue
        for extra in ({}, {"add_generation_prompt": False}, {"tools": TOOLS, "bos_token": "<bos>"}):
            expected = _reference_render(template, messages, **dict(extra))
            assert render_chat(template, messages, **extra) == expected, (name, messages, extra)


def test_nested_range_loops_stop_at_the_time_limit():
    """Was: `range(100000)` nested twice ran 10**10 empty iterations with no way to cancel."""
    from edgespec.chat import RENDER_SECONDS, ChatTemplateError, render_chat

    assert RENDER_SECONDS == 2.0
    bomb = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="time limit of 2.0 s"):
        render_chat(bomb, [{"role": "user", "content": "x"}])
    assert time.perf_counter() - t0 < RENDER_SECONDS + 1.5


def test_string_repetition_bomb_neither_aborts_nor_allocates():
    """Was: `{{'x'*1000000000}}` killed the process with SIGABRT (run in a child, so this test survives it)."""
    code = """
        from edgespec.chat import ChatTemplateError, render_chat
        try:
            render_chat("{{'x'*1000000000}}", [{"role": "user", "content": "x"}])
        except ChatTemplateError as exc:
            print("refused:", exc)
        # (VmHWM: this process's own peak; ru_maxrss would include the forking parent's)
        print("peak MiB", [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] // 1024)
    """
    out = run_python(code)
    assert out.returncode == 0, (out.returncode, out.stderr[-1000:])
    assert "refused: chat template makes a string of 1000000000 characters, over the limit of 8388608" in out.stdout
    assert int(out.stdout.split("peak MiB")[1]) < 300


BOMBS = {  # each makes ~100M characters or items, or runs for minutes, without the budget
    "str repetition": ("{{ 'x' * 100000000 }}", "makes a string of 100000000 characters"),
    "list repetition": ("{{ ([1] * 100000000)|length }}", "makes a list of 100000000 items"),
    "concat doubling": ("{% set ns = namespace(s='x') %}{% for i in range(27) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s|length }}", "makes a string of 16777216 characters"),
    "plus doubling": ("{% set ns = namespace(s='x') %}{% for i in range(27) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}{{ ns.s|length }}", "makes a string of 16777216 characters"),
    "center filter": ("{{ 'x'|center(100000000) }}", "100000000 characters"),
    "indent filter": ("{{ 'x\\ny'|indent(100000000) }}", "characters, over the limit"),
    "ljust method": ("{{ 'x'.ljust(100000000) }}", "100000000 characters"),
    "str.format width": ("{{ '{:>100000000}'.format(1) }}", "over the limit"),
    "printf width": ("{{ '%100000000d' % 1 }}", "over the limit"),
    "replace blow-up": ("{% set s = 'x' * 10000 %}{{ s.replace('x', s)|length }}", "100000000 characters"),
    "join blow-up": ("{{ (['x' * 1000000] * 100)|join|length }}", "100000000 characters"),
    "batch fill": ("{{ [1]|batch(100000000, 'x')|list|length }}", "100000000 items"),
    "big power": ("{{ 3 ** 100000000 }}", "bits, over the limit of 4096"),
    "squaring loop": ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
                      "{% endfor %}{{ ns.x }}", "bits, over the limit of 4096"),
    "macro output": ("{% macro m(s) %}{% for i in range(100) %}{{ s }}{% endfor %}{% endmacro %}"
                     "{{ m('x' * 5000000)|length }}", "made over 67108864 characters and items in all"),
    "quadratic concat": ("{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ "
                         "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' %}{% endfor %}",
                         "made over 67108864 characters and items in all"),
    "output": ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "output is over the limit of 8388608"),
    "split": ("{{ ('a ' * 4000000).split()|length }}", "makes a list of"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion too deep"),
    "exponential macro": ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                          "{{ f(60) }}", "time limit"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_template_bombs_are_refused_within_bounds(bomb):
    from edgespec.chat import ChatTemplateError, render_chat

    template, match = BOMBS[bomb]
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match=match):
            render_chat(template, [{"role": "user", "content": "x"}])
        peak = tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()
    assert peak < 200, f"{peak:.0f} MiB"
    assert time.perf_counter() - t0 < 4.0


def test_templates_at_the_limits_still_render():
    from edgespec.chat import RENDER_MAX_CHARS, RENDER_MAX_ITEMS, render_chat

    msgs = [{"role": "user", "content": "x"}]
    assert len(render_chat(f"{{{{ 'x' * {RENDER_MAX_CHARS} }}}}", msgs)) == RENDER_MAX_CHARS
    assert render_chat(f"{{{{ ([0] * {RENDER_MAX_ITEMS})|length }}}}", msgs) == str(RENDER_MAX_ITEMS)
    assert render_chat("{{ 2 ** 4000 > 0 }}", msgs) == "True"


# ------------------------------------------------------------------------------------------------ manifests
@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    ft.manifest_setup(tmp_path)
    bundle = tmp_path / "manifest"
    (bundle / "manifest.json").write_bytes(ft.get_target("manifest")._seeds[0])
    load_manifest(bundle)
    return bundle


def _set(path: tuple, value):
    def edit(entry):
        node = entry
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return edit


MANIFEST_FIELDS = {  # each was accepted at load, then failed later with the error named
    "accuracy_level list": (("quantization", "accuracy_level"), [1], "quantization.accuracy_level"),  # TypeError
    "accuracy_level 1e400": (("quantization", "accuracy_level"), "@inf@", "quantization.accuracy_level"),  # Overflow
    "accuracy_level text": (("quantization", "accuracy_level"), "abc", "quantization.accuracy_level"),  # ValueError
    "accuracy_level 5": (("quantization", "accuracy_level"), 5, "an integer from 0 to 4"),
    "accuracy_level true": (("quantization", "accuracy_level"), True, "quantization.accuracy_level"),
    "t_invariant text": (("quantization", "t_invariant"), "yes", "quantization.t_invariant"),
    "tensor_types list": (("quantization", "tensor_types"), [1], "quantization.tensor_types"),
    "accuracy missing keys": (("accuracy",), {"perplexity": 5}, "accuracy.top1_agreement is missing"),  # KeyError
    "accuracy text": (("accuracy",), {"top1_agreement": "high", "perplexity": 5, "reference_perplexity": 5},
                      "accuracy.top1_agreement must be a number from 0 to 1"),
    "accuracy nan": (("accuracy",), {"top1_agreement": 0.9, "perplexity": "@nan@", "reference_perplexity": 5},
                     "accuracy.perplexity must be a positive number"),
}


@pytest.mark.parametrize("case", list(MANIFEST_FIELDS))
def test_manifest_fields_are_checked_at_load(fake_bundle, case):
    path, value, match = MANIFEST_FIELDS[case]
    raw = json.loads((fake_bundle / "manifest.json").read_text())
    _set(path, value)(raw["models"]["t"])
    text = json.dumps(raw).replace('"@inf@"', "1e400").replace('"@nan@"', "NaN")
    (fake_bundle / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=match.replace(".", r"\.")) as info:
        load_manifest(fake_bundle)
    assert str(fake_bundle / "manifest.json") in str(info.value)


def test_valid_quantization_and_accuracy_still_load(fake_bundle):
    raw = json.loads((fake_bundle / "manifest.json").read_text())
    raw["models"]["t"]["quantization"] = {"mode": "gguf", "accuracy_level": None, "tensor_types": {"Q4_K": 3},
                                          "t_invariant": True, "future_field": [1]}
    raw["models"]["t"]["accuracy"] = {"top1_agreement": 1, "perplexity": 8.5, "reference_perplexity": 8,
                                      "text_tokens": 256, "max_nll_difference": 0.0, "future": "x"}
    raw["models"]["d"]["accuracy"] = {}
    (fake_bundle / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(fake_bundle).models["t"].accuracy["perplexity"] == 8.5


def test_num_layers_below_the_graphs_is_refused_at_load(tiny_bundles, tmp_path):
    """Was: num_layers=1 over a 2-layer graph loaded, then failed at the first generate (ORT: missing inputs)."""
    def one_layer(entry):
        entry["num_layers"], entry["layer_types"] = 1, ["full"]

    bundle = copy_bundle(tiny_bundles["qwen2"], tmp_path / "b", one_layer)
    with pytest.raises(BundleError, match="past key/value inputs for 2 layers but the manifest's num_layers is 1"):
        edgespec.load(bundle, threads=1, drafter=None)


# ------------------------------------------------------------------------------------------------ housekeeping
def _stale(folder: Path, name: str, age: float = 120) -> Path:
    path = folder / name
    path.write_bytes(b"half-written" * 100)
    past = time.time() - age
    os.utime(path, (past, past))
    return path


def test_atomic_writes_remove_temp_files_left_by_killed_writers(tmp_path):
    """Was: temporary files of writers killed with kill -9 stayed forever (4 files after 40 kills)."""
    from edgespec.history import SessionLog
    from edgespec.drafters.cachefile import make_header, write_cache_file
    from edgespec.drafters.ngram_table import NGramTable
    from edgespec.runtimes.files import STALE_TEMP_SECONDS, write_json_atomic

    assert STALE_TEMP_SECONDS == 60
    # the JSON writer (manifests, device profiles) and the history trim: "<name>.<8 random>.tmp"
    stale = [_stale(tmp_path, "profile.json.ab12cd_9.tmp"), _stale(tmp_path, "h.jsonl.zzzzzzzz.tmp")]
    fresh = _stale(tmp_path, "profile.json.fresh123.tmp", age=5)  # may be a live writer's
    other = [_stale(tmp_path, "profile.json.notes.tmp"), _stale(tmp_path, "profile.json.ab12cd_9.tmp.keep"),
             _stale(tmp_path, "other.json.ab12cd_9.tmp")]
    write_json_atomic(tmp_path / "profile.json", {"a": 1})
    assert not stale[0].exists() and fresh.exists() and all(p.exists() for p in other)
    log = SessionLog(tmp_path / "h.jsonl", max_bytes=200)
    for i in range(4):
        log.append("p" * 60, "o", [1], [2], "m")  # passes the cap: trimmed through an atomic rewrite
    assert not stale[1].exists()
    # the n-gram cache writer: ".<name>.<8 random>.tmp"
    cache_stale = _stale(tmp_path, ".c.npz.k3j4h5g6.tmp")
    arrays = NGramTable(2).to_arrays()
    write_cache_file(tmp_path / "c.npz", make_header("persistent", 2, 96, "fp", 0, arrays), arrays)
    assert not cache_stale.exists() and (tmp_path / "c.npz").is_file()
