"""A `tokenizers` tokenizer built from a GGUF file's own vocabulary, without transformers (or torch).

A GGUF carries no tokenizer.json: its vocabulary, merges and token types are metadata (``tokenizer.ggml.*``). For
byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: Qwen2, SmolLM2, Llama 3, ...) this module builds the
same tokenizer transformers' GGUF converter builds (``transformers.integrations.gguf``): the vocabulary spelled in the
byte alphabet, the file's merges, the split regex named by ``tokenizer.ggml.pre`` (or GPT-2's byte-level regex), a
byte-level decoder, control tokens as special added tokens and user-defined ones as plain added tokens. Equality with
the transformers tokenizer is checked on the real models (tests/test_hub_sources.py, marked ``real``).

Other vocabularies (sentencepiece ``llama`` as in Gemma, ``t5``, ...) and pre-tokenizers not listed here raise
:class:`UnsupportedTokenizer`; the caller then falls back to transformers.
"""

from __future__ import annotations

from typing import Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

__all__ = ["UnsupportedTokenizer", "byte_level_bpe_from_gguf", "byte_alphabet"]

# Split regexes by ``tokenizer.ggml.pre`` (the patterns transformers and the models' own tokenizer.json files use).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
          "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}
# Pre-tokenizer names that transformers maps to GPT-2's own byte-level regex (no split of their own).
GPT2_REGEX_PRES = ("gpt-2", "smollm", "default")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPECIAL_ID_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                    "tokenizer.ggml.padding_token_id")


class UnsupportedTokenizer(ValueError):
    """The GGUF's tokenizer is not one this module builds (the message says which); use transformers instead."""


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of every byte-level BPE vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _spelled_vocab(tokens, alphabet: dict[int, str]) -> dict[str, int]:
    """Token -> id, a token with characters outside the byte alphabet re-spelled byte by byte (as transformers)."""
    letters = set(alphabet.values())
    return {token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8")): index
            for index, token in enumerate(tokens)}


def _merge_pairs(merges) -> list[tuple[str, str]]:
    """The file's merges ("a b") as pairs; a merge without exactly one space is a corrupt file."""
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"tokenizer.ggml.merges[{i}] is not two tokens separated by one space: {merge[:40]!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _pre_tokenizer(pre: str | None):
    """The pre-tokenizer for ``tokenizer.ggml.pre``; UnsupportedTokenizer for a name not known here."""
    if pre in SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre is None or pre in GPT2_REGEX_PRES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    raise UnsupportedTokenizer(f"byte-level BPE with pre-tokenizer {pre!r} (built here: "
                               f"{', '.join(sorted(SPLITS) + list(GPT2_REGEX_PRES))})")


def _added_tokens(fields: Mapping, tokens, vocab: dict[str, int], alphabet: dict[int, str]):
    """(special, plain) added tokens: control tokens spelled in the byte alphabet and the bos/eos/unk/pad tokens;
    user-defined tokens that are in the vocabulary."""
    letters = set(alphabet.values())
    types = list(fields.get("tokenizer.ggml.token_type") or ())
    if types and len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    special_ids = [i for i, t in enumerate(types) if t == _CONTROL and set(tokens[i]) <= letters]
    special_ids += [fields[key] for key in _SPECIAL_ID_KEYS
                    if isinstance(fields.get(key), int) and 0 <= fields[key] < len(tokens)
                    and tokens[fields[key]] in vocab]
    special = [AddedToken(tokens[i], normalized=False, special=True) for i in dict.fromkeys(special_ids)]
    plain = [AddedToken(tokens[i], normalized=False, special=False)
             for i, t in enumerate(types) if t == _USER_DEFINED and tokens[i] in vocab]
    return special, plain


def byte_level_bpe_from_gguf(fields: Mapping) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF's decoded metadata (``GGUFWeights.fields``) describes.

    Raises :class:`UnsupportedTokenizer` for another tokenizer model or an unknown pre-tokenizer, and ValueError for
    missing or inconsistent vocabulary metadata.
    """
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedTokenizer(f"tokenizer.ggml.model {kind!r} (built here: 'gpt2', byte-level BPE)")
    tokens, merges = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.merges")
    if not tokens or not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError("the GGUF has no tokenizer.ggml.tokens list")
    if not isinstance(merges, list):
        raise UnsupportedTokenizer("byte-level BPE without tokenizer.ggml.merges (merges derived from scores)")
    pre = _pre_tokenizer(fields.get("tokenizer.ggml.pre"))
    alphabet = byte_alphabet()
    vocab = _spelled_vocab(tokens, alphabet)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(merges), dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    special, plain = _added_tokens(fields, tokens, vocab, alphabet)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)
    return tokenizer
