"""Tests for edgespec.text: Tokenizer, StreamDecoder, StopMatcher.

Two tiny tokenizers are built in code (a GPT-2 style byte-level BPE and a Gemma-style
SentencePiece BPE with byte fallback and "▁" spaces), so everything runs without model files.
The real tokenizers of SmolLM2, Gemma 3 and Qwen2.5-Coder are converted from the GGUF files in
/work/dl/models (or $EDGESPEC_MODELS_DIR) once and cached in pytest's cache directory; those tests
skip when the files or transformers are missing.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from edgespec.text import StopMatcher, StreamDecoder, Tokenizer

MODELS_DIR = Path(os.environ.get("EDGESPEC_MODELS_DIR", "/work/dl/models"))
REAL_GGUF = {
    "smollm2": "smollm2-135m.gguf",
    "gemma3": "gemma3-270m.gguf",
    "qwen2.5-coder": "qwen2.5-coder-0.5b.gguf",
}

CORPUS = [
    "Hello world! This is a small corpus for a tiny tokenizer.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "The quick brown fox jumps over the lazy dog.  Twice.",
    "café naïve résumé déjà vu — “quotes” and ‘apostrophes’",
    "日本語のテキスト。中文文本。한국어 텍스트.",
    "emoji: 😀 🚀 👍🏽 and flags 🇫🇷, math 𝔘 ∑ ∞",
    "tabs\tand\nnewlines\n\n\nand   multiple   spaces",
] * 3

TEXTS = [
    "Hello world!",
    " leading space and trailing space ",
    "café naïve — “quoted” 日本語 😀🚀👍🏽 🇫🇷 𝔘 ∑",
    "def f(x):\n\treturn x * 2  # comment\n\n\n",
    "混合 text with 中文 and emoji 🤖 in the middle of words: ab😀cd",
    "e\u0301 combining, zero\u200bwidth, replacement char \ufffd literal",
    "",
    "x",
]


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------


def build_bytelevel_tokenizer() -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE (like Qwen / SmolLM2), trained on CORPUS."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    return tk


def build_sentencepiece_tokenizer() -> tokenizers.Tokenizer:
    """Gemma-style BPE: spaces -> "▁", byte fallback <0xNN> for characters outside the vocabulary."""
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        limit_alphabet=45,  # keeps most non-ASCII characters out: they must use byte fallback
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tk


@pytest.fixture(scope="module")
def tiny_bytelevel() -> Tokenizer:
    return Tokenizer(build_bytelevel_tokenizer())


@pytest.fixture(scope="module")
def tiny_sentencepiece() -> Tokenizer:
    return Tokenizer(build_sentencepiece_tokenizer())


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece"])
def tiny_tokenizer(request, tiny_bytelevel, tiny_sentencepiece) -> Tokenizer:
    return tiny_bytelevel if request.param == "bytelevel" else tiny_sentencepiece


def _real_tokenizer_file(config, name: str) -> Path:
    gguf = MODELS_DIR / REAL_GGUF[name]
    if not gguf.is_file():
        pytest.skip(f"{gguf} not present")
    st = gguf.stat()
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    if cache is not None:
        cache_dir = Path(cache.mkdir("edgespec-tokenizers"))
    else:
        cache_dir = Path(tempfile.gettempdir()) / f"edgespec-tokenizers-{os.getuid()}"
        cache_dir.mkdir(exist_ok=True)
    out = cache_dir / f"{name}-{st.st_size}-{int(st.st_mtime)}.json"
    if not out.is_file():
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        hf.backend_tokenizer.save(str(tmp))
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="session", params=list(REAL_GGUF))
def real_tokenizer(request) -> Tokenizer:
    tok = Tokenizer(_real_tokenizer_file(request.config, request.param))
    tok.name = request.param
    return tok


@pytest.fixture(scope="session")
def gemma_tokenizer(request) -> Tokenizer:
    return Tokenizer(_real_tokenizer_file(request.config, "gemma3"))


@pytest.fixture(scope="session")
def smollm_tokenizer(request) -> Tokenizer:
    return Tokenizer(_real_tokenizer_file(request.config, "smollm2"))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def stream(tok: Tokenizer, ids, skip_special_tokens: bool = True) -> tuple[list[str], str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def assert_stream_exact(tok: Tokenizer, ids, skip_special_tokens: bool = True) -> list[str]:
    pieces, tail = stream(tok, ids, skip_special_tokens)
    expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) + tail == expected, (ids, pieces, tail)
    return pieces


class CountingTokenizer(Tokenizer):
    """Records how many ids each decode call gets."""

    def __init__(self, inner: Tokenizer):
        super().__init__(inner.backend)
        self.calls: list[int] = []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        self.calls.append(len(ids))
        return super().decode(ids, skip_special_tokens)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_missing_tokenizer_file(tmp_path):
    path = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(ValueError, match="not found") as info:
        Tokenizer(path)
    assert str(path) in str(info.value)


def test_unreadable_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file") as info:
        Tokenizer(str(bad))
    assert str(bad) in str(info.value)
    with pytest.raises(ValueError, match="not a file"):
        Tokenizer(tmp_path)


def test_tokenizer_from_file_roundtrip(tmp_path, tiny_bytelevel):
    path = tmp_path / "tokenizer.json"
    tiny_bytelevel.backend.save(str(path))
    tok = Tokenizer(path)
    assert tok.path == str(path)
    assert tok.vocab_size == tiny_bytelevel.vocab_size
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == tiny_bytelevel.encode(text)
        assert tok.decode(ids) == text


def test_tokenizer_basic_api(tiny_tokenizer):
    tok = tiny_tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text
    assert tok.vocab_size > 256
    for i in (0, 5, tok.vocab_size - 1):
        assert tok.token_to_id(tok.id_to_token(i)) == i
    assert tok.token_to_id("definitely-not-a-token-xyz") is None
    assert tok.id_to_token(tok.vocab_size + 10) is None


def test_encode_adds_no_bos_by_default(tiny_sentencepiece):
    tok = tiny_sentencepiece
    bos = tok.token_to_id("<bos>")
    assert tok.encode("Hello")[0] != bos
    assert tok.encode("Hello", add_special_tokens=True)[0] == bos


def test_special_tokens_in_text_are_parsed(tiny_bytelevel):
    tok = tiny_bytelevel
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert {im_start, im_end} <= tok.special_ids
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_decode_accepts_numpy(tiny_bytelevel):
    np = pytest.importorskip("numpy")
    ids = tiny_bytelevel.encode("Hello world")
    assert tiny_bytelevel.decode(np.array(ids, dtype=np.int64)) == "Hello world"


def test_byte_fallback_ids(tiny_bytelevel, tiny_sentencepiece):
    assert tiny_bytelevel.byte_fallback_ids == frozenset()
    assert len(tiny_sentencepiece.byte_fallback_ids) == 256
    ids = tiny_sentencepiece.encode("🦀")  # not in CORPUS
    assert len(ids) == 4 and set(ids) <= tiny_sentencepiece.byte_fallback_ids


# ---------------------------------------------------------------------------------------------
# StreamDecoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    pieces = assert_stream_exact(tiny_tokenizer, ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces), pieces


def test_multibyte_characters_are_never_split(tiny_bytelevel):
    tok = tiny_bytelevel
    ids = tok.encode("a😀")
    # the emoji is 4 bytes; the tiny vocabulary splits it over several tokens
    assert len(ids) >= 3
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert pieces[0] == "a"
    assert all(p == "" for p in pieces[1:-1])
    assert pieces[-1] == "😀"
    assert dec.flush() == ""


def test_byte_fallback_run_is_held_until_complete(tiny_sentencepiece):
    tok = tiny_sentencepiece
    emoji = tok.encode("🦀")  # not in CORPUS: four <0xNN> tokens
    word = tok.encode(" Hello")
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in emoji] == ["", "", "", ""]
    # a following non-byte token closes the run
    out = "".join(dec.push(i) for i in word)
    assert out + dec.flush() == "🦀 Hello"


def test_byte_fallback_invalid_run_matches_decode(tiny_sentencepiece):
    """A valid character followed by a stray byte: ByteFallback turns the whole run into U+FFFD."""
    tok = tiny_sentencepiece
    b = lambda x: tok.token_to_id(f"<0x{x:02X}>")  # noqa: E731
    ids = [b(0xE2), b(0x82), b(0xAC), b(0xFF)] + tok.encode(" ok")
    assert tok.decode(ids).startswith("\ufffd" * 4)
    assert_stream_exact(tok, ids)
    assert_stream_exact(tok, ids[:4])  # ends inside the run: flush settles it


def test_stream_special_tokens(tiny_bytelevel):
    tok = tiny_bytelevel
    ids = tok.encode("<|im_start|>assistant\nhé 😀<|im_end|><|endoftext|>")
    assert_stream_exact(tok, ids, skip_special_tokens=True)
    pieces = assert_stream_exact(tok, ids, skip_special_tokens=False)
    assert pieces[0] == "<|im_start|>"
    # skipped special tokens between the bytes of one character do not break it
    emoji = tok.encode("😀")
    mixed = emoji[:1] + [tok.token_to_id("<|im_end|>")] + emoji[1:]
    assert_stream_exact(tok, mixed)


@pytest.mark.parametrize("seed", range(20))
def test_stream_random_ids(tiny_tokenizer, seed):
    """Arbitrary id sequences (broken UTF-8, stray bytes, specials) still stream exactly."""
    rng = random.Random(seed)
    tok = tiny_tokenizer
    ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
    assert_stream_exact(tok, ids)
    assert_stream_exact(tok, ids, skip_special_tokens=False)


def _mixed_ids(data, tok: Tokenizer) -> list[int]:
    """Segments drawn by hypothesis: random ids, byte-fallback ids (valid or broken runs), special ids, and the
    ids of texts with multi-byte characters and emoji, cut anywhere."""
    byte_ids, special_ids = sorted(tok.byte_fallback_ids), sorted(tok.special_ids)
    ids: list[int] = []
    for kind in data.draw(st.lists(st.sampled_from(["random", "bytes", "special", "text"]), min_size=1, max_size=8)):
        if kind == "random":
            ids += data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=12))
        elif kind == "bytes" and byte_ids:
            ids += data.draw(st.lists(st.sampled_from(byte_ids), min_size=1, max_size=6))
        elif kind == "special" and special_ids:
            ids.append(data.draw(st.sampled_from(special_ids)))
        else:
            text_ids = tok.encode(data.draw(st.sampled_from(TEXTS + CORPUS[:7])))
            start = data.draw(st.integers(0, len(text_ids)))
            ids += text_ids[start:start + data.draw(st.integers(0, 24))]
    return ids


def _check_random_stream(tok: Tokenizer, data) -> None:
    """Pieces pushed one by one (or in chunks with push_many) plus the flush join to tok.decode, with and without
    special tokens."""
    ids = _mixed_ids(data, tok)
    for skip in (True, False):
        assert_stream_exact(tok, ids, skip_special_tokens=skip)
        cut = data.draw(st.integers(0, len(ids)))
        dec = StreamDecoder(tok, skip_special_tokens=skip)
        assert dec.push_many(ids[:cut]) + dec.push_many(ids[cut:]) + dec.flush() == tok.decode(ids, skip), ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_joins_to_decode_for_random_sequences(tiny_tokenizer, data):
    """Property: for any token sequence the streamed pieces join to Tokenizer.decode (tiny tokenizers)."""
    _check_random_stream(tiny_tokenizer, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_real_stream_joins_to_decode_for_random_sequences(real_tokenizer, data):
    """The same property on the real tokenizers (Qwen2.5 and SmolLM2 byte-level BPE, Gemma 3 byte fallback)."""
    _check_random_stream(real_tokenizer, data)


def test_stream_keeps_context_for_prefix_stripping_decoders():
    """Llama-style SentencePiece (Metaspace, prepend_scheme="first") drops the "▁" of the first
    token of each decode call: the prefix window keeps the previous tokens as context so later
    words keep their space."""
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"], show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tok = Tokenizer(tk)
    text = "Hello world, the quick brown fox jumps"
    ids = tok.encode(text)
    assert tok.id_to_token(ids[1]).startswith("\u2581")
    assert tok.decode(ids) == text
    naive = "".join(tok.decode([i]) for i in ids)
    assert naive != text  # decoding token by token loses the spaces
    pieces = assert_stream_exact(tok, ids)
    assert any(p.startswith(" ") for p in pieces)


def test_stream_token_id_range(tiny_bytelevel):
    """Ids are u32: the largest decodes to nothing (beyond the vocabulary), one past it or below 0 is refused."""
    dec = StreamDecoder(tiny_bytelevel)
    assert dec.push(tiny_bytelevel.encode("a")[0]) + dec.push(0xFFFFFFFF) + dec.flush() == "a"
    for bad in (-1, 0x100000000):
        with pytest.raises(ValueError, match="out of range"):
            StreamDecoder(tiny_bytelevel).push(bad)


def test_stream_push_many(tiny_tokenizer):
    text = TEXTS[2]
    ids = tiny_tokenizer.encode(text)
    dec = StreamDecoder(tiny_tokenizer)
    out = dec.push_many(ids[:5]) + dec.push_many(ids[5:]) + dec.flush()
    assert out == text


def test_stream_cost_is_constant_per_token(tiny_tokenizer):
    """The decoded window stays small however long the stream gets (no re-decoding of everything): pushes decode in
    tokenizers' DecodeStream, and a flush anywhere in a long stream decodes only the last few tokens."""
    tok = CountingTokenizer(tiny_tokenizer)
    ids = tok.encode(" ".join(TEXTS) * 40)
    assert len(ids) > 2000
    cuts = range(len(ids) // 2, len(ids) + 1, 53)
    for cut in cuts:
        dec = StreamDecoder(tok)
        out = "".join(dec.push(i) for i in ids[:cut]) + dec.flush()
        assert out == tiny_tokenizer.decode(ids[:cut])
    assert tok.calls, "no cut fell inside a character: the test would check nothing"
    assert max(tok.calls) <= 40
    assert sum(tok.calls) <= 2 * 40 * len(cuts)


def test_real_tokenizer_stream(real_tokenizer):
    tok = real_tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        pieces = assert_stream_exact(tok, ids)
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces)
    rng = random.Random(1234)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert_stream_exact(tok, ids)
        assert_stream_exact(tok, ids, skip_special_tokens=False)


def test_real_tokenizer_stream_long(real_tokenizer):
    tok = CountingTokenizer(real_tokenizer)
    ids = tok.encode("\n".join(CORPUS) * 10)
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == real_tokenizer.decode(ids)
    assert max(tok.calls, default=0) <= 40  # only the flush decodes here


def test_gemma_space_handling(gemma_tokenizer):
    """Gemma 3: spaces become "▁" inside tokens, no dummy prefix, no BOS unless asked."""
    tok = gemma_tokenizer
    ids = tok.encode("Hello world")
    assert [tok.id_to_token(i) for i in ids] == ["Hello", "\u2581world"]
    assert tok.encode("Hello", add_special_tokens=True)[0] == tok.token_to_id("<bos>") == 2
    assert tok.decode(tok.encode(" leading")) == " leading"
    # streaming keeps the leading space of a word token
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in ids] == ["Hello", " world"]
    # characters outside the vocabulary use <0xNN> byte tokens
    ids = tok.encode("𝔘")
    assert all(i in tok.byte_fallback_ids for i in ids) and len(ids) == 4
    assert_stream_exact(tok, ids + tok.encode(" x"))


def test_smollm_emoji_split_over_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    ids = tok.encode(" 😀")
    assert len(ids) == 2  # the emoji's bytes straddle two tokens
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in ids] == ["", " 😀"]


# ---------------------------------------------------------------------------------------------
# StopMatcher
# ---------------------------------------------------------------------------------------------


def reference_stop(text: str, stops) -> str | None:
    """Text before the first stop string a character-by-character reader would see, or None."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[: end - len(s)]
    return None


def feed(matcher: StopMatcher, pieces) -> list[str]:
    return [matcher.push(p) for p in pieces]


def test_stop_spanning_pieces():
    m = StopMatcher(["\n\nUser:", "</s>"])
    outs = feed(m, ["Hello", " wor", "ld\n", "\nUs", "er: more", "ignored"])
    assert outs == ["Hello", " wor", "ld", "", "", ""]
    assert m.stopped and m.stop_string == "\n\nUser:"
    assert m.text == "Hello world"
    assert m.flush() == ""


def test_stop_false_start_is_released():
    m = StopMatcher(["\n\nUser:"])
    outs = feed(m, ["a\n", "\nUs", "age"])
    assert outs == ["a", "", "\n\nUsage"]
    assert not m.stopped
    assert feed(m, ["\n"]) == [""]
    assert m.pending == "\n"
    assert m.flush() == "\n"
    assert m.text == "a\n\nUsage\n"


def test_stop_inside_one_piece_and_at_start():
    m = StopMatcher(["STOP"])
    assert m.push("abcSTOPdef") == "abc"
    assert m.stopped and m.text == "abc"
    m = StopMatcher(["STOP"])
    assert m.push("ST") == ""
    assert m.push("OP") == ""
    assert m.stopped and m.text == ""


def test_no_stop_strings_pass_through():
    m = StopMatcher([])
    assert feed(m, ["a", "b\n", ""]) == ["a", "b\n", ""]
    assert m.flush() == "" and m.text == "ab\n" and not m.stopped


def test_stop_precedence_first_end_then_longest():
    m = StopMatcher(["abcd", "bc"])
    assert m.push("xabcd") == "xa" and m.stop_string == "bc"
    m = StopMatcher(["b", "ab"])
    assert m.push("xab") == "x" and m.stop_string == "ab"


def test_stop_invalid():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])
    with pytest.raises(ValueError, match="must be str"):
        StopMatcher([1])
    assert StopMatcher("abc").stop_strings == ("abc",)


@pytest.mark.parametrize("seed", range(200))
def test_stop_chunking_invariance(seed):
    rng = random.Random(seed)
    alphabet = "ab\n "
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    m = StopMatcher(stops)
    out = "".join(feed(m, pieces))
    ref = reference_stop(text, stops)
    if ref is None:
        assert not m.stopped
        # nothing emitted may overlap the held tail; flush completes the text
        assert out + m.flush() == text
        assert m.text == text
    else:
        assert m.stopped
        assert out == ref == m.text
        assert m.flush() == ""


def test_stream_decoder_feeds_stop_matcher(tiny_bytelevel):
    tok = tiny_bytelevel
    ids = tok.encode("def add(a, b):\n    return a + b\n\nprint(add(1, 2))")
    dec, m = StreamDecoder(tok), StopMatcher(["\n\n"])
    out = ""
    for i in ids:
        out += m.push(dec.push(i))
        if m.stopped:
            break
    assert out == "def add(a, b):\n    return a + b"
