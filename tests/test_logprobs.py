"""Log probabilities (issue 20): the raw model's log-softmax of each emitted token and its top alternatives, from
the engine on the plain and the speculative paths (the same values under greedy decoding), in the stream as it goes,
and from the server in OpenAI's shapes (chat `logprobs` / `top_logprobs`, completions `logprobs: N`, streaming too),
plus the server's sampling extensions (`repetition_penalty`, `min_p`, `min_tokens`)."""

from __future__ import annotations

import numpy as np
import pytest

from edgespec.engine import load
from edgespec.runtimes.runner import ModelRunner
from edgespec.sampling import MAX_TOP_LOGPROBS, TokenLogprob, token_logprob

from spec_helpers import OracleDrafter

torch = pytest.importorskip("torch")

PROMPT = "def add(a, b):\n    return"
TOKENS = 32


def reference_logprobs(entry, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """torch's float64 log-softmax of the raw logits before each of `tokens`, decoding one token at a time."""
    runner = ModelRunner(entry, threads=2)
    logits = runner.prefill(prompt_ids)
    rows = []
    for token in tokens:
        rows.append(torch.log_softmax(torch.tensor(np.asarray(logits, dtype=np.float64)), dim=-1).numpy())
        logits = runner.forward([token])[0]
        runner.commit()
    return np.stack(rows)


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles["qwen2"]


@pytest.fixture(scope="module")
def plain(bundle):
    return load(bundle, threads=2, drafter=None, history=False)


# ---- the function ---------------------------------------------------------------------------------------------------
def test_token_logprob_is_the_log_softmax_with_ordered_alternatives():
    logits = np.array([1.0, 3.0, 3.0, -2.0, 0.5, 3.0, 2.0], dtype=np.float32)
    got = token_logprob(logits, 4, top=4)
    reference = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1).numpy()
    assert got.token_id == 4 and got.logprob == pytest.approx(reference[4], abs=1e-12)
    assert [t for t, _ in got.top] == [1, 2, 5, 6]  # best first, ties by lower id
    assert [v for _, v in got.top] == pytest.approx(reference[[1, 2, 5, 6]], abs=1e-12)
    assert token_logprob(logits, 0).top == ()
    assert len(token_logprob(logits, 0, top=MAX_TOP_LOGPROBS).top) == len(logits)  # fewer tokens than asked
    assert np.exp([v for _, v in token_logprob(logits, 0, top=7).top]).sum() == pytest.approx(1.0)


# ---- the engine ------------------------------------------------------------------------------------------------------
def test_plain_logprobs_are_the_raw_model_log_softmax(plain):
    ids = plain.encode(PROMPT)
    result = plain.generate(ids, max_new_tokens=TOKENS, ignore_eos=True, logprobs=True, top_logprobs=5)
    assert len(result.logprobs) == len(result.token_ids) == TOKENS
    assert all(isinstance(lp, TokenLogprob) for lp in result.logprobs)
    reference = reference_logprobs(plain.entry, ids, result.token_ids)
    for i, (lp, token) in enumerate(zip(result.logprobs, result.token_ids)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(reference[i, token], abs=1e-9)
        assert len(lp.top) == 5 and lp.top[0][0] == token  # greedy: the chosen token is the most likely
        assert [t for t, _ in lp.top] == list(np.argsort(-reference[i], kind="stable")[:5])
    assert plain.generate(ids, max_new_tokens=4).logprobs is None  # off by default


def test_logprobs_are_raw_not_the_processed_distribution(plain):
    """Under repetition penalty, temperature and top-k the values stay the model's own log-softmax (as OpenAI and
    vLLM's default), not the sampled distribution's."""
    ids = plain.encode(PROMPT)
    result = plain.generate(ids, max_new_tokens=12, ignore_eos=True, temperature=0.5, top_k=3,
                            repetition_penalty=1.5, seed=4, logprobs=True, top_logprobs=2)
    reference = reference_logprobs(plain.entry, ids, result.token_ids)
    got = np.array([lp.logprob for lp in result.logprobs])
    np.testing.assert_allclose(got, reference[np.arange(12), result.token_ids], atol=1e-9)
    assert np.isfinite(got).all() and (got < 0).all()


def speculative_engines(bundle, copy_drafter_bundle, plain, ids, expected):
    vocab = plain.entry.vocab_size
    return {
        "ngram": load(bundle, threads=2, drafter="ngram", ngram_cache=False, history=False),
        "oracle": load(bundle, threads=2, drafter=OracleDrafter(ids + expected, len(ids), vocab, depth=8,
                                                                distractors=2), draft_budget=24, history=False),
        "draft": load(copy_drafter_bundle, threads=2, drafter="draft", draft_budget=12, ngram_cache=False,
                      tree="tree:3x4", history=False),
    }


@pytest.mark.parametrize("options", [dict(), dict(repetition_penalty=1.3)])
def test_speculative_logprobs_equal_plain_logprobs_under_greedy(options, bundle, copy_drafter_bundle, plain):
    """The rows of a verification forward give the same log probabilities as plain decoding's one-token steps: the
    same tokens, values equal to 1e-5, the same alternatives."""
    ids = plain.encode(PROMPT)
    kwargs = dict(max_new_tokens=TOKENS, ignore_eos=True, logprobs=True, top_logprobs=4, **options)
    expected = plain.generate(ids, **kwargs)
    for kind, engine in speculative_engines(bundle, copy_drafter_bundle, plain, ids, expected.token_ids).items():
        got = engine.generate(ids, **kwargs)
        assert got.token_ids == expected.token_ids, kind
        if kind != "ngram" or options:
            assert got.stats.accepted_tokens > 0, kind
        assert len(got.logprobs) == TOKENS
        for mine, theirs in zip(got.logprobs, expected.logprobs):
            assert mine.token_id == theirs.token_id
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-5), kind
            assert [t for t, _ in mine.top] == [t for t, _ in theirs.top], kind
            np.testing.assert_allclose([v for _, v in mine.top], [v for _, v in theirs.top], atol=1e-5)


def test_stream_logprobs_follow_the_kept_tokens(bundle, plain):
    ids = plain.encode(PROMPT)
    full = plain.generate(ids, max_new_tokens=TOKENS, ignore_eos=True, logprobs=True)
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    engine = load(bundle, threads=2, drafter="ngram", ngram_cache=False, history=False)
    seen = 0
    with engine.stream(ids, max_new_tokens=TOKENS, ignore_eos=True, logprobs=True, stop=[stop]) as stream:
        for _ in stream:  # each piece's tokens are there by the time it comes, in order
            kept = [lp.token_id for lp in stream.logprobs]
            assert seen <= len(kept) and kept == full.token_ids[:len(kept)]
            seen = len(kept)
    result = stream.result
    assert result.finish_reason == "stop" and len(result.logprobs) == len(result.token_ids) < TOKENS
    assert [lp.token_id for lp in result.logprobs] == result.token_ids == full.token_ids[:len(result.token_ids)]
    assert all(lp.top == () for lp in result.logprobs)
    eos = full.token_ids[6]
    cut = plain.generate(ids, max_new_tokens=TOKENS, eos_token_ids=(eos,), logprobs=True)  # EOS itself: not kept
    assert len(cut.logprobs) == len(cut.token_ids) == full.token_ids.index(eos)
    closed = plain.stream(ids, max_new_tokens=4, logprobs=True)
    closed.close()
    assert closed.result.logprobs == [] and plain.stream(ids, max_new_tokens=4).logprobs is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1), "top_logprobs must be an int from 0 to 20"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs must be an int from 0 to 20"),
    (dict(top_logprobs=3), "top_logprobs needs logprobs=True"),
    (dict(logprobs="yes"), "logprobs must be a bool"),
])
def test_logprob_options_are_checked(kwargs, match, plain):
    with pytest.raises(ValueError, match=match):
        plain.generate("Hi", max_new_tokens=2, **kwargs)


def test_top_logprobs_at_its_limit(plain):
    result = plain.generate("Hi", max_new_tokens=2, ignore_eos=True, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS)
    assert all(len(lp.top) == MAX_TOP_LOGPROBS for lp in result.logprobs)
    values = [v for _, v in result.logprobs[0].top]
    assert values == sorted(values, reverse=True)


# ---- the server ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(bundle):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from test_server import running

    from edgespec.server import create_app

    engine = load(bundle, threads=1, ngram_cache=False, history=False)
    with running(create_app(engine, max_tokens_limit=256)) as url:
        yield url


@pytest.fixture
def client(live):
    import openai

    return openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0, timeout=60)


def chat_messages():
    return [{"role": "user", "content": "def add(a, b):"}]


def test_chat_logprobs_in_openai_shape(client, plain):
    model = plain.entry.name
    expected = plain.generate(plain.render_chat(chat_messages()), max_new_tokens=16, ignore_eos=True, logprobs=True,
                              top_logprobs=3)
    resp = client.chat.completions.create(model=model, messages=chat_messages(), max_tokens=16, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == 16
    for item, lp in zip(content, expected.logprobs):
        token_text = plain.tokenizer.decode([lp.token_id], skip_special_tokens=False)
        assert item.token == token_text and item.logprob == pytest.approx(lp.logprob, abs=1e-5)
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        for alt, (token_id, value) in zip(item.top_logprobs, lp.top):
            assert alt.token == plain.tokenizer.decode([token_id], skip_special_tokens=False)
            assert alt.logprob == pytest.approx(value, abs=1e-5) and isinstance(alt.bytes, list)
    raw = b"".join(bytes(item.bytes) for item in content)
    assert raw.decode("utf-8", errors="replace") == plain.tokenizer.decode(expected.token_ids,
                                                                           skip_special_tokens=False)
    plain_resp = client.chat.completions.create(model=model, messages=chat_messages(), max_tokens=4)
    assert plain_resp.choices[0].logprobs is None
    bare = client.chat.completions.create(model=model, messages=chat_messages(), max_tokens=4, logprobs=True)
    assert all(item.top_logprobs == [] for item in bare.choices[0].logprobs.content)


def test_chat_streaming_logprobs_add_up_to_the_full_answer(client, plain):
    model = plain.entry.name
    kwargs = dict(model=model, messages=chat_messages(), max_tokens=20, temperature=0, logprobs=True,
                  top_logprobs=2, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [(i.token, i.bytes) for i in streamed] == [(i.token, i.bytes) for i in full]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in full], abs=1e-5)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert all(c.choices[0].logprobs is not None for c in text_chunks)


def test_completions_logprobs_in_the_legacy_shape(client, plain):
    model = plain.entry.name
    expected = plain.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True, logprobs=True,
                              top_logprobs=2)
    resp = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    texts = [plain.tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids]
    assert lp.tokens == texts
    assert lp.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in texts[:-1]]))
    for alternatives, token, entry in zip(lp.top_logprobs, texts, expected.logprobs):
        assert token in alternatives and 1 <= len(alternatives) <= 3  # the top 2 and the chosen token
        assert alternatives[token] == pytest.approx(entry.logprob, abs=1e-5)
    chunks = list(client.completions.create(model=model, prompt="The quick brown fox", max_tokens=12,
                                            temperature=0, logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs and c.choices[0].logprobs.tokens]
    assert [t for part in streamed for t in part.tokens] == texts
    assert [o for part in streamed for o in part.text_offset] == lp.text_offset
    zero = client.completions.create(model=model, prompt="The quick", max_tokens=3, temperature=0, logprobs=0)
    assert all(len(alternatives) == 1 for alternatives in zero.choices[0].logprobs.top_logprobs)


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"logprobs": 1, "top_logprobs": 1}, "top_logprobs"),
    ("/v1/chat/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/chat/completions", {"repetition_penalty": 10.5}, "repetition_penalty"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"min_p": -0.1}, "min_p"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
])
def test_bad_logprob_and_sampling_fields_are_400(live, plain, path, fields, param):
    from test_server import assert_error, post

    body = {"model": plain.entry.name, "max_tokens": 4, **fields}
    body.update({"messages": chat_messages()} if "chat" in path else {"prompt": "Hi"})
    assert_error(post(live, path, body), 400, param)


def test_server_sampling_extensions_match_the_engine(client, plain):
    """`repetition_penalty`, `min_p` and `min_tokens` (vLLM's names) reach the engine, at their limits too."""
    model = plain.entry.name
    prompt = plain.render_chat(chat_messages())
    for fields in ({"repetition_penalty": 1.3}, {"repetition_penalty": 10}, {"min_p": 1.0, "temperature": 1.2,
                                                                             "seed": 1}):
        engine_fields = {k: v for k, v in fields.items()}
        expected = plain.generate(prompt, max_new_tokens=16, ignore_eos=True, **engine_fields).text
        resp = client.chat.completions.create(model=model, messages=chat_messages(), max_tokens=16,
                                              extra_body={"ignore_eos": True, **fields})
        assert resp.choices[0].message.content == expected, fields
    eos_heavy = client.completions.create(model=model, prompt="Hi", max_tokens=6, temperature=0,
                                          extra_body={"min_tokens": 6})
    assert eos_heavy.usage.completion_tokens == 6
