"""`edgespec serve`: the OpenAI-compatible server on tiny bundles (and a slow fake engine for queueing, cancellation
and failures). Servers bind 127.0.0.1 only: uvicorn in a background thread, or `edgespec serve` in a subprocess for
the SIGTERM and load tests."""

from __future__ import annotations

import contextlib
import json
import os
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
openai = pytest.importorskip("openai")

import edgespec  # noqa: E402
from edgespec.engine import GenerationResult, GenerationStats  # noqa: E402
from edgespec.server import create_app  # noqa: E402

HOST = "127.0.0.1"
MODEL = "tiny-qwen2"
LIMIT = 256  # max_tokens_limit of the main test server
EXTENSION_KEYS = {"drafter", "tokens_per_second", "mean_accepted_tokens", "drafted_tokens", "accepted_tokens",
                  "acceptance_rate", "steps", "time_to_first_token", "queue_seconds"}


# ---- helpers ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn in a background thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on"))
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def assert_error(response, status: int, param=None, code=None, type_="invalid_request_error") -> dict:
    """The response is an OpenAI-shaped error with this status (and param / code when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_, error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


class FakeEngine:
    """A duck-typed engine with no model: each generation emits `pieces` pieces `delay` seconds apart. Prompts
    "fail-at-start" / "fail-midway" raise. Records prompts, pieces, closes and the threads it was called from."""

    context_length = 512

    def __init__(self, delay: float = 0.02, pieces: int = 20):
        self.entry = SimpleNamespace(name="fake")
        self.delay, self.pieces = delay, pieces
        self.prompts: list[str] = []
        self.produced: dict[str, int] = {}
        self.closed: dict[str, threading.Event] = {}
        self.cancel_flags: dict[str, object] = {}  # the `cancel` flag each generation got (the engine checks it)
        self.threads: set[int] = set()

    def render_chat(self, messages):
        self.threads.add(threading.get_ident())
        return messages[-1]["content"]

    def stream(self, prompt, **options):
        self.threads.add(threading.get_ident())
        if prompt == "fail-at-start":
            raise RuntimeError("no engine today")
        self.prompts.append(prompt)
        self.produced[prompt], self.closed[prompt] = 0, threading.Event()
        self.cancel_flags[prompt] = options.pop("cancel", None)
        return self._generate(prompt, min(self.pieces, options["max_new_tokens"]))

    def _generate(self, prompt, n):
        try:
            for i in range(n):
                if prompt == "fail-midway" and i == 2:
                    raise RuntimeError("engine exploded")
                time.sleep(self.delay)
                self.produced[prompt] += 1
                yield f"w{i} "
        finally:
            self.closed[prompt].set()
        stats = GenerationStats(prompt_tokens=3, new_tokens=n, steps=n, drafter="fake")
        return GenerationResult("", list(range(n)), "length", stats)


def post(url: str, path: str, body, **kwargs):
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{url}{path}", content=body, headers={"Content-Type": "application/json"},
                          timeout=kwargs.pop("timeout", 30), **kwargs)
    return httpx.post(f"{url}{path}", json=body, timeout=kwargs.pop("timeout", 30), **kwargs)


def chat_body(content="Hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


# ---- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["qwen2"]


@pytest.fixture(scope="module")
def reference(bundle):
    """Plain greedy decoding of the same bundle: what every greedy answer must equal."""
    return edgespec.load(bundle, threads=1, drafter=None, history=False)


@pytest.fixture(scope="module")
def live(bundle):
    """The app on a speculative (n-gram) engine of the tiny bundle."""
    engine = edgespec.load(bundle, threads=1, ngram_cache=False, history=False)
    app = create_app(engine, max_tokens_limit=LIMIT)
    with running(app) as url:
        yield SimpleNamespace(url=url, engine=engine, app=app)


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


# ---- happy paths -----------------------------------------------------------------------------------------------
def test_health_and_models(live, client):
    h = health(live.url)
    assert h["status"] == "ok" and h["model"] == MODEL
    assert h["queue_depth"] == 0 and h["in_flight"] == 0 and h["max_queue"] == 64
    assert h["peak_rss_bytes"] > 0
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("extra", [{}, {"ignore_eos": True}])
def test_chat_equals_engine_greedy_output(live, client, reference, extra):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Berlin?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                          extra_body=extra or None)
    expected = reference.generate(reference.render_chat(messages), max_new_tokens=24, **extra)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    if extra:
        assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == expected.stats.prompt_tokens
    assert resp.usage.completion_tokens == expected.stats.new_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    ext = resp.model_extra["edgespec"]
    assert EXTENSION_KEYS <= set(ext)
    assert ext["drafter"] == "ngram" and ext["steps"] >= 1 and ext["queue_seconds"] >= 0
    assert ext["accepted_tokens"] <= ext["drafted_tokens"]


def test_chat_streaming_equals_non_streaming(live, client, reference):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    expected = reference.generate(reference.render_chat(messages), max_new_tokens=20, ignore_eos=True)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    assert EXTENSION_KEYS <= set(finishing[0].model_extra["edgespec"])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == expected.stats.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_client_example_script_against_the_server(live):
    """examples/openai_client.py (the official client, as a mobile backend uses it) prints the transcript with the
    speculation stats, and its streamed answer equals the non-streamed one."""
    script = Path(__file__).resolve().parents[1] / "examples" / "openai_client.py"
    done = subprocess.run([sys.executable, str(script), "--url", f"{live.url}/v1", "--max-tokens", "12"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "identical to non-streaming: True" in done.stdout
    stats = [json.loads(line[len("edgespec: "):]) for line in done.stdout.splitlines() if line.startswith("edgespec: ")]
    assert len(stats) == 3 and all(s["drafter"] == "ngram" and s["steps"] >= 1 for s in stats)


def test_completions_text_and_token_ids(live, client, reference):
    expected = reference.generate("The quick brown fox", max_new_tokens=12)
    resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    assert resp.usage.completion_tokens == expected.stats.new_tokens
    assert "edgespec" in resp.model_extra
    ids = reference.encode("def add(a, b):")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == reference.generate(ids, max_new_tokens=12).text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_completions_streaming(live, client, reference):
    expected = reference.generate("Berlin is", max_new_tokens=16, ignore_eos=True)
    chunks = list(client.completions.create(model=MODEL, prompt="Berlin is", max_tokens=16, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length" and "edgespec" in chunks[-1].model_extra


def test_default_max_tokens_for_completions_is_16(live, client):
    resp = client.completions.create(model=MODEL, prompt="The quick", temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16


def test_stop_strings(live, client, reference):
    full = reference.generate("The quick brown fox", max_new_tokens=24, ignore_eos=True).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("no usable stop string in this output")
    expected = reference.generate("The quick brown fox", max_new_tokens=24, ignore_eos=True, stop=[stop])
    for form in (stop, [stop, "@@never@@"]):
        resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0,
                                         stop=form, extra_body={"ignore_eos": True})
        assert resp.choices[0].text == expected.text and resp.choices[0].finish_reason == "stop"
        assert stop not in resp.choices[0].text


def test_seeded_sampling_is_reproducible(live, client):
    kwargs = dict(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


# ---- errors ----------------------------------------------------------------------------------------------------
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = [
    (CHAT, b"{not json", 400, None, "invalid_json"),
    (CHAT, b"[1, 2]", 400, None, "invalid_json"),
    (CHAT, b'{"model": "tiny-qwen2", "messages": [], "temperature": NaN}', 400, None, "invalid_json"),
    (CHAT, {"messages": [{"role": "user", "content": "Hi"}]}, 400, "model", "missing_required_parameter"),
    (CHAT, {"model": 3, "messages": [{"role": "user", "content": "Hi"}]}, 400, "model", None),
    (CHAT, {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    (CHAT, {"model": MODEL, "messages": "Hi"}, 400, "messages", None),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", None),
    (CHAT, {"model": MODEL, "messages": ["Hi"]}, 400, "messages[0]", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role", None),
    (CHAT, {"model": MODEL, "messages": [{"content": "Hi"}]}, 400, "messages[0].role", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0]", None),
    (CHAT, chat_body(max_tokens=0), 400, "max_tokens", None),
    (CHAT, chat_body(max_tokens=-5), 400, "max_tokens", None),
    (CHAT, chat_body(max_tokens="8"), 400, "max_tokens", None),
    (CHAT, chat_body(max_tokens=2.5), 400, "max_tokens", None),
    (CHAT, chat_body(max_tokens=True), 400, "max_tokens", None),
    (CHAT, chat_body(max_tokens=LIMIT + 1), 400, "max_tokens", None),
    (CHAT, chat_body(max_completion_tokens=0), 400, "max_completion_tokens", None),
    (CHAT, chat_body(temperature=-0.1), 400, "temperature", None),
    (CHAT, chat_body(temperature=2.5), 400, "temperature", None),
    (CHAT, chat_body(temperature="hot"), 400, "temperature", None),
    (CHAT, chat_body(temperature=10 ** 400), 400, "temperature", None),  # an int too large for a float
    (CHAT, chat_body(top_p=0), 400, "top_p", None),
    (CHAT, chat_body(top_p=1.5), 400, "top_p", None),
    (CHAT, chat_body(n=2), 400, "n", None),
    (CHAT, chat_body(seed=-1), 400, "seed", None),
    (CHAT, chat_body(stop=[""]), 400, "stop", None),
    (CHAT, chat_body(stop=3), 400, "stop", None),
    (CHAT, chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (CHAT, chat_body(stream="yes"), 400, "stream", None),
    (CHAT, chat_body(stream_options={"include_usage": True}), 400, "stream_options", None),
    (CHAT, chat_body(top_logprobs=3), 400, "top_logprobs", None),  # needs logprobs: true
    (CHAT, chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    (CHAT, chat_body(tools=[{"type": "function"}]), 400, "tools", "unsupported_parameter"),
    (CHAT, chat_body(model="gpt-4o"), 404, "model", "model_not_found"),
    (CHAT, chat_body("xq " * 1500), 400, "messages", "context_length_exceeded"),
    (COMPLETIONS, {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    (COMPLETIONS, {"model": MODEL, "prompt": {"text": "Hi"}}, 400, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": ["Hi", "there"]}, 400, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": [10 ** 6]}, 400, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "xq " * 1500}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "echo": True}, 400, "echo", "unsupported_parameter"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS,
                         ids=[f"{i}-{case[0].rsplit('/', 1)[-1]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(live, path, body, status, param, code):
    assert_error(post(live.url, path, body), status, param, code)
    assert health(live.url)["status"] == "ok"
    ok = post(live.url, CHAT, chat_body())
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_body_too_large_unknown_routes_and_methods(live):
    assert_error(post(live.url, CHAT, {"model": MODEL, "junk": "x" * (5 * 2 ** 20)}), 413,
                 code="request_too_large")
    assert_error(httpx.get(f"{live.url}/v1/nothing-here"), 404, code="not_found")
    assert_error(httpx.get(f"{live.url}{CHAT}"), 405, code="method_not_allowed")
    assert health(live.url)["status"] == "ok"


def test_openai_client_sees_the_error_codes(live, client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="xq " * 1500, max_tokens=4)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=3)
    assert exc.value.param == "temperature"


def test_api_key():
    engine = FakeEngine(delay=0, pieces=3)
    with running(create_app(engine, api_key="sekrit")) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # open
        assert_error(httpx.get(f"{url}/v1/models"), 401, code="invalid_api_key")
        assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401,
                     code="invalid_api_key")
        assert_error(post(url, COMPLETIONS, {"model": "fake", "prompt": "Hi"}), 401, code="invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model="fake", prompt="Hi", max_tokens=3).choices[0].text == "w0 w1 w2 "


def test_engine_failures_are_500_and_the_server_stays_up():
    engine = FakeEngine(delay=0, pieces=5)
    with running(create_app(engine)) as url:
        for prompt in ("fail-at-start", "fail-midway"):
            assert_error(post(url, COMPLETIONS, {"model": "fake", "prompt": prompt}), 500, type_="server_error")
        with httpx.stream("POST", f"{url}{COMPLETIONS}", json={"model": "fake", "prompt": "fail-midway",
                                                               "stream": True}) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        ok = post(url, COMPLETIONS, {"model": "fake", "prompt": "fine"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "w0 w1 w2 w3 w4 "
        assert len(engine.threads) == 1  # only the worker thread ever touched the engine


# ---- queueing, cancellation, time limits -----------------------------------------------------------------------
def _in_background(fn, *args, **kwargs) -> dict:
    """Run fn in a thread; the returned dict gets "result" (or "error") when it finishes."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def test_full_queue_answers_429_at_once():
    engine = FakeEngine(delay=0.1, pieces=20)  # two seconds per request
    with running(create_app(engine, max_queue=1)) as url:
        first = _in_background(post, url, COMPLETIONS, {"model": "fake", "prompt": "A", "max_tokens": 20})
        wait_until(lambda: health(url)["in_flight"] == 1, what="A in flight")
        second = _in_background(post, url, COMPLETIONS, {"model": "fake", "prompt": "B", "max_tokens": 20})
        wait_until(lambda: health(url)["queue_depth"] == 1, what="B queued")
        t0 = time.monotonic()
        third = post(url, COMPLETIONS, {"model": "fake", "prompt": "C", "max_tokens": 20})
        assert time.monotonic() - t0 < 0.5
        assert_error(third, 429, code="queue_full", type_="rate_limit_error")
        assert third.headers.get("retry-after") == "1"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
                model="fake", prompt="D", max_tokens=20)
        for box in (first, second):
            box["thread"].join(10)
            assert box["result"].status_code == 200
        assert engine.prompts == ["A", "B"]
        ext = second["result"].json()["edgespec"]
        assert ext["queue_seconds"] > 0.3  # B waited for A


def test_streaming_client_disconnect_cancels_generation():
    engine = FakeEngine(delay=0.02, pieces=500)  # ten seconds if not cancelled
    with running(create_app(engine)) as url:
        with httpx.stream("POST", f"{url}{CHAT}", json={"model": "fake", "stream": True, "max_tokens": 500,
                                                        "messages": [{"role": "user", "content": "long"}]},
                          timeout=30) as response:
            received = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received += 1
                    if received == 3:
                        break
        assert engine.closed["long"].wait(5), "generation was not stopped"
        assert engine.produced["long"] < 100
        assert engine.cancel_flags["long"].is_set()  # the real engine also checks it between prefill chunks
        wait_until(lambda: health(url)["in_flight"] == 0, what="worker idle")
        assert post(url, COMPLETIONS, {"model": "fake", "prompt": "next", "max_tokens": 2}).status_code == 200


def test_queued_request_whose_client_left_is_skipped():
    engine = FakeEngine(delay=0.05, pieces=20)
    with running(create_app(engine)) as url:
        first = _in_background(post, url, COMPLETIONS, {"model": "fake", "prompt": "A", "max_tokens": 20})
        wait_until(lambda: health(url)["in_flight"] == 1, what="A in flight")
        with pytest.raises(httpx.TimeoutException):
            post(url, COMPLETIONS, {"model": "fake", "prompt": "gone", "max_tokens": 20}, timeout=0.3)
        first["thread"].join(10)
        assert first["result"].status_code == 200
        assert post(url, COMPLETIONS, {"model": "fake", "prompt": "after", "max_tokens": 2}).status_code == 200
        assert engine.prompts == ["A", "after"]


def test_request_timeout_is_504_and_stops_the_generation():
    engine = FakeEngine(delay=0.05, pieces=200)
    with running(create_app(engine, request_timeout=0.3)) as url:
        assert_error(post(url, COMPLETIONS, {"model": "fake", "prompt": "slow", "max_tokens": 200}), 504,
                     code="request_timeout", type_="server_error")
        assert engine.closed["slow"].wait(5) and engine.produced["slow"] < 50


class ClosableFakeEngine(FakeEngine):
    """A fake engine with `close()` (what the server calls at shutdown to persist caches)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.close_threads: list[int] = []

    def close(self):
        self.close_threads.append(threading.get_ident())


def test_graceful_app_shutdown_lets_the_request_in_flight_finish_then_closes_the_engine():
    engine = ClosableFakeEngine(delay=0.03, pieces=20)
    with running(create_app(engine)) as url:
        box = _in_background(post, url, COMPLETIONS, {"model": "fake", "prompt": "A", "max_tokens": 20})
        wait_until(lambda: engine.produced.get("A", 0) > 0, what="A started")
    box["thread"].join(10)
    assert box["result"].status_code == 200 and box["result"].json()["choices"][0]["text"].count("w") == 20
    assert len(engine.close_threads) == 1 and engine.threads == set(engine.close_threads)  # on the engine thread


def test_shutdown_answers_queued_requests_503_and_cancels_past_the_grace_period():
    engine = FakeEngine(delay=0.05, pieces=200)  # ten seconds: longer than the grace period
    app = create_app(engine, shutdown_grace=0.3)

    def stream_lines(url):
        with httpx.stream("POST", f"{url}{COMPLETIONS}", json={"model": "fake", "prompt": "A", "max_tokens": 200,
                                                               "stream": True}, timeout=30) as response:
            return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]

    with running(app) as url:
        first = _in_background(stream_lines, url)
        wait_until(lambda: health(url)["in_flight"] == 1, what="A in flight")
        second = _in_background(post, url, COMPLETIONS, {"model": "fake", "prompt": "B", "max_tokens": 5})
        wait_until(lambda: health(url)["queue_depth"] == 1, what="B queued")
        app.state.service.begin_shutdown_threadsafe()  # what SIGTERM does first
        second["thread"].join(10)
        assert_error(second["result"], 503, code="server_shutting_down", type_="server_error")
        assert health(url)["status"] == "draining"
        assert_error(post(url, COMPLETIONS, {"model": "fake", "prompt": "C"}), 503, code="server_shutting_down",
                     type_="server_error")
        first["thread"].join(10)
        events = first["result"]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "server_shutting_down"
        assert engine.closed["A"].wait(5) and engine.produced["A"] < 100
    assert engine.prompts == ["A"]


# ---- the command line: SIGTERM and the load test -------------------------------------------------------------
def _serve(bundle, tmp_path, *extra) -> tuple[subprocess.Popen, str]:
    """`edgespec serve` in a subprocess (its own n-gram cache folder); returns it and its URL once healthy."""
    port = free_port()
    env = {**os.environ, "EDGESPEC_NGRAM_DIR": str(tmp_path / "ngram"), "EDGESPEC_HISTORY": "0"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgespec.cli", "serve", "--bundle", str(bundle), "--host",
                                 HOST, "--port", str(port), "--threads", "1", "--device", "none", "--max-context",
                                 "256", "--log-level", "warning", *extra],
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "server did not come up"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.2)


def test_sigterm_during_a_request_exits_0_and_keeps_the_ngram_cache(bundle, tmp_path):
    proc, url = _serve(bundle, tmp_path, "--shared-cache")  # the persistent n-gram cache is opt-in (issue 19)
    try:
        body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0,
                "stream": True, "ignore_eos": True}
        finish, signalled = None, False
        with httpx.stream("POST", f"{url}{COMPLETIONS}", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if not signalled:
                    proc.send_signal(signal.SIGTERM)  # at the first chunk: the request is in flight
                    signalled = True
                if line == "data: [DONE]":
                    break
                choices = json.loads(line[6:]).get("choices") or [{}]
                finish = choices[0].get("finish_reason") or finish
        assert finish == "length"  # the request in flight was allowed to finish
        assert proc.wait(60) == 0, proc.log.read_text()
        assert "http://127.0.0.1:" in proc.log.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    caches = list((tmp_path / "ngram").glob("*.npz"))
    assert caches, f"no n-gram cache in {tmp_path / 'ngram'}"


@pytest.mark.slow
def test_load_test_32_clients_identical_to_single_client_output(bundle, tmp_path):
    from edgespec.loadtest import run_load_test

    proc, url = _serve(bundle, tmp_path)
    try:
        report = run_load_test(url, clients=32, requests_per_client=20, max_tokens=16, server_pid=proc.pid,
                               timeout=120)
        assert report["requests"] == 640 and report["streaming_requests"] == 320
        assert report["error_count"] == 0, report["error_examples"]
        assert report["mismatches"] == 0, report["mismatch_examples"]
        assert report["identical_to_reference"] == 640
        assert report["server_peak_rss_bytes"] > 0 and report["server_rss_source"].startswith("/proc/")
        lat = report["latency_seconds"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
        out = tmp_path / "report.json"
        from edgespec.cli import main

        assert main(["serve-bench", "--url", url, "-c", "2", "-r", "2", "--max-tokens", "4", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["requests"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_does_not_import_the_server_dependencies():
    code = ("import sys, edgespec, edgespec.cli; edgespec.cli.build_parser(); "
            "bad = [m for m in ('starlette', 'uvicorn', 'httpx', 'openai') if m in sys.modules]; "
            "assert not bad, bad; print('CLEAN')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "CLEAN" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "edgespec.cli", "serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--api-key" in proc.stdout and "127.0.0.1" in proc.stdout
