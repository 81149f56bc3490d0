"""Peak memory of `edgespec serve` under the abusive requests of issue 19, next to its peak under normal load.

    python -m tests.server_memory [--bundle BUNDLE] [--json OUT] [--root REPO] [--skip NAME ...]

Each scenario runs against a fresh server process (a tiny random bundle built here when --bundle is not given) and
reports the process's peak resident memory (VmHWM) after start-up and one request, and after the scenario. `--root`
serves another checkout of the repository (to measure an older server; scenarios whose options it lacks are
skipped). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
MIB = 2 ** 20


def build_bundle(folder: Path) -> Path:
    """A tiny random Qwen2 bundle (tests/conftest.py's recipe)."""
    sys.path.insert(0, str(HERE))
    from conftest import make_tiny_model

    from edgespec.export.bundle import export_bundle

    model = make_tiny_model("qwen2", folder / "model")
    return export_bundle(str(model), folder / "bundle", name="tiny-qwen2", log=lambda m: None).bundle


def vm(pid: int, field: str) -> int:
    """A /proc/PID/status figure (VmHWM, VmRSS) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(bundle: Path, root: Path, extra: list[str]):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "EDGESPEC_HISTORY": "0",
           "EDGESPEC_NGRAM_DIR": tempfile.mkdtemp(prefix="mem-ngram-")}
    proc = subprocess.Popen([sys.executable, "-m", "edgespec.cli", "serve", "--bundle", str(bundle), "--port",
                             str(port), "--threads", "1", "--device", "none", "--max-context", str(CONTEXT),
                             "--log-level", "error", *extra], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(url: str, body, timeout: float = 120) -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        return httpx.post(f"{url}/v1/completions", content=data, headers={"Content-Type": "application/json"},
                          timeout=timeout).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def in_threads(n: int, fn, *args) -> list:
    results = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(*args))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


MODEL = "tiny-qwen2"
LONG = {"model": MODEL, "prompt": "Berlin", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
BOMB = b'{"model": "tiny-qwen2", "prompt": "x", "junk": [' + b"{}," * ((4 * MIB - 64) // 3) + b"{}]}"
HUGE_PROMPT = {"model": MODEL, "prompt": "x " * 2 ** 19, "max_tokens": 1}  # 1 Mi characters
CONTEXT = 256  # --max-context of the servers measured
LARGEST_PROMPT = {"model": MODEL, "prompt": "x " * (16 * CONTEXT // 2), "max_tokens": 1}  # the server's text limit


def normal_load(url: str, proc) -> dict:
    """8 clients x 10 ordinary requests at once."""
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}
    codes = in_threads(8, lambda: [post(url, body) for _ in range(10)])
    return {"status": sorted({c for client in codes for c in client}, key=str)}


def stop_1mb(url: str, proc) -> dict:
    return {"status": [post(url, {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "stop": "s" * 1_000_000})]}


def empty_objects(url: str, proc) -> dict:
    return {"status": [post(url, BOMB)]}


def behind_a_long_request(url: str, bodies: list) -> list:
    """Send `bodies` at once while a long generation is in flight (so they queue)."""
    first = threading.Thread(target=post, args=(url, LONG), daemon=True)
    first.start()
    time.sleep(0.3)
    codes = []
    threads = [threading.Thread(target=lambda b=b: codes.append(post(url, b))) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.join()
    return sorted(set(codes), key=str)


def eight_empty_objects_queued(url: str, proc) -> dict:
    return {"status": behind_a_long_request(url, [BOMB] * 8)}


def eight_huge_prompts_queued(url: str, proc) -> dict:
    return {"status": behind_a_long_request(url, [HUGE_PROMPT] * 8)}


def eight_largest_prompts_queued(url: str, proc) -> dict:
    return {"status": behind_a_long_request(url, [LARGEST_PROMPT] * 8)}


def fifty_half_uploads(url: str, proc) -> dict:
    """50 uploads that send the headers and 2 MiB of a declared 4 MiB body, then stall."""
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for _ in range(50):
        sock = socket.create_connection((HOST, port))
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {4 * MIB}\r\n\r\n".encode() + b'{"model": "tiny-qwen2", "prompt": "'
                     + b"x" * (2 * MIB))
        socks.append(sock)
    time.sleep(2)
    held = vm(proc.pid, "VmRSS")
    answered, deadline = 0, time.monotonic() + 10
    for sock in socks:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            answered += sock.recv(64).startswith(b"HTTP/1.1 408")
        sock.close()
    return {"status": [f"{answered}/50 answered 408"], "rss_while_held_mib": round(held / MIB, 1)}


SCENARIOS = {
    "normal load (8 clients x 10 requests)": (normal_load, []),
    "1 MB stop string": (stop_1mb, []),
    "4 MiB body of {} objects": (empty_objects, []),
    "8 x 4 MiB {} bodies sent while one generates": (eight_empty_objects_queued, []),
    "8 prompts of 1 Mi characters sent while one generates": (eight_huge_prompts_queued, []),
    "8 prompts at the text limit (16 x 256 characters) queued": (eight_largest_prompts_queued, []),
    "50 half-sent 4 MiB uploads": (fifty_half_uploads, ["--body-timeout", "5"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--root", type=Path, default=HERE.parent, help="the checkout to serve (default: this one)")
    parser.add_argument("--skip", nargs="*", default=[], help="scenarios to skip (substrings of their names)")
    parser.add_argument("--no-extra", action="store_true", help="drop scenario options (an older server)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="server-memory-")
    bundle = args.bundle or build_bundle(Path(tmp.name))
    rows = []
    for name, (scenario, extra) in SCENARIOS.items():
        if any(s in name for s in args.skip):
            continue
        with server(bundle, args.root.resolve(), [] if args.no_extra else extra) as (proc, url):
            post(url, {"model": MODEL, "prompt": "warm up", "max_tokens": 4})
            base = vm(proc.pid, "VmHWM")
            t0 = time.monotonic()
            result = scenario(url, proc)
            peak = vm(proc.pid, "VmHWM")
            rows.append({"scenario": name, "baseline_peak_mib": round(base / MIB, 1), "peak_mib": round(peak / MIB, 1),
                         "added_mib": round((peak - base) / MIB, 1), "seconds": round(time.monotonic() - t0, 1),
                         **result})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| scenario | peak RSS before | peak RSS after | added | answers |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['baseline_peak_mib']} MiB | {r['peak_mib']} MiB | {r['added_mib']} MiB | "
              f"{', '.join(map(str, r['status']))} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
