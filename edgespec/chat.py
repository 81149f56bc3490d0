"""Chat prompt rendering with Hugging Face chat templates (jinja2, sandboxed).

The environment mirrors ``transformers``' ``apply_chat_template``: ``ImmutableSandboxedEnvironment``
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a no-op
``{% generation %}`` block, the ``raise_exception`` and ``strftime_now`` globals, a ``tojson`` filter
that does not escape non-ASCII/HTML characters, and the restricted ``dict``/``namespace`` globals.
The template sees ``messages``, ``tools`` and ``documents`` (None unless given),
``add_generation_prompt``, ``bos_token``, ``eos_token`` and any extra keyword argument.

Models without a template (e.g. the Gemma 3 270M base model) get a plain-text fallback, see
:data:`FALLBACK_FORMAT` and :func:`render_plain`.

A template comes from a bundle, so it is untrusted: the sandbox blocks file and attribute access, and a render is
bounded in time and memory (each limit raises :class:`ChatTemplateError` naming it):

* time: :data:`RENDER_SECONDS` of wall time, checked at every loop iteration, call, attribute or item access,
  operator, filter and output piece (the loops' iterables are wrapped when the template is compiled);
* output: at most :data:`RENDER_MAX_CHARS` characters, counted while rendering (``Template.generate``);
* values: no operator (``*``, ``+``, ``~``, ``%``, ``**``), filter (``center``, ``indent``, ``join``, ``replace``,
  ``batch``, ...) or string method (``ljust``, ``replace``, ``split``, ``format``, ...) may make a string over
  :data:`RENDER_MAX_CHARS` characters, a list over :data:`RENDER_MAX_ITEMS` items or an integer over
  :data:`RENDER_MAX_INT_BITS` bits: each is refused *before* it is computed, from its operands' sizes;
* in all, the strings, lists and outputs a render makes (macro bodies included) add up to at most
  :data:`RENDER_MAX_CREATED` characters and items, so a loop that builds values cannot outgrow the limits either.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import math
import re
import string
import time
import types
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.utils
import jinja2.visitor
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplateError",
    "FALLBACK_FORMAT",
    "has_template",
    "render_chat",
    "render_plain",
    "validate_messages",
    "RENDER_SECONDS",
    "RENDER_MAX_CHARS",
    "RENDER_MAX_ITEMS",
    "RENDER_MAX_INT_BITS",
    "RENDER_MAX_CREATED",
]

RENDER_SECONDS = 2.0  # wall time of one render (real templates take milliseconds)
RENDER_MAX_CHARS = 8 << 20  # characters of the rendered prompt, and of any one string a template makes
RENDER_MAX_ITEMS = 1 << 20  # items of any one list a template makes
RENDER_MAX_INT_BITS = 4096  # bits of any integer a template computes
RENDER_MAX_CREATED = 64 << 20  # characters and items of all strings, lists and output a render makes
MAX_TOJSON_INDENT = 64

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


# -- render budget: time and size limits (see the module docstring) ---------------------------------------------


class _Budget:
    """The limits of one render in progress: a deadline and the characters and items made so far."""

    __slots__ = ("deadline", "created")

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.created = 0


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("edgespec_chat_budget", default=None)


def _tick() -> None:
    """Raise ChatTemplateError when the render in progress is past its deadline (no-op outside a render)."""
    budget = _BUDGET.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise ChatTemplateError(f"chat template took over its time limit of {RENDER_SECONDS} s to render")


def _size(value: Any) -> int:
    """Characters of a string, items of a list, tuple or dict; 0 for anything else."""
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _refuse_size(kind: str, size: int) -> None:
    """Raise ChatTemplateError when a value of `kind` ("string", "list" or "integer") of `size` characters, items or
    bits would pass its limit."""
    limit = {"string": RENDER_MAX_CHARS, "list": RENDER_MAX_ITEMS, "integer": RENDER_MAX_INT_BITS}[kind]
    unit = {"string": "characters", "list": "items", "integer": "bits"}[kind]
    if size > limit:
        article = "an" if kind == "integer" else "a"
        raise ChatTemplateError(f"chat template makes {article} {kind} of {size} {unit}, over the limit of {limit}")


def _charge(value: Any) -> Any:
    """Count a value a template made against the render's limits (one value, and all made so far); returns it."""
    size = _size(value)
    if size:
        _refuse_size("string" if isinstance(value, str) else "list", size)
        budget = _BUDGET.get()
        if budget is not None:
            budget.created += size
            if budget.created > RENDER_MAX_CREATED:
                raise ChatTemplateError(f"chat template made over {RENDER_MAX_CREATED} characters and items in "
                                        "all while rendering")
    return value


def _int(value: Any) -> int | None:
    """`value` when it is an int (bools included, as Python treats them), else None."""
    return value if isinstance(value, int) else None


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would pass a size limit, judged from the operands before computing it."""
    if operator == "*":
        for seq, times in ((left, _int(right)), (right, _int(left))):
            if times is not None and isinstance(seq, (str, list, tuple)):
                _refuse_size("string" if isinstance(seq, str) else "list", len(seq) * max(times, 0))
        if _int(left) is not None and _int(right) is not None:
            _refuse_size("integer", abs(left).bit_length() + abs(right).bit_length())
    elif operator == "+":
        if isinstance(left, str) and isinstance(right, str):
            _refuse_size("string", len(left) + len(right))
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            _refuse_size("list", len(left) + len(right))
    elif operator == "**":
        if _int(left) is not None and _int(right) is not None and right > 0 and abs(left) > 1:
            _refuse_size("integer", math.ceil(right * math.log2(abs(left))))
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(left, right)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(fmt: str, args: Any) -> None:
    """Refuse a printf-style format whose field widths or precisions (written, or `*` taken from `args`) would
    make a string over RENDER_MAX_CHARS."""
    star = False
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*":
                star = True
            elif number:
                _refuse_size("string", len(number) > 7 and RENDER_MAX_CHARS + 1 or int(number))
    if star:
        for value in args if isinstance(args, tuple) else (args,):
            if _int(value) is not None:
                _refuse_size("string", abs(value))


def _check_brace_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """Refuse a str.format string whose format specs hold a width or precision over RENDER_MAX_CHARS (nested
    `{}` specs: judged from every integer argument)."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    nested = False
    for _, _, spec, _ in fields:
        if spec:
            nested |= "{" in spec
            for number in re.findall(r"\d+", spec):
                _refuse_size("string", len(number) > 7 and RENDER_MAX_CHARS + 1 or int(number))
    if nested:
        values = list(args) + (list(kwargs.values()) if isinstance(kwargs, Mapping) else [])
        for value in values:
            if _int(value) is not None:
                _refuse_size("string", abs(value))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or name."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _check_str_method(text: str, name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a str method call (`text.name(*args, **kwargs)`) whose result would pass a size limit."""
    if name in ("center", "ljust", "rjust", "zfill"):
        width = _int(_arg(args, kwargs, 0, "width"))
        if width is not None:
            _refuse_size("string", width)
    elif name == "expandtabs":
        tabsize = _int(_arg(args, kwargs, 0, "tabsize", 8))
        if tabsize is not None:
            _refuse_size("string", len(text) + text.count("\t") * max(tabsize, 0))
    elif name == "replace":
        old, new = _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new")
        if isinstance(old, str) and isinstance(new, str):
            found = text.count(old) if old else len(text) + 1
            count = _int(_arg(args, kwargs, 2, "count", -1))
            if count is not None and count >= 0:
                found = min(found, count)
            _refuse_size("string", len(text) + found * max(len(new) - len(old), 0))
    elif name == "join":
        items = _arg(args, kwargs, 0, "iterable")
        if isinstance(items, (list, tuple)):
            _refuse_size("string", sum(len(x) for x in items if isinstance(x, str))
                         + len(text) * max(len(items) - 1, 0))
    elif name in ("split", "rsplit"):
        sep, most = _arg(args, kwargs, 0, "sep"), _int(_arg(args, kwargs, 1, "maxsplit", -1))
        parts = text.count(sep) + 1 if isinstance(sep, str) and sep else len(text) // 2 + 1
        if most is not None and most >= 0:
            parts = min(parts, most + 1)
        _refuse_size("list", parts)
    elif name == "splitlines":
        _refuse_size("list", sum(map(text.count, "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")) + 1)


def _check_filter(name: str, bound: inspect.BoundArguments) -> None:
    """Refuse a filter call whose result would pass a size limit, judged from its arguments."""
    a = bound.arguments
    if name == "center":
        width = _int(a.get("width", 80))
        if width is not None:
            _refuse_size("string", width)
    elif name == "indent":
        s, width = a.get("s"), a.get("width", 4)
        if isinstance(s, str):
            step = len(width) if isinstance(width, str) else _int(width) or 0
            _refuse_size("string", len(s) + (s.count("\n") + 1) * max(step, 0))
    elif name == "wordwrap":
        s, wrap = a.get("s"), a.get("wrapstring")
        if isinstance(s, str) and isinstance(wrap, str):
            _refuse_size("string", len(s) * (1 + len(wrap)))
    elif name == "format":
        value = a.get("value")
        if isinstance(value, str):
            _check_percent_format(value, tuple(a.get("args", ())) or a.get("kwargs", {}))
    elif name == "join":
        value, sep = a.get("value"), a.get("d", "")
        if isinstance(value, (list, tuple)) and isinstance(sep, str) and a.get("attribute") is None:
            _refuse_size("string", sum(len(x) for x in value if isinstance(x, str))
                         + len(sep) * max(len(value) - 1, 0))
    elif name == "replace":
        s, old, new = a.get("s"), a.get("old"), a.get("new")
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            _check_str_method(s, "replace", (old, new, -1 if a.get("count") is None else a.get("count")), {})
    elif name in ("batch", "slice"):
        count = _int(a.get("linecount" if name == "batch" else "slices"))
        if count is not None:
            _refuse_size("list", count)
    elif name == "tojson":
        indent = a.get("indent")
        if (_int(indent) or 0) > MAX_TOJSON_INDENT or (isinstance(indent, str) and len(indent) > MAX_TOJSON_INDENT):
            raise ChatTemplateError(f"chat template asks tojson for an indent over {MAX_TOJSON_INDENT}")
    elif name == "sum":
        start, iterable = a.get("start", 0), a.get("iterable")
        if isinstance(start, (list, tuple, str)) and isinstance(iterable, (list, tuple)):
            _refuse_size("string" if isinstance(start, str) else "list",
                         len(start) + sum(len(x) for x in iterable if isinstance(x, (list, tuple, str))))
    elif name in ("list", "sort", "unique", "groupby", "dictsort", "reverse"):
        value = a.get("value")
        if isinstance(value, str):
            _refuse_size("list", len(value))


def _guard_filter(name: str, func):
    """`func` (a jinja filter) checked against the render's limits: the deadline before, the size of its result
    before (`_check_filter`) and after (`_charge`). Keeps jinja's pass_context / pass_environment marks."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        _tick()
        if signature is not None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                bound = None  # the filter itself raises the error
            if bound is not None:
                bound.apply_defaults()
                _check_filter(name, bound)
        return _charge(func(*args, **kwargs))

    return guarded


def _internal(func):
    """Mark one of the render's own helpers (called from the compiled template): not charged a second time."""
    func.edgespec_internal = True
    return func


@_internal
@jinja2.pass_eval_context
def _concat(eval_ctx, *values: Any) -> str:
    """The `~` operator (what jinja's markup_join / str_join do), refused before joining when too long."""
    texts = [v if isinstance(v, str) else str(v) for v in values]
    _refuse_size("string", sum(map(len, texts)))
    if eval_ctx.autoescape:
        return _charge(jinja2.runtime.markup_join(values))
    return _charge("".join(texts))


@_internal
def _emit(value: Any) -> Any:
    """One piece of output (also inside macros, blocks and `set` blocks): counted against the render's limits."""
    _tick()
    budget = _BUDGET.get()
    if budget is not None:
        budget.created += len(value) if isinstance(value, str) else len(str(value))
        if budget.created > RENDER_MAX_CREATED:
            raise ChatTemplateError(f"chat template made over {RENDER_MAX_CREATED} characters and items in all "
                                    "while rendering")
    return value


class _GuardedIterable:
    """A for loop's iterable whose every iteration checks the render's deadline (len() as the original's)."""

    __slots__ = ("_items",)

    def __init__(self, items: Any):
        self._items = items

    def __iter__(self):
        for item in self._items:
            _tick()
            yield item

    def __len__(self) -> int:
        return len(self._items)


@_internal
def _loop(items: Any) -> _GuardedIterable:
    """Wrap a for loop's iterable (see _GuardedIterable)."""
    return _GuardedIterable(items)


def _imported(func) -> jinja2.nodes.ImportedName:
    """A template node naming one of this module's functions (imported by the compiled template's code, so a
    template cannot shadow it with a variable of the same name)."""
    return jinja2.nodes.ImportedName(f"{__name__}.{func.__name__}")


class _Guard(jinja2.visitor.NodeTransformer):
    """Rewrites a parsed template so the budget sees what the sandbox cannot: every for loop iterates through
    `_loop`, every `~` runs as `_concat`, every output piece passes `_emit`."""

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        node.iter = jinja2.nodes.Call(_imported(_loop), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        return jinja2.nodes.Call(_imported(_concat), list(node.nodes), [], None, None, lineno=node.lineno)

    def visit_Output(self, node: jinja2.nodes.Output) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        node.nodes = [jinja2.nodes.Call(_imported(_emit), [child], [], None, None, lineno=child.lineno)
                      for child in node.nodes]
        return node


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the render budget in its hooks: operators that can make big values are
    intercepted, and calls, attribute and item access check the deadline."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context, operator, left, right):
        """Check the deadline and the result's size, then apply the operator."""
        _tick()
        _check_binop(operator, left, right)
        return _charge(super().call_binop(context, operator, left, right))

    def call(*args, **kwargs):  # (self, context, obj, *args): positional only, a template may pass any keyword
        """Check the deadline (and a str method's result size) around a call from the template."""
        self, context, obj, *rest = args
        _tick()
        if isinstance(obj, types.BuiltinMethodType) and isinstance(getattr(obj, "__self__", None), str):
            _check_str_method(obj.__self__, obj.__name__, tuple(rest), kwargs)
        result = ImmutableSandboxedEnvironment.call(self, context, obj, *rest, **kwargs)
        return result if getattr(obj, "edgespec_internal", False) else _charge(result)

    def getattr(self, obj, attribute):
        """Check the deadline, then the sandbox's attribute access."""
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        """Check the deadline, then the sandbox's item access."""
        _tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        """The sandbox's str.format, with its widths checked before formatting and its result charged."""
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        text, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(formatter)
        def bounded(*args, **kwargs):
            _tick()
            mapping = args[0] if is_map and args else kwargs
            _check_brace_format(text, () if is_map else args, mapping)
            return _charge(formatter(*args, **kwargs))

        return bounded


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, func) for name, func in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        tree = _Guard().visit(env.parse(template))
        tree.set_environment(env)
        return env.from_string(tree)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile (line {exc.lineno}): {exc.message}") from exc
    except RecursionError:
        raise ChatTemplateError("chat template does not compile: nested too deeply") from None


def _render_bounded(compiled: jinja2.Template, context: dict) -> str:
    """Render under a fresh budget: the deadline, the output cap (counted piece by piece as `generate` yields)
    and the limits on the values the template makes."""
    token = _BUDGET.set(_Budget(RENDER_SECONDS))
    try:
        pieces, total = [], 0
        for piece in compiled.generate(**context):
            total += len(piece)
            if total > RENDER_MAX_CHARS:
                raise ChatTemplateError(f"chat template output is over the limit of {RENDER_MAX_CHARS} characters")
            _tick()
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _BUDGET.reset(token)


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
    when the template does not compile, calls ``raise_exception``, fails while rendering, or passes a limit
    of the render budget (time, output size, value sizes: see the module docstring).
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
        return _render_bounded(compiled, context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
    except RecursionError:
        raise ChatTemplateError("chat template failed to render: recursion too deep") from None
    except MemoryError:
        raise ChatTemplateError("chat template failed to render: out of memory") from None
    except Exception as exc:  # noqa: BLE001  whatever the template's own code raises is the template's fault
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {str(exc)[:500]}") from exc
