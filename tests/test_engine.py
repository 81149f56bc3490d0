"""Engine behaviour on the tiny bundles: greedy parity with torch, streaming, stop rules, sampling, prefix reuse,
chat and stats. Every assertion compares against an independent reference (torch, the tokenizer, a fresh engine)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgespec.engine import Engine, GenerationResult, load

ARCHS = ("qwen2", "llama", "gemma3")
PROMPTS = (
    "The quick brown fox jumps over",
    "def add(a, b):\n    return",
    "Speculative decoding drafts tokens. Caf\u00e9 \u65e5\u672c\u8a9e \U0001F600",
)
MULTIBYTE_PROMPT = "Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001F600 and"
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def engines(tiny_bundles) -> dict[str, Engine]:
    """One engine per tiny architecture, shared by the tests of this module (each test's result must not depend
    on what ran before it: that is itself part of what is tested, since the engine reuses cached prefixes)."""
    return {arch: load(tiny_bundles[arch], threads=2) for arch in ARCHS}


def _top2_margin(model, ids: list[int]) -> float:
    """Top-1 minus top-2 logit of the torch model after `ids`."""
    from edgespec.export.reference import reference_logits

    last = np.sort(reference_logits(model, np.asarray(ids))[-1].astype(np.float64))
    return float(last[-1] - last[-2])


# ---- greedy parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_torch(arch, engines, tiny_models, torch_reference):
    """64 greedy tokens equal transformers' greedy output (for Gemma this crosses the sliding window of 8)."""
    from edgespec.export.reference import reference_greedy

    engine = engines[arch]
    model = torch_reference("hf", tiny_models[arch])
    if arch == "gemma3":
        assert engine.entry.sliding_window == 8 and "sliding" in engine.entry.layer_types
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        assert len(ids) + 64 > 8
        ours = engine.generate(ids, max_new_tokens=64, ignore_eos=True).token_ids
        ref = reference_greedy(model, ids, 64)
        assert len(ref) == 64
        assert len(ours) == 64, f"{arch} {prompt!r}: generated {len(ours)} tokens, expected 64"
        if ours == ref:
            continue
        p = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
        margin = _top2_margin(model, ids + ref[:p])
        assert margin < NEAR_TIE, (
            f"{arch} {prompt!r}: first difference at token {p} (ours {ours[p]}, torch {ref[p]}) is not a near-tie: "
            f"torch top-2 margin {margin:.3g}")


@pytest.mark.parametrize("arch", ARCHS)
def test_text_and_token_prompts_agree(arch, engines):
    """A text prompt is the same as its encoded ids."""
    engine = engines[arch]
    a = engine.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True)
    b = engine.generate(engine.encode(PROMPTS[0]), max_new_tokens=16, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.stats.prompt_tokens == len(engine.encode(PROMPTS[0]))


# ---- streaming ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt", [PROMPTS[0], MULTIBYTE_PROMPT])
def test_stream_concatenates_to_generate_and_decode(arch, prompt, engines):
    engine = engines[arch]
    result = engine.generate(prompt, max_new_tokens=48, ignore_eos=True)
    pieces = list(engine.stream(prompt, max_new_tokens=48, ignore_eos=True))
    assert "".join(pieces) == result.text
    assert result.text == engine.tokenizer.decode(result.token_ids)
    assert all(isinstance(p, str) and p for p in pieces)
    assert engine.last_stats.new_tokens == len(result.token_ids) == 48


def test_multibyte_prompt_round_trips(engines):
    """The multi-byte prompt is tokenized losslessly (so the engine sees exactly the characters we gave)."""
    for engine in engines.values():
        ids = engine.encode(MULTIBYTE_PROMPT)
        assert engine.tokenizer.decode(ids) == MULTIBYTE_PROMPT
        assert len(MULTIBYTE_PROMPT.encode()) > len(MULTIBYTE_PROMPT)  # really multi-byte


def test_stream_pieces_never_split_a_character(engines):
    """Every streamed piece is a whole-character string: no piece ends in an incomplete UTF-8 sequence that a
    later piece completes (a replacement char in a piece must also be in decode() of the whole output)."""
    engine = engines["qwen2"]
    result = engine.generate(MULTIBYTE_PROMPT, max_new_tokens=64, ignore_eos=True)
    pieces = list(engine.stream(MULTIBYTE_PROMPT, max_new_tokens=64, ignore_eos=True))
    assert "".join(pieces) == result.text
    assert sum(p.count("\ufffd") for p in pieces) == result.text.count("\ufffd")


# ---- stop strings, EOS, length ------------------------------------------------------------------------------------


def _stop_across_two_tokens(engine: Engine, ids: list[int]) -> tuple[str, int] | None:
    """A stop string that spans a token boundary of the output `ids` and first occurs right there.

    Returns (stop, k): the stop string ends with the first character of token k + 1's text and starts inside
    the text of token k or earlier; its first occurrence in the whole text is at that place.
    """
    full = engine.tokenizer.decode(ids)
    ends = []  # ends[k] = length of the text of ids[:k + 1] when it is a stable prefix of the full text
    for k in range(len(ids)):
        t = engine.tokenizer.decode(ids[:k + 1])
        ends.append(len(t) if full.startswith(t) and not t.endswith("\ufffd") else None)
    order = list(range(2, len(ids) - 1)) + [0, 1]
    for k in order:
        start, end, nxt = (ends[k - 1] if k else 0), ends[k], ends[k + 1]
        if start is None or end is None or nxt is None or not start < end < nxt:
            continue
        for s in range(end - 1, -1, -1):  # shortest first
            stop = full[s:end + 1]
            if "\ufffd" in stop:
                break
            if full.find(stop) == s:
                return stop, k
    return None


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_string(arch, engines):
    engine = engines[arch]
    for prompt in (PROMPTS[1], PROMPTS[0], PROMPTS[2]):  # the first whose output has a clean token boundary
        full = engine.generate(prompt, max_new_tokens=48, ignore_eos=True)
        found = _stop_across_two_tokens(engine, full.token_ids)
        if found is not None:
            break
    assert found is not None, f"{arch}: no usable token boundary in {full.text!r}"
    stop, k = found
    cut = full.text.find(stop)
    assert 0 <= cut < len(engine.tokenizer.decode(full.token_ids[:k + 1]))
    stopped = engine.generate(prompt, max_new_tokens=48, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    assert stop not in stopped.text
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(full.token_ids)
    # the token that completed the stop string (token k + 1) is the last one kept
    assert len(stopped.token_ids) == k + 2
    assert stop in engine.tokenizer.decode(stopped.token_ids)
    assert stop not in engine.tokenizer.decode(stopped.token_ids[:-1])
    # the streamed form stops at the same place
    assert "".join(engine.stream(prompt, max_new_tokens=48, ignore_eos=True, stop=[stop])) == full.text[:cut]


def test_stop_string_never_generated_runs_to_length(engines):
    engine = engines["llama"]
    full = engine.generate(PROMPTS[0], max_new_tokens=20, ignore_eos=True)
    stop = "\u2603never\u2603"
    assert stop not in full.text
    r = engine.generate(PROMPTS[0], max_new_tokens=20, ignore_eos=True, stop=stop)
    assert (r.text, r.token_ids, r.finish_reason) == (full.text, full.token_ids, "length")


def test_eos_stops_before_the_eos_token(engines):
    # a (engine, prompt) whose 5th greedy token does not occur among the first four
    cases = [(engines[a], p) for a in ARCHS for p in PROMPTS]
    for engine, prompt in cases:
        greedy = engine.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids
        if greedy[4] not in greedy[:4]:
            break
    else:
        pytest.fail("no prompt whose 5th greedy token is new")
    t = greedy[4]
    r = engine.generate(prompt, max_new_tokens=16, eos_token_ids=[t])
    assert r.token_ids == greedy[:4]
    assert r.finish_reason == "stop"
    assert r.text == engine.tokenizer.decode(greedy[:4])
    assert r.stats.new_tokens == 4
    # ignore_eos wins over eos_token_ids
    r2 = engine.generate(prompt, max_new_tokens=16, eos_token_ids=[t], ignore_eos=True)
    assert r2.token_ids == greedy and r2.finish_reason == "length"


def test_model_eos_ids_stop_by_default(engines):
    """Without eos_token_ids, the manifest's EOS ids stop generation (found by forcing one to be greedy)."""
    engine = engines["qwen2"]
    greedy = engine.generate(PROMPTS[0], max_new_tokens=32, ignore_eos=True).token_ids
    eos = set(engine.entry.eos_token_ids)
    assert eos
    r = engine.generate(PROMPTS[0], max_new_tokens=32)
    hits = [i for i, t in enumerate(greedy) if t in eos]
    if hits:
        assert r.token_ids == greedy[:hits[0]] and r.finish_reason == "stop"
    else:
        assert r.token_ids == greedy and r.finish_reason == "length"


@pytest.mark.parametrize("n", [1, 7])
def test_max_new_tokens_is_honoured(n, engines):
    engine = engines["gemma3"]
    longer = engine.generate(PROMPTS[2], max_new_tokens=12, ignore_eos=True)
    r = engine.generate(PROMPTS[2], max_new_tokens=n, ignore_eos=True)
    assert r.token_ids == longer.token_ids[:n]
    assert r.finish_reason == "length"
    assert r.stats.new_tokens == n


def test_zero_new_tokens(engines):
    engine = engines["llama"]
    r = engine.generate(PROMPTS[0], max_new_tokens=0)
    assert r.text == "" and r.token_ids == [] and r.stats.new_tokens == 0
    assert list(engine.stream(PROMPTS[0], max_new_tokens=0)) == []


def test_generation_stops_at_the_context_length(tiny_bundles):
    engine = load(tiny_bundles["llama"], max_context=32)
    ids = engine.encode("The quick brown fox jumps over the lazy dog. Berlin is the capital of")
    assert len(ids) < 30
    r = engine.generate(ids, max_new_tokens=100, ignore_eos=True)
    assert len(r.token_ids) == 32 - len(ids)
    assert r.finish_reason == "length"
    fresh = load(tiny_bundles["llama"]).generate(ids, max_new_tokens=32 - len(ids), ignore_eos=True)
    assert r.token_ids == fresh.token_ids


# ---- sampling -----------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(engines):
    engine = engines["qwen2"]
    kw = dict(max_new_tokens=32, ignore_eos=True, temperature=1.0)
    a = engine.generate(PROMPTS[0], seed=1, **kw)
    b = engine.generate(PROMPTS[0], seed=1, **kw)
    c = engine.generate(PROMPTS[0], seed=2, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    greedy = engine.generate(PROMPTS[0], max_new_tokens=32, ignore_eos=True)
    assert a.token_ids != greedy.token_ids  # temperature 1 on a random model really samples
    # a fresh engine with the same seed agrees (the seed, not the engine's history, decides)
    assert load(engine.bundle_path).generate(PROMPTS[0], seed=1, **kw).token_ids == a.token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_1_is_greedy(arch, engines):
    engine = engines[arch]
    greedy = engine.generate(PROMPTS[1], max_new_tokens=24, ignore_eos=True)
    for seed in (0, 5):
        r = engine.generate(PROMPTS[1], max_new_tokens=24, ignore_eos=True, temperature=0.8, top_k=1, seed=seed)
        assert r.token_ids == greedy.token_ids


def test_do_sample_false_is_greedy(engines):
    engine = engines["qwen2"]
    greedy = engine.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True)
    r = engine.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, temperature=1.5, do_sample=False, seed=3)
    assert r.token_ids == greedy.token_ids


# ---- prefix reuse -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_reuse_matches_a_fresh_engine(arch, tiny_bundles):
    engine = load(tiny_bundles[arch])
    first_ids = engine.encode(PROMPTS[0])
    first = engine.generate(first_ids, max_new_tokens=12, ignore_eos=True)
    assert first.stats.reused_prompt_tokens == 0

    # 1. the second prompt extends the first one
    extra = engine.encode(" and then the dog sleeps.")
    second_ids = first_ids + extra
    second = engine.generate(second_ids, max_new_tokens=20, ignore_eos=True)
    assert second.stats.reused_prompt_tokens >= len(first_ids)
    assert second.stats.prompt_tokens == len(second_ids)
    fresh = load(tiny_bundles[arch]).generate(second_ids, max_new_tokens=20, ignore_eos=True)
    assert second.token_ids == fresh.token_ids and second.text == fresh.text

    # 2. a continuation of the conversation: prompt + answer + more; all but the answer's last token is cached
    third_ids = second_ids + second.token_ids + extra
    third = engine.generate(third_ids, max_new_tokens=20, ignore_eos=True)
    assert third.stats.reused_prompt_tokens == len(second_ids) + len(second.token_ids) - 1
    fresh = load(tiny_bundles[arch]).generate(third_ids, max_new_tokens=20, ignore_eos=True)
    assert third.token_ids == fresh.token_ids

    # 3. back to a shorter, diverging prompt: the cache is rewound, results still exact
    fourth_ids = first_ids[:-1] + engine.encode(" cat")
    fourth = engine.generate(fourth_ids, max_new_tokens=20, ignore_eos=True)
    assert fourth.stats.reused_prompt_tokens == len(first_ids) - 1
    fresh = load(tiny_bundles[arch]).generate(fourth_ids, max_new_tokens=20, ignore_eos=True)
    assert fourth.token_ids == fresh.token_ids

    # 4. the very same prompt again: everything but the last prompt token is reused, same output
    again = engine.generate(fourth_ids, max_new_tokens=20, ignore_eos=True)
    assert again.stats.reused_prompt_tokens == len(fourth_ids) - 1
    assert again.token_ids == fourth.token_ids

    # 5. reset forgets the cache
    engine.reset()
    after = engine.generate(fourth_ids, max_new_tokens=20, ignore_eos=True)
    assert after.stats.reused_prompt_tokens == 0 and after.token_ids == fourth.token_ids


def test_a_variant_shares_the_session_but_not_the_cache_or_the_speculation(tiny_bundles):
    """Engine.variant: the loaded target (session) is shared; the KV cache, drafter and tree policy are its own, so
    generations alternating between the two stay exact, and closing one leaves the other working."""
    engine = load(tiny_bundles["qwen2"], threads=1, drafter=None, history=False)
    variant = engine.variant("ngram", tree="chain:2")
    assert variant._runner.session is engine._runner.session and variant._runner is not engine._runner
    assert engine.drafter is None and variant.drafter.name == "ngram" and variant.tree_policy == "chain:2"
    assert variant.context_length == engine.context_length and variant.threads == engine.threads
    prompts = [engine.encode(p) for p in PROMPTS[:2]]
    first = [engine.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids for ids in prompts]
    for ids, expected in zip(prompts, first):  # alternating: each engine keeps its own committed prefix
        assert variant.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids == expected
        assert engine.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids == expected
    assert variant.last_stats.drafted_tokens > 0  # it speculated
    engine.close()
    assert variant.generate(prompts[0], max_new_tokens=12, ignore_eos=True).token_ids == first[0]
    with pytest.raises(RuntimeError, match="closed"):
        engine.variant()


def test_the_ngram_drafter_stops_correcting_its_estimates_while_a_planner_sizes_its_trees(tiny_bundles):
    engine = load(tiny_bundles["qwen2"], threads=1, drafter="ngram", history=False, tree="plan")
    assert engine.drafter.self_calibrating is False
    scored = engine.variant("ngram", tree="scores")
    assert scored.drafter.self_calibrating is True
    engine.set_drafter("ngram", ngram_cache=False)
    assert engine.drafter.self_calibrating is False
    engine.close()
    scored.close()


def test_abandoned_stream_does_not_corrupt_the_cache(tiny_bundles):
    """Stopping a stream early (consumer breaks) leaves the engine consistent for the next call."""
    engine = load(tiny_bundles["gemma3"])
    ids = engine.encode(PROMPTS[2])
    stream = engine.stream(ids, max_new_tokens=40, ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    follow = ids + engine.encode(" more")
    r = engine.generate(follow, max_new_tokens=24, ignore_eos=True)
    fresh = load(tiny_bundles["gemma3"]).generate(follow, max_new_tokens=24, ignore_eos=True)
    assert r.token_ids == fresh.token_ids


# ---- chat ---------------------------------------------------------------------------------------------------------


def test_chat_uses_the_template(engines):
    engine = engines["qwen2"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = engine.render_chat(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi there<|im_end|>" in rendered
    ids = engine.encode(rendered)
    assert engine.tokenizer.token_to_id("<|im_start|>") in ids  # the marker is one special token, not text
    r = engine.chat(messages, max_new_tokens=16, ignore_eos=True)
    assert isinstance(r, GenerationResult) and r.text
    assert r.token_ids == engine.generate(rendered, max_new_tokens=16, ignore_eos=True).token_ids
    assert "".join(engine.chat_stream(messages, max_new_tokens=16, ignore_eos=True)) == r.text


def test_chat_fallback_without_template(tiny_bundles, tmp_path):
    bundle = tmp_path / "gemma-no-template"
    shutil.copytree(tiny_bundles["gemma3"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["models"][manifest["target"]]["chat_template"] = None
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    engine = load(bundle)
    assert engine.entry.chat_template is None
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = engine.render_chat(messages)
    assert rendered == "User: Hi there\nAssistant:"
    assert "<|im_start|>" not in rendered
    r = engine.chat(messages, max_new_tokens=12, ignore_eos=True)
    assert r.text and len(r.token_ids) == 12
    assert r.token_ids == engine.generate(rendered, max_new_tokens=12, ignore_eos=True).token_ids


# ---- stats --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_stats(arch, tiny_bundles):
    """Plain decoding's stats (speculative stats are tested in test_speculative)."""
    engine = load(tiny_bundles[arch], drafter=None)
    ids = engine.encode(PROMPTS[0])
    r = engine.generate(ids, max_new_tokens=16, ignore_eos=True)
    s = r.stats
    assert engine.last_stats is s
    assert s.new_tokens == 16 == len(r.token_ids)
    assert s.prompt_tokens == len(ids)
    assert s.reused_prompt_tokens == 0
    assert s.steps == 16  # prefill + 15 single-token decodes
    assert s.mean_accepted_tokens == pytest.approx(s.new_tokens / s.steps) == pytest.approx(1.0)
    for name in ("prefill_seconds", "decode_seconds", "time_to_first_token", "total_seconds"):
        assert getattr(s, name) > 0, name
    assert s.total_seconds >= s.prefill_seconds + s.decode_seconds * 0.99
    assert s.time_to_first_token <= s.total_seconds
    assert s.tokens_per_second > 0
    d = s.to_dict()
    assert d["new_tokens"] == 16 and d["mean_accepted_tokens"] == pytest.approx(1.0)
    json.dumps(d)
    # EOS-stopped: the step that produced the EOS counts, the EOS itself is not a new token
    greedy = r.token_ids
    stopped = engine.generate(ids, max_new_tokens=16, eos_token_ids=[greedy[3]] if greedy[3] not in greedy[:3]
                              else [max(engine.entry.vocab_size - 1, 0)])
    assert stopped.stats.new_tokens == len(stopped.token_ids)
    assert stopped.stats.steps >= stopped.stats.new_tokens


# ---- option validation --------------------------------------------------------------------------------------------


def test_unknown_option_is_a_type_error(engines):
    engine = engines["llama"]
    with pytest.raises(TypeError, match="max_tokens"):
        engine.generate("Hi", max_tokens=5)
    with pytest.raises(TypeError, match="bogus"):
        list(engine.stream("Hi", bogus=1))
    with pytest.raises(TypeError, match="nope"):
        engine.chat([{"role": "user", "content": "Hi"}], nope=True)


@pytest.mark.parametrize("option, match", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"stop": [""]}, "stop"),
    ({"seed": -3}, "seed"),
])
def test_invalid_option_values(option, match, engines):
    engine = engines["llama"]
    before = engine.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).token_ids
    with pytest.raises(ValueError, match=match):
        engine.generate(PROMPTS[0], **option)
    assert engine.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).token_ids == before


def test_bad_prompts(engines):
    engine = engines["llama"]
    before = engine.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).token_ids
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate("")
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, 2, engine.entry.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([-1, 5])
    assert engine.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True).token_ids == before


def test_top_level_api_and_eager_stream_errors(tiny_bundles):
    import edgespec
    from edgespec.runtimes.runner import ContextOverflow

    engine = edgespec.load(tiny_bundles["qwen2"], max_context=32)
    assert isinstance(engine, edgespec.Engine)
    with pytest.raises(TypeError):
        engine.stream("hello", no_such_option=1)  # raised at the call, not at the first piece
    with pytest.raises(ContextOverflow, match="context length is 32"):
        engine.stream(list(range(40)))
    assert "".join(engine.stream("hello", max_new_tokens=4)) == engine.generate("hello", max_new_tokens=4).text


def test_truncation_only_when_asked(tiny_bundles):
    import edgespec
    from edgespec.runtimes.runner import ContextOverflow

    engine = edgespec.load(tiny_bundles["qwen2"], max_context=48)
    prompt = list(range(1, 61))
    with pytest.raises(ContextOverflow, match="truncate_prompt"):
        engine.generate(prompt, max_new_tokens=8)
    result = engine.generate(prompt, max_new_tokens=8, truncate_prompt=True)
    assert result.stats.prompt_tokens == 40  # 48 - room for 8 new tokens: the prompt's last 40 tokens
    assert result.token_ids == engine.generate(prompt[-40:], max_new_tokens=8).token_ids


def test_base_model_chat_fallback_is_announced(tiny_bundles, tmp_path):
    import json as _json
    import warnings as _warnings

    import edgespec

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["gemma3"], copy)
    manifest = _json.loads((copy / "manifest.json").read_text())
    for model in manifest["models"].values():
        model["chat_template"] = None
    (copy / "manifest.json").write_text(_json.dumps(manifest))
    engine = edgespec.load(copy)
    with pytest.warns(UserWarning, match="no chat template"):
        engine.render_chat([{"role": "user", "content": "Hi"}])
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        engine.render_chat([{"role": "user", "content": "Hi"}])  # said once, not on every turn


def test_generations_are_logged_for_adaptation_unless_switched_off(tiny_bundles, tmp_path, monkeypatch):
    from edgespec.history import read_history

    log = tmp_path / "h.jsonl"
    engine = load(tiny_bundles["qwen2"], threads=1, drafter=None, history=log)
    result = engine.generate("The quick", max_new_tokens=6, ignore_eos=True)
    engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=4, ignore_eos=True)
    records = read_history(log)
    assert len(records) == 2
    assert records[0]["output_ids"] == result.token_ids and records[0]["output"] == result.text
    assert records[0]["prompt_ids"] == engine.encode("The quick") and records[0]["model"] == engine.entry.name
    assert "<|im_start|>" in records[1]["prompt"]  # the rendered chat, special tokens kept
    assert load(tiny_bundles["qwen2"], threads=1, drafter=None, history=False)._history is None
    monkeypatch.setenv("EDGESPEC_HISTORY", "0")
    assert load(tiny_bundles["qwen2"], threads=1, drafter=None)._history is None
    monkeypatch.setenv("EDGESPEC_HISTORY", "1")
    default = load(tiny_bundles["qwen2"], threads=1, drafter=None)
    assert default._history is not None and default._history.path.name.endswith("--tiny-qwen2.jsonl")


def test_stream_closed_early_keeps_stats_and_close_releases_the_engine(tiny_bundles, tmp_path):
    """A stream abandoned half-way still records its stats; close() saves the n-gram cache, is idempotent, and
    later calls fail clearly."""
    cache = tmp_path / "ngram.npz"
    engine = load(tiny_bundles["qwen2"], threads=2, drafter="ngram", ngram_cache=cache, history=False)
    stream = engine.stream("def add(a, b):", max_new_tokens=32, ignore_eos=True)
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    stats = engine.last_stats
    assert pieces and stats.stopped_early and 3 <= stats.new_tokens < 32
    full = engine.generate("def add(a, b):", max_new_tokens=8, ignore_eos=True)
    assert not full.stats.stopped_early and full.stats.new_tokens == 8
    with engine:
        pass  # __exit__ closes
    assert cache.is_file()
    engine.close()  # idempotent
    engine.reset()  # harmless once closed
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate("x", max_new_tokens=2)
    with pytest.raises(RuntimeError, match="closed"):
        engine.stream("x", max_new_tokens=2)
