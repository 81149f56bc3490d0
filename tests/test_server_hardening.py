"""`edgespec serve` against hostile clients and careless setups (issue 19): privacy by default (no session history,
no state shared between clients), bounded memory per request (field limits, queue slots taken before the body is
read, upload timeout, connection limit), clean errors (deep JSON, disconnects, Host/Origin checks, key files, port
numbers) and a dispatcher that survives anything one request raises. Servers bind 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import edgespec  # noqa: E402
from edgespec import server as srv  # noqa: E402
from edgespec.engine import GenerationResult, GenerationStats  # noqa: E402
from edgespec.server import APIError, create_app, parse_json_body, parse_request  # noqa: E402

HOST = "127.0.0.1"
MODEL = "tiny-qwen2"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = {"Content-Type": "application/json"}


# ---- helpers ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running(app, max_connections: int = srv.MAX_CONNECTIONS):
    """Serve `app` with the server's own uvicorn config (`server_config`) in a background thread; yields the URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    config = srv.server_config(app, HOST, port, log_level="warning", max_connections=max_connections)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def post(url: str, path: str, body, headers=None, timeout: float = 30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=data, headers={**JSON, **(headers or {})}, timeout=timeout)


def assert_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=10)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def open_upload(url: str, declared: int, sent: bytes = b"", path: str = COMPLETIONS) -> socket.socket:
    """A raw connection that sends the headers of a POST declaring `declared` body bytes, then only `sent`."""
    sock = socket.create_connection((HOST, port_of(url)), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port_of(url)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    sock.sendall(head + sent)
    return sock


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP/1.1 response on a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


class FakeEngine:
    """A duck-typed engine with no model: each generation emits `pieces` pieces `delay` seconds apart; the prompts
    "panic-at-start" / "panic-midway" raise `Panic`, a BaseException that is not an Exception (as a tokenizer's Rust
    panic, pyo3_runtime.PanicException, is)."""

    context_length = 512

    def __init__(self, delay: float = 0.0, pieces: int = 3):
        self.entry = SimpleNamespace(name="fake")
        self.delay, self.pieces = delay, pieces
        self.prompts: list[str] = []
        self.threads: set[int] = set()

    def render_chat(self, messages):
        return messages[-1]["content"]

    def stream(self, prompt, **options):
        self.threads.add(threading.get_ident())
        if prompt == "panic-at-start":
            raise Panic("tokenizer panicked")
        self.prompts.append(prompt)
        return self._generate(prompt, min(self.pieces, options["max_new_tokens"]))

    def _generate(self, prompt, n):
        for i in range(n):
            if prompt == "panic-midway" and i == 1:
                raise Panic("decoder panicked")
            time.sleep(self.delay)
            yield f"w{i} "
        return GenerationResult("", list(range(n)), "length", GenerationStats(prompt_tokens=3, new_tokens=n,
                                                                              steps=n, drafter="fake"))


class Panic(BaseException):
    """Stands for pyo3_runtime.PanicException (a BaseException subclass)."""


def completion(prompt="Hi", **fields) -> dict:
    return {"model": "fake", "prompt": prompt, **fields}


# ---- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["qwen2"]


def tiny_engine(bundle, **kwargs):
    return edgespec.load(bundle, threads=1, history=False, device=None, **{"ngram_cache": False, **kwargs})


# ==== 1. privacy ================================================================================================
def ask(url: str, prompt: str, headers=None, **fields) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, **fields}
    response = post(url, COMPLETIONS, body, headers)
    assert response.status_code == 200, response.text
    return response.json()["edgespec"]


SECRET = "The quick brown fox jumps over the lazy dog. Berlin is the capital of Germany."


def session_accepted(engine) -> int:
    """Draft tokens the n-gram drafter's session tier got accepted so far (the tier holding earlier requests)."""
    return engine.drafter.counters["accepted"]["session"]


@pytest.mark.parametrize("who", ["user", "anonymous"])
def test_second_client_gets_no_prefix_reuse_and_no_drafts_from_the_first_clients_text(bundle, who):
    engine = tiny_engine(bundle)
    with running(create_app(engine)) as url:
        ask(url, SECRET, user="alice")
        before = session_accepted(engine)
        ext = ask(url, SECRET, **({"user": "bob"} if who == "user" else {}))  # the attacker guesses alice's prompt
        assert ext["reused_prompt_tokens"] == 0
        assert session_accepted(engine) == before  # nothing drafted from alice's prompt or answer
        assert not health(url).json()["shared_cache"]
    shared_engine = tiny_engine(bundle)
    with running(create_app(shared_engine, shared_cache=True)) as url:  # the opt-in restores sharing
        ask(url, SECRET, user="alice")
        before = session_accepted(shared_engine)
        shared = ask(url, SECRET, **({"user": "bob"} if who == "user" else {}))
        assert shared["reused_prompt_tokens"] > 0
        assert session_accepted(shared_engine) > before
        assert shared["steps"] < ext["steps"]  # the speed difference an attacker would time


def test_the_same_client_keeps_its_cached_prefix_and_api_keys_separate_clients(bundle):
    engine = tiny_engine(bundle)
    with running(create_app(engine, api_key=["key-one", "key-two"])) as url:
        one, two = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
        ask(url, SECRET, one)
        assert ask(url, SECRET, one)["reused_prompt_tokens"] > 0  # same key: its own state is kept
        assert ask(url, SECRET, two)["reused_prompt_tokens"] == 0  # another key: wiped
        assert ask(url, SECRET, two, user="x")["reused_prompt_tokens"] == 0  # another declared user: wiped
        assert ask(url, SECRET, two, user="x")["reused_prompt_tokens"] > 0


def test_the_wipe_forgets_recycled_predictions(bundle):
    engine = tiny_engine(bundle)
    engine.generate(SECRET, max_new_tokens=20, ignore_eos=True)
    assert engine.drafter.recycled and engine.drafter.session_table.entries
    srv.forget_earlier_requests(engine)
    assert engine.drafter.recycled == {} and engine.drafter.session_table.entries == 0


def test_an_engine_with_a_persistent_cache_needs_shared_cache(bundle, tmp_path):
    engine = tiny_engine(bundle, ngram_cache=str(tmp_path / "cache.npz"))
    with pytest.raises(ValueError, match="shared_cache"):
        create_app(engine)
    create_app(engine, shared_cache=True)


def serve_args(*argv):
    from edgespec.cli import build_parser

    return build_parser().parse_args(["serve", "--bundle", "b", *argv])


def test_serve_loads_without_history_or_persistent_cache_unless_asked(monkeypatch):
    import edgespec.engine

    calls = []
    monkeypatch.setattr(edgespec.engine, "load", lambda *a, **k: calls.append(k) or FakeEngine())
    monkeypatch.setattr(srv, "serve", lambda engine, **k: calls.append(k) or 0)
    monkeypatch.setenv("EDGESPEC_HISTORY", "1")  # the library's switch does not turn the server's history on
    assert srv.cmd_serve(serve_args()) == 0
    assert calls[0]["history"] is False and calls[0]["ngram_cache"] is False
    assert calls[1]["shared_cache"] is False
    calls.clear()
    assert srv.cmd_serve(serve_args("--history", "--shared-cache")) == 0
    assert calls[0]["history"] is True and calls[0]["ngram_cache"] is None
    assert calls[1]["shared_cache"] is True


# ==== 2. bounded memory =========================================================================================
def chat(content="Hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def parse(body: dict, kind: str = "chat"):
    return parse_request(body, kind, MODEL, None, 16)


def refused(body: dict, kind: str = "chat") -> APIError:
    with pytest.raises(APIError) as exc:
        parse(body, kind)
    assert exc.value.status == 400 and len(exc.value.message) < 300
    return exc.value


N, T = srv.MAX_MESSAGES, srv.MAX_TEXT_CHARS
LIMITS = [  # (field, body at the limit, body over it, param named, kind)
    ("messages", {"model": MODEL, "messages": [{"role": "user", "content": "x"}] * N},
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}] * (N + 1)}, "messages", "chat"),
    ("content", chat("x" * T), chat("x" * (T + 1)), "messages[0].content", "chat"),
    ("total", {"model": MODEL, "messages": [{"role": "user", "content": "x" * (T // 2)}] * 2},
     {"model": MODEL, "messages": [{"role": "user", "content": "x" * (T // 2)}] * 2
      + [{"role": "user", "content": "x"}]}, "messages", "chat"),
    ("parts", chat([{"type": "text", "text": "x"}] * srv.MAX_CONTENT_PARTS),
     chat([{"type": "text", "text": "x"}] * (srv.MAX_CONTENT_PARTS + 1)), "messages[0].content", "chat"),
    ("name", {"model": MODEL, "messages": [{"role": "user", "content": "x", "name": "n" * 256}]},
     {"model": MODEL, "messages": [{"role": "user", "content": "x", "name": "n" * 257}]}, "messages[0].name",
     "chat"),
    ("user", chat(user="u" * 256), chat(user="u" * 257), "user", "chat"),
    ("stop count", chat(stop=["a", "b", "c", "d"]), chat(stop=["a", "b", "c", "d", "e"]), "stop", "chat"),
    ("stop length", chat(stop=["s" * srv.MAX_STOP_CHARS] * 4), chat(stop=["s" * (srv.MAX_STOP_CHARS + 1)]), "stop",
     "chat"),
    ("prompt", {"model": MODEL, "prompt": "x" * T}, {"model": MODEL, "prompt": "x" * (T + 1)}, "prompt",
     "completion"),
    ("prompt ids", {"model": MODEL, "prompt": [1] * srv.MAX_PROMPT_IDS},
     {"model": MODEL, "prompt": [1] * (srv.MAX_PROMPT_IDS + 1)}, "prompt", "completion"),
]


@pytest.mark.parametrize("name, at_limit, over, param, kind", LIMITS, ids=[case[0] for case in LIMITS])
def test_every_field_is_bounded_with_a_400_naming_it(name, at_limit, over, param, kind):
    parse(at_limit, kind)
    error = refused(over, kind)
    assert error.param == param and error.code in ("array_above_max_length", "string_above_max_length"), error.body()


def test_a_huge_value_is_never_echoed_back():
    for body in (chat(model="m" * 1_000_000), chat(temperature="t" * 1_000_000),
                 {"model": MODEL, "messages": [{"role": "r" * 1_000_000, "content": "x"}]}):
        error = refused(body) if body.get("model", "").startswith(MODEL) else None
        if error is None:
            with pytest.raises(APIError) as exc:
                parse(body)
            error = exc.value
        assert len(error.message) < 300


def test_a_one_megabyte_stop_string_is_refused_at_once_over_http():
    with running(create_app(FakeEngine())) as url:
        t0 = time.monotonic()
        assert_error(post(url, COMPLETIONS, completion(stop="s" * 1_000_000)), 400, "stop", "string_above_max_length")
        assert time.monotonic() - t0 < 2


def test_json_values_are_counted_before_parsing():
    bomb = b"[" + b"{}," * (4 * 2**20 // 3 - 2) + b"{}]"  # 4 MiB of empty objects: ~100 MB once parsed
    with pytest.raises(APIError) as exc:
        parse_json_body(bomb)
    assert exc.value.status == 400 and exc.value.code == "too_many_values"
    ids = srv.MAX_JSON_VALUES - 3  # the object, its key, the array and the ids
    at_limit = b'{"prompt": [' + b",".join([b"1"] * ids) + b"]}"
    assert srv.json_value_count(at_limit) == srv.MAX_JSON_VALUES
    assert len(parse_json_body(at_limit)["prompt"]) == ids
    with pytest.raises(APIError, match="values"):
        parse_json_body(b'{"prompt": [' + b",".join([b"1"] * (ids + 1)) + b"]}")
    commas = json.dumps({"prompt": ",[{:" * 500_000}).encode()  # inside a string they are not values
    assert parse_json_body(commas)["prompt"].startswith(",[{:")
    t0 = time.monotonic()  # an unterminated string full of escapes: the count stays linear
    with pytest.raises(APIError, match="parse"):
        parse_json_body(b'{"a": "' + b'\\",' * 1_000_000)
    assert time.monotonic() - t0 < 2


def test_body_limit_is_413_at_one_byte_over():
    raw = b'{"model": "fake", "prompt": "' + b"x" * (srv.MAX_BODY_BYTES - 31) + b'"}'
    assert len(raw) == srv.MAX_BODY_BYTES
    assert parse_json_body(raw)["model"] == "fake"
    with pytest.raises(APIError) as exc:
        parse_json_body(raw + b" ")
    assert exc.value.status == 413


def test_queue_full_is_answered_before_the_body_is_read():
    engine = FakeEngine(delay=0.05, pieces=20)  # one second per request
    with running(create_app(engine, max_queue=1)) as url:
        first = threading.Thread(target=post, args=(url, COMPLETIONS, completion("A", max_tokens=20)), daemon=True)
        first.start()
        wait_until(lambda: health(url).json()["in_flight"] == 1, what="A in flight")
        second = threading.Thread(target=post, args=(url, COMPLETIONS, completion("B", max_tokens=20)), daemon=True)
        second.start()
        wait_until(lambda: health(url).json()["queue_depth"] == 1, what="B queued")
        sock = open_upload(url, declared=srv.MAX_BODY_BYTES)  # headers only: the body never comes
        t0 = time.monotonic()
        status, headers, body = read_response(sock, timeout=3)
        assert status == 429 and json.loads(body)["error"]["code"] == "queue_full" and headers["retry-after"] == "1"
        assert time.monotonic() - t0 < 1
        sock.close()


def test_stalled_uploads_are_dropped_after_the_body_timeout_and_free_their_slots():
    with running(create_app(FakeEngine(), max_queue=64, body_timeout=0.5)) as url:
        socks = [open_upload(url, declared=1000, sent=b'{"model": "fa') for _ in range(50)]
        t0 = time.monotonic()
        for sock in socks:
            status, headers, body = read_response(sock, timeout=5)
            assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
            assert closed_by_server(sock)
            sock.close()
        assert time.monotonic() - t0 < 3
        assert post(url, COMPLETIONS, completion()).status_code == 200  # the 50 slots are free again


def test_connections_over_the_limit_get_503():
    with running(create_app(FakeEngine(), body_timeout=1.0), max_connections=4) as url:
        socks = [open_upload(url, declared=100) for _ in range(3)]  # with the next one: 4 connections
        try:
            time.sleep(0.2)
            assert health(url).status_code == 503  # uvicorn's limit_concurrency counts this one too
        finally:
            for sock in socks:
                sock.close()
        wait_until(lambda: health(url).status_code == 200, timeout=5, what="the connections to go")


# ==== 3. clean errors ===========================================================================================
@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000],
                         ids=["arrays", "objects"])
def test_deeply_nested_json_is_a_400(raw):
    with running(create_app(FakeEngine())) as url:
        assert_error(post(url, COMPLETIONS, raw), 400, code="invalid_json")
        assert health(url).json()["status"] == "ok"


def test_a_client_gone_mid_upload_is_one_log_line(caplog):
    caplog.set_level(logging.INFO)
    with running(create_app(FakeEngine())) as url:
        sock = open_upload(url, declared=1000, sent=b'{"model": "fake", "pro')
        time.sleep(0.2)
        sock.close()
        wait_until(lambda: any("disconnected" in r.getMessage() for r in caplog.records), timeout=5,
                   what="the log line")
        assert post(url, COMPLETIONS, completion()).status_code == 200
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None and gone[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


GUARD_CASES = [  # (headers, content type, status, code)
    ({"Origin": "https://evil.example"}, "text/plain", 403, "forbidden_origin"),  # a cross-site form/fetch POST
    ({"Origin": "https://evil.example"}, "application/json", 403, "forbidden_origin"),
    ({"Origin": "null"}, "application/json", 403, "forbidden_origin"),  # a sandboxed page
    ({"Host": "attacker.example:8000"}, "application/json", 403, "forbidden_host"),  # DNS rebinding
    ({"Host": "evil.example"}, "application/json", 403, "forbidden_host"),
    ({}, "text/plain", 415, "unsupported_media_type"),  # not a browser, but not JSON either
    ({}, "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ({"Origin": "http://localhost:3000"}, "application/json", 200, None),  # a page on this machine
    ({"Origin": "http://127.0.0.1:5173"}, "application/json", 200, None),
    ({"Host": "localhost:8000"}, "application/json", 200, None),
    ({"Host": "127.0.0.1"}, "application/json", 200, None),
    ({"Origin": "https://app.example"}, "application/json", 200, None),  # allowed by the option below
]


@pytest.mark.parametrize("headers, content_type, status, code", GUARD_CASES,
                         ids=[f"{i}-{c[2]}" for i, c in enumerate(GUARD_CASES)])
def test_foreign_origins_and_host_names_are_refused(headers, content_type, status, code):
    with running(create_app(FakeEngine(), allow_origins=["https://app.example"])) as url:
        response = httpx.post(f"{url}{COMPLETIONS}", content=json.dumps(completion()).encode(),
                              headers={**headers, "Content-Type": content_type}, timeout=10)
        if code is None:
            assert response.status_code == 200, response.text
            if "Origin" in headers:
                assert response.headers["access-control-allow-origin"] == headers["Origin"]
        else:
            assert_error(response, status, code=code)
        if status == 403:  # the guard answers /health too (a rebinding page cannot read it either)
            assert httpx.get(f"{url}/health", headers=headers, timeout=10).status_code == 403


def test_allow_host_and_cors_preflight():
    with running(create_app(FakeEngine(), allow_hosts=["box.lan"])) as url:
        assert httpx.get(f"{url}/health", headers={"Host": "box.lan:8000"}).status_code == 200
        preflight = httpx.options(f"{url}{COMPLETIONS}", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert httpx.options(f"{url}{COMPLETIONS}", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}).status_code == 403


def test_api_key_file_and_environment(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# clients\nkey-one\n\n  key-two  \n")
    assert srv.read_api_keys(keys) == ("key-one", "key-two")
    for text, message in (("", "no API key"), ("a b\n", "line 1"), ("k" * 257, "line 1"),
                          ("k\n" * (srv.MAX_API_KEYS + 1), "API keys"), ("é\n", "ASCII")):
        keys.write_text(text)
        with pytest.raises(ValueError, match=message):
            srv.read_api_keys(keys)
    keys.write_bytes(b"k" * (srv.MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="bytes"):
        srv.read_api_keys(keys)
    keys.write_text("key-one\n")
    monkeypatch.setenv("EDGESPEC_API_KEY", "from-env")
    assert srv.api_keys_from(serve_args("--api-key-file", str(keys)), os.environ) == ("key-one",)
    assert srv.api_keys_from(serve_args(), os.environ) == ("from-env",)
    monkeypatch.delenv("EDGESPEC_API_KEY")
    assert srv.api_keys_from(serve_args(), os.environ) == ()


@pytest.mark.parametrize("argv, option", [
    (["--port", "99999"], "--port"), (["--port", "0"], "--port"), (["--port=-1"], "--port"),
    (["--max-queue", "0"], "--max-queue"), (["--body-timeout", "-1"], "--body-timeout"),
    (["--max-connections", "0"], "--max-connections"), (["--threads", "100000"], "--threads"),
    (["--max-context", "0"], "--max-context"), (["--api-key-file", "/nonexistent/keys"], "--api-key-file"),
])
def test_bad_serve_options_are_argparse_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        serve_args(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err


# ==== 4. the dispatcher survives anything ===================================================================
def test_a_base_exception_from_the_engine_is_a_500_and_the_server_carries_on():
    engine = FakeEngine()
    with running(create_app(engine)) as url:
        for prompt in ("panic-at-start", "panic-midway"):
            error = assert_error(post(url, COMPLETIONS, completion(prompt), timeout=10), 500)
            assert "Panic" in error["message"] and error["type"] == "server_error"
        with httpx.stream("POST", f"{url}{COMPLETIONS}", json=completion("panic-midway", stream=True),
                          timeout=10) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "Panic" in json.loads(events[-2])["error"]["message"]
        ok = post(url, COMPLETIONS, completion("fine"), timeout=10)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "w0 w1 w2 "
        assert health(url).json()["status"] == "ok"
        assert len(engine.threads) == 1


def catastrophic_bundle(bundle: Path, folder: Path) -> Path:
    """A copy of `bundle` whose tokenizer pre-splits text with the regular expression `(a+)+$` (catastrophic
    backtracking: the tokenizers library gives up and panics, a pyo3_runtime.PanicException)."""
    out = shutil.copytree(bundle, folder / "catastrophic")
    path = next(out.glob("*/tokenizer.json"))
    spec = json.loads(path.read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False},
        spec["pre_tokenizer"]]}
    path.write_text(json.dumps(spec))
    return out


def test_a_real_tokenizer_panic_is_a_500_and_later_requests_work(bundle, tmp_path):
    engine = tiny_engine(catastrophic_bundle(bundle, tmp_path))
    with pytest.raises(BaseException) as exc:  # the hostile fixture does panic
        engine.encode("a" * 5000 + "!")
    assert not isinstance(exc.value, Exception) and "Panic" in type(exc.value).__name__
    with running(create_app(engine)) as url:
        for path, body in ((COMPLETIONS, {"model": MODEL, "prompt": "a" * 5000 + "!", "max_tokens": 4}),
                           (CHAT, chat("a" * 5000 + "!", max_tokens=4))):
            error = assert_error(post(url, path, body, timeout=20), 500)
            assert "PanicException" in error["message"]
        assert post(url, COMPLETIONS, {"model": MODEL, "prompt": "Hello", "max_tokens": 4}).status_code == 200
        assert health(url).json()["status"] == "ok"


def test_health_tells_the_truth_when_the_dispatcher_is_dead():
    app = create_app(FakeEngine())
    with running(app) as url:
        service = app.state.service
        service.loop.call_soon_threadsafe(service._dispatcher.cancel)
        wait_until(lambda: health(url).status_code == 503, timeout=5, what="health to say failed")
        assert health(url).json()["status"] == "failed" and "dispatcher" in health(url).json()["error"]
        t0 = time.monotonic()
        assert_error(post(url, COMPLETIONS, completion(), timeout=5), 503, code="server_failed")
        assert time.monotonic() - t0 < 1


class ClosingEngine(FakeEngine):
    """An engine whose `close()` reports an unsaved cache the way Engine.close does (a warning)."""

    def close(self):
        import warnings

        warnings.warn("drafter 'ngram' cache not saved: [Errno 28] No space left on device", UserWarning)


def test_caches_not_saved_at_shutdown_give_a_nonzero_exit_status():
    app = create_app(ClosingEngine())
    with running(app) as url:
        assert post(url, COMPLETIONS, completion()).status_code == 200
    service = app.state.service
    assert "not saved" in service.persist_error and service.exit_status() == 1
    healthy = create_app(FakeEngine())
    with running(healthy):
        pass
    assert healthy.state.service.exit_status() == 0


def test_serve_end_to_end_env_key_no_history_and_sigterm_exit_status(bundle, tmp_path):
    """`edgespec serve --shared-cache` with EDGESPEC_API_KEY and EDGESPEC_HISTORY=1: the key works, no history is
    written, and a SIGTERM whose cache save fails exits 1."""
    port = socket.socket()
    port.bind((HOST, 0))
    number = port.getsockname()[1]
    port.close()
    ngram, history = tmp_path / "ngram", tmp_path / "history"
    env = {**os.environ, "EDGESPEC_NGRAM_DIR": str(ngram), "EDGESPEC_HISTORY_DIR": str(history),
           "EDGESPEC_HISTORY": "1", "EDGESPEC_API_KEY": "env-key"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgespec.cli", "serve", "--bundle", str(bundle), "--port",
                                 str(number), "--threads", "1", "--device", "none", "--max-context", "256",
                                 "--log-level", "warning", "--shared-cache"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    url = f"http://{HOST}:{number}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if health(url).status_code == 200:
                    break
            time.sleep(0.1)
        body = {"model": MODEL, "prompt": SECRET, "max_tokens": 8}
        assert_error(post(url, COMPLETIONS, body), 401, code="invalid_api_key")
        assert post(url, COMPLETIONS, body, {"Authorization": "Bearer env-key"}).status_code == 200
        assert list(ngram.glob("*.npz"))  # --shared-cache keeps the persistent cache...
        shutil.rmtree(ngram)
        ngram.write_text("not a folder")  # ...which now cannot be saved
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "not saved" in text and "Traceback" not in text
    assert not history.exists() or not any(history.rglob("*"))


def test_prompt_text_is_bounded_by_the_context_before_tokenizing():
    engine = FakeEngine()  # context 512: at most 16 x 512 characters
    limit = srv.text_limit(engine)
    assert limit == srv.PROMPT_CHARS_PER_TOKEN * engine.context_length == 8192
    with running(create_app(engine)) as url:
        assert post(url, COMPLETIONS, completion("x" * limit)).status_code == 200
        assert_error(post(url, COMPLETIONS, completion("x" * (limit + 1))), 400, "prompt", "string_above_max_length")
        body = {"model": "fake", "messages": [{"role": "user", "content": "x" * (limit // 2)}] * 2}
        assert post(url, CHAT, body).status_code == 200
        body["messages"].append({"role": "user", "content": "x"})
        assert_error(post(url, CHAT, body), 400, "messages", "string_above_max_length")
    assert srv.text_limit(SimpleNamespace()) == srv.MAX_TEXT_CHARS
