"""`edgespec serve` conventions of other OpenAI-compatible servers (issue 20): Prometheus metrics at /metrics
(`--metrics`), a CORS allow-list (`--cors-origin`, the same list as the Origin guard's `--allow-origin`), model cards
with the context length and the bundle's creation time, and model aliases (any case, the target's and the
folder's names, `--alias`). Servers bind 127.0.0.1 only: uvicorn in a background thread."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
prometheus_client = pytest.importorskip("prometheus_client")

import edgespec  # noqa: E402
from edgespec import server as srv  # noqa: E402
from edgespec.engine import GenerationResult, GenerationStats  # noqa: E402
from edgespec.server import create_app  # noqa: E402

HOST = "127.0.0.1"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
SECRET = "SECRET-PROMPT-7f3a"  # must never show up in the metrics
PAGE = "https://app.example"


# ---- helpers ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running(app):
    """Serve `app` with the server's own uvicorn config in a background thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(srv.server_config(app, HOST, port, log_level="warning"))
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


class StatsEngine:
    """A duck-typed engine with no model: `pieces` pieces per generation, and GenerationStats with speculation
    figures derived from the piece count (2 drafted per token, tau 2)."""

    context_length = 512

    def __init__(self, pieces: int = 6, bundle_path: str | None = None):
        self.entry = SimpleNamespace(name="fake")
        self.pieces = pieces
        if bundle_path is not None:
            self.bundle_path = bundle_path

    def render_chat(self, messages):
        return messages[-1]["content"]

    def stream(self, prompt, **options):
        n = min(self.pieces, options["max_new_tokens"])
        return self._generate(n)

    def _generate(self, n):
        for i in range(n):
            yield f"w{i} "
        steps = max(1, n // 2)
        stats = GenerationStats(prompt_tokens=3, new_tokens=n, steps=steps, drafted_tokens=2 * n,
                                accepted_tokens=n - steps, drafter="fake", time_to_first_token=0.004,
                                decode_seconds=0.002 * (n - 1), total_seconds=0.004 + 0.002 * (n - 1))
        return GenerationResult("", list(range(n)), "length", stats)


def post(url: str, path: str, body: dict, headers=None, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=timeout)


def assert_error(response, status: int, code=None) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def samples(text: str) -> dict:
    """Prometheus text -> {(sample name, ((label, value), ...)): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(url: str, headers=None) -> dict:
    response = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert SECRET not in response.text and "alice" not in response.text
    return samples(response.text)


def requests_count(found: dict, endpoint: str, status: int) -> float:
    return found.get(("edgespec_requests_total", (("endpoint", endpoint), ("status", str(status)))), 0.0)


def serve_args(*argv):
    from edgespec.cli import build_parser

    return build_parser().parse_args(["serve", "--bundle", "b", *argv])


# ---- 1. metrics ----------------------------------------------------------------------------------------------
def test_metrics_are_off_unless_asked_for_and_say_how_to_turn_them_on():
    with running(create_app(StatsEngine())) as url:
        error = assert_error(httpx.get(f"{url}/metrics", timeout=10), 404, "not_found")
        assert "--metrics" in error["message"] and "edgespec[metrics]" in error["message"]
    assert serve_args().metrics is False and serve_args("--metrics").metrics is True


def test_metrics_count_requests_tokens_latencies_and_speculation():
    engine = StatsEngine(pieces=6)
    with running(create_app(engine, metrics=True, allow_origins=[PAGE])) as url:
        before = scrape(url)
        assert before[("edgespec_queue_depth", ())] == 0 and before[("edgespec_in_flight", ())] == 0
        assert before[("edgespec_generated_tokens_total", ())] == 0
        body = {"model": "fake", "prompt": SECRET, "max_tokens": 8, "user": "alice"}
        assert post(url, COMPLETIONS, body).status_code == 200
        with httpx.stream("POST", f"{url}{COMPLETIONS}", json={**body, "stream": True, "max_tokens": 4},
                          timeout=10) as response:
            assert response.status_code == 200 and list(response.iter_lines())
        chat = {"model": "fake", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 8}
        assert post(url, CHAT, chat).status_code == 200
        assert_error(post(url, COMPLETIONS, {**body, "model": "other"}), 404, "model_not_found")
        assert_error(post(url, COMPLETIONS, body, headers={"Origin": "https://evil.example"}), 403)
        assert_error(httpx.get(f"{url}/nowhere/{SECRET}", timeout=10), 404)
        found = scrape(url)
    assert requests_count(found, COMPLETIONS, 200) == 2 and requests_count(found, CHAT, 200) == 1
    assert requests_count(found, COMPLETIONS, 404) == 1
    assert requests_count(found, COMPLETIONS, 403) == 1  # the guard's refusals are counted too
    assert requests_count(found, "other", 404) == 1  # any unknown path is one label: the label set stays closed
    assert requests_count(found, "/metrics", 200) == 1  # the first scrape (this one is counted once answered)
    tokens = 6 + 4 + 6  # pieces of the three generations
    steps = 3 + 2 + 3
    assert found[("edgespec_generated_tokens_total", ())] == tokens
    assert found[("edgespec_prompt_tokens_total", ())] == 3 * 3
    assert found[("edgespec_target_steps_total", ())] == steps
    assert found[("edgespec_drafted_tokens_total", ())] == 2 * tokens
    assert found[("edgespec_accepted_tokens_total", ())] == tokens - steps
    assert found[("edgespec_generations_total", (("finish_reason", "length"),))] == 3
    assert found[("edgespec_accepted_tokens_per_step_count", ())] == 3
    assert found[("edgespec_accepted_tokens_per_step_sum", ())] == pytest.approx(6.0)  # tau 2 each
    assert found[("edgespec_accepted_tokens_per_step_bucket", (("le", "1.75"),))] == 0
    assert found[("edgespec_accepted_tokens_per_step_bucket", (("le", "2.0"),))] == 3
    assert found[("edgespec_time_per_output_token_seconds_count", ())] == 3
    assert found[("edgespec_time_per_output_token_seconds_sum", ())] == pytest.approx(3 * 0.002)
    assert found[("edgespec_time_to_first_token_seconds_count", ())] == 3
    assert found[("edgespec_time_to_first_token_seconds_sum", ())] >= 3 * 0.004  # queue wait + the engine's
    assert found[("edgespec_queue_wait_seconds_count", ())] == 3
    assert found[("edgespec_in_flight", ())] == 0 and found[("edgespec_waiting_requests", ())] == 0


def test_metrics_need_the_api_key_and_pass_the_host_and_origin_guard():
    with running(create_app(StatsEngine(), api_key="k1", metrics=True)) as url:
        assert_error(httpx.get(f"{url}/metrics", timeout=10), 401, "invalid_api_key")
        assert scrape(url, {"Authorization": "Bearer k1"})[("edgespec_in_flight", ())] == 0
        refused = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k1", "Host": "evil.example"})
        assert_error(refused, 403, "forbidden_host")


def test_each_app_has_its_own_registry_never_the_global_one():
    first, second = create_app(StatsEngine(), metrics=True), create_app(StatsEngine(), metrics=True)
    assert first.state.metrics.registry is not second.state.metrics.registry
    assert first.state.metrics.registry is not prometheus_client.REGISTRY
    assert prometheus_client.REGISTRY.get_sample_value("edgespec_generated_tokens_total") is None
    with running(first) as url:
        assert post(url, COMPLETIONS, {"model": "fake", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert first.state.metrics.registry.get_sample_value("edgespec_generated_tokens_total") == 2
    assert second.state.metrics.registry.get_sample_value("edgespec_generated_tokens_total") == 0


def test_metrics_without_prometheus_client_name_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if it were not installed
    with pytest.raises(RuntimeError, match=r"edgespec\[metrics\]"):
        create_app(StatsEngine(), metrics=True)
    create_app(StatsEngine())  # without --metrics nothing needs it
    from edgespec.cli import main

    import edgespec.engine

    monkeypatch.setattr(edgespec.engine, "load", lambda *a, **k: pytest.fail("loaded before checking --metrics"))
    assert main(["serve", "--bundle", str(tmp_path), "--metrics"]) == 2
    err = capsys.readouterr().err
    assert "--metrics needs prometheus_client" in err and "edgespec[metrics]" in err and "Traceback" not in err


def test_serve_passes_metrics_aliases_and_cors_origins(monkeypatch):
    import edgespec.engine

    calls = []
    monkeypatch.setattr(edgespec.engine, "load", lambda *a, **k: StatsEngine())
    monkeypatch.setattr(srv, "serve", lambda engine, **k: calls.append(k) or 0)
    args = serve_args("--metrics", "--alias", "gpt-4o", "--alias", "mini", "--cors-origin", "https://A.example/",
                      "--allow-origin", "http://b.example:8080")
    assert srv.cmd_serve(args) == 0
    assert calls[0]["metrics"] is True and calls[0]["aliases"] == ("gpt-4o", "mini")
    assert calls[0]["allow_origins"] == ("https://a.example", "http://b.example:8080")


# ---- 2. CORS allow-list --------------------------------------------------------------------------------------
def preflight(url: str, origin: str, headers: str = "content-type,authorization") -> httpx.Response:
    return httpx.options(f"{url}{CHAT}", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": headers}, timeout=10)


def test_cors_preflight_is_answered_only_for_listed_origins():
    engine = StatsEngine()
    with running(create_app(engine, allow_origins=srv.web_origins([PAGE + "/"]))) as url:
        allowed = preflight(url, PAGE, "content-type,authorization,x-stainless-os,x-stainless-lang")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == PAGE
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "x-stainless-os" in allowed.headers["access-control-allow-headers"].lower()  # the openai JS client
        for origin in ("https://evil.example", "https://app.example.evil.example", "http://app.example", "null"):
            refused = preflight(url, origin)
            assert_error(refused, 403, "forbidden_origin")
            assert "access-control-allow-origin" not in refused.headers
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answer = post(url, CHAT, body, headers={"Origin": PAGE})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == PAGE
        plain = post(url, CHAT, body)  # not a browser: no CORS headers
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
        assert preflight(url, "http://localhost:5173").headers["access-control-allow-origin"] == \
            "http://localhost:5173"  # pages on this machine, as before


def test_cors_origin_option_is_the_guards_allow_list_and_bounded(capsys):
    assert serve_args("--cors-origin", PAGE).allow_origin == [PAGE]
    at_limit = [arg for i in range(srv.MAX_ORIGINS) for arg in ("--cors-origin", f"https://h{i}.example")]
    assert len(serve_args(*at_limit).allow_origin) == srv.MAX_ORIGINS
    for argv, message in (([*at_limit, "--allow-origin", "https://one-more.example"], "at most 64"),
                          (["--cors-origin", "app.example"], "not a web origin"),
                          (["--cors-origin", "https://app.example/path"], "not a web origin"),
                          (["--cors-origin", "https://" + "a" * 510], "1 to 512 characters")):
        with pytest.raises(SystemExit) as exc:
            serve_args(*argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--cors-origin" in err and message in err and "Traceback" not in err
    assert srv.check_origin("http://[::1]:3000") == "http://[::1]:3000" and srv.check_origin("*") == "*"
    with pytest.raises(ValueError, match="at most 64"):
        create_app(StatsEngine(), allow_origins=[f"https://h{i}.example" for i in range(srv.MAX_ORIGINS + 1)])
    with pytest.raises(ValueError, match="not a web origin"):
        create_app(StatsEngine(), allow_origins=["ftp://files.example"])


# ---- 3 and 4. model cards and aliases on a real tiny bundle ---------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles["qwen2"]


@pytest.fixture(scope="module")
def live(bundle):
    engine = edgespec.load(bundle, threads=1, ngram_cache=False, history=False, max_context=256)
    app = create_app(engine, metrics=True, aliases=["my-assistant"])
    with running(app) as url:
        yield SimpleNamespace(url=url, engine=engine, app=app)


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_model_card_has_the_context_length_and_the_bundles_creation_time(live, client, bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    created = int(dt.datetime.fromisoformat(manifest["created_at"]).timestamp())
    card = httpx.get(f"{live.url}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == "tiny-qwen2" and card["created"] == created
    assert card["context_length"] == card["max_model_len"] == live.engine.context_length == 256
    assert card["aliases"] == ["qwen2", "my-assistant"]  # the folder's name, then --alias
    assert client.models.retrieve("TINY-QWEN2").created == created


def test_created_falls_back_to_the_manifest_files_time_then_the_start_time(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "fake"}))  # no created_at
    os.utime(tmp_path / "manifest.json", (1_700_000_000, 1_700_000_000))
    assert srv.bundle_created_time(StatsEngine(bundle_path=str(tmp_path)), 5) == 1_700_000_000
    (tmp_path / "manifest.json").write_text(json.dumps({"created_at": "2024-05-01T12:00:00+00:00"}))
    assert srv.bundle_created_time(StatsEngine(bundle_path=str(tmp_path)), 5) == 1_714_564_800
    (tmp_path / "manifest.json").write_text(json.dumps({"created_at": "yesterday"}))
    os.utime(tmp_path / "manifest.json", (1_600_000_000, 1_600_000_000))
    assert srv.bundle_created_time(StatsEngine(bundle_path=str(tmp_path)), 5) == 1_600_000_000
    assert srv.bundle_created_time(StatsEngine(bundle_path=str(tmp_path / "gone")), 5) == 5
    before = int(time.time())
    app = create_app(StatsEngine())  # no bundle folder: when the app was made (not 0, not each request's time)
    with running(app) as url:
        time.sleep(1.1)
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert before <= card["created"] <= before + 1 and card["context_length"] == 512


@pytest.mark.parametrize("name", ["tiny-qwen2", "Tiny-Qwen2", "qwen2", "QWEN2", "my-assistant", "My-Assistant"])
def test_any_alias_in_any_case_gets_the_same_answer(live, client, name):
    messages = [{"role": "user", "content": "What is Berlin?"}]
    expected = client.chat.completions.create(model="tiny-qwen2", messages=messages, max_tokens=8, temperature=0)
    answer = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.model == "tiny-qwen2"  # the id, whatever name the client used
    assert client.models.retrieve(name).id == "tiny-qwen2"


def test_an_unknown_model_is_openais_404_naming_the_served_ones(live, client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    error = exc.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    for name in ("'tiny-qwen2'", "'qwen2'", "'my-assistant'", "'gpt-4o'"):
        assert name in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("qwen")  # a prefix is not a name


def test_aliases_are_bounded():
    at_limit = [f"alias-{i}" for i in range(srv.MAX_ALIASES)]
    names = srv.model_names(StatsEngine(), None, at_limit)
    assert names.id == "fake" and names.aliases == tuple(at_limit)
    assert srv.model_names(StatsEngine(), "served", ["FAKE", "Served", "x"]).aliases == ("fake", "x")  # no twins
    with pytest.raises(ValueError, match="at most 16"):
        srv.model_names(StatsEngine(), None, at_limit + ["one-more"])
    assert srv.check_alias("a" * srv.MAX_NAME_CHARS)
    for bad in ("", "a" * (srv.MAX_NAME_CHARS + 1), "tab\there", 7):
        with pytest.raises(ValueError, match="1 to 256 printable"):
            create_app(StatsEngine(), aliases=[bad])
    argv = [arg for name in at_limit for arg in ("--alias", name)]
    assert serve_args(*argv).alias == at_limit
    with pytest.raises(SystemExit):
        serve_args(*argv, "--alias", "one-more")
    with pytest.raises(SystemExit):
        serve_args("--alias", "a" * 257)


def test_parse_request_with_a_plain_id_keeps_matching_it_and_any_case():
    body = {"model": "FAKE", "prompt": "hi"}
    assert srv.parse_request(body, "completion", "fake", None, 16).prompt == "hi"
    with pytest.raises(srv.APIError) as exc:
        srv.parse_request({**body, "model": "fak"}, "completion", "fake", None, 16)
    assert exc.value.status == 404 and exc.value.code == "model_not_found"


def test_metrics_of_a_real_generation_equal_its_extension_field(live, client):
    registry = live.app.state.metrics.registry
    base = {name: registry.get_sample_value(f"edgespec_{name}_total") or 0.0
            for name in ("generated_tokens", "drafted_tokens", "accepted_tokens", "target_steps")}
    answer = client.completions.create(model="qwen2", prompt="def add(a, b):\n    return a + b\n\ndef add(a, b):",
                                       max_tokens=24, temperature=0)
    ext = answer.model_extra["edgespec"]
    found = scrape(live.url)
    assert found[("edgespec_generated_tokens_total", ())] - base["generated_tokens"] == \
        answer.usage.completion_tokens
    assert found[("edgespec_drafted_tokens_total", ())] - base["drafted_tokens"] == ext["drafted_tokens"]
    assert found[("edgespec_accepted_tokens_total", ())] - base["accepted_tokens"] == ext["accepted_tokens"]
    assert found[("edgespec_target_steps_total", ())] - base["target_steps"] == ext["steps"]
