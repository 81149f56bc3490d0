"""`edgespec serve`: an OpenAI-compatible HTTP server for one engine (Starlette + uvicorn).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream: true` as server-sent events). See docs/server.md for the fields, the errors and the `edgespec` extension
field that carries the speculation statistics.

Concurrency: the engine runs one generation at a time, so every request becomes a `Job` in a bounded asyncio queue;
one dispatcher task hands the jobs, one at a time, to ONE worker thread that owns the engine (it alone calls the
engine). A full queue answers 429 at once. The worker runs `engine.stream(..., cancel=flag)` with the job's cancel
flag: a client that goes away (or a request over its time limit) sets it, and the engine stops before its next
prefill chunk or step (the worker also closes the stream between pieces); a queued job whose client went away is
skipped.

Starlette and uvicorn are imported inside the functions that need them, so `import edgespec` (and the CLI, which
registers the `serve` command from here) works without them: `pip install 'edgespec[serve]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .runtimes.manifest import is_finite_number, is_int
from .runtimes.runner import ContextOverflow
from .sampling import GenerationConfig

__all__ = ["APIError", "Job", "Service", "create_app", "serve", "register_cli", "run_job", "persist_caches"]

logger = logging.getLogger("edgespec.server")

MAX_BODY_BYTES = 4 * 1024 * 1024  # larger request bodies get 413
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CANCEL_WAIT_SECONDS = 10.0  # at shutdown: how long a cancelled in-flight generation may take to stop
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4  # as OpenAI
# fields that would change the output in ways this server cannot honour: 400 unless they hold a neutral value
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
}


# ---- errors ----------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        """A Starlette JSON response."""
        return _json_response(self.body(), self.status, self.headers)


def invalid(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    """400 for a bad request field, naming it."""
    return APIError(400, message, "invalid_request_error", param, code)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ---- request parsing (pure functions, run on the event loop) -------------------------------------------------------
@dataclass
class CompletionRequest:
    """A validated /v1/chat/completions or /v1/completions request."""

    kind: str  # "chat" or "completion"
    prompt: str | list[int] | None  # completions
    messages: list[dict] | None  # chat
    options: dict  # GenerationConfig fields
    stream: bool = False
    include_usage: bool = False


def json_type(value) -> str:
    """The JSON name of a value's type (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def parse_request(body: dict, kind: str, model_id: str, max_tokens_limit: int | None,
                  default_max_tokens: int) -> CompletionRequest:
    """Check a request body and turn it into a CompletionRequest; raises APIError (400/404) naming the field."""
    check_model(body.get("model"), model_id)
    check_unsupported(body)
    stream = optional_bool(body, "stream", False)
    include_usage = stream_options(body.get("stream_options"), stream)
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
        raise invalid("n", f"only n=1 is supported, got {n!r}")
    if kind == "chat":
        messages, prompt = parse_messages(body.get("messages")), None
        names = ("max_completion_tokens", "max_tokens")
    else:
        messages, prompt = None, parse_prompt(body.get("prompt"))
        names = ("max_tokens",)
    options = {
        "max_new_tokens": max_tokens(body, names, max_tokens_limit, default_max_tokens),
        "temperature": temperature(body.get("temperature")),
        "top_p": top_p(body.get("top_p")),
        "top_k": top_k(body.get("top_k")),
        "seed": seed(body.get("seed")),
        "stop": stop_strings(body.get("stop")),
        "ignore_eos": optional_bool(body, "ignore_eos", False),
    }
    try:
        GenerationConfig(**options).validate()
    except ValueError as exc:  # a combination the checks above let through
        raise invalid(None, str(exc)) from None
    return CompletionRequest(kind, prompt, messages, options, stream, include_usage)


def check_model(model, model_id: str) -> None:
    """`model` is required and must be the served model (404 model_not_found otherwise)."""
    if model is None:
        raise invalid("model", "you must provide a model parameter", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, got {json_type(model)}")
    if model != model_id:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_id!r}",
                       "invalid_request_error", "model", "model_not_found")


def check_unsupported(body: dict) -> None:
    """Refuse options this server cannot honour (log probabilities, tools, penalties...)."""
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if any(value is v or (type(value) is type(v) and value == v) for v in neutral):
            continue
        if name in ("frequency_penalty", "presence_penalty") and is_finite_number(value) and value == 0:
            continue
        raise invalid(name, f"'{name}' is not supported by this server", "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid("response_format", "only response_format {'type': 'text'} is supported",
                      "unsupported_parameter")


def optional_bool(body: dict, name: str, default: bool) -> bool:
    """A boolean field (null or absent = `default`)."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be a boolean, got {json_type(value)}")
    return value


def stream_options(value, stream: bool) -> bool:
    """`stream_options.include_usage` (only with `stream: true`)."""
    if value is None:
        return False
    if not stream:
        raise invalid("stream_options", "stream_options is only allowed when 'stream' is true")
    if not isinstance(value, dict):
        raise invalid("stream_options", f"'stream_options' must be an object, got {json_type(value)}")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("stream_options.include_usage", "'include_usage' must be a boolean")
    return include


def max_tokens(body: dict, names: tuple[str, ...], limit: int | None, default: int) -> int:
    """The first of `names` present: an int >= 1, at most `limit` (when set)."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not is_int(value):
            raise invalid(name, f"'{name}' must be an integer, got {json_type(value)}")
        if value < 1:
            raise invalid(name, f"'{name}' must be at least 1, got {value}")
        if limit is not None and value > limit:
            raise invalid(name, f"'{name}' is {value}; this server allows at most {limit}")
        return value
    return default


def temperature(value) -> float:
    """0 (greedy, the default: the engine's) to 2."""
    if value is None:
        return 0.0
    if not is_finite_number(value) or not 0 <= value <= 2:
        raise invalid("temperature", f"'temperature' must be a number from 0 to 2, got {value!r}")
    return float(value)


def top_p(value) -> float:
    """Nucleus mass in (0, 1] (1 = off)."""
    if value is None:
        return 1.0
    if not is_finite_number(value) or not 0 < value <= 1:
        raise invalid("top_p", f"'top_p' must be a number in (0, 1], got {value!r}")
    return float(value)


def top_k(value) -> int:
    """Extension (as vLLM): keep the k most likely tokens, 0 or -1 = off."""
    if value is None or value == -1:
        return 0
    if not is_int(value) or value < 0:
        raise invalid("top_k", f"'top_k' must be an integer >= 0 (or -1 = off), got {value!r}")
    return value


def seed(value) -> int | None:
    """An int >= 0, or null."""
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise invalid("seed", f"'seed' must be an integer >= 0, got {value!r}")
    return value


def stop_strings(value) -> tuple[str, ...]:
    """`stop`: a string or a list of up to 4 non-empty strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop", f"'stop' must be a string or a list of strings, got {json_type(value)}")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid("stop", f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(items)}")
    if any(not s for s in items):
        raise invalid("stop", "stop strings must be non-empty")
    return tuple(items)


def parse_messages(messages) -> list[dict]:
    """Chat messages -> [{role, content}] with text content (content parts of type "text" are joined)."""
    if messages is None:
        raise invalid("messages", "you must provide 'messages'", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array of {role, content} objects")
    return [parse_message(i, m) for i, m in enumerate(messages)]


def parse_message(i: int, message) -> dict:
    """One chat message: a known role and text content. A `developer` message is rendered as `system`."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(where, f"{where} must be an object, got {json_type(message)}")
    role = message.get("role")
    if not isinstance(role, str):
        raise invalid(f"{where}.role", f"{where}.role must be a string, got {json_type(role)}")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    elif isinstance(content, list):
        content = "".join(text_part(f"{where}.content[{j}]", part) for j, part in enumerate(content))
    elif not isinstance(content, str):
        raise invalid(f"{where}.content", f"{where}.content must be a string or an array of text parts, got "
                                          f"{json_type(content)}")
    out = {"role": "system" if role == "developer" else role, "content": content}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def text_part(where: str, part) -> str:
    """The text of a content part (only {"type": "text", "text": ...} parts are supported)."""
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise invalid(where, f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are supported")
    return part["text"]


def parse_prompt(prompt) -> str | list[int]:
    """A completions prompt: a string, a list of token ids, or a one-element list of either."""
    if prompt is None:
        raise invalid("prompt", "you must provide a 'prompt'", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        return list(prompt)
    raise invalid("prompt", "'prompt' must be a string or a non-empty list of token ids (batches of more than one "
                            "prompt are not supported)")


# ---- response shapes -------------------------------------------------------------------------------------------
def usage_of(stats) -> dict:
    """OpenAI's usage object from GenerationStats."""
    prompt, completion = int(stats.prompt_tokens), int(stats.new_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension_of(stats, queue_seconds: float) -> dict:
    """The `edgespec` extension field: speculation statistics of one generation."""
    return {
        "drafter": stats.drafter,
        "tokens_per_second": round(stats.tokens_per_second, 3),
        "mean_accepted_tokens": round(stats.mean_accepted_tokens, 3),
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "steps": stats.steps,
        "reused_prompt_tokens": stats.reused_prompt_tokens,
        "time_to_first_token": round(stats.time_to_first_token, 6),
        "generation_seconds": round(stats.total_seconds, 6),
        "queue_seconds": round(queue_seconds, 6),
    }


@dataclass
class Reply:
    """Builds the response objects of one request (chat.completion / text_completion and their chunks)."""

    kind: str
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, result, queue_seconds: float) -> dict:
        """The non-streaming response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": result.finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": result.finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage_of(result.stats),
                "edgespec": extension_of(result.stats, queue_seconds)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        """One streaming chunk: the role (chat, first), a text piece, or the finish reason."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def final_chunks(self, result, queue_seconds: float) -> list[dict]:
        """The chunk with the finish reason (and the `edgespec` field), then the usage chunk when asked for."""
        last = self.chunk(finish_reason=result.finish_reason)
        extension = extension_of(result.stats, queue_seconds)
        last["edgespec"] = extension
        chunks = [last]
        if self.include_usage:
            usage = {**self._head(last["object"]), "choices": [], "usage": usage_of(result.stats),
                     "edgespec": extension}
            chunks.append(usage)
        return chunks


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


# ---- the engine thread -------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One request's work for the engine thread, and the asyncio queue its events come back on.

    Events: ("start", None) once the prompt is accepted (streaming), ("piece", text) (streaming), ("done", (text,
    GenerationResult)) and ("error", APIError)."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancel_error: APIError | None = None  # answered when the server (not the client) cancelled the job
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        """True once the job should stop (client gone, timed out or server shutting down)."""
        return self._cancelled.is_set()

    def cancel(self, error: APIError | None = None) -> None:
        """Stop the job: skipped if queued; if running, the engine stops at its next prefill chunk or step."""
        if error is not None and self.cancel_error is None:
            self.cancel_error = error
        self._cancelled.set()

    @property
    def queue_seconds(self) -> float:
        """Seconds the job waited before the engine took it."""
        return (self.started or time.monotonic()) - self.enqueued

    def post(self, kind: str, value=None) -> None:
        """Send an event to the request handler (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


def run_job(engine, job: Job) -> None:
    """Run one job on the engine thread: open the engine's stream, pass the pieces on (or collect them), stop early
    when the job is cancelled (closing the generator stops generation cleanly), and post the result."""
    if job.cancelled:
        return
    job.started = time.monotonic()
    try:
        generator = open_stream(engine, job.request, cancel=job._cancelled)
    except APIError as exc:
        job.post("error", exc)
        return
    if job.request.stream:
        job.post("start")
    pieces: list[str] = []
    try:
        result = drain(generator, job, pieces)
    except Exception as exc:  # an engine failure mid-generation: 500, the server stays up
        logger.exception("generation failed")
        job.post("error", APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"))
        return
    finally:
        generator.close()
    if result is None or job.cancelled:  # cancelled (the engine may have stopped on the flag first)
        if job.cancel_error is not None:
            job.post("error", job.cancel_error)
        return
    job.post("done", ("".join(pieces), result))


def open_stream(engine, request: CompletionRequest, cancel: threading.Event | None = None):
    """`engine.stream(...)` for the request (chat: the model's template first); bad prompts raise APIError 400.
    `cancel` stops the generation once set, also during the prompt's prefill."""
    param = "messages" if request.kind == "chat" else "prompt"
    try:
        prompt = engine.render_chat(request.messages) if request.kind == "chat" else request.prompt
        return engine.stream(prompt, cancel=cancel, **request.options)
    except ContextOverflow as exc:  # the engine's hint about truncate_prompt is for the Python API only
        message = str(exc).split(" (pass truncate_prompt")[0]
        raise APIError(400, message, "invalid_request_error", param, "context_length_exceeded") from None
    except (ValueError, TypeError) as exc:
        raise invalid(param, str(exc)) from None
    except Exception as exc:
        logger.exception("could not start a generation")
        raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error") from None


def drain(generator, job: Job, pieces: list[str]):
    """Iterate the engine's generator until it returns its GenerationResult (or None when the job is cancelled)."""
    while True:
        if job.cancelled:
            return None
        try:
            piece = next(generator)
        except StopIteration as stop:
            return stop.value
        if job.request.stream:
            job.post("piece", piece)
        else:
            pieces.append(piece)


def persist_caches(engine) -> str | None:
    """At shutdown: `engine.close()`, which saves the drafters' persistent caches and releases the sessions (an
    engine without `close`, a test double, has nothing to persist). Returns what was done."""
    close = getattr(engine, "close", None)
    if not callable(close):
        return None
    close()
    return "close"


# ---- the service: queue, dispatcher, worker thread ------------------------------------------------------------
def engine_model_name(engine) -> str:
    """The bundle's target name (the model id)."""
    entry = getattr(engine, "entry", None)
    return getattr(entry, "name", None) or "edgespec"


def memory_usage() -> dict:
    """This process's resident memory and its peak, in bytes (`edgespec.devices.memory`; absent when unknown)."""
    from .devices.memory import process_peak_rss_mb, process_rss_mb

    figures = {"rss_bytes": process_rss_mb(), "peak_rss_bytes": process_peak_rss_mb()}
    return {key: round(mb * 2**20) for key, mb in figures.items() if mb is not None}


class Service:
    """The engine behind a bounded queue: one dispatcher task, one worker thread, graceful shutdown."""

    def __init__(self, engine, max_queue: int = 64, shutdown_grace: float = 30.0):
        if not is_int(max_queue) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self.shutdown_grace = shutdown_grace
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgespec-engine")
        self.in_flight: Job | None = None
        self.served = 0
        self.draining = False
        self._current: asyncio.Future | None = None
        self._dispatcher: asyncio.Task | None = None
        self._closed = False

    async def start(self) -> None:
        """Create the queue and the dispatcher on the running event loop (idempotent)."""
        if self._dispatcher is None:
            self.loop = asyncio.get_running_loop()
            self.queue = asyncio.Queue(self.max_queue)
            self._dispatcher = asyncio.create_task(self._dispatch(), name="edgespec-dispatcher")

    async def _dispatch(self) -> None:
        """Hand queued jobs, one at a time, to the engine thread (jobs whose client went away are skipped)."""
        while True:
            job = await self.queue.get()
            if job.cancelled:
                continue
            self.in_flight = job
            self._current = self.loop.run_in_executor(self.executor, run_job, self.engine, job)
            try:
                await asyncio.shield(self._current)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("job failed")
            finally:
                self.in_flight = None
                self.served += 1

    async def submit(self, request: CompletionRequest) -> Job:
        """Queue a request; 429 when the queue is full, 503 while shutting down."""
        await self.start()
        if self.draining:
            raise shutting_down()
        job = Job(request, self.loop)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           "rate_limit_error", None, "queue_full", headers={"Retry-After": "1"}) from None
        return job

    def health(self) -> dict:
        """Queue depth, in-flight requests, served count, memory."""
        return {"status": "draining" if self.draining else "ok",
                "queue_depth": self.queue.qsize() if self.queue is not None else 0,
                "max_queue": self.max_queue, "in_flight": int(self.in_flight is not None), "served": self.served,
                **memory_usage()}

    # -- shutdown ----------------------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Stop taking requests: queued ones get 503 at once; the in-flight one may finish within the grace period,
        after which it is cancelled. Call on the event loop (see `begin_shutdown_threadsafe`)."""
        if self.draining:
            return
        self.draining = True
        while self.queue is not None and not self.queue.empty():
            job = self.queue.get_nowait()  # it never reaches the worker: its handler is told here
            job.cancel(shutting_down())
            job.events.put_nowait(("error", job.cancel_error))
        if self.loop is not None:
            self.loop.call_later(max(0.0, self.shutdown_grace), self._cancel_in_flight)

    def begin_shutdown_threadsafe(self) -> None:
        """`begin_shutdown` from a signal handler or another thread."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.begin_shutdown)

    def _cancel_in_flight(self) -> None:
        job = self.in_flight
        if job is not None:
            logger.warning("shutdown grace period over: cancelling the request in flight")
            job.cancel(shutting_down())

    async def close(self) -> None:
        """Graceful shutdown: drain (see `begin_shutdown`), wait for the in-flight generation, then persist the
        caches on the engine thread and stop it."""
        if self._closed:
            return
        self._closed = True
        self.begin_shutdown()
        current = self._current
        if current is not None and not current.done():
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(current), self.shutdown_grace + CANCEL_WAIT_SECONDS)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._dispatcher
        try:
            done = await asyncio.get_running_loop().run_in_executor(self.executor, persist_caches, self.engine)
            if done:
                logger.info("caches persisted (%s)", done)
        except Exception:
            logger.exception("could not persist the caches")
        self.executor.shutdown(wait=False)


def shutting_down() -> APIError:
    """503: the server is shutting down."""
    return APIError(503, "the server is shutting down", "server_error", None, "server_shutting_down")


# ---- HTTP layer ------------------------------------------------------------------------------------------------
def _json_response(payload: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status, headers=headers)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request, max_bytes: int) -> dict:
    """The request body as a JSON object: 413 over `max_bytes`, 400 when malformed or not an object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body too large (over {max_bytes} bytes)", "invalid_request_error", None,
                       "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body too large (over {max_bytes} bytes)", "invalid_request_error", None,
                           "request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"could not parse the JSON body of the request: {exc}", "invalid_request_error", None,
                       "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_type(body)}",
                       "invalid_request_error", None, "invalid_json")
    return body


async def wait_disconnect(receive) -> None:
    """Return once the client has disconnected (the body must have been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Routes:
    """The endpoints of one app, bound to its Service."""

    def __init__(self, service: Service, model_id: str, api_key: str | None, max_tokens_limit: int | None,
                 request_timeout: float | None, max_body_bytes: int, default_chat_tokens: int):
        self.service, self.model_id, self.api_key = service, model_id, api_key
        self.max_tokens_limit, self.request_timeout, self.max_body_bytes = max_tokens_limit, request_timeout, \
            max_body_bytes
        self.default_chat_tokens = default_chat_tokens

    # -- plumbing ----------------------------------------------------------------------------------------------
    def endpoint(self, handler, auth: bool = True):
        """Wrap a handler: API key check, APIError -> its response, anything else -> 500 (the server stays up)."""

        async def wrapped(request):
            try:
                if auth:
                    self.authorize(request)
                return await handler(request)
            except APIError as exc:
                return exc.response()
            except Exception as exc:
                logger.exception("unexpected error in %s", request.url.path)
                return APIError(500, f"internal server error: {type(exc).__name__}", "server_error").response()

        return wrapped

    def authorize(self, request) -> None:
        """401 unless the request carries `Authorization: Bearer <api key>` (when a key is set)."""
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", None, "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def deadline(self) -> float | None:
        return None if self.request_timeout is None else time.monotonic() + self.request_timeout

    # -- endpoints ---------------------------------------------------------------------------------------------
    async def health(self, request):
        """GET /health: status, model, queue depth, in-flight requests, memory (no API key needed)."""
        return _json_response({**self.service.health(), "model": self.model_id})

    async def models(self, request):
        """GET /v1/models."""
        return _json_response({"object": "list", "data": [self.model_card()]})

    async def model(self, request):
        """GET /v1/models/{model}."""
        if request.path_params["model"] != self.model_id:
            raise APIError(404, f"the model {request.path_params['model']!r} does not exist",
                           "invalid_request_error", "model", "model_not_found")
        return _json_response(self.model_card())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "edgespec"}

    async def chat_completions(self, request):
        """POST /v1/chat/completions."""
        return await self.complete(request, "chat", self.default_chat_tokens)

    async def completions(self, request):
        """POST /v1/completions."""
        return await self.complete(request, "completion", min(DEFAULT_COMPLETION_TOKENS,
                                                               self.max_tokens_limit or DEFAULT_COMPLETION_TOKENS))

    async def complete(self, request, kind: str, default_tokens: int):
        """Parse, queue, and answer (JSON or server-sent events)."""
        body = await read_json(request, self.max_body_bytes)
        spec = parse_request(body, kind, self.model_id, self.max_tokens_limit, default_tokens)
        deadline = self.deadline()
        job = await self.service.submit(spec)
        reply = Reply(kind, self.model_id, spec.include_usage)
        try:
            event, value = await self.first_event(request, job, deadline)
        except ClientGone:
            from starlette.responses import Response

            return Response(status_code=499)
        if event == "error":
            raise value
        if not spec.stream:
            text, result = value
            return _json_response(reply.full(text, result, job.queue_seconds))
        from starlette.responses import StreamingResponse

        return StreamingResponse(self.events(job, reply, deadline), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def first_event(self, request, job: Job, deadline: float | None):
        """The job's first event ("start", "done" or "error"), watching for the client going away (the job is then
        cancelled: skipped if still queued) and for the time limit (504)."""
        watch = asyncio.ensure_future(wait_disconnect(request.receive))
        get = asyncio.ensure_future(job.events.get())
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({get, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                return get.result()
            job.cancel()
            if watch in done:
                raise ClientGone()
            raise timed_out(self.request_timeout)
        finally:
            for task in (watch, get):
                task.cancel()

    async def events(self, job: Job, reply: Reply, deadline: float | None):
        """The server-sent events of a streaming answer. However it ends (client gone included), the job is
        cancelled, which stops its generation."""
        try:
            if reply.kind == "chat":
                yield sse(reply.chunk(role=True))
            while True:
                try:
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    event, value = await asyncio.wait_for(job.events.get(), timeout)
                except asyncio.TimeoutError:
                    event, value = "error", timed_out(self.request_timeout)
                if event == "piece":
                    yield sse(reply.chunk(text=value))
                elif event == "done":
                    for chunk in reply.final_chunks(value[1], job.queue_seconds):
                        yield sse(chunk)
                    break
                else:  # an error after the headers went out: OpenAI's in-stream error event
                    yield sse(value.body())
                    break
            yield sse("[DONE]")
        finally:
            job.cancel()


def timed_out(seconds: float | None) -> APIError:
    """504: the request ran over the server's time limit."""
    return APIError(504, f"the request took longer than the server's limit of {seconds} s", "server_error", None,
                    "request_timeout")


def create_app(engine, model_name: str | None = None, api_key: str | None = None, max_queue: int = 64,
               max_tokens_limit: int | None = None, request_timeout: float | None = None,
               shutdown_grace: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES):
    """The Starlette app serving `engine` (see the module docstring). `model_name`: the model id (default: the
    bundle's target name); `api_key`: required as `Authorization: Bearer KEY` on /v1 routes when set;
    `max_queue`: requests that may wait (more get 429); `max_tokens_limit`: the largest max_tokens accepted (and
    chat's default); `request_timeout`: seconds from arrival to the last token (504 / in-stream error past it);
    `shutdown_grace`: seconds the in-flight request may take at shutdown. The Service is `app.state.service`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    if max_tokens_limit is not None and (not is_int(max_tokens_limit) or max_tokens_limit < 1):
        raise ValueError(f"max_tokens_limit must be an int >= 1, got {max_tokens_limit!r}")
    if request_timeout is not None and not (is_finite_number(request_timeout) and request_timeout > 0):
        raise ValueError(f"request_timeout must be a number > 0, got {request_timeout!r}")
    service = Service(engine, max_queue=max_queue, shutdown_grace=shutdown_grace)
    context = getattr(engine, "context_length", None)
    default_chat = max_tokens_limit or (context if is_int(context) else 4096)
    routes = Routes(service, model_name or engine_model_name(engine), api_key or None, max_tokens_limit,
                    request_timeout, max_body_bytes, default_chat)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.close()

    async def http_error(request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        "invalid_request_error", None, kind).response()

    app = Starlette(
        routes=[
            Route("/health", routes.endpoint(routes.health, auth=False), methods=["GET"]),
            Route("/v1/models", routes.endpoint(routes.models), methods=["GET"]),
            Route("/v1/models/{model:path}", routes.endpoint(routes.model), methods=["GET"]),
            Route("/v1/chat/completions", routes.endpoint(routes.chat_completions), methods=["POST"]),
            Route("/v1/completions", routes.endpoint(routes.completions), methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.model_id = routes.model_id
    return app


# ---- running it ------------------------------------------------------------------------------------------------
def _graceful_server(config, service: Service):
    """A uvicorn Server whose SIGTERM/SIGINT starts our drain at once and does not re-raise the signal after the
    shutdown (so the process exits 0)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.begin_shutdown_threadsafe()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()  # uvicorn >= 0.29 re-raises captured signals after serving

    return GracefulServer(config)


def serve(engine, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          api_key: str | None = None, max_queue: int = 64, max_tokens_limit: int | None = None,
          request_timeout: float | None = None, shutdown_grace: float = 30.0, log_level: str = "info",
          announce=print) -> int:
    """Serve `engine` until SIGTERM/SIGINT, then shut down gracefully (no new requests; the in-flight one finishes
    within `shutdown_grace` seconds or is cancelled; caches persisted). Returns 0."""
    import uvicorn

    app = create_app(engine, model_name=model_name, api_key=api_key, max_queue=max_queue,
                     max_tokens_limit=max_tokens_limit, request_timeout=request_timeout,
                     shutdown_grace=shutdown_grace)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(math.ceil(shutdown_grace + CANCEL_WAIT_SECONDS)))
    server = _graceful_server(config, app.state.service)
    announce(f"edgespec serve: model {app.state.model_id!r} at http://{host}:{port}/v1 "
             f"(OpenAI-compatible; health at http://{host}:{port}/health)")
    server.run()
    return 0


def require_server_dependencies() -> None:
    """RuntimeError naming the extra when starlette or uvicorn is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"`edgespec serve` needs starlette and uvicorn ({exc}): "
                           "pip install 'edgespec[serve]'") from None


def cmd_serve(args) -> int:
    """`edgespec serve`: load the bundle and serve it."""
    require_server_dependencies()
    from .engine import load

    api_key = args.api_key or os.environ.get("EDGESPEC_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without an API key (--api-key or EDGESPEC_API_KEY)", flush=True)
    engine = load(args.bundle, threads=args.threads, drafter=None if args.drafter == "none" else args.drafter,
                  device=None if args.device == "none" else args.device, max_context=args.max_context)
    return serve(engine, host=args.host, port=args.port, model_name=args.model_name, api_key=api_key,
                 max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                 request_timeout=args.request_timeout, shutdown_grace=args.grace, log_level=args.log_level,
                 announce=lambda line: print(line, flush=True))


def cmd_serve_bench(args) -> int:
    """`edgespec serve-bench`: the load test (edgespec.loadtest) against a running server."""
    from .loadtest import run_from_args

    return run_from_args(args)


def register_cli(subparsers) -> None:
    """Add the `serve` and `serve-bench` commands to an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API")
    p.add_argument("--bundle", "-b", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (also: EDGESPEC_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id to serve under (default: the bundle's target name)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429 (default 64)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens accepted")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request, queueing included")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the in-flight request may take to finish at shutdown (default 30)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--drafter", default="ngram", metavar="SPEC", help="speculative drafter (see `generate`)")
    p.add_argument("--device", default="auto", metavar="NAME|auto|FILE|none",
                   help="device profile sizing the draft trees (see `generate`)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    from .loadtest import add_arguments

    p = subparsers.add_parser("serve-bench", help="load-test a running `edgespec serve` (concurrent clients)")
    add_arguments(p)
    p.set_defaults(func=cmd_serve_bench)
