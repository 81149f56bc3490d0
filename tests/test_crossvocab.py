"""Cross-vocabulary drafting on tiny models: text alignment and translation traps, the learned mapping cache and its
file, the drafter's context kept in step with the target's text, and exactness (greedy and sampling).

Two kinds of pairs: a *mirror* drafter (the target's own weights and tokenizer with token ids permuted: same
strings, other ids, so it drafts perfectly through text and exercises long accepted runs) and a drafter with a
SentencePiece-style tokenizer (Metaspace spaces, byte fallback, another vocabulary) and random weights."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgespec import load
from edgespec.drafters.crossvocab import (CrossVocabCache, CrossVocabDrafter, align_units, direct_token_map, token_spans,
                                 translate, unit_kind)
from edgespec.export.bundle import ModelRequest, export_bundle
from edgespec.drafters.cachefile import CacheFileError, NGramCacheWarning
from edgespec.runtimes.manifest import BundleError
from edgespec.runtimes.runner import ModelRunner
from edgespec.text import Tokenizer
from spec_helpers import assert_exact_or_near_tie
from test_speculative import PROMPTS, TOKEN2_TV_BOUND, TOKEN3_TV_BOUND, _empirical_marginals, _exact_marginals, _tv


# ---------------------------------------------------------------------------------------------------- fixtures
def build_metaspace_tokenizer(path: Path) -> None:
    """A SentencePiece-style BPE (Metaspace '▁' spaces, no dummy prefix, byte fallback <0x00>..<0xFF>), trained on
    the tiny corpus with few merges: another vocabulary than the byte-level tiny tokenizer, same special strings."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import CORPUS

    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=110, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path))


def make_mirror_model(source: Path, folder: Path) -> Path:
    """The model in `source` with its token ids permuted (the specials 0-2 stay): embedding and LM head rows and
    the tokenizer's vocabulary move together, so it computes the same function in another id space."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    data = json.loads((source / "tokenizer.json").read_text())
    n = len(data["model"]["vocab"])
    perm = np.arange(model.config.vocab_size)
    perm[3:n] = np.arange(3, n)[::-1]  # new id of old id i is perm[i]
    inverse = np.argsort(perm)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[torch.as_tensor(inverse)])
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head.copy_(head[torch.as_tensor(inverse)])
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    data["model"]["vocab"] = {tok: int(perm[i]) for tok, i in data["model"]["vocab"].items()}
    for added in data["added_tokens"]:
        added["id"] = int(perm[added["id"]])
    (folder / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(source / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


@pytest.fixture(scope="module")
def cross_bundles(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """'mirror': tiny qwen2 target + its id-permuted copy; 'metaspace': qwen2 target + a random llama with the
    Metaspace tokenizer; 'gemma': tiny gemma3 target + that Metaspace drafter."""
    from conftest import make_tiny_model

    root = tmp_path_factory.mktemp("cross-bundles")
    mirror = make_mirror_model(tiny_models["qwen2"], root / "mirror")
    meta = make_tiny_model("llama", root / "meta", seed=23)
    build_metaspace_tokenizer(meta / "tokenizer.json")
    quiet = dict(log=lambda m: None, parity=False)
    return {
        "mirror": export_bundle(str(tiny_models["qwen2"]), root / "b-mirror", name="tiny-qwen2",
                                drafters=[ModelRequest(str(mirror), "drafter", name="mirror")], **quiet).bundle,
        "metaspace": export_bundle(str(tiny_models["qwen2"]), root / "b-meta", name="tiny-qwen2",
                                   drafters=[ModelRequest(str(meta), "drafter", name="meta")], **quiet).bundle,
        "gemma": export_bundle(str(tiny_models["gemma3"]), root / "b-gemma", name="tiny-gemma3",
                               drafters=[ModelRequest(str(meta), "drafter", name="meta")], **quiet).bundle,
    }


@pytest.fixture(scope="module")
def cross_plain(cross_bundles) -> dict[tuple[str, int], tuple[list[int], list[int]]]:
    out = {}
    for kind, bundle in cross_bundles.items():
        engine = load(bundle, threads=2, drafter=None)
        for i, prompt in enumerate(PROMPTS):
            ids = engine.encode(prompt)
            out[kind, i] = ids, engine.generate(ids, max_new_tokens=40, ignore_eos=True).token_ids
    return out


def _tokenizers(cross_bundles, kind):
    from edgespec.runtimes.manifest import load_manifest

    manifest = load_manifest(cross_bundles[kind])
    drafter = manifest.drafters()[0]
    return Tokenizer(str(drafter.tokenizer_path)), Tokenizer(str(manifest.target_model.tokenizer_path))


# ---------------------------------------------------------------------------------------------------- alignment
def test_align_units_pairs_common_boundaries():
    # text "abcdef": drafter "ab|c|def", target "a|bc|de|f"
    units = align_units([2, 3, 6], [1, 3, 5, 6])
    assert units == [(0, 2, 0, 2), (2, 3, 2, 4)]
    assert [unit_kind(d1 - d0, t1 - t0) for d0, d1, t0, t1 in units] == ["group", "split"]
    assert align_units([1, 2], [1, 2]) == [(0, 1, 0, 1), (1, 2, 1, 2)]
    assert align_units([3], [1, 2]) == []  # no common boundary yet: nothing to learn
    assert unit_kind(3, 1) == "merge" and unit_kind(1, 1) == "direct"


def test_token_spans_share_a_split_character():
    assert token_spans([(0, 3), (3, 5), (4, 5), (5, 6)], base=10) == ([10, 13, 14, 15], [13, 15, 15, 16])


def test_translate_keeps_the_unfinished_word_out(cross_bundles):
    drafter_tok, target_tok = _tokenizers(cross_bundles, "metaspace")
    text = " The quick brown fox"
    enc = drafter_tok.backend.encode(text)
    _, ends = token_spans(enc.offsets)
    ids, t_ends, learned = translate(enc.ids, ends, text, target_tok, None, complete=False)
    shown = target_tok.decode(ids)
    assert " fox" not in shown and text.startswith(shown)  # the last drafter token is only look-ahead
    assert all(end <= ends[-2] for end in t_ends) and not any(learned)
    assert t_ends[-1] <= text.index(" fox")  # nothing ends inside the unfinished last word
    done, _, _ = translate(enc.ids, ends, text, target_tok, None, complete=True)
    assert target_tok.decode(done) == text


def test_translate_cuts_incomplete_characters_and_uses_learned_mappings(cross_bundles):
    drafter_tok, target_tok = _tokenizers(cross_bundles, "metaspace")
    text = " Caf\u00e9 \U0001F680 ok"  # the rocket is not in the training corpus
    enc = drafter_tok.backend.encode(text)
    ids = enc.ids
    assert any(i in drafter_tok.byte_fallback_ids for i in ids)  # the emoji falls back to bytes
    _, ends = token_spans(enc.offsets)
    partial = "".join([" Caf\u00e9 ", "\ufffd"])  # the emoji's bytes not all drafted yet
    cut_ids, cut_ends, _ = translate(ids[:4], ends[:4], partial, target_tok, None, complete=True)
    assert "\ufffd" not in target_tok.decode(cut_ids) and max(cut_ends, default=0) <= partial.index("\ufffd")
    cache = CrossVocabCache(min_count=1)
    cache.add(ids[:2], [7])  # pretend the target wrote the first two drafter tokens as token 7
    got, _, learned = translate(ids, ends, text, target_tok, cache, complete=True)
    assert got[0] == 7 and learned[0] and not any(learned[1:])


def test_cache_counts_thresholds_and_file_round_trip(tmp_path):
    cache = CrossVocabCache(min_count=2, min_share=0.6)
    cache.add([1, 2], [9])
    assert cache.mapping([1, 2]) is None  # seen once
    cache.add([1, 2], [9])
    cache.add([1, 2], [8, 3])
    assert cache.mapping([1, 2]) == (9,)
    cache.add([5], [6, 7], count=3)
    assert cache.longest([4, 1, 2, 5], 1) == (2, (9,))
    assert cache.sizes() == {"entries": 2, "direct": 0, "merge": 1, "split": 1, "group": 0}
    path = tmp_path / "x.npz"
    cache.save(path, "fp", drafter_vocab=10, target_vocab=12)
    again = CrossVocabCache.load(path, "fp", 10, 12)
    assert again.table == cache.table
    with pytest.raises(CacheFileError, match="another pair"):
        CrossVocabCache.load(path, "other", 10, 12)
    with pytest.raises(CacheFileError, match="out of range"):
        CrossVocabCache.load(path, "fp", 4, 12)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CacheFileError, match="corrupt"):
        CrossVocabCache.load(path, "fp", 10, 12)


def test_direct_token_map_matches_equal_strings(cross_bundles):
    drafter_tok, target_tok = _tokenizers(cross_bundles, "mirror")
    mapping = direct_token_map(drafter_tok, target_tok)
    assert len(mapping) > 200
    assert all(drafter_tok.decode([d], False) == target_tok.decode([t], False) for d, t in mapping.items())
    assert any(d != t for d, t in mapping.items())  # the ids really differ


# ---------------------------------------------------------------------------------------------------- the drafter
@pytest.mark.parametrize("kind,spec", [("mirror", "cross"), ("mirror", "ngram>cross"), ("metaspace", "cross"),
                                       ("metaspace", "ngram>cross"), ("gemma", "cross")])
def test_cross_vocabulary_greedy_is_exact(kind, spec, cross_bundles, cross_plain):
    """Greedy output equals plain greedy output; the mirror drafter (perfect through text) gets long runs
    accepted, and its learned mappings are used."""
    # a fixed chain: what is verified never depends on timing (a busy machine would otherwise cut the drafts)
    engine = load(cross_bundles[kind], threads=2, drafter=spec, draft_budget=10, ngram_cache=False, tree="chain:10")
    drafter: CrossVocabDrafter = engine.drafter
    assert drafter.name.endswith(f"cross:{'mirror' if kind == 'mirror' else 'meta'}")
    drafter.target_cost = None  # tiny drafters cost as much as tiny targets: draft regardless of timing
    taus = []
    for i in range(len(PROMPTS)):
        ids, expected = cross_plain[kind, i]
        result = engine.generate(ids, max_new_tokens=40, ignore_eos=True)
        assert_exact_or_near_tie(engine.entry, ids, expected, result.token_ids, f"{kind} {spec} prompt {i}")
        taus.append(result.stats.mean_accepted_tokens)
    stats = drafter.stats()
    assert stats["nodes"] > 0 and stats["forwards"] > 0
    if kind == "mirror":  # (a random target may emit invalid UTF-8, whose text never completes: no drafts there)
        assert max(taus) > 1.5 and stats["accepted"] >= 10, (taus, stats)
        assert stats["cache"]["direct"] > 0 and stats["learned_nodes"] > 0
    if spec.startswith("ngram"):
        assert stats["stage_fed"] > 0


def test_drafter_context_stays_in_step_with_the_text(cross_bundles, cross_plain):
    """After every step the drafter's cache holds its own tokenization of the target's text: the logits it drafts
    from equal a fresh prefill of that tokenization."""
    engine = load(cross_bundles["metaspace"], threads=2, drafter="cross", draft_budget=6, ngram_cache=False)
    drafter: CrossVocabDrafter = engine.drafter
    drafter.target_cost = None
    fresh = ModelRunner(drafter.runner.entry, threads=1)
    checks = []
    original = drafter._sync

    def checked_sync():
        fed = original()
        ids = drafter.draft_tok.encode(drafter._text)
        assert drafter._d_ids == ids
        fresh.reset()
        prefix = [drafter.bos_id] if drafter.bos_id is not None else []
        np.testing.assert_allclose(drafter._logits, fresh.prefill(prefix + ids), atol=2e-3)
        checks.append(len(ids))
        return fed

    drafter._sync = checked_sync
    ids, _ = cross_plain["metaspace", 2]
    engine.generate(ids, max_new_tokens=30, ignore_eos=True)
    assert len(checks) >= 5 and drafter.counters["resyncs"] > 0


@pytest.fixture(scope="module")
def cross_sampling_reference(cross_bundles):
    engine = load(cross_bundles["mirror"], threads=2, drafter=None)
    ids = engine.encode(PROMPTS[0])
    return ids, _exact_marginals(engine.entry, ids)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["cross", "ngram>cross"])
def test_cross_vocabulary_sampling_matches_exact_distribution(spec, cross_bundles, cross_sampling_reference):
    """Sampled tokens 2 and 3 follow the target's exact distribution: the translated draft is verified as a
    deterministic proposal (the target samples each position itself)."""
    ids, (second, third) = cross_sampling_reference
    engine = load(cross_bundles["mirror"], threads=2, drafter=spec, draft_budget=6, ngram_cache=False,
                  tree="chain:6")  # what is verified never depends on timing
    engine.drafter.target_cost = None
    got_second, got_third = _empirical_marginals(engine, ids, 30_000)
    assert _tv(got_second, second) < TOKEN2_TV_BOUND
    assert _tv(got_third, third) < TOKEN3_TV_BOUND
    counters = engine.drafter.counters
    assert 0 < counters["accepted"] < counters["nodes"]


def test_learned_mappings_persist_and_a_broken_file_starts_fresh(cross_bundles, cross_plain, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("EDGESPEC_NGRAM_DIR", str(tmp_path))
    engine = load(cross_bundles["mirror"], threads=2, drafter="cross", draft_budget=8)
    engine.drafter.target_cost = None
    ids, _ = cross_plain["mirror", 0]
    engine.generate(ids, max_new_tokens=24, ignore_eos=True)
    path = engine.drafter.cache_path
    assert path is not None and path.exists() and path.parent == tmp_path
    saved = engine.drafter.cache.table
    again = load(cross_bundles["mirror"], threads=2, drafter="cross")
    assert again.drafter.cache.table == saved and len(saved) > 0
    path.write_bytes(b"not a cache")
    with pytest.warns(NGramCacheWarning, match="not used"):
        fresh = load(cross_bundles["mirror"], threads=2, drafter="cross")
    assert len(fresh.drafter.cache) == 0
    off = load(cross_bundles["mirror"], threads=2, drafter="cross", ngram_cache=False)
    assert off.drafter.cache_path is None


def test_cross_vocabulary_specs_and_errors(tiny_bundles, cross_bundles):
    with pytest.raises(BundleError, match="no drafter model"):
        load(tiny_bundles["qwen2"], drafter="cross")
    with pytest.raises(BundleError, match="no drafter 'nope'"):
        load(cross_bundles["metaspace"], drafter="cross:nope")
    with pytest.raises(BundleError, match="does not share the tokenizer"):
        load(cross_bundles["metaspace"], drafter="draft")  # a same-vocabulary drafter is needed there
    engine = load(cross_bundles["metaspace"], threads=2, drafter="ngram>cross:meta", ngram_cache=False)
    assert engine.drafter.name == "ngram>cross:meta"
    assert engine.drafter.stage.vocab_size == engine.drafter.runner.entry.vocab_size  # n-grams in drafter ids


@pytest.mark.parametrize("kind", ["mirror", "metaspace", "gemma"])
def test_sampling_with_translated_drafts_equals_plain_sampling(kind, cross_bundles):
    """The translated draft is verified as a deterministic proposal: the target draws each position's token from
    the same random stream as plain sampling, so one seed gives the plain sampled output."""
    plain = load(cross_bundles[kind], threads=2, drafter=None)
    engine = load(cross_bundles[kind], threads=2, drafter="cross", draft_budget=8, ngram_cache=False)
    engine.drafter.target_cost = None
    for seed, prompt in enumerate(PROMPTS):
        want = plain.generate(prompt, seed=seed, max_new_tokens=30, ignore_eos=True, temperature=0.9, top_k=20)
        got = engine.generate(prompt, seed=seed, max_new_tokens=30, ignore_eos=True, temperature=0.9, top_k=20)
        assert got.token_ids == want.token_ids, (kind, seed)
    assert engine.drafter.counters["nodes"] > 0


@pytest.mark.parametrize("spec", ["cross", "ngram>cross"])
def test_a_cross_drafter_sitting_out_runs_no_forward_and_catches_up_exactly(spec, cross_bundles, cross_plain):
    """While the cross-vocabulary drafter sits out it neither decodes, re-encodes nor runs its model; the next
    draft catches up on the missed text in one batched forward, and greedy output stays the plain target's."""
    from spec_helpers import DraftEvery, forwards_while_sitting_out

    engine = load(cross_bundles["mirror"], threads=2, drafter=spec, draft_budget=10, ngram_cache=False,
                  tree="chain:6")
    drafter: CrossVocabDrafter = engine.drafter
    schedule = drafter.pays_off = DraftEvery(4)
    idle_forwards = forwards_while_sitting_out(drafter, schedule)
    accepted = sat_out = 0
    for i in range(len(PROMPTS)):
        ids, expected = cross_plain["mirror", i]
        result = engine.generate(ids, max_new_tokens=40, ignore_eos=True)
        assert result.token_ids == expected, f"prompt {i}"
        accepted += result.stats.accepted_tokens
        sat_out += result.stats.sat_out_steps
    assert accepted > 0 and schedule.skipped > 10 and sat_out >= schedule.skipped  # (+ steps with no budget)
    assert len(idle_forwards) == schedule.skipped and not any(idle_forwards)
