"""`edgespec serve`: an OpenAI-compatible HTTP server for one engine (Starlette + uvicorn).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream: true` as server-sent events), `GET /metrics` (Prometheus, with `--metrics`: edgespec.servermetrics). A
request's `model` may be the id or an alias, in any case (`ModelNames`). See docs/server.md for the fields, the errors, the limits, what is stored
where, and the `edgespec` extension field that carries the speculation statistics.

Concurrency: the engine runs one generation at a time, so every request becomes a `Job` in a bounded asyncio queue;
one dispatcher task hands the jobs, one at a time, to ONE worker thread that owns the engine (it alone calls the
engine). A request takes a queue slot before its body is read, so a full queue answers 429 at once, unread. The
worker runs `engine.stream(..., cancel=flag)` with the job's cancel flag: a client that goes away (or a request over
its time limit) sets it, and the engine stops before its next prefill chunk or step (the worker also closes the
stream between pieces); a queued job whose client went away is skipped. Whatever one request raises (a tokenizer's
Rust panic is a BaseException) is that request's 500: the dispatcher and the worker carry on, and `/health` says
"failed" (503) if the dispatcher ever stops.

Privacy: by default nothing a client sends is kept for another. The engine's state that speeds up a later request
(the cached prompt prefix, the n-gram drafter's context, session and recycling tiers) belongs to one client at a
time and is wiped when the next request comes from another client (or from an unidentified one); the persistent
n-gram cache is refused unless `shared_cache=True` (`--shared-cache`).

Starlette and uvicorn are imported inside the functions that need them, so `import edgespec` (and the CLI, which
registers the `serve` command from here) works without them: `pip install 'edgespec[serve]'`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import stat
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .runtimes.checks import is_finite_number, is_int
from .runtimes.runner import ContextOverflow
from .sampling import MAX_REPETITION_PENALTY, MAX_TOP_LOGPROBS, GenerationConfig
from .servermetrics import METRICS_HINT, MetricsMiddleware
from .text import MAX_STOP_CHARS  # characters per stop string: the library's own limit (1,000)

__all__ = ["APIError", "Job", "Service", "create_app", "serve", "register_cli", "run_job", "persist_caches",
           "parse_request", "parse_json_body", "read_api_keys", "forget_earlier_requests"]

logger = logging.getLogger("edgespec.server")

# ---- limits: every field a client sends is bounded (docs/server.md, "Limits") -----------------------------------
MAX_BODY_BYTES = 4 * 1024 * 1024  # larger request bodies get 413
MAX_JSON_VALUES = 1 << 17  # objects, arrays, strings, numbers... in one body (each costs ~50-200 bytes parsed)
MAX_MESSAGES = 1024  # chat messages per request
MAX_CONTENT_PARTS = 256  # text parts of one message's content
MAX_TEXT_CHARS = 1 << 20  # characters: one message's content, all messages' content together, a prompt string
PROMPT_CHARS_PER_TOKEN = 16  # ... and at most this many per token of the engine's context (`text_limit`): the
# tokenizer needs ~330 bytes per token, so a prompt that cannot fit is refused before it is tokenized
MAX_PROMPT_IDS = 1 << 16  # token ids of a token-id prompt
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_NAME_CHARS = 256  # a message's `name`, the request's `user`, a model alias
MAX_ALIASES = 16  # --alias names of the served model
MAX_ORIGINS = 64  # --allow-origin / --cors-origin web origins
BODY_TIMEOUT = 30.0  # seconds to receive a whole request body (then 408 and the connection is closed)
MAX_CONNECTIONS = 128  # concurrent connections and requests (uvicorn's limit_concurrency: over it, 503)
MAX_KEY_FILE_BYTES = 64 * 1024  # --api-key-file
MAX_API_KEYS = 1024
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CANCEL_WAIT_SECONDS = 10.0  # at shutdown: how long a cancelled in-flight generation may take to stop
ROLES = ("system", "developer", "user", "assistant", "tool")
# fields that would change the output in ways this server cannot honour: 400 unless they hold a neutral value
UNSUPPORTED = {
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none"),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
}
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


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


def too_long(param: str, what: str, size: int, limit: int, unit: str = "characters") -> APIError:
    """400 for a string over its limit (OpenAI's code `string_above_max_length`)."""
    return invalid(param, f"{what} has {size} {unit}; this server allows at most {limit}", "string_above_max_length")


def too_many(param: str, what: str, count: int, limit: int) -> APIError:
    """400 for an array over its limit (OpenAI's code `array_above_max_length`)."""
    return invalid(param, f"{what} holds {count} items; this server allows at most {limit}", "array_above_max_length")


def shown(value, limit: int = 60) -> str:
    """A short printable form of a client's value for an error message (never echoes a huge input back)."""
    if isinstance(value, str):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text[:-1]}...' ({len(value)} characters)"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    user: str | None = None  # OpenAI's `user`: a client-declared identity (see `client_identity`)


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
                  default_max_tokens: int, max_text_chars: int = MAX_TEXT_CHARS) -> CompletionRequest:
    """Check a request body and turn it into a CompletionRequest; raises APIError (400/404) naming the field.
    Every field is bounded (MAX_MESSAGES, `max_text_chars` characters of text, MAX_PROMPT_IDS, MAX_STOP_STRINGS,
    MAX_STOP_CHARS...)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_type(body)}",
                       "invalid_request_error", None, "invalid_json")
    check_model(body.get("model"), model_id)
    check_unsupported(body)
    stream = optional_bool(body, "stream", False)
    include_usage = stream_options(body.get("stream_options"), stream)
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
        raise invalid("n", f"only n=1 is supported, got {shown(n)}")
    if kind == "chat":
        messages, prompt = parse_messages(body.get("messages"), max_text_chars), None
        names = ("max_completion_tokens", "max_tokens")
    else:
        messages, prompt = None, parse_prompt(body.get("prompt"), max_text_chars)
        names = ("max_tokens",)
    options = {
        "max_new_tokens": max_tokens(body, names, max_tokens_limit, default_max_tokens),
        "temperature": temperature(body.get("temperature")),
        "top_p": top_p(body.get("top_p")),
        "top_k": top_k(body.get("top_k")),
        "seed": seed(body.get("seed")),
        "stop": stop_strings(body.get("stop")),
        "ignore_eos": optional_bool(body, "ignore_eos", False),
        "repetition_penalty": repetition_penalty(body.get("repetition_penalty")),
        "min_p": min_p(body.get("min_p")),
        "min_new_tokens": min_tokens(body.get("min_tokens")),
    }
    if options["min_new_tokens"] > options["max_new_tokens"]:
        raise invalid("min_tokens", f"'min_tokens' ({options['min_new_tokens']}) must be at most the maximum number "
                                    f"of tokens ({options['max_new_tokens']})")
    options["logprobs"], options["top_logprobs"] = logprob_fields(body, kind)
    try:
        GenerationConfig(**options).validate()
    except ValueError as exc:  # a combination the checks above let through
        raise invalid(None, str(exc)) from None
    return CompletionRequest(kind, prompt, messages, options, stream, include_usage, user_field(body.get("user")))


def check_model(model, model_id: "str | ModelNames") -> None:
    """`model` is required and must name the served model: its id or one of its aliases, in any case (see
    `ModelNames`); 404 model_not_found naming them otherwise."""
    if model is None:
        raise invalid("model", "you must provide a model parameter", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, got {json_type(model)}")
    names = model_id if isinstance(model_id, ModelNames) else ModelNames(model_id)
    if not names.matches(model):
        raise names.not_found(model)


@dataclass(frozen=True)
class ModelNames:
    """The names a client may use for the served model: the id (`--model-name`, else the bundle's target name) and
    its aliases (the target's name, the bundle's folder name, `--alias` names), compared case-insensitively."""

    id: str
    aliases: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        """Whether `name` is the id or an alias, ignoring case."""
        wanted = name.casefold()
        return any(wanted == known.casefold() for known in (self.id, *self.aliases))

    def not_found(self, name: str) -> APIError:
        """OpenAI's 404 `model_not_found`, naming the models this server answers to."""
        also = f" (also accepted: {', '.join(repr(a) for a in self.aliases)})" if self.aliases else ""
        return APIError(404, f"the model {shown(name)} does not exist; this server serves {self.id!r}{also}",
                        "invalid_request_error", "model", "model_not_found")


def check_unsupported(body: dict) -> None:
    """Refuse options this server cannot honour (tools, frequency / presence penalties, echo...). Log
    probabilities are served (`logprob_fields`): the raw model's, in OpenAI's chat and completions shapes."""
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
            raise invalid(name, f"'{name}' must be at least 1, got {shown(value)}")
        if limit is not None and value > limit:
            raise invalid(name, f"'{name}' is {shown(value)}; this server allows at most {limit}")
        return value
    return default


def temperature(value) -> float:
    """0 (greedy, the default: the engine's) to 2."""
    if value is None:
        return 0.0
    if not is_finite_number(value) or not 0 <= value <= 2:
        raise invalid("temperature", f"'temperature' must be a number from 0 to 2, got {shown(value)}")
    return float(value)


def top_p(value) -> float:
    """Nucleus mass in (0, 1] (1 = off)."""
    if value is None:
        return 1.0
    if not is_finite_number(value) or not 0 < value <= 1:
        raise invalid("top_p", f"'top_p' must be a number in (0, 1], got {shown(value)}")
    return float(value)


def top_k(value) -> int:
    """Extension (as vLLM): keep the k most likely tokens, 0 or -1 = off."""
    if value is None or value == -1:
        return 0
    if not is_int(value) or value < 0:
        raise invalid("top_k", f"'top_k' must be an integer >= 0 (or -1 = off), got {shown(value)}")
    return value


def repetition_penalty(value) -> float:
    """Extension (as vLLM): Hugging Face's repetition penalty in (0, MAX_REPETITION_PENALTY]; 1 = off."""
    if value is None:
        return 1.0
    if not is_finite_number(value) or not 0 < value <= MAX_REPETITION_PENALTY:
        raise invalid("repetition_penalty", f"'repetition_penalty' must be a number in (0, "
                                            f"{MAX_REPETITION_PENALTY:g}] (1 = off), got {shown(value)}")
    return float(value)


def min_p(value) -> float:
    """Extension (as vLLM): keep the tokens with probability >= min_p times the top one; [0, 1], 0 = off."""
    if value is None:
        return 0.0
    if not is_finite_number(value) or not 0 <= value <= 1:
        raise invalid("min_p", f"'min_p' must be a number in [0, 1] (0 = off), got {shown(value)}")
    return float(value)


def min_tokens(value) -> int:
    """Extension (as vLLM): generate at least this many tokens before EOS or a stop string may end the answer."""
    if value is None:
        return 0
    if not is_int(value) or value < 0:
        raise invalid("min_tokens", f"'min_tokens' must be an integer >= 0, got {shown(value)}")
    return value


def logprob_fields(body: dict, kind: str) -> tuple[bool, int]:
    """(logprobs, top_logprobs) of a request: chat's `logprobs` (boolean) and `top_logprobs` (0 to
    MAX_TOP_LOGPROBS, needs logprobs true); completions' `logprobs` (an integer 0 to MAX_TOP_LOGPROBS: the
    alternatives per token, null = none)."""
    top = body.get("top_logprobs")
    if kind == "chat":
        wanted = optional_bool(body, "logprobs", False)
        if top is None:
            return wanted, 0
        if not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise invalid("top_logprobs", f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got "
                                          f"{shown(top)}")
        if top and not wanted:
            raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return wanted, top
    if top is not None:
        raise invalid("top_logprobs", "'top_logprobs' is a chat completions field; for completions give "
                                      "'logprobs': N (the alternatives per token)", "unsupported_parameter")
    value = body.get("logprobs")
    if value is None:
        return False, 0
    if not is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise invalid("logprobs", f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (the alternatives "
                                  f"per token), got {shown(value)}")
    return True, value


def seed(value) -> int | None:
    """An int >= 0, or null."""
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise invalid("seed", f"'seed' must be an integer >= 0, got {shown(value)}")
    return value


def stop_strings(value) -> tuple[str, ...]:
    """`stop`: a string or a list of up to MAX_STOP_STRINGS non-empty strings of at most MAX_STOP_CHARS each."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop", f"'stop' must be a string or a list of strings, got {json_type(value)}")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid("stop", f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(items)}",
                      "array_above_max_length")
    if any(not s for s in items):
        raise invalid("stop", "stop strings must be non-empty")
    for s in items:
        if len(s) > MAX_STOP_CHARS:
            raise too_long("stop", "a stop string", len(s), MAX_STOP_CHARS)
    return tuple(items)


def user_field(value) -> str | None:
    """OpenAI's `user` (an end-user id): a string of at most MAX_NAME_CHARS, or null."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid("user", f"'user' must be a string, got {json_type(value)}")
    if len(value) > MAX_NAME_CHARS:
        raise too_long("user", "'user'", len(value), MAX_NAME_CHARS)
    return value


def parse_messages(messages, max_chars: int = MAX_TEXT_CHARS) -> list[dict]:
    """Chat messages -> [{role, content}] with text content (content parts of type "text" are joined). At most
    MAX_MESSAGES messages and `max_chars` characters of content in all."""
    if messages is None:
        raise invalid("messages", "you must provide 'messages'", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise too_many("messages", "'messages'", len(messages), MAX_MESSAGES)
    parsed = [parse_message(i, m, max_chars) for i, m in enumerate(messages)]
    total = sum(len(m["content"]) for m in parsed)
    if total > max_chars:
        raise too_long("messages", "the content of all messages together", total, max_chars)
    return parsed


def parse_message(i: int, message, max_chars: int = MAX_TEXT_CHARS) -> dict:
    """One chat message: a known role and text content (at most `max_chars` characters, MAX_CONTENT_PARTS parts).
    A `developer` message is rendered as `system`."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(where, f"{where} must be an object, got {json_type(message)}")
    role = message.get("role")
    if not isinstance(role, str):
        raise invalid(f"{where}.role", f"{where}.role must be a string, got {json_type(role)}")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"{where}.role {shown(role)} is not one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    elif isinstance(content, list):
        if len(content) > MAX_CONTENT_PARTS:
            raise too_many(f"{where}.content", f"{where}.content", len(content), MAX_CONTENT_PARTS)
        content = "".join(text_part(f"{where}.content[{j}]", part) for j, part in enumerate(content))
    elif not isinstance(content, str):
        raise invalid(f"{where}.content", f"{where}.content must be a string or an array of text parts, got "
                                          f"{json_type(content)}")
    if len(content) > max_chars:
        raise too_long(f"{where}.content", f"{where}.content", len(content), max_chars)
    out = {"role": "system" if role == "developer" else role, "content": content}
    name = message.get("name")
    if isinstance(name, str):
        if len(name) > MAX_NAME_CHARS:
            raise too_long(f"{where}.name", f"{where}.name", len(name), MAX_NAME_CHARS)
        out["name"] = name
    return out


def text_part(where: str, part) -> str:
    """The text of a content part (only {"type": "text", "text": ...} parts are supported)."""
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise invalid(where, f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are supported")
    return part["text"]


def parse_prompt(prompt, max_chars: int = MAX_TEXT_CHARS) -> str | list[int]:
    """A completions prompt: a string (at most `max_chars` characters), a list of token ids (at most
    MAX_PROMPT_IDS), or a one-element list of either."""
    if prompt is None:
        raise invalid("prompt", "you must provide a 'prompt'", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if len(prompt) > max_chars:
            raise too_long("prompt", "'prompt'", len(prompt), max_chars)
        return prompt
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPT_IDS:
        raise too_many("prompt", "the token-id 'prompt'", len(prompt), MAX_PROMPT_IDS)
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        return list(prompt)
    raise invalid("prompt", "'prompt' must be a string or a non-empty list of token ids (batches of more than one "
                            "prompt are not supported)")


# ---- the JSON body (pure: bytes -> dict) ------------------------------------------------------------------------
# a JSON string, possibly unterminated (then it runs to the end: the scan stays linear on any input)
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)


def json_value_count(raw: "bytes | bytearray") -> int:
    """An upper bound of the values (objects, arrays, strings, numbers, literals) in the JSON text `raw`, without
    parsing it: one more than its commas, opening brackets and colons outside strings. Linear time; the strings are
    blanked only when the plain count (which counts them too) is over MAX_JSON_VALUES."""
    def count(text: bytes) -> int:
        return text.count(b",") + text.count(b"[") + text.count(b"{") + text.count(b":") + 1

    plain = count(raw)
    if plain <= MAX_JSON_VALUES:
        return plain
    return count(_JSON_STRING.sub(b'""', raw))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: "bytes | bytearray", max_bytes: int = MAX_BODY_BYTES,
                    max_values: int = MAX_JSON_VALUES) -> dict:
    """A request body -> a JSON object. 413 over `max_bytes`; 400 (`invalid_json`) when it is not JSON (NaN and
    Infinity included), nests too deeply, or is not an object; 400 (`too_many_values`) over `max_values` values,
    checked before parsing: parsed JSON costs up to ~25x its text (4 MiB of `{}` is 100 MB of dicts)."""
    if len(raw) > max_bytes:
        raise body_too_large(max_bytes)
    values = json_value_count(raw)
    if values > max_values:
        raise APIError(400, f"the JSON body holds about {values} values; this server allows at most {max_values}",
                       "invalid_request_error", None, "too_many_values")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "could not parse the JSON body of the request: it nests too deeply",
                       "invalid_request_error", None, "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"could not parse the JSON body of the request: {str(exc)[:200]}",
                       "invalid_request_error", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_type(body)}",
                       "invalid_request_error", None, "invalid_json")
    return body


def body_too_large(max_bytes: int) -> APIError:
    """413: the body is over the limit."""
    return APIError(413, f"request body too large (over {max_bytes} bytes)", "invalid_request_error", None,
                    "request_too_large")


def check_json_content_type(content_type: str | None) -> None:
    """415 unless the body is declared JSON (`application/json` or `*+json`): a browser can send a cross-site
    `text/plain` or form POST without asking the server first, never an `application/json` one."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise APIError(415, f"the request body must be sent as 'Content-Type: application/json', got "
                            f"{shown(content_type or '')}", "invalid_request_error", None, "unsupported_media_type")


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


# ---- log probabilities in OpenAI's shapes ---------------------------------------------------------------------
LOGPROB_FLOOR = -9999.0  # what a log probability of -inf is sent as (JSON has no infinity; OpenAI uses this value)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character standing for each byte value."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL_CHARS = _byte_level_decoder()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text and its UTF-8 bytes (OpenAI's `token` and `bytes`). A token that is part of a character
    decodes to U+FFFD; its bytes are then read from the vocabulary form (byte-level BPE's alphabet, SentencePiece's
    <0xNN> byte tokens)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text, list(text.encode("utf-8"))
    piece = tokenizer.id_to_token(token_id) or ""
    fallback = BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return text, [int(fallback.group(1), 16)]
    if piece and all(ch in BYTE_LEVEL_CHARS for ch in piece):
        return text, [BYTE_LEVEL_CHARS[ch] for ch in piece]
    return text, list(text.encode("utf-8"))


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def logprob_entries(tokenizer, logprobs) -> list[dict]:
    """OpenAI's chat `logprobs.content` items for a list of `edgespec.sampling.TokenLogprob`: token, logprob,
    bytes and top_logprobs (each a token, logprob and bytes). Run on the engine thread (it decodes tokens)."""
    texts: dict[int, tuple[str, list[int]]] = {}

    def item(token_id: int, logprob: float) -> dict:
        if token_id not in texts:
            texts[token_id] = token_text(tokenizer, token_id)
        text, raw = texts[token_id]
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}

    return [{**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]} for lp in logprobs]


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """The legacy completions `logprobs` object for chat-style `entries`: tokens, token_logprobs, top_logprobs (per
    token a {token: logprob} map of the alternatives and the chosen token, as OpenAI) and text_offset (each token's
    character offset in the answer, from `offset`)."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{**{t["token"]: t["logprob"] for t in e["top_logprobs"]}, e["token"]: e["logprob"]}
                             for e in entries],
            "text_offset": offsets}


@dataclass
class Reply:
    """Builds the response objects of one request (chat.completion / text_completion and their chunks). With
    `logprobs`, every choice carries the log probabilities of its tokens (chat-style entries from
    `logprob_entries`, shaped per endpoint); `text_offset` counts the characters of the tokens sent so far."""

    kind: str
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    logprobs: bool = False
    text_offset: int = 0

    def _logprobs(self, entries: list[dict] | None) -> dict | None:
        """A choice's `logprobs` value for `entries` (None when not asked for)."""
        if not self.logprobs:
            return None
        entries = entries or []
        if self.kind == "chat":
            return {"content": entries, "refusal": None}
        shaped = completion_logprobs(entries, self.text_offset)
        self.text_offset += sum(len(e["token"]) for e in entries)
        return shaped

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, result, queue_seconds: float, entries: list[dict] | None = None) -> dict:
        """The non-streaming response (`entries`: the tokens' log probabilities, when asked for)."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self._logprobs(entries), "finish_reason": result.finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(entries),
                      "finish_reason": result.finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage_of(result.stats),
                "edgespec": extension_of(result.stats, queue_seconds)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              entries: list[dict] | None = None) -> dict:
        """One streaming chunk: the role (chat, first), a text piece, or the finish reason; `entries`: the log
        probabilities of the tokens kept since the previous chunk (when asked for; none on the role chunk)."""
        logprobs = None if role else self._logprobs(entries)
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def final_chunks(self, result, queue_seconds: float, entries: list[dict] | None = None) -> list[dict]:
        """The chunk with the finish reason (and the `edgespec` field, and the log probabilities of tokens kept
        after the last piece), then the usage chunk when asked for."""
        last = self.chunk(finish_reason=result.finish_reason, entries=entries)
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
class Ticket:
    """A queue slot, taken before a request's body is read and given back once the dispatcher takes its job (or
    the request ends before it is queued). Releasing twice is harmless."""

    def __init__(self, service: "Service"):
        self.service, self.held = service, True

    def release(self) -> None:
        """Give the slot back."""
        if self.held:
            self.held = False
            self.service.waiting -= 1


@dataclass
class Job:
    """One request's work for the engine thread, and the asyncio queue its events come back on.

    Events: ("start", None) once the prompt is accepted (streaming), ("piece", (text, logprob entries or None))
    (streaming), ("done", (text, GenerationResult, logprob entries or None: all of them, or those after the last
    piece)) and ("error", APIError). `client` is who the request's cached state belongs to (see
    `client_identity`; None: nobody, it is never reused)."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancel_error: APIError | None = None  # answered when the server (not the client) cancelled the job
    client: str | None = None
    ticket: Ticket | None = None
    answered: bool = False  # a "done" or "error" event was posted
    result: object = None  # the GenerationResult of a finished generation (for the metrics)
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
        if kind in ("done", "error"):
            self.answered = True
        if kind == "done":
            self.result = value[1]  # value: (text, GenerationResult, ...)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


def engine_failure(exc: BaseException, what: str = "generation failed") -> APIError:
    """500 naming the exception (any BaseException: a tokenizer's Rust panic is one)."""
    return APIError(500, f"{what}: {type(exc).__name__}: {str(exc)[:500]}", "server_error")


def run_job(engine, job: Job, isolate: bool = False) -> None:
    """Run one job on the engine thread: wipe what earlier requests left in the engine when `isolate` (another
    client's state), open the engine's stream, pass the pieces on (or collect them), stop early when the job is
    cancelled (closing the generator stops generation cleanly), and post the result. Never raises: whatever the
    engine raises, BaseException included, becomes the job's 500 and the worker thread carries on."""
    if job.cancelled:
        return
    job.started = time.monotonic()
    try:
        if isolate:
            forget_earlier_requests(engine)
        generator = open_stream(engine, job.request, cancel=job._cancelled)
    except APIError as exc:
        job.post("error", exc)
        return
    except BaseException as exc:  # noqa: BLE001  (a panic in the tokenizer, a failed wipe...)
        logger.error("could not start a generation: %s: %s", type(exc).__name__, exc, exc_info=exc)
        job.post("error", engine_failure(exc, "could not start the generation"))
        return
    if job.request.stream:
        job.post("start")
    pieces: list[str] = []
    feed = LogprobFeed(getattr(engine, "tokenizer", None), bool(job.request.options.get("logprobs")))
    try:
        result = drain(generator, job, pieces, feed)
        entries = None if result is None else feed.new(getattr(result, "logprobs", None))  # all, or the rest
    except BaseException as exc:  # noqa: BLE001  an engine failure mid-generation: 500, the server stays up
        logger.error("generation failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        job.post("error", engine_failure(exc))
        return
    finally:
        close_quietly(generator)
    if result is None or job.cancelled:  # cancelled (the engine may have stopped on the flag first)
        if job.cancel_error is not None:
            job.post("error", job.cancel_error)
        return
    job.post("done", ("".join(pieces), result, entries))


def close_quietly(generator) -> None:
    """Close the engine's stream; a failure while closing is logged, never raised (the job is answered already)."""
    try:
        generator.close()
    except BaseException as exc:  # noqa: BLE001
        logger.error("closing a generation failed: %s: %s", type(exc).__name__, exc)


def open_stream(engine, request: CompletionRequest, cancel: threading.Event | None = None):
    """`engine.stream(...)` for the request (chat: the model's template first); bad prompts raise APIError 400,
    anything else (BaseException included) APIError 500. `cancel` stops the generation once set, also during the
    prompt's prefill."""
    param = "messages" if request.kind == "chat" else "prompt"
    try:
        prompt = engine.render_chat(request.messages) if request.kind == "chat" else request.prompt
        return engine.stream(prompt, cancel=cancel, **request.options)
    except ContextOverflow as exc:  # the engine's hint about truncate_prompt is for the Python API only
        message = str(exc).split(" (pass truncate_prompt")[0]
        raise APIError(400, message, "invalid_request_error", param, "context_length_exceeded") from None
    except (ValueError, TypeError) as exc:
        raise invalid(param, str(exc)[:500]) from None
    except BaseException as exc:  # noqa: BLE001  a tokenizer panic is a BaseException
        logger.error("could not start a generation: %s: %s", type(exc).__name__, exc, exc_info=exc)
        raise engine_failure(exc) from None


class LogprobFeed:
    """The log probabilities of one generation in OpenAI's entries (`logprob_entries`), handed out as the tokens
    come: `new` returns those not handed out yet (None when not asked for). Used on the engine thread."""

    def __init__(self, tokenizer, wanted: bool):
        self.tokenizer, self.wanted, self.sent = tokenizer, wanted and tokenizer is not None, 0

    def new(self, logprobs: list | None) -> list[dict] | None:
        """Entries for `logprobs[sent:]` (the engine's TokenLogprobs of the tokens kept so far)."""
        if not self.wanted or logprobs is None:
            return None
        fresh, self.sent = logprobs[self.sent:], max(self.sent, len(logprobs))
        return logprob_entries(self.tokenizer, fresh)


def drain(generator, job: Job, pieces: list[str], feed: LogprobFeed | None = None):
    """Iterate the engine's generator until it returns its GenerationResult (or None when the job is cancelled).
    Streaming, each piece is posted with the log probabilities of the tokens kept since the previous one."""
    while True:
        if job.cancelled:
            return None
        try:
            piece = next(generator)
        except StopIteration as stop:
            return stop.value
        if job.request.stream:
            entries = None if feed is None else feed.new(getattr(generator, "logprobs", None))
            job.post("piece", (piece, entries))
        else:
            pieces.append(piece)


def drafter_stages(engine) -> list:
    """The engine's drafter and its first stages (a staged drafter's `stage`, and so on)."""
    stages, stage = [], getattr(engine, "drafter", None)
    while stage is not None and len(stages) < 16:
        stages.append(stage)
        stage = getattr(stage, "stage", None)
    return stages


def persistent_caches(engine) -> list[str]:
    """The files in which the engine's drafters keep what they learn from every generation, across requests and
    restarts (the n-gram drafter's persistent tier, the cross-vocabulary drafter's mappings)."""
    paths = []
    for stage in drafter_stages(engine):
        for attribute in ("persistent_path", "cache_path"):
            path = getattr(stage, attribute, None)
            if path is not None:
                paths.append(str(path))
    return paths


def forget_earlier_requests(engine) -> None:
    """Wipe what earlier requests left in the engine that would speed up a later one (so its timing would tell
    another client what they sent): the cached prompt prefix (KV reuse), the drafters' context and session state
    (`engine.reset()`), and the n-gram drafter's recycled predictions (the target's next tokens after each token
    of an earlier answer). Static caches stay (they hold no client's text). Runs on the engine thread."""
    reset = getattr(engine, "reset", None)
    if callable(reset):
        reset()
    for stage in drafter_stages(engine):
        recycled = getattr(stage, "recycled", None)
        if isinstance(recycled, dict):
            recycled.clear()


class CacheNotSaved(RuntimeError):
    """A drafter's persistent cache could not be written at shutdown."""


def persist_caches(engine) -> str | None:
    """At shutdown: `engine.close()`, which saves the drafters' persistent caches and releases the sessions (an
    engine without `close`, a test double, has nothing to persist). Returns what was done; raises CacheNotSaved when
    a cache could not be written (the engine reports that as a warning) or whatever `close` raised."""
    import warnings

    close = getattr(engine, "close", None)
    if not callable(close):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        close()
    failed = [str(w.message) for w in caught if "not saved" in str(w.message)]
    if failed:
        raise CacheNotSaved("; ".join(failed))
    return "close"


# ---- the service: queue, dispatcher, worker thread ------------------------------------------------------------
def engine_model_name(engine) -> str:
    """The bundle's target name (the model id)."""
    entry = getattr(engine, "entry", None)
    return getattr(entry, "name", None) or "edgespec"


def check_alias(name) -> str:
    """A model alias: 1 to MAX_NAME_CHARS printable characters (ValueError otherwise)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"a model alias is 1 to {MAX_NAME_CHARS} printable characters, got {shown(name)}")
    return name


def model_names(engine, model_name: str | None = None, aliases=()) -> ModelNames:
    """The served model's id (`model_name`, else the bundle's target name) and every other name a client may use:
    the target's name, the bundle's folder name and `aliases` (at most MAX_ALIASES), duplicates (ignoring case)
    dropped. ValueError for a bad alias."""
    aliases = tuple(aliases or ())
    if len(aliases) > MAX_ALIASES:
        raise ValueError(f"at most {MAX_ALIASES} model aliases, got {len(aliases)}")
    model_id = model_name or engine_model_name(engine)
    bundle = getattr(engine, "bundle_path", None)
    folder = os.path.basename(os.path.normpath(bundle)) if isinstance(bundle, str) and bundle else None
    candidates = [engine_model_name(engine), folder, *(check_alias(a) for a in aliases)]
    seen, kept = {model_id.casefold()}, []
    for name in candidates:
        if name and name.casefold() not in seen:
            seen.add(name.casefold())
            kept.append(name)
    return ModelNames(model_id, tuple(kept))


def bundle_created_time(engine, fallback: int) -> int:
    """When the served bundle was made, in Unix seconds: its manifest's `created_at`, else the manifest file's
    modification time; `fallback` for an engine without a bundle folder (a test double)."""
    import datetime as dt

    from .runtimes.files import read_json_capped
    from .runtimes.manifest import MAX_MANIFEST_BYTES

    bundle = getattr(engine, "bundle_path", None)
    if not isinstance(bundle, str) or not bundle:
        return fallback
    path = os.path.join(bundle, "manifest.json")
    try:
        created = read_json_capped(path, MAX_MANIFEST_BYTES, ValueError, "a bundle manifest").get("created_at")
        stamp = dt.datetime.fromisoformat(created)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.timezone.utc)
        return int(stamp.timestamp())
    except (OSError, ValueError, TypeError, AttributeError, OverflowError):
        pass
    try:
        return int(os.stat(path).st_mtime)
    except (OSError, ValueError, OverflowError):
        return fallback


def memory_usage() -> dict:
    """This process's resident memory and its peak, in bytes (`edgespec.devices.memory`; absent when unknown)."""
    from .devices.memory import process_peak_rss_mb, process_rss_mb

    figures = {"rss_bytes": process_rss_mb(), "peak_rss_bytes": process_peak_rss_mb()}
    return {key: round(mb * 2**20) for key, mb in figures.items() if mb is not None}


def text_limit(engine) -> int:
    """The most characters of prompt text (or chat content) a request may carry: PROMPT_CHARS_PER_TOKEN per token of
    the engine's context, at most MAX_TEXT_CHARS. Text over it cannot fit in the context, and tokenizing it just to
    find that out would cost ~330 bytes per token."""
    context = getattr(engine, "context_length", None)
    if not is_int(context) or context < 1:
        return MAX_TEXT_CHARS
    return min(MAX_TEXT_CHARS, PROMPT_CHARS_PER_TOKEN * context)


def client_identity(key_index: int | None, user: str | None) -> str | None:
    """Who a request's cached engine state belongs to: the API key it authenticated with (by position in the key
    list) and the `user` it declared. None (anonymous: its state is wiped before the next request, whoever sends
    it) when neither is known."""
    if key_index is None and user is None:
        return None
    return f"{'' if key_index is None else key_index}/{user or ''}"


_NOBODY = object()  # the cache owner before the first request, and after a failed wipe: the next request wipes


class Service:
    """The engine behind a bounded queue: one dispatcher task, one worker thread, graceful shutdown.

    `max_queue` slots are shared by the requests being read and parsed and those waiting (the one being generated
    not counted). `shared_cache`: False (the default) wipes the engine's reusable state whenever the next job
    belongs to another client (or to none, see `client_identity`)."""

    def __init__(self, engine, max_queue: int = 64, shutdown_grace: float = 30.0, shared_cache: bool = False):
        if not is_int(max_queue) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self.shutdown_grace = shutdown_grace
        self.shared_cache = bool(shared_cache)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgespec-engine")
        self.in_flight: Job | None = None
        self.served = 0
        self.waiting = 0  # slots taken: requests being read, parsed or queued
        self.draining = False
        self.failure: str | None = None  # why the dispatcher stopped (then /health says "failed")
        self.persist_error: str | None = None  # why the caches could not be saved at shutdown
        self.cache_owner: object = _NOBODY  # the client whose state the engine holds
        self.metrics = None  # a servermetrics.ServerMetrics when metrics are on (create_app)
        self._current: asyncio.Future | None = None
        self._dispatcher: asyncio.Task | None = None
        self._closed = False

    async def start(self) -> None:
        """Create the queue and the dispatcher on the running event loop (idempotent)."""
        if self._dispatcher is None:
            self.loop = asyncio.get_running_loop()
            self.queue = asyncio.Queue()  # bounded by the slots (`admit`)
            self._dispatcher = asyncio.create_task(self._dispatch(), name="edgespec-dispatcher")
            self._dispatcher.add_done_callback(self._dispatcher_stopped)

    def must_isolate(self, client: str | None) -> bool:
        """Whether the engine's state must be wiped before a job of `client` runs."""
        return not self.shared_cache and (client is None or client != self.cache_owner)

    async def _dispatch(self) -> None:
        """Hand queued jobs, one at a time, to the engine thread (jobs whose client went away are skipped). Survives
        anything a job raises; only its own cancellation (at shutdown) ends it."""
        while True:
            job = await self.queue.get()
            if job.ticket is not None:
                job.ticket.release()
            if job.cancelled:
                continue
            isolate = self.must_isolate(job.client)
            self.cache_owner = _NOBODY  # until the job has run (a cancelled or failed job may leave state behind)
            self.in_flight = job
            self._current = self.loop.run_in_executor(self.executor, run_job, self.engine, job, isolate)
            try:
                await asyncio.shield(self._current)
                self.cache_owner = job.client if job.client is not None else _NOBODY
                self.record_generation(job)
            except asyncio.CancelledError:
                if not self._current.done() or self._current.cancelled():
                    raise  # the dispatcher itself is cancelled (shutdown)
                self._job_failed(job, asyncio.CancelledError("the job was cancelled"))
            except BaseException as exc:  # noqa: BLE001  run_job never raises; this is the last line of defence
                self._job_failed(job, exc)
            finally:
                self.in_flight = None
                self.served += 1

    def record_generation(self, job: Job) -> None:
        """Add a finished job's counts and timings to the metrics (when on); a failure there is logged only."""
        stats = getattr(job.result, "stats", None)
        if self.metrics is None or stats is None:
            return
        try:
            self.metrics.observe_generation(stats, job.queue_seconds, job.result.finish_reason)
        except Exception as exc:  # noqa: BLE001  metrics never cost a request or the dispatcher
            logger.error("could not record metrics: %s: %s", type(exc).__name__, exc)

    def _job_failed(self, job: Job, exc: BaseException) -> None:
        logger.error("job failed: %s: %s", type(exc).__name__, exc)
        if not job.answered:
            job.post("error", engine_failure(exc))

    def _dispatcher_stopped(self, task: asyncio.Task) -> None:
        """Done-callback of the dispatcher: unless the server is closing, record why it stopped, fail the waiting
        jobs with 503, and refuse new ones (so no request waits for an answer that never comes)."""
        if self._closed:
            return
        if task.cancelled():
            self.failure = "the dispatcher was cancelled"
        else:
            exc = task.exception()
            self.failure = f"the dispatcher stopped: {type(exc).__name__}: {exc}" if exc else "the dispatcher ended"
        logger.error("%s; new requests get 503 and /health says 'failed'", self.failure)
        self._fail_waiting(self.unavailable())

    def _fail_waiting(self, error: APIError) -> None:
        """Answer every queued job with `error` (they never reach the worker)."""
        while self.queue is not None and not self.queue.empty():
            job = self.queue.get_nowait()
            if job.ticket is not None:
                job.ticket.release()
            job.cancel(error)
            job.events.put_nowait(("error", job.cancel_error))

    def alive(self) -> bool:
        """Whether the dispatcher runs (or has not been started yet)."""
        if self.failure is None and self._dispatcher is not None and self._dispatcher.done() and not self._closed:
            self.failure = "the dispatcher stopped"
        return self.failure is None

    def unavailable(self) -> APIError:
        """503 while the dispatcher is dead."""
        return APIError(503, f"the server cannot serve requests ({self.failure}); restart it", "server_error", None,
                        "server_failed")

    def admit(self) -> Ticket:
        """Take a queue slot before reading a request's body: 503 while shutting down or failed, 429 (unread) when
        `max_queue` requests are already being read or waiting."""
        if self.draining:
            raise shutting_down()
        if not self.alive():
            raise self.unavailable()
        if self.waiting >= self.max_queue:
            raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           "rate_limit_error", None, "queue_full", headers={"Retry-After": "1"})
        self.waiting += 1
        return Ticket(self)

    async def submit(self, request: CompletionRequest, client: str | None = None, ticket: Ticket | None = None) -> Job:
        """Queue a request (with the slot `ticket` from `admit`, else one is taken here): 429 when the queue is full,
        503 while shutting down or failed."""
        await self.start()
        if ticket is None:
            ticket = self.admit()
        if self.draining or not self.alive():
            ticket.release()
            raise shutting_down() if self.draining else self.unavailable()
        job = Job(request, self.loop, client=client, ticket=ticket)
        self.queue.put_nowait(job)
        return job

    def health(self) -> dict:
        """Status ("ok", "draining" or "failed", with the reason), queue depth, in-flight requests, served count,
        memory."""
        alive = self.alive()
        status = "failed" if not alive else "draining" if self.draining else "ok"
        out = {"status": status, "queue_depth": self.queue.qsize() if self.queue is not None else 0,
               "max_queue": self.max_queue, "in_flight": int(self.in_flight is not None), "served": self.served,
               "shared_cache": self.shared_cache, **memory_usage()}
        if not alive:
            out["error"] = self.failure
        return out

    # -- shutdown ----------------------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Stop taking requests: queued ones get 503 at once; the in-flight one may finish within the grace period,
        after which it is cancelled. Call on the event loop (see `begin_shutdown_threadsafe`)."""
        if self.draining:
            return
        self.draining = True
        self._fail_waiting(shutting_down())
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
        caches on the engine thread and stop it. A failure to persist is logged and kept in `persist_error` (the
        process then exits non-zero: `exit_status`)."""
        if self._closed:
            return
        self.begin_shutdown()
        self._closed = True
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
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001  (a panic while saving included)
            self.persist_error = f"{type(exc).__name__}: {exc}"
            logger.error("could not persist the caches: %s", self.persist_error)
        self.executor.shutdown(wait=False)

    def exit_status(self) -> int:
        """The process's exit status after `close`: 0, or 1 when the caches could not be saved or the dispatcher
        had failed."""
        return 1 if self.persist_error is not None or self.failure is not None else 0


def shutting_down() -> APIError:
    """503: the server is shutting down."""
    return APIError(503, "the server is shutting down", "server_error", None, "server_shutting_down")


# ---- HTTP layer ------------------------------------------------------------------------------------------------
def _json_response(payload: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status, headers=headers)


async def read_body(request, max_bytes: int, timeout: float | None) -> bytes:
    """The request body: 413 over `max_bytes` (by its Content-Length, unread, or as it arrives), 408 with
    `Connection: close` when it has not all arrived within `timeout` seconds (a client that sends half a body and
    stalls), ClientGone when the client disconnects during the upload."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and (len(length) > 18 or int(length) > max_bytes):
        raise body_too_large(max_bytes)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    try:
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), remaining)
            except StopAsyncIteration:
                break
            size += len(chunk)
            if size > max_bytes:
                raise body_too_large(max_bytes)
            chunks.append(chunk)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s ({size} bytes received)",
                       "invalid_request_error", None, "request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone(f"the client disconnected during the upload ({size} bytes received)") from None
    return b"".join(chunks)


async def read_json(request, max_bytes: int = MAX_BODY_BYTES, timeout: float | None = BODY_TIMEOUT) -> dict:
    """The request body as a JSON object (see `read_body` and `parse_json_body`)."""
    return parse_json_body(await read_body(request, max_bytes, timeout), max_bytes)


async def wait_disconnect(receive) -> None:
    """Return once the client has disconnected (the body must have been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# -- Host and Origin: no DNS rebinding, no cross-site requests ---------------------------------------------------
def host_name(host: str) -> str:
    """The name in a Host header (or a URL's netloc): no port, no brackets, lower case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_ip_literal(name: str) -> bool:
    """Whether `name` is an IPv4 or IPv6 address (a browser reaches it by address: no DNS to rebind)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_local_name(name: str) -> bool:
    """localhost, a *.localhost name (both always loopback in browsers) or a loopback address."""
    return name == "localhost" or name.endswith(".localhost") or (is_ip_literal(name) and
                                                                   ipaddress.ip_address(name).is_loopback)


def host_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's Host header is acceptable: an IP address, localhost, or a name in `allowed` ("*": any).
    Any other name is how DNS rebinding reaches a local server from a web page (its name resolves to 127.0.0.1)."""
    if host is None or "*" in allowed:
        return True  # HTTP/1.0 without Host: not a browser
    name = host_name(host)
    return bool(name) and (is_ip_literal(name) or is_local_name(name) or name in allowed)


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's Origin header is acceptable: none (not a browser, or a same-origin GET), an http(s)
    origin on this machine (localhost, 127.0.0.1, [::1], any port), or one in `allowed` ("*": any). A web page on
    another site (Origin https://evil.example) or a sandboxed one (Origin null) is refused."""
    if origin is None or "*" in allowed:
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and is_local_name(host_name(parts.netloc))


class RequestGuard:
    """ASGI middleware: 403 (unread) for a request whose Host is a foreign name (DNS rebinding) or whose Origin is
    a foreign web page (cross-site requests), before anything else runs."""

    def __init__(self, app, allowed_hosts=(), allowed_origins=()):
        self.app = app
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.allowed_origins = frozenset(o.lower().rstrip("/") for o in allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {}
            for key, value in scope.get("headers", ()):
                headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
            error = self.refusal(headers.get("host"), headers.get("origin"))
            if error is not None:
                logger.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), error.message)
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, host: str | None, origin: str | None) -> APIError | None:
        """The 403 for these headers, or None when they are acceptable."""
        if not host_allowed(host, self.allowed_hosts):
            return APIError(403, f"Host {shown(host)} is not this server's name (start the server with "
                                 "--allow-host NAME to accept it)", "invalid_request_error", None, "forbidden_host")
        if not origin_allowed(origin, self.allowed_origins):
            return APIError(403, f"requests from web pages at {shown(origin)} are refused (start the server with "
                                 "--allow-origin ORIGIN to accept them)", "invalid_request_error", None,
                            "forbidden_origin")
        return None


def local_origin_pattern() -> str:
    """A regular expression of the http(s) origins on this machine (allowed by default, as ollama does)."""
    return r"https?://(localhost|[a-z0-9.-]+\.localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?"


class Routes:
    """The endpoints of one app, bound to its Service."""

    def __init__(self, service: Service, model_id: str, api_keys: tuple[str, ...], max_tokens_limit: int | None,
                 request_timeout: float | None, max_body_bytes: int, default_chat_tokens: int,
                 body_timeout: float | None = BODY_TIMEOUT, max_text_chars: int = MAX_TEXT_CHARS, *,
                 names: "ModelNames | None" = None, created: int = 0, context_length: int | None = None,
                 metrics=None):
        self.service, self.model_id, self.api_keys = service, model_id, api_keys
        self.names = names or ModelNames(model_id)  # the id and the aliases a request's `model` may use
        self.created, self.context_length = created, context_length  # for the model card
        self.metrics = metrics  # a servermetrics.ServerMetrics, or None: /metrics is off
        self.max_text_chars = max_text_chars
        self.max_tokens_limit, self.request_timeout, self.max_body_bytes = max_tokens_limit, request_timeout, \
            max_body_bytes
        self.default_chat_tokens = default_chat_tokens
        self.body_timeout = body_timeout

    # -- plumbing ----------------------------------------------------------------------------------------------
    def endpoint(self, handler, auth: bool = True):
        """Wrap a handler: API key check, APIError -> its response, a client gone mid-request -> one log line,
        anything else -> 500 (the server stays up)."""

        async def wrapped(request):
            try:
                return await handler(request, self.authorize(request) if auth else None)
            except APIError as exc:
                return exc.response()
            except ClientGone as exc:
                from starlette.responses import Response

                logger.info("%s %s: %s", request.method, request.url.path, exc)
                return Response(status_code=499)
            except Exception as exc:
                logger.exception("unexpected error in %s", request.url.path)
                return APIError(500, f"internal server error: {type(exc).__name__}", "server_error").response()

        return wrapped

    def authorize(self, request) -> int | None:
        """The position of the API key the request carries as `Authorization: Bearer <key>`, or None when no key is
        set; 401 when keys are set and none matches (every key is compared, in constant time)."""
        if not self.api_keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token_bytes = token.strip().encode()
        found = None
        for i, key in enumerate(self.api_keys):
            if hmac.compare_digest(token_bytes, key.encode()) and found is None:
                found = i
        if scheme.lower() != "bearer" or found is None:
            raise APIError(401, "incorrect or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", None, "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return found

    def deadline(self) -> float | None:
        return None if self.request_timeout is None else time.monotonic() + self.request_timeout

    # -- endpoints ---------------------------------------------------------------------------------------------
    async def health(self, request, key=None):
        """GET /health: status ("ok", "draining", or "failed" with 503), model, queue depth, in-flight requests,
        memory (no API key needed)."""
        report = self.service.health()
        return _json_response({**report, "model": self.model_id}, 503 if report["status"] == "failed" else 200)

    async def models(self, request, key=None):
        """GET /v1/models."""
        return _json_response({"object": "list", "data": [self.model_card()]})

    async def model(self, request, key=None):
        """GET /v1/models/{model}: the id or an alias, in any case."""
        if not self.names.matches(request.path_params["model"]):
            raise self.names.not_found(request.path_params["model"])
        return _json_response(self.model_card())

    def model_card(self) -> dict:
        """OpenAI's model object, with the context length (`context_length`, and vLLM's `max_model_len`), the
        bundle's creation time and the other names the model answers to (`aliases`)."""
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgespec",
                "aliases": list(self.names.aliases)}
        if self.context_length is not None:
            card["context_length"] = card["max_model_len"] = self.context_length
        return card

    async def metrics_page(self, request, key=None):
        """GET /metrics: Prometheus text format (404 with a hint when the server runs without --metrics)."""
        if self.metrics is None:
            raise APIError(404, f"metrics are off: start the server with --metrics ({METRICS_HINT})",
                           "invalid_request_error", None, "not_found")
        from starlette.responses import Response

        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)

    async def chat_completions(self, request, key=None):
        """POST /v1/chat/completions."""
        return await self.complete(request, "chat", self.default_chat_tokens, key)

    async def completions(self, request, key=None):
        """POST /v1/completions."""
        return await self.complete(request, "completion", min(DEFAULT_COMPLETION_TOKENS,
                                                               self.max_tokens_limit or DEFAULT_COMPLETION_TOKENS),
                                   key)

    async def complete(self, request, kind: str, default_tokens: int, key: int | None = None):
        """Check the content type, take a queue slot (429 before reading anything), read and parse the body, queue,
        and answer (JSON or server-sent events)."""
        check_json_content_type(request.headers.get("content-type"))
        await self.service.start()
        ticket = self.service.admit()
        try:
            body = await read_json(request, self.max_body_bytes, self.body_timeout)
            spec = parse_request(body, kind, self.names, self.max_tokens_limit, default_tokens,
                                 self.max_text_chars)
            del body  # a queued request holds only its checked fields
            job = await self.service.submit(spec, client_identity(key, spec.user), ticket)
        except BaseException:
            ticket.release()
            raise
        deadline = self.deadline()
        reply = Reply(kind, self.model_id, spec.include_usage, logprobs=bool(spec.options.get("logprobs")))
        try:
            event, value = await self.first_event(request, job, deadline)
        except ClientGone:
            from starlette.responses import Response

            return Response(status_code=499)
        if event == "error":
            raise value
        if not spec.stream:
            text, result, entries = value
            return _json_response(reply.full(text, result, job.queue_seconds, entries))
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
                    text, entries = value
                    yield sse(reply.chunk(text=text, entries=entries))
                elif event == "done":
                    for chunk in reply.final_chunks(value[1], job.queue_seconds, value[2]):
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


def create_app(engine, model_name: str | None = None, api_key: "str | list[str] | tuple[str, ...] | None" = None,
               max_queue: int = 64, max_tokens_limit: int | None = None, request_timeout: float | None = None,
               shutdown_grace: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES, *, shared_cache: bool = False,
               body_timeout: float | None = BODY_TIMEOUT, allow_origins=(), allow_hosts=(), aliases=(),
               metrics: bool = False):
    """The Starlette app serving `engine` (see the module docstring). `model_name`: the model id (default: the
    bundle's target name); `aliases`: more names a request's `model` may use (at most MAX_ALIASES; the target's
    name and the bundle's folder name are accepted anyway, any case); `api_key`: a key, or several (one per client: each key's cached state is its own),
    required as `Authorization: Bearer KEY` on /v1 routes when set; `max_queue`: requests that may be read or wait
    (more get 429); `max_tokens_limit`: the largest max_tokens accepted (and chat's default); `request_timeout`:
    seconds from arrival to the last token (504 / in-stream error past it); `shutdown_grace`: seconds the in-flight
    request may take at shutdown; `shared_cache`: let every client reuse the engine's state (KV prefix, n-gram
    tiers, the persistent n-gram cache: a timing side channel between clients) instead of wiping it between
    clients; without it an engine with a persistent cache is refused (ValueError); `body_timeout`: seconds to
    receive a body (408 past it); `allow_origins`: web origins (`https://app.example`, "*") accepted besides this
    machine's (at most MAX_ORIGINS; they also get CORS headers, preflight included); `allow_hosts`: Host names
    accepted besides IP addresses and localhost ("*": any); `metrics`: serve Prometheus metrics at /metrics
    (needs prometheus_client: RuntimeError naming the extra without it). The Service is `app.state.service`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.routing import Route

    if max_tokens_limit is not None and (not is_int(max_tokens_limit) or max_tokens_limit < 1):
        raise ValueError(f"max_tokens_limit must be an int >= 1, got {max_tokens_limit!r}")
    if request_timeout is not None and not (is_finite_number(request_timeout) and request_timeout > 0):
        raise ValueError(f"request_timeout must be a number > 0, got {request_timeout!r}")
    if body_timeout is not None and not (is_finite_number(body_timeout) and body_timeout > 0):
        raise ValueError(f"body_timeout must be a number > 0, got {body_timeout!r}")
    keys = api_keys_of(api_key)
    origins = web_origins(allow_origins)
    names = model_names(engine, model_name, aliases)
    if not shared_cache and persistent_caches(engine):
        raise ValueError(f"the engine keeps a persistent cache that every client would share "
                         f"({', '.join(persistent_caches(engine))}): load it with ngram_cache=False, or pass "
                         "shared_cache=True (edgespec serve --shared-cache) to accept the timing side channel")
    service = Service(engine, max_queue=max_queue, shutdown_grace=shutdown_grace, shared_cache=shared_cache)
    context = getattr(engine, "context_length", None)
    default_chat = max_tokens_limit or (context if is_int(context) else 4096)
    if metrics:
        from .servermetrics import ServerMetrics

        service.metrics = ServerMetrics(queue_depth=lambda: service.queue.qsize() if service.queue else 0,
                                        waiting=lambda: service.waiting,
                                        in_flight=lambda: int(service.in_flight is not None))
    routes = Routes(service, names.id, keys, max_tokens_limit,
                    request_timeout, max_body_bytes, default_chat, body_timeout, text_limit(engine), names=names,
                    created=bundle_created_time(engine, int(time.time())),
                    context_length=context if is_int(context) else None, metrics=service.metrics)

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

    counting = [] if service.metrics is None else [Middleware(MetricsMiddleware, metrics=service.metrics)]
    app = Starlette(
        routes=[
            Route("/health", routes.endpoint(routes.health, auth=False), methods=["GET"]),
            Route("/v1/models", routes.endpoint(routes.models), methods=["GET"]),
            Route("/v1/models/{model:path}", routes.endpoint(routes.model), methods=["GET"]),
            Route("/v1/chat/completions", routes.endpoint(routes.chat_completions), methods=["POST"]),
            Route("/v1/completions", routes.endpoint(routes.completions), methods=["POST"]),
            Route("/metrics", routes.endpoint(routes.metrics_page), methods=["GET"]),
        ],
        middleware=[
            *counting,  # outermost: the guard's refusals are counted too
            Middleware(RequestGuard, allowed_hosts=tuple(allow_hosts), allowed_origins=tuple(origins)),
            # the guard has let only this machine's and the listed origins through: any request header is fine
            Middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=local_origin_pattern(),
                       allow_methods=["GET", "POST"], allow_headers=["*"], max_age=600),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.model_id = routes.model_id
    app.state.model_names = names
    app.state.metrics = service.metrics
    return app


def check_origin(text) -> str:
    """A web origin as the Origin header carries it (`https://app.example`, `http://host:8080`) or "*": lower case,
    no trailing slash; ValueError for anything else (a path, a query, a user name, another scheme, over 512
    characters)."""
    if not isinstance(text, str) or not text.strip() or len(text) > 512:
        raise ValueError(f"a web origin is 1 to 512 characters, got {shown(text)}")
    origin = text.strip().lower().rstrip("/")
    if origin == "*":
        return origin
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query
            or parts.fragment or "@" in parts.netloc or any(c.isspace() for c in origin)):
        raise ValueError(f"{shown(text)} is not a web origin: write scheme://host[:port], e.g. https://app.example")
    return origin


def web_origins(allow_origins) -> list[str]:
    """`create_app`'s allow_origins checked (`check_origin`), at most MAX_ORIGINS."""
    origins = list(allow_origins or ())
    if len(origins) > MAX_ORIGINS:
        raise ValueError(f"at most {MAX_ORIGINS} web origins, got {len(origins)}")
    return [check_origin(o) for o in origins]


def api_keys_of(api_key) -> tuple[str, ...]:
    """`create_app`'s api_key as a tuple of keys (empty: no key required)."""
    if api_key is None or api_key == "":
        return ()
    keys = (api_key,) if isinstance(api_key, str) else tuple(api_key)
    if not all(isinstance(k, str) and k for k in keys):
        raise ValueError("api keys must be non-empty strings")
    return keys


# ---- running it ------------------------------------------------------------------------------------------------
def _graceful_server(config, service: Service):
    """A uvicorn Server whose SIGTERM/SIGINT starts our drain at once and does not re-raise the signal after the
    shutdown (so the exit status is ours: `Service.exit_status`)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.begin_shutdown_threadsafe()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()  # uvicorn >= 0.29 re-raises captured signals after serving

    return GracefulServer(config)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
                  shutdown_grace: float = 30.0, max_connections: int = MAX_CONNECTIONS):
    """The uvicorn Config serving `app`: over `max_connections` concurrent connections or requests uvicorn answers
    503 (`limit_concurrency`)."""
    import uvicorn

    if not is_int(max_connections) or max_connections < 1:
        raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          limit_concurrency=max_connections,
                          timeout_graceful_shutdown=int(math.ceil(shutdown_grace + CANCEL_WAIT_SECONDS)))


def serve(engine, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          api_key: "str | list[str] | tuple[str, ...] | None" = None, max_queue: int = 64,
          max_tokens_limit: int | None = None, request_timeout: float | None = None, shutdown_grace: float = 30.0,
          log_level: str = "info", announce=print, shared_cache: bool = False,
          body_timeout: float | None = BODY_TIMEOUT, max_connections: int = MAX_CONNECTIONS, allow_origins=(),
          allow_hosts=(), aliases=(), metrics: bool = False) -> int:
    """Serve `engine` until SIGTERM/SIGINT, then shut down gracefully (no new requests; the in-flight one finishes
    within `shutdown_grace` seconds or is cancelled; caches persisted). Returns the exit status: 0, or 1 when the
    caches could not be saved or the dispatcher had failed. The other arguments are `create_app`'s and
    `server_config`'s; the bound host is accepted as a Host name."""
    hosts = tuple(allow_hosts) + (() if is_ip_literal(host_name(host)) else (host_name(host),))
    app = create_app(engine, model_name=model_name, api_key=api_key, max_queue=max_queue,
                     max_tokens_limit=max_tokens_limit, request_timeout=request_timeout,
                     shutdown_grace=shutdown_grace, shared_cache=shared_cache, body_timeout=body_timeout,
                     allow_origins=allow_origins, allow_hosts=hosts, aliases=aliases, metrics=metrics)
    config = server_config(app, host, port, log_level=log_level, shutdown_grace=shutdown_grace,
                           max_connections=max_connections)
    service = app.state.service
    server = _graceful_server(config, service)
    announce(f"edgespec serve: model {app.state.model_id!r} at http://{host}:{port}/v1 "
             f"(OpenAI-compatible; health at http://{host}:{port}/health)")
    announce("cache: " + ("shared by all clients (--shared-cache)" if shared_cache else
                          "per client (KV prefix and n-gram session state wiped between clients; no persistent "
                          "n-gram cache)"))
    if app.state.model_names.aliases:
        announce("model also answers to: " + ", ".join(repr(a) for a in app.state.model_names.aliases))
    if metrics:
        announce(f"metrics: http://{host}:{port}/metrics (Prometheus; counts and timings, no text"
                 f"{'; API key required' if api_key else ''})")
    server.run()
    status = service.exit_status()
    if status:
        announce(f"edgespec serve: exit status {status}: {service.persist_error or service.failure}")
    return status


def require_server_dependencies() -> None:
    """RuntimeError naming the extra when starlette or uvicorn is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"`edgespec serve` needs starlette and uvicorn ({exc}): "
                           "pip install 'edgespec[serve]'") from None


def read_api_keys(path: "str | os.PathLike") -> tuple[str, ...]:
    """The API keys in the file `path`, one per line (blank lines and `#` comments skipped): 1 to MAX_API_KEYS keys
    of 1 to 256 printable ASCII characters without spaces, in a regular file of at most MAX_KEY_FILE_BYTES.
    ValueError naming the file (and the line) otherwise; OSError when it cannot be read."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} has {st.st_size} bytes; an API key file has at most {MAX_KEY_FILE_BYTES}")
    with open(path, "rb") as f:
        raw = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} has over {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: API keys must be ASCII") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) > 256 or any(not 0x21 <= ord(c) <= 0x7E for c in key):
            raise ValueError(f"{path}, line {number}: an API key is 1 to 256 printable characters without spaces")
        keys.append(key)
    if not keys:
        raise ValueError(f"{path} holds no API key")
    if len(keys) > MAX_API_KEYS:
        raise ValueError(f"{path} holds {len(keys)} API keys; at most {MAX_API_KEYS}")
    return tuple(keys)


@dataclass(frozen=True)
class KeyFile:
    """--api-key-file: the file and the keys read from it."""

    path: str
    keys: tuple[str, ...]


def api_key_file(text: str) -> KeyFile:
    """argparse type of --api-key-file: the keys (see `read_api_keys`), read at once."""
    try:
        return KeyFile(text, read_api_keys(text))
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def key_file_readable_by_others(path: str) -> bool:
    """Whether the group or others may read the key file (then the server warns)."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def api_keys_from(args, environ) -> tuple[str, ...]:
    """The keys `serve` requires: those of --api-key-file and --api-key, else $EDGESPEC_API_KEY (none: open)."""
    keys = (args.api_key_file.keys if args.api_key_file else ()) + ((args.api_key,) if args.api_key else ())
    if not keys and environ.get("EDGESPEC_API_KEY", "").strip():
        keys = (environ["EDGESPEC_API_KEY"].strip(),)
    return keys


def origin_arg(text: str) -> str:
    """argparse type of --allow-origin / --cors-origin (see `check_origin`)."""
    try:
        return check_origin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def alias_arg(text: str) -> str:
    """argparse type of --alias (see `check_alias`)."""
    try:
        return check_alias(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_serve(args) -> int:
    """`edgespec serve`: load the bundle (no session history unless --history; no persistent n-gram cache unless
    --shared-cache) and serve it."""
    require_server_dependencies()
    if args.metrics:
        from .servermetrics import require_prometheus

        require_prometheus()  # before the model is loaded
    from .engine import load

    keys = api_keys_from(args, os.environ)
    say = lambda line: print(line, flush=True)  # noqa: E731
    if args.api_key:
        say("warning: --api-key is visible to every user of this machine (ps); use --api-key-file or "
            "EDGESPEC_API_KEY")
    if args.api_key_file and key_file_readable_by_others(args.api_key_file.path):
        say(f"warning: {args.api_key_file.path} is readable by other users (chmod 600 it)")
    if not is_local_name(host_name(args.host)) and not keys:
        say(f"warning: serving on {args.host} without an API key (--api-key-file or EDGESPEC_API_KEY)")
    engine = load(args.bundle, threads=args.threads, drafter=None if args.drafter == "none" else args.drafter,
                  device=None if args.device == "none" else args.device, max_context=args.max_context,
                  history=bool(args.history), ngram_cache=None if args.shared_cache else False)
    if args.history:
        say("history: on (--history): every prompt and answer is appended to the bundle's history file under "
            "$EDGESPEC_HISTORY_DIR or ~/.cache/edgespec/history")
    return serve(engine, host=args.host, port=args.port, model_name=args.model_name, api_key=keys or None,
                 max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                 request_timeout=args.request_timeout, shutdown_grace=args.grace, log_level=args.log_level,
                 announce=say, shared_cache=args.shared_cache, body_timeout=args.body_timeout,
                 max_connections=args.max_connections, allow_origins=tuple(args.allow_origin or ()),
                 allow_hosts=tuple(args.allow_host or ()), aliases=tuple(args.alias or ()), metrics=args.metrics)


def cmd_serve_bench(args) -> int:
    """`edgespec serve-bench`: the load test (edgespec.loadtest) against a running server."""
    from .loadtest import run_from_args

    return run_from_args(args)


def register_cli(subparsers) -> None:
    """Add the `serve` and `serve-bench` commands to an argparse subparsers object. Every number is bounded
    (edgespec.cliargs): a bad value is argparse's one-line error and exit status 2."""
    from .cliargs import MAX_TOKENS, at_most, bounded_float, bounded_int, bounded_text, not_special_file, threads_arg

    p = subparsers.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API")
    p.add_argument("--bundle", "-b", required=True, type=not_special_file)
    p.add_argument("--host", default="127.0.0.1", type=bounded_text(253),
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=bounded_int(1, 65535), default=8000, help="1 to 65535 (default 8000)")
    p.add_argument("--api-key-file", type=api_key_file, default=None, metavar="PATH",
                   help="require 'Authorization: Bearer KEY' on /v1 routes, KEY one of the keys in PATH (one per "
                        "line; each key's clients get their own cached state). Also: EDGESPEC_API_KEY")
    p.add_argument("--api-key", default=None, type=bounded_text(256),
                   help="one key on the command line (visible in `ps`: prefer --api-key-file or EDGESPEC_API_KEY)")
    p.add_argument("--model-name", default=None, type=bounded_text(256),
                   help="model id to serve under (default: the bundle's target name)")
    p.add_argument("--max-queue", type=bounded_int(1, 65536), default=64,
                   help="requests that may be read or wait; more get 429 (default 64)")
    p.add_argument("--max-tokens-limit", type=bounded_int(1, MAX_TOKENS), default=None,
                   help="largest max_tokens accepted")
    p.add_argument("--request-timeout", type=bounded_float(0, 86400, lo_open=True), default=None,
                   help="seconds per request, queueing included")
    p.add_argument("--body-timeout", type=bounded_float(0, 3600, lo_open=True), default=BODY_TIMEOUT,
                   help=f"seconds to receive a request body; a slower upload gets 408 and is dropped "
                        f"(default {BODY_TIMEOUT:g})")
    p.add_argument("--max-connections", type=bounded_int(1, 65536), default=MAX_CONNECTIONS,
                   help=f"concurrent connections and requests; more get 503 (default {MAX_CONNECTIONS})")
    p.add_argument("--grace", type=bounded_float(0, 3600), default=30.0,
                   help="seconds the in-flight request may take to finish at shutdown (default 30)")
    p.add_argument("--history", action="store_true",
                   help="record every prompt and answer in the bundle's session history (for `edgespec adapt`; "
                        "mode 0600). Off by default: the server keeps no client's text")
    p.add_argument("--shared-cache", action="store_true",
                   help="let all clients share the engine's caches (prompt-prefix reuse, n-gram tiers) and keep the "
                        "persistent n-gram cache: faster, but a client can time whether another sent a text")
    p.add_argument("--allow-origin", "--cors-origin", action=at_most(MAX_ORIGINS), type=origin_arg,
                   metavar="ORIGIN", help=f"a web origin (https://app.example) whose pages may call the server: "
                   f"accepted by the Origin check and given CORS headers, preflight included (repeatable, at most "
                   f"{MAX_ORIGINS}; '*': any). Pages on this machine (localhost) always may; others get 403")
    p.add_argument("--alias", action=at_most(MAX_ALIASES), type=alias_arg, metavar="NAME",
                   help=f"another name a request's 'model' may use (repeatable, at most {MAX_ALIASES}, 1 to "
                        f"{MAX_NAME_CHARS} characters); the bundle's target name and folder name are accepted "
                        "anyway, in any case")
    p.add_argument("--metrics", action="store_true",
                   help=f"serve Prometheus metrics at /metrics (counts and timings, no text; the API key applies). "
                        f"Needs prometheus_client: {METRICS_HINT}")
    p.add_argument("--allow-host", action=at_most(64), type=bounded_text(253), metavar="NAME",
                   help="a Host name to accept besides IP addresses, localhost and --host (repeatable; '*': any); "
                        "other names get 403 (DNS rebinding)")
    p.add_argument("--threads", type=threads_arg(), default=None, help="intra-op threads, 1 to 4x the CPU count")
    p.add_argument("--max-context", type=bounded_int(1, MAX_TOKENS), default=4096,
                   help=f"tokens of context, 1 to {MAX_TOKENS} (default 4096)")
    p.add_argument("--drafter", default="auto", metavar="SPEC", type=bounded_text(256),
                   help="speculative drafter (see `generate`)")
    p.add_argument("--device", default="auto", metavar="NAME|auto|FILE|none", type=not_special_file,
                   help="device profile sizing the draft trees (see `generate`)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    from .loadtest import add_arguments

    p = subparsers.add_parser("serve-bench", help="load-test a running `edgespec serve` (concurrent clients)")
    add_arguments(p)
    p.set_defaults(func=cmd_serve_bench)
