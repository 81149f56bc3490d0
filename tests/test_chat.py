"""Tests for edgespec.chat.render_chat.

The real chat templates of Qwen2.5-Coder and SmolLM2 are read from the GGUF files in
/work/dl/models (or $EDGESPEC_MODELS_DIR) with gguf.GGUFReader (cached in pytest's cache, the
reader is slow) and rendered both by edgespec and by transformers' own renderer; those tests
skip when the files, gguf or transformers are missing.  Hand-written expected strings cover the
same conversations without any of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgespec.chat import FALLBACK_FORMAT, ChatTemplateError, has_template, render_chat, render_plain

MODELS_DIR = Path(os.environ.get("EDGESPEC_MODELS_DIR", "/work/dl/models"))

# The two templates as stored in the GGUF files (checked against the files below when present).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Write a haiku about café ☕ and 日本."},
]

EXPECTED_CHATML = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    "<|im_start|>user\nWrite a haiku about café ☕ and 日本.<|im_end|>\n"
    "<|im_start|>assistant\n"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo actuelle d'une ville",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "Nom de la ville"}},
                "required": ["city"],
            },
        },
    }
]

TOOL_CONVERSATION = [
    {"role": "user", "content": "Quel temps fait-il à Zürich ?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp_c": 21, "sky": "ensoleillé"}'},
    {"role": "tool", "content": '{"wind_kmh": 5}'},
]

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "def add(a, b):"}],
    "system_multiturn": CONVERSATION,
    "no_system_multiturn": CONVERSATION[1:],
    "whitespace": [{"role": "user", "content": "  spaces\n\n\ttab  "}, {"role": "assistant", "content": ""}],
}


def _gguf_template(config, filename: str) -> str | None:
    path = MODELS_DIR / filename
    if not path.is_file():
        pytest.skip(f"{path} not present")
    st = path.stat()
    key = f"edgespec/gguf_chat_template/{filename}-{st.st_size}-{int(st.st_mtime)}"
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    cached = cache.get(key, None) if cache is not None else None
    if cached is not None:
        return cached["template"]
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("tokenizer.chat_template")
    template = None if field is None else field.contents()
    if cache is not None:
        cache.set(key, {"template": template})
    return template


@pytest.fixture(scope="session")
def qwen_template(request) -> str:
    t = _gguf_template(request.config, "qwen2.5-coder-0.5b.gguf")
    assert t
    return t


@pytest.fixture(scope="session")
def smollm_template(request) -> str:
    t = _gguf_template(request.config, "smollm2-135m.gguf")
    assert t
    return t


@pytest.fixture(scope="session")
def hf_render():
    """transformers' renderer for a template string (no model or tokenizer needed)."""
    pytest.importorskip("transformers")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        pytest.skip("this transformers version has no render_jinja_template")

    def render(template, messages, add_generation_prompt=True, **kwargs):
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return rendered[0]

    return render


# ---------------------------------------------------------------------------------------------
# real templates
# ---------------------------------------------------------------------------------------------


def test_smollm_gguf_template_is_the_known_one(smollm_template):
    assert smollm_template == SMOLLM2_TEMPLATE


def test_hand_written_chatml_smollm():
    assert render_chat(SMOLLM2_TEMPLATE, CONVERSATION) == EXPECTED_CHATML
    no_prompt = render_chat(SMOLLM2_TEMPLATE, CONVERSATION, add_generation_prompt=False)
    assert no_prompt == EXPECTED_CHATML[: -len("<|im_start|>assistant\n")]
    assert render_chat(SMOLLM2_TEMPLATE, [{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hand_written_chatml_qwen(qwen_template):
    assert render_chat(qwen_template, CONVERSATION) == EXPECTED_CHATML
    assert render_chat(qwen_template, [{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("model", ["qwen", "smollm"])
def test_matches_transformers(model, name, add_generation_prompt, request, hf_render):
    template = request.getfixturevalue(f"{model}_template")
    messages = CONVERSATIONS[name]
    kwargs = dict(bos_token="<|endoftext|>", eos_token="<|im_end|>")
    ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt, **kwargs)
    theirs = hf_render(template, messages, add_generation_prompt=add_generation_prompt, **kwargs)
    assert ours == theirs


def test_qwen_tools_match_transformers(qwen_template, hf_render):
    ours = render_chat(qwen_template, TOOL_CONVERSATION, tools=TOOLS)
    theirs = hf_render(qwen_template, TOOL_CONVERSATION, tools=TOOLS)
    assert ours == theirs
    assert "Météo" in ours and "Zürich" in ours  # tojson keeps non-ASCII
    assert ours.count("<tool_response>") == 2 and ours.count("<|im_start|>user") == 2
    assert ours.endswith("<|im_start|>assistant\n")


def test_messages_are_not_modified(qwen_template):
    import copy

    before = copy.deepcopy(TOOL_CONVERSATION)
    render_chat(qwen_template, TOOL_CONVERSATION, tools=TOOLS)
    assert TOOL_CONVERSATION == before


# ---------------------------------------------------------------------------------------------
# fallback
# ---------------------------------------------------------------------------------------------


def test_fallback_without_template():
    assert not has_template(None) and not has_template("") and not has_template("  \n")
    assert has_template(SMOLLM2_TEMPLATE)
    assert render_chat(None, [{"role": "user", "content": "Hi"}]) == "User: Hi\nAssistant:"
    assert render_chat("", CONVERSATION) == (
        "You are terse.\n\n"
        "User: Hi\n"
        "Assistant: Hello! How can I help?\n"
        "User: Write a haiku about café ☕ and 日本.\n"
        "Assistant:"
    )
    assert render_chat(None, CONVERSATION[:2], add_generation_prompt=False, bos_token="<bos>") == (
        "You are terse.\n\nUser: Hi\n"
    )
    assert render_plain([{"role": "tool", "content": "42"}]) == "Tool: 42\nAssistant:"
    assert "User:" in FALLBACK_FORMAT


# ---------------------------------------------------------------------------------------------
# environment and errors
# ---------------------------------------------------------------------------------------------


def test_environment_features():
    msgs = [{"role": "user", "content": "x"}]
    # trim_blocks / lstrip_blocks
    assert render_chat("  {% if true %}\nA\n  {% endif %}\nB", msgs) == "A\nB"
    # tojson: no ASCII or HTML escaping, optional indent
    assert render_chat("{{ {'k': 'é<>&'} | tojson }}", msgs) == '{"k": "é<>&"}'
    assert render_chat("{{ [1] | tojson(indent=2) }}", msgs) == "[\n  1\n]"
    # strftime_now
    out = render_chat("{{ strftime_now('%Y') }}", msgs)
    assert out.isdigit() and len(out) == 4
    # loop controls, namespace, dict
    t = "{% set ns = namespace(n=0) %}{% for m in [1,2,3,4] %}{% if m == 3 %}{% break %}{% endif %}"
    t += "{% set ns.n = ns.n + m %}{% endfor %}{{ ns.n }}{{ dict(a=1)['a'] }}"
    assert render_chat(t, msgs) == "31"
    # HF's {% generation %} block renders its body
    assert render_chat("{% generation %}gen{% endgeneration %}", msgs) == "gen"
    # bos/eos tokens and extra variables
    assert render_chat("{{ bos_token }}|{{ eos_token }}|{{ flavour }}", msgs, bos_token="<s>", eos_token="</s>",
                       flavour="x") == "<s>|</s>|x"
    out = render_chat("{{ tools is none }}{{ add_generation_prompt }}", msgs, add_generation_prompt=False)
    assert out == "TrueFalse"


def test_raise_exception_is_value_error():
    t = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System role first, please') }}{% endif %}"
    with pytest.raises(ValueError, match="System role first, please"):
        render_chat(t, [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        render_chat(t, [{"role": "user", "content": "x"}])


def test_bad_templates():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="does not compile"):
        render_chat("{% for m in messages %}", msgs)
    with pytest.raises(ValueError, match="failed to render"):
        render_chat("{{ messages.append(1) }}", msgs)  # immutable sandbox
    with pytest.raises(ValueError, match="failed to render"):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", msgs)
    with pytest.raises(ValueError, match="failed to render"):
        render_chat("{{ namespace(_x=1) }}", msgs)


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "must be a list"),
        (None, "must be a list"),
        ([["user", "hi"]], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no 'content'"),
        ([{"role": "", "content": "hi"}], "non-empty string"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 5}], r"messages\[1\]\['content'\]"),
        ([{"role": "assistant", "content": None}], "must be a string"),
        ([{"role": "user", "content": "x", "meta": object()}], "JSON-like"),
    ],
)
def test_invalid_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(SMOLLM2_TEMPLATE, messages)
    with pytest.raises(ValueError, match=match):
        render_chat(None, messages)
