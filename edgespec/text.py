"""Text side of generation: tokenizer wrapper, streaming detokenizer, stop-string matcher.

Only ``tokenizers`` (Hugging Face's Rust tokenizer) is used: no torch, no transformers.

* :class:`Tokenizer` wraps a ``tokenizer.json``.  ``encode`` never adds BOS/EOS by default: whether
  to prepend BOS is the caller's decision (manifest ``special_tokens.add_bos``).
* :class:`StreamDecoder` turns a stream of token ids into a stream of text pieces whose
  concatenation (plus :meth:`StreamDecoder.flush`) is exactly ``Tokenizer.decode(all_ids)``.
* :class:`StopMatcher` holds back text that may be the beginning of a stop string and cuts the
  text exactly before the first stop string.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import tokenizers

__all__ = ["Tokenizer", "StreamDecoder", "StopMatcher", "common_prefix_length"]

_REPLACEMENT_CHAR = "\ufffd"
# Encoded once when a tokenizer file is loaded: letters, digits, punctuation, whitespace, accents, CJK, an emoji.
_SMOKE_TEXT = "Hello, World! 0123 x = a_b + c;\n\t caf\u00e9 \u00fcber \u65e5\u672c \U0001F600 <|im_end|>"


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json`` file.

    ``Tokenizer(path)`` loads a file; ``Tokenizer(tokenizers.Tokenizer)`` wraps an existing object
    (handy in tests).  A missing, unreadable or malformed file raises ``ValueError`` naming the path.
    """

    def __init__(self, source: str | os.PathLike | tokenizers.Tokenizer):
        if isinstance(source, tokenizers.Tokenizer):
            self.path: str | None = None
            self._tk = source
        else:
            path = os.fspath(source)
            self.path = path
            if not os.path.exists(path):
                raise ValueError(f"tokenizer file not found: {path}")
            if not os.path.isfile(path):
                raise ValueError(f"tokenizer path is not a file: {path}")
            try:
                self._tk = tokenizers.Tokenizer.from_file(path)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001  a bare Exception on parse errors, and a Rust panic
                # (pyo3's PanicException derives from BaseException) on some malformed files
                raise ValueError(f"cannot read tokenizer file {path}: {type(exc).__name__}: {exc}") from None
            try:  # a file can parse and still fail on text (a WordPiece model without its [UNK] token, ...)
                self._tk.decode(self._tk.encode(_SMOKE_TEXT, add_special_tokens=False).ids)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001
                raise ValueError(f"tokenizer file {path} cannot encode text: {type(exc).__name__}: {exc}") from None
        added = self._tk.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._byte_ids: frozenset[int] | None = None

    # -- basic API -----------------------------------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included.

        This can be smaller than the model's embedding rows (manifest ``vocab_size``), which are
        often padded: ids beyond it decode to nothing.
        """
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged *special* (the ones ``skip_special_tokens`` drops)."""
        return self._special_ids

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens ``<0x00>`` .. ``<0xFF>`` (empty for byte-level BPE)."""
        if self._byte_ids is None:
            ids = (self._tk.token_to_id(f"<0x{b:02X}>") for b in range(256))
            self._byte_ids = frozenset(i for i in ids if i is not None)
        return self._byte_ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        Special-token strings written in the text (``<|im_start|>`` ...) are recognised as their
        ids.  ``add_special_tokens=False`` (default) skips the tokenizer's post-processor, so no
        BOS/EOS is added: the caller prepends BOS itself when the manifest says ``add_bos``.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (any iterable of ints, numpy arrays included)."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary form, e.g. ``"Ġthe"`` or ``"▁the"``), or None."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string of an id, or None when out of range."""
        return self._tk.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer for streaming output.

    ``push(token_id)`` returns the text completed by that token (often ``""``); ``flush()`` returns
    whatever is still held back at the end.  Guarantee: ``"".join(pushes) + flush()`` equals
    ``tokenizer.decode(all_ids, skip_special_tokens)``.

    Method (as text-generation-inference's ``decode_token``): two token offsets, ``prefix`` and
    ``read``.  Each push decodes ``ids[prefix:]`` and emits what it adds to ``decode(ids[prefix:read])``;
    the prefix tokens give the decoder context (leading-space handling), and the window only
    spans the last two emissions, so a push costs O(1) amortized.  Text is held back while

    * it ends in U+FFFD: an incomplete multi-byte UTF-8 sequence (byte-level BPE, e.g. Qwen, SmolLM2),
    * the last decoded token is a SentencePiece byte-fallback token ``<0xNN>`` (Gemma 3): the
      ``ByteFallback`` decoder turns a whole run of byte tokens into text at once and replaces
      *every* byte of an invalid run by U+FFFD, so a run is only final once a non-byte token follows.

    Skipped special tokens are dropped before decoding (they decode to nothing anyway), so long runs
    of them cost nothing.  Worst case: a stream of never-completing invalid bytes keeps the window
    growing until a clean character arrives (correct, just slower).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._skip_ids = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer.byte_fallback_ids
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        self._pending_bytes = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (possibly ``""``)."""
        tid = int(token_id)
        if tid in self._skip_ids:
            return ""
        self._ids.append(tid)
        self._pending_bytes = tid in self._byte_ids
        if self._pending_bytes:
            return ""
        text = self._decode(self._ids[self._prefix :])
        if (
            len(text) > len(self._prefix_text)
            and not text.endswith(_REPLACEMENT_CHAR)
            and text.startswith(self._prefix_text)
        ):
            new = text[len(self._prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            # Keep only the window: earlier ids are never decoded again.
            if self._prefix > 4096:
                del self._ids[: self._prefix]
                self._read -= self._prefix
                self._prefix = 0
            return new
        return ""

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Push several ids; return the concatenated new text."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Return all text still held back (incomplete characters become U+FFFD, as ``decode`` does)."""
        text = self._decode(self._ids[self._prefix :])
        if text.startswith(self._prefix_text):
            rest = text[len(self._prefix_text) :]
        else:  # decoder not prefix-stable on this input: best effort
            n = 0
            for a, b in zip(text, self._prefix_text):
                if a != b:
                    break
                n += 1
            rest = text[n:]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        self._pending_bytes = False
        return rest


class StopMatcher:
    """Streaming stop-string detection over text pieces.

    ``push(piece)`` returns the part of the text that is now safe to emit: everything except a tail
    that could still grow into a stop string.  When a stop string appears, :attr:`stopped` becomes
    True, :attr:`stop_string` names it, and :attr:`text` is exactly the text before it (the stop
    string and anything after are dropped).  Later pushes return ``""``.  ``flush()`` releases the
    held tail when generation ends without a stop.

    When several stop strings occur, the one that *ends* first wins (ties: the longest), which is
    what a character-by-character stream would see, so the result never depends on how the text
    was cut into pieces.
    """

    def __init__(self, stop_strings: Iterable[str] = ()):
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        stops = tuple(stop_strings)
        for s in stops:
            if not isinstance(s, str):
                raise ValueError(f"stop strings must be str, got {type(s).__name__}: {s!r}")
            if not s:
                raise ValueError("stop strings must be non-empty")
        self.stop_strings: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._prefixes = frozenset(s[:k] for s in self.stop_strings for k in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in self.stop_strings), default=0)
        self._emitted: list[str] = []
        self._pending = ""
        self.stopped = False
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        """Text emitted so far; after a stop, exactly the text before the stop string."""
        return "".join(self._emitted)

    @property
    def pending(self) -> str:
        """Held-back tail that may be the start of a stop string."""
        return self._pending

    def push(self, piece: str) -> str:
        """Feed a text piece; return the newly safe text (``""`` once stopped)."""
        if self.stopped or not piece:
            return ""
        buf = self._pending + piece
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self.stop_strings:
            i = buf.find(s)
            if i >= 0:
                key = (i + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        if best is not None:
            end, neg_len, s = best
            out = buf[: end + neg_len]
            self._pending = ""
            self.stopped = True
            self.stop_string = s
        else:
            hold = 0
            for k in range(min(self._max_hold, len(buf)), 0, -1):
                if buf[-k:] in self._prefixes:
                    hold = k
                    break
            out = buf[: len(buf) - hold]
            self._pending = buf[len(buf) - hold :]
        if out:
            self._emitted.append(out)
        return out

    def flush(self) -> str:
        """End of stream: return the held-back tail (``""`` if stopped)."""
        out, self._pending = self._pending, ""
        if self.stopped:
            return ""
        if out:
            self._emitted.append(out)
        return out


def common_prefix_length(a: list[int] | str, b: list[int] | str) -> int:
    """Length of the longest common prefix of two token lists (or two strings)."""
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    lo, hi = 0, limit  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
