"""Load test of a running `edgespec serve` (`edgespec serve-bench` or `python -m edgespec.loadtest`).

Starts nothing itself: it hits the server at `--url` with C concurrent clients x R requests each (half streaming,
chat and completions alternating, greedy, fixed prompts), after first taking each prompt's single-client greedy
answer as the reference. Reports requests, errors by status, p50/p95/max latency, throughput, how many answers are
identical to the reference, and the server's peak RSS (VmHWM of `--server-pid`, else /health's `peak_rss_bytes`).
Needs httpx (`pip install httpx`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

DEFAULT_PROMPTS = (
    "The quick brown fox",
    "def add(a, b):",
    "Berlin is the capital of",
    "Speculative decoding drafts tokens and",
    "print(add(2, 3))",
    "Explain KV caches in one sentence.",
)


@dataclass
class Outcome:
    """One request's result."""

    kind: str  # "chat" or "completion"
    prompt: str
    stream: bool
    status: str  # HTTP status, or "exception:<Type>"
    latency: float
    text: str = ""
    completion_tokens: int = 0
    error: str = ""


def request_body(model: str, kind: str, prompt: str, stream: bool, max_tokens: int) -> dict:
    """A greedy request for `prompt` (chat: one user message)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def endpoint(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


def one_request(client, model: str, kind: str, prompt: str, stream: bool, max_tokens: int) -> Outcome:
    """Send one request with an httpx.Client (base URL set) and collect its text, usage and latency."""
    import httpx

    body = request_body(model, kind, prompt, stream, max_tokens)
    t0 = time.perf_counter()
    try:
        if stream:
            with client.stream("POST", endpoint(kind), json=body) as response:
                if response.status_code != 200:
                    response.read()
                    return Outcome(kind, prompt, stream, str(response.status_code), time.perf_counter() - t0,
                                   error=response.text[:200])
                text, tokens, error = read_events(response.iter_lines(), kind)
        else:
            response = client.post(endpoint(kind), json=body)
            if response.status_code != 200:
                return Outcome(kind, prompt, stream, str(response.status_code), time.perf_counter() - t0,
                               error=response.text[:200])
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if kind == "chat" else choice["text"]
            tokens, error = int(data["usage"]["completion_tokens"]), ""
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Outcome(kind, prompt, stream, f"exception:{type(exc).__name__}", time.perf_counter() - t0,
                       error=str(exc)[:200])
    status = "stream-error" if error else "200"
    return Outcome(kind, prompt, stream, status, time.perf_counter() - t0, text, tokens, error)


def read_events(lines, kind: str) -> tuple[str, int, str]:
    """Text, completion tokens and any in-stream error of a server-sent event stream."""
    pieces, tokens = [], 0
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            return "".join(pieces), tokens, json.dumps(event["error"])[:200]
        for choice in event.get("choices", []):
            piece = choice.get("delta", {}).get("content") if kind == "chat" else choice.get("text")
            pieces.append(piece or "")
        if event.get("usage"):
            tokens = int(event["usage"]["completion_tokens"])
    return "".join(pieces), tokens, ""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


def peak_rss(pid: int | None, client) -> tuple[int | None, str]:
    """The server's peak resident memory in bytes: VmHWM of `pid` when given, else /health's field."""
    if pid is not None:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024, f"/proc/{pid}/status"
        except OSError:
            pass
    try:
        return client.get("/health").json().get("peak_rss_bytes"), "/health"
    except Exception:
        return None, "unavailable"


def plan(clients: int, requests_per_client: int, prompts) -> list[list[tuple[str, str, bool]]]:
    """Per client, its requests as (kind, prompt, stream): half streaming, chat and completions alternating."""
    out = []
    for c in range(clients):
        mine = []
        for i in range(requests_per_client):
            kind = "chat" if (c + i // 2) % 2 == 0 else "completion"
            mine.append((kind, prompts[(7 * c + i) % len(prompts)], (c + i) % 2 == 1))
        out.append(mine)
    return out


def run_load_test(url: str, clients: int = 32, requests_per_client: int = 20, max_tokens: int = 32,
                  api_key: str | None = None, model: str | None = None, server_pid: int | None = None,
                  prompts=DEFAULT_PROMPTS, timeout: float = 300.0) -> dict:
    """Run the load test and return the report (a dict; see the module docstring)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = url.rstrip("/").removesuffix("/v1")

    def new_client():
        return httpx.Client(base_url=base, headers=headers, timeout=timeout)

    with new_client() as client:
        model = model or client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        references = {}
        for kind in ("chat", "completion"):
            for prompt in prompts:
                outcome = one_request(client, model, kind, prompt, False, max_tokens)
                if outcome.status != "200":
                    raise RuntimeError(f"reference request failed ({outcome.status}): {outcome.error}")
                references[kind, prompt] = outcome.text
        work = plan(clients, requests_per_client, list(prompts))
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        barrier = threading.Barrier(clients + 1)

        def worker(requests):
            with new_client() as own:
                barrier.wait()
                mine = [one_request(own, model, kind, prompt, stream, max_tokens) for kind, prompt, stream in requests]
            with lock:
                outcomes.extend(mine)

        threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in work]
        for thread in threads:
            thread.start()
        barrier.wait()
        t0 = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
        rss, rss_source = peak_rss(server_pid, client)
    return summarize(outcomes, references, wall, dict(url=url, model=model, clients=clients,
                                                      requests_per_client=requests_per_client,
                                                      max_tokens=max_tokens, server_peak_rss_bytes=rss,
                                                      server_rss_source=rss_source))


def summarize(outcomes: list[Outcome], references: dict, wall: float, header: dict) -> dict:
    """The report: counts, errors by status, latency percentiles, throughput, identical answers."""
    ok = [o for o in outcomes if o.status == "200"]
    latencies = [o.latency for o in ok]
    mismatches = [o for o in ok if o.text != references[o.kind, o.prompt]]
    return {
        **header,
        "requests": len(outcomes),
        "streaming_requests": sum(o.stream for o in outcomes),
        "ok": len(ok),
        "errors": dict(Counter(o.status for o in outcomes if o.status != "200")),
        "error_count": len(outcomes) - len(ok),
        "identical_to_reference": len(ok) - len(mismatches),
        "mismatches": len(mismatches),
        "mismatch_examples": [asdict(o) | {"reference": references[o.kind, o.prompt]} for o in mismatches[:3]],
        "error_examples": [asdict(o) for o in outcomes if o.status != "200"][:3],
        "latency_seconds": {"p50": round(percentile(latencies, 50), 4), "p95": round(percentile(latencies, 95), 4),
                            "max": round(max(latencies, default=0.0), 4),
                            "mean": round(sum(latencies) / len(latencies), 4) if latencies else 0.0},
        "wall_seconds": round(wall, 3),
        "throughput_requests_per_second": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "throughput_tokens_per_second": round(sum(o.completion_tokens for o in ok) / wall, 3) if wall > 0 else 0.0,
    }


def format_report(report: dict) -> str:
    """A few human-readable lines."""
    lat = report["latency_seconds"]
    rss = report["server_peak_rss_bytes"]
    return "\n".join([
        f"{report['requests']} requests ({report['clients']} clients x {report['requests_per_client']}, "
        f"{report['streaming_requests']} streaming) against {report['model']} at {report['url']}",
        f"errors: {report['error_count']} {report['errors'] or ''}".rstrip(),
        f"identical to single-client greedy output: {report['identical_to_reference']}/{report['ok']}",
        f"latency p50 {lat['p50'] * 1000:.0f} ms, p95 {lat['p95'] * 1000:.0f} ms, max {lat['max'] * 1000:.0f} ms",
        f"throughput {report['throughput_requests_per_second']:.2f} requests/s, "
        f"{report['throughput_tokens_per_second']:.1f} tokens/s over {report['wall_seconds']:.1f} s",
        f"server peak RSS: {rss / 2**20:.0f} MiB ({report['server_rss_source']})" if rss else
        "server peak RSS: unavailable",
    ])


MAX_CLIENTS = 1024  # one thread each
MAX_REQUESTS = 100_000  # per client
MAX_PID = 1 << 22  # Linux's PID_MAX_LIMIT
MAX_TIMEOUT = 86_400.0  # seconds per request (a day)
MAX_TEXT = 4096  # characters of --url, --api-key, --model


def _json_target(text: str) -> str:
    """An argparse type for --json: '-' (stdout) or a path where nothing is yet or a regular file."""
    from .cliargs import new_or_regular_file

    return text if text == "-" else new_or_regular_file(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The load test's options (shared by `edgespec serve-bench` and `python -m edgespec.loadtest`), each bounded."""
    from .cliargs import MAX_TOKENS, bounded_float, bounded_int, bounded_text

    p.add_argument("--url", type=bounded_text(MAX_TEXT), default="http://127.0.0.1:8000",
                   help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", type=bounded_text(MAX_TEXT), default=None, help="API key (also: EDGESPEC_API_KEY)")
    p.add_argument("--model", type=bounded_text(MAX_TEXT), default=None, help="model id (default: the server's first)")
    p.add_argument("--clients", "-c", type=bounded_int(1, MAX_CLIENTS), default=32,
                   help=f"concurrent clients, 1 to {MAX_CLIENTS} (default 32)")
    p.add_argument("--requests", "-r", type=bounded_int(1, MAX_REQUESTS), default=20,
                   help=f"requests per client, 1 to {MAX_REQUESTS} (default 20)")
    p.add_argument("--max-tokens", type=bounded_int(1, MAX_TOKENS), default=32, help=f"1 to {MAX_TOKENS} (default 32)")
    p.add_argument("--server-pid", type=bounded_int(1, MAX_PID), default=None,
                   help="server process id, for its peak RSS (VmHWM)")
    p.add_argument("--timeout", type=bounded_float(0.0, MAX_TIMEOUT, lo_open=True), default=300.0,
                   help=f"seconds per request, over 0 and at most {MAX_TIMEOUT:g} (default 300)")
    p.add_argument("--json", type=_json_target, default=None, metavar="PATH",
                   help="write the report as JSON ('-' = stdout)")


def run_from_args(args) -> int:
    """Run with parsed arguments; exit status 1 when any request failed or differed from its reference."""
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        raise ValueError("--clients, --requests and --max-tokens must be >= 1")
    report = run_load_test(args.url, args.clients, args.requests, args.max_tokens,
                           api_key=args.api_key or os.environ.get("EDGESPEC_API_KEY"), model=args.model,
                           server_pid=args.server_pid, timeout=args.timeout)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    return 0 if report["error_count"] == 0 and report["mismatches"] == 0 else 1


def main(argv=None) -> int:
    """`python -m edgespec.loadtest`."""
    parser = argparse.ArgumentParser(prog="python -m edgespec.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
