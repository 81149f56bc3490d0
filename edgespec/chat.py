"""Chat prompt rendering with Hugging Face chat templates (jinja2, sandboxed).

The environment mirrors ``transformers``' ``apply_chat_template``: ``ImmutableSandboxedEnvironment``
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a no-op
``{% generation %}`` block, the ``raise_exception`` and ``strftime_now`` globals, a ``tojson`` filter
that does not escape non-ASCII/HTML characters, and the restricted ``dict``/``namespace`` globals.
The template sees ``messages``, ``tools`` and ``documents`` (None unless given),
``add_generation_prompt``, ``bos_token``, ``eos_token`` and any extra keyword argument.

Models without a template (e.g. the Gemma 3 270M base model) get a plain-text fallback, see
:data:`FALLBACK_FORMAT` and :func:`render_plain`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplateError",
    "FALLBACK_FORMAT",
    "has_template",
    "render_chat",
    "render_plain",
    "validate_messages",
]

FALLBACK_FORMAT = (
    "Plain-text fallback used when a model has no chat template:\n"
    "  a system message renders as its content followed by a blank line;\n"
    "  every other message renders as '<Role>: <content>' plus a newline, with the role capitalised\n"
    "  ('User: ...', 'Assistant: ...');\n"
    "  add_generation_prompt appends 'Assistant:' (no trailing space).\n"
    "bos_token/eos_token are not written: the caller adds BOS from the manifest's add_bos."
)


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or called ``raise_exception``."""


def has_template(template: str | None) -> bool:
    """True when ``template`` is a usable chat template (a non-blank string).

    When False, :func:`render_chat` uses the plain-text fallback (:data:`FALLBACK_FORMAT`).
    """
    return isinstance(template, str) and bool(template.strip())


def validate_messages(messages: Any) -> list[dict]:
    """Check a conversation and return it as a list of plain dicts (deep copy).

    Each message must be a dict with a non-empty string ``role`` and a ``content`` that is a string
    (``None`` is accepted for an assistant message that carries ``tool_calls``).  Extra keys are
    kept.  Raises ``ValueError`` naming the offending message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(msg).__name__}")
        if "role" not in msg:
            raise ValueError(f"messages[{i}] has no 'role' key")
        role = msg["role"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        if "content" not in msg:
            raise ValueError(f"messages[{i}] (role {role!r}) has no 'content' key")
        content = msg["content"]
        if not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
            raise ValueError(
                f"messages[{i}]['content'] (role {role!r}) must be a string, got {type(content).__name__}"
            )
        out.append(_plain(msg, f"messages[{i}]"))
    return out


def _plain(value: Any, where: str) -> Any:
    """Rebuild JSON-like data out of plain types so the template only ever sees inert objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise ValueError(f"{where} contains a {type(value).__name__}; only JSON-like values are allowed")


def render_plain(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Plain-text rendering for models without a chat template (see :data:`FALLBACK_FORMAT`).

    Example: ``[system "Be brief.", user "Hi"]`` -> ``"Be brief.\\n\\nUser: Hi\\nAssistant:"``.
    """
    msgs = validate_messages(messages)
    parts = []
    for m in msgs:
        content = m["content"] or ""
        if m["role"] == "system":
            parts.append(f"{content}\n\n")
        else:
            parts.append(f"{m['role'][:1].upper()}{m['role'][1:]}: {content}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


# -- jinja environment (same conventions as transformers.utils.chat_template_utils) --------------


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(f"chat template raised an error: {message}")


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` for templates without exposing the ``dict`` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore attributes."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged (HF uses it for masks)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile (line {exc.lineno}): {exc.message}") from exc


def render_chat(
    template: str | None,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render ``messages`` into a prompt string with a Hugging Face chat template.

    ``template`` is the jinja source (manifest ``chat_template``).  When it is None or blank,
    the plain-text fallback :func:`render_plain` is used (check :func:`has_template` to report it).
    ``extra`` keyword arguments (``tools=``, ``documents=``, ``enable_thinking=`` ...) are passed to
    the template.  Many templates write ``bos_token`` themselves: do not prepend BOS again then.

    Raises ``ValueError`` for malformed messages and :class:`ChatTemplateError` (a ``ValueError``)
    when the template does not compile, calls ``raise_exception`` or fails while rendering.
    """
    if not has_template(template):
        return render_plain(messages, add_generation_prompt=add_generation_prompt)
    msgs = validate_messages(messages)
    compiled = _compile(template)
    context = {"tools": None, "documents": None}
    context.update({k: _plain(v, k) for k, v in extra.items()})
    context.update(
        messages=msgs,
        add_generation_prompt=bool(add_generation_prompt),
        bos_token=bos_token,
        eos_token=eos_token,
    )
    try:
        return compiled.render(**context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
    except (TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc
