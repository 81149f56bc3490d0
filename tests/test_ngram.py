"""Tests for edgespec.drafters.ngram (and its table, cache file and static builder): n-gram tables, tiers and thresholds, tree growth, recycling, cache files, static builds."""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgespec.drafters import cachefile, ngram_table
from edgespec.drafters.base import DraftTree, VerifiedStep, fast_top_k
from edgespec.drafters.cachefile import NGramCacheWarning, default_cache_path, tokenizer_fingerprint
from edgespec.drafters.ngram import NGramDrafter, Thresholds, TierThresholds, grow_tree, longest_match
from edgespec.drafters.ngram_static import build_static_cache, register_cli
from edgespec.drafters.ngram_table import NGramTable

VOCAB = 1000


def table_state(table: NGramTable) -> dict:
    """A comparable snapshot: key -> (total, best, {token: (count, stamp)})."""
    return {key: (c.total, c.best, {t: (ngram_table.entry_count(e), ngram_table.entry_stamp(e)) for t, e in c.next.items()})
            for key, c in table.grams.items()}


def fresh_table(tokens, max_n=4) -> NGramTable:
    table = NGramTable(max_n)
    table.add_tokens(tokens)
    return table


def step_after(token: int, best_next: list[int], vocab: int = VOCAB, accepted=()) -> VerifiedStep:
    """A verification that fed only `token`; the target ranks `best_next` first (best first)."""
    logits = np.zeros((1, vocab), np.float32)
    for rank, nxt in enumerate(best_next):
        logits[0, nxt] = 10.0 - rank
    return VerifiedStep(np.array([token]), np.array([-1]), logits, [], [best_next[0]], context_length=1)


# ------------------------------------------------------------------------------------------------ tables and matching
def test_table_counts_every_n_with_stamps():
    table = fresh_table([1, 2, 3, 1, 2, 4], max_n=3)
    assert table_state(table)[(1, 2)] == (2, 1, {3: (1, 2), 4: (1, 5)})
    assert table_state(table)[(2,)] == (2, 1, {3: (1, 2), 4: (1, 5)})
    assert table_state(table)[(1,)] == (2, 2, {2: (2, 4)})  # count 2, latest at position 4
    assert (3, 1, 2) in table.grams and (1, 2, 3, 1) not in table.grams  # max_n = 3
    assert table.entries == sum(len(c.next) for c in table.grams.values())


def test_longest_n_wins_over_more_frequent_shorter_match():
    # (2, 3) is followed by 5 three times, but the longer (1, 2, 3) only by 4
    context = [1, 2, 3, 4, 9, 2, 3, 5, 8, 2, 3, 5, 7, 2, 3, 5, 6, 1, 2, 3]
    drafter = NGramDrafter(VOCAB, recycling=False)
    tree = drafter.propose(context, 1)
    assert tree.tokens.tolist() == [4] and drafter.last_sources == ["context"]
    # and with the 3-gram gone from the key, (2, 3) -> 5 wins
    tree = drafter.propose(context + [9, 2, 3], 1)
    assert tree.tokens.tolist() == [5]


def test_continuations_ranked_by_count_then_recency():
    lax = TierThresholds((1,), (0.0,), (1.0,), 1)
    table = fresh_table([7, 1, 7, 2, 7, 2, 7, 3], max_n=1)  # after 7: 1 once (oldest), 2 twice, 3 once (latest)
    assert [t for t, _ in longest_match(table, (7,), lax, VOCAB)] == [2, 3, 1]
    estimates = dict(longest_match(table, (7,), lax, VOCAB))
    assert estimates[2] == pytest.approx(0.5) and estimates[3] == pytest.approx(0.25)


def test_thresholds_count_and_share_per_n():
    table = fresh_table([5, 1, 5, 2, 5, 2], max_n=1)  # after 5: 2 twice, 1 once (share 2/3, 1/3)
    assert longest_match(table, (5,), TierThresholds((3,), (0.0,), (1.0,)), VOCAB) == []  # count 2 < 3
    only_two = longest_match(table, (5,), TierThresholds((1,), (0.5,), (1.0,)), VOCAB)
    assert [t for t, _ in only_two] == [2]  # 1/3 < 0.5
    assert longest_match(table, (5,), TierThresholds((1,), (0.0,), (1.0,), min_n=2), VOCAB) == []  # n=1 not allowed
    assert [t for t, _ in longest_match(table, (5,), TierThresholds((1,), (0.0,), (1.0,)), 2)] == [1]  # 2 >= vocab


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=0, max_size=80), st.lists(st.integers(0, 80), max_size=6),
       st.integers(1, 5))
def test_incremental_ingestion_equals_scratch_build(tokens, cuts, max_n):
    whole = fresh_table(tokens, max_n)
    pieces = NGramTable(max_n)
    done = 0
    for cut in sorted(cuts) + [len(tokens)]:
        cut = min(cut, len(tokens))
        pieces.add_tokens(tokens[:cut], done)
        done = max(done, cut)
    assert table_state(pieces) == table_state(whole)
    assert pieces.entries == whole.entries

    drafter = NGramDrafter(VOCAB, max_n=max_n)  # the drafter's context tier, fed step by step
    for end in range(0, len(tokens) + 1, 3):
        drafter.propose(tokens[:end], 4)
    drafter.propose(tokens, 4)
    assert table_state(drafter.context_table) == table_state(whole)


def test_context_tier_rebuilds_when_context_does_not_extend():
    drafter = NGramDrafter(VOCAB)
    drafter.propose([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4)
    other = [20, 21, 22, 20, 21]
    drafter.propose(other, 4)
    assert table_state(drafter.context_table) == table_state(fresh_table(other))
    drafter.start([20, 21, 22, 20, 21, 23], None)  # a prompt extending what was seen: kept and extended
    assert table_state(drafter.context_table) == table_state(fresh_table([20, 21, 22, 20, 21, 23]))
    drafter.start([1, 2], None)  # not an extension: rebuilt
    assert table_state(drafter.context_table) == table_state(fresh_table([1, 2]))


# ------------------------------------------------------------------------------------------------ tree growth
def constant_children(pairs):
    return lambda tail: [(token, prob, "test") for token, prob in pairs]


def test_grow_tree_is_best_first():
    tokens, parents, _, _ = grow_tree((0,), 4, constant_children([(1, 0.6), (2, 0.5)]), 0.0, 10, 4)
    # 1 (.6), 2 (.5), then 1->1 (.36), then 1->2 (.30, pushed before 2->1 at .30)
    assert tokens == [1, 2, 1, 2] and parents == [-1, -1, 0, 0]
    tokens, parents, _, _ = grow_tree((0,), 4, constant_children([(1, 0.9), (2, 0.5)]), 0.0, 10, 4)
    assert tokens == [1, 1, 1, 1] and parents == [-1, 0, 1, 2]  # .9, .81, .73, .66 all beat .5


def test_grow_tree_stops_below_min_node_prob_and_max_depth():
    tokens, parents, _, _ = grow_tree((0,), 10, constant_children([(1, 0.6), (2, 0.5)]), 0.35, 10, 4)
    assert tokens == [1, 2, 1]  # .36 is the last estimate >= .35
    tokens, parents, _, _ = grow_tree((0,), 10, constant_children([(1, 1.0)]), 0.0, 3, 4)
    assert DraftTree(tokens, parents).depths().max() == 3 and len(tokens) == 3
    assert grow_tree((0,), 0, constant_children([(1, 1.0)]), 0.0, 3, 4)[0] == []


def test_grow_tree_caps_nodes_per_source():
    children = lambda tail: [(1, 0.9, "recycled"), (2, 0.8, "recycled")]
    tokens, _, sources, _ = grow_tree((0,), 10, children, 0.0, 10, 4, {"recycled": 2})
    assert len(tokens) == 2 and sources == ["recycled", "recycled"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=200), st.integers(1, 24), st.integers(1, 9),
       st.integers(6, 14))
def test_tree_shape_respects_budget_depth_and_vocabulary(tokens, budget, max_depth, vocab):
    drafter = NGramDrafter(vocab, max_depth=max_depth, min_node_prob=0.01)
    drafter.observe(step_after(tokens[-1], [3, 11, 13], vocab=16))  # recycled ids >= vocab must be dropped
    tree = drafter.propose(tokens, budget)
    assert len(tree) <= budget and len(drafter.last_sources) == len(tree)
    tree.validate(vocab)  # parents before children, distinct siblings, ids inside the vocabulary
    if len(tree):
        assert tree.depths().max() <= max_depth
        assert tree.probs is None


def test_repetitive_context_fills_budget_with_a_branching_tree():
    rng = random.Random(0)
    context = [rng.choice([1, 2, 3, 4]) for _ in range(400)]
    tree = NGramDrafter(VOCAB, min_node_prob=0.01).propose(context, 16)
    assert len(tree) == 16 and len(set(tree.parents.tolist())) < 16  # some node has several children
    tree.validate(VOCAB)


def test_nothing_matches_gives_an_empty_tree():
    drafter = NGramDrafter(VOCAB)
    tree = drafter.propose([1, 2, 3, 4, 5], 16)
    assert len(tree) == 0 and drafter.counters["empty"] == 1 and drafter.counters["proposals"] == 1
    assert len(drafter.propose([], 16)) == 0


# ------------------------------------------------------------------------------------------------ session tier
def test_session_tier_found_after_finish_and_cleared_by_reset():
    answer = [100, 101, 102, 103, 104, 105]
    drafter = NGramDrafter(VOCAB, recycling=False)
    drafter.start([1, 2, 3], None)
    drafter.finish([1, 2, 3] + answer + answer)  # the answer twice: counts of 2 pass the session thresholds
    drafter.start([50, 51], None)
    tree = drafter.propose([50, 51, 100, 101], 4)
    assert tree.tokens.tolist()[:1] == [102] and drafter.last_sources[0] == "session"
    drafter.reset()
    assert len(drafter.propose([50, 51, 100, 101], 4)) == 0


def test_finish_counts_a_repeated_history_once():
    drafter = NGramDrafter(VOCAB)
    first = [1, 2, 3, 4, 5]
    drafter.finish(first)
    drafter.finish(first + [6, 7])  # the next chat turn repeats the history
    assert table_state(drafter.session_table)[(1, 2)][0] == 1
    assert table_state(drafter.session_table)[(4, 5)][2] == {6: (1, 5 + 5)}  # stamp: clock 5 + position 5


def test_the_most_likely_tier_wins_and_ties_go_to_the_earlier_tier():
    drafter = NGramDrafter(VOCAB, recycling=False)
    drafter.finish([60, 61, 62, 63, 64] * 2)  # session: the 4-gram (60, 61, 62, 63) -> 64, twice
    context = [63, 70, 63, 70, 60, 61, 62, 63]  # context: only the 1-gram (63,) -> 70, share 1, weight .35
    tree = drafter.propose(context, 1)
    assert tree.tokens.tolist() == [64] and drafter.last_sources == ["session"]  # .70 beats .35
    drafter.reset()
    drafter.finish([60, 61, 62, 63, 64] * 2)
    same = Thresholds(session=Thresholds().context)  # equal weights: the context tier comes first
    drafter.thresholds = same
    context = [60, 61, 62, 63, 71, 60, 61, 62, 63]
    assert drafter.propose(context, 1).tokens.tolist() == [71] and drafter.last_sources == ["context"]


# ------------------------------------------------------------------------------------------------ recycling
def test_recycling_drafts_the_observed_top_k_when_nothing_matches():
    drafter = NGramDrafter(VOCAB, min_node_prob=0.15)
    drafter.observe(step_after(42, [7, 8, 9]))
    assert drafter.recycled[42][:3] == [7, 8, 9]
    tree = drafter.propose([1, 2, 42], 16)
    assert tree.tokens.tolist() == [7] and drafter.last_sources == ["recycled"]  # .30 >= .15, rank 2 (.12) is not
    drafter.observe(step_after(42, [5, 6]))  # the latest observation replaces
    assert drafter.propose([1, 2, 42], 16).tokens.tolist() == [5]
    assert len(NGramDrafter(VOCAB, recycling=False, min_node_prob=0.15).propose([1, 2, 42], 16)) == 0


def test_recycling_budget_and_weights_are_configurable():
    drafter = NGramDrafter(VOCAB, recycling_budget=1, min_node_prob=0.05,
                           thresholds=Thresholds(recycle_weights=(0.6, 0.5, 0.4)))
    drafter.observe(step_after(42, [7, 8, 9]))
    assert len(drafter.propose([42], 16)) == 1
    drafter.recycling_budget = 3
    assert drafter.propose([42], 16).tokens.tolist() == [7, 8, 9]


def test_recycling_learns_only_the_accepted_path_and_counts_acceptance():
    drafter = NGramDrafter(VOCAB, min_node_prob=0.01)
    context = [1, 2, 3, 9, 1, 2, 3]
    tree = drafter.propose(context, 2)
    assert tree.tokens.tolist() == [9, 1] and drafter.last_sources == ["context", "context"]
    logits = np.zeros((3, VOCAB), np.float32)
    logits[0, 9] = logits[1, 40] = logits[2, 50] = 5.0
    drafter.observe(VerifiedStep(np.array([3, 9, 1]), np.array([-1, 0, 1]), logits, [0], [9, 40],
                                 context_length=len(context)))
    assert drafter.counters["accepted"]["context"] == 1 and drafter.counters["drafted"]["context"] == 2
    assert drafter.recycled[3][0] == 9 and drafter.recycled[9][0] == 40 and 1 not in drafter.recycled


def test_fast_top_k_is_exact():
    rng = np.random.default_rng(0)
    for vocab in (5, 300, 50_000):
        logits = rng.standard_normal((4, vocab)).astype(np.float32)
        logits[1, :] = np.round(logits[1, :])  # many ties
        k = min(8, vocab)
        got = fast_top_k(logits, k)
        assert got.shape == (4, k)
        for row in range(4):
            expected = np.sort(logits[row])[::-1][:k]
            np.testing.assert_array_equal(logits[row, got[row]], expected)
            assert len(set(got[row].tolist())) == k


# ------------------------------------------------------------------------------------------------ persistent tier
PATTERN = [300, 301, 302, 303, 304, 305, 306, 307]


def test_persistent_round_trip(tmp_path):
    path = tmp_path / "cache.npz"
    first = NGramDrafter(VOCAB, fingerprint="fp1", persistent_path=path, recycling=False)
    first.finish([1] + PATTERN * 3)
    assert path.is_file()
    second = NGramDrafter(VOCAB, fingerprint="fp1", persistent_path=path, recycling=False)
    assert table_state(second.persistent_table) == table_state(first.persistent_table)
    tree = second.propose([9, 8, 300, 301, 302], 4)
    assert tree.tokens.tolist()[:2] == [303, 304] and set(second.last_sources) == {"persistent"}
    second.reset()  # a new conversation keeps the persistent tier
    assert len(second.propose([9, 8, 300, 301, 302], 4)) > 0


def test_persistent_clock_and_saved_file_follow_the_table(tmp_path):
    path = tmp_path / "cache.npz"
    drafter = NGramDrafter(VOCAB, fingerprint="fp", persistent_path=path)
    rng = random.Random(1)
    for _ in range(5):
        drafter.finish([rng.randrange(50) for _ in range(60)])
    reloaded = NGramDrafter(VOCAB, fingerprint="fp", persistent_path=path)
    assert table_state(reloaded.persistent_table) == table_state(drafter.persistent_table)
    assert reloaded._persistent_clock == drafter._persistent_clock == 300


def test_no_persistent_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    drafter = NGramDrafter(VOCAB)
    drafter.finish(PATTERN * 3)
    assert drafter.persistent_table is None and list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "cache.npz"
    drafter = NGramDrafter(VOCAB, persistent_path=path)
    drafter.finish(PATTERN)
    drafter.finish(PATTERN + [1, 2])
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.npz"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "cache.npz"
    drafter = NGramDrafter(VOCAB, persistent_path=path)
    drafter.finish(PATTERN * 3)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cachefile.os, "replace", failing_replace)
    with pytest.warns(NGramCacheWarning, match="not saved: disk full"):
        drafter.finish([5, 6, 7, 8, 9])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]
    with pytest.raises(OSError, match="disk full"):
        drafter.save()
    monkeypatch.undo()
    drafter.save()  # the next save writes what the failed one could not
    reloaded = NGramDrafter(VOCAB, persistent_path=path)
    assert table_state(reloaded.persistent_table) == table_state(drafter.persistent_table)
    assert (8,) in reloaded.persistent_table.grams


def test_eviction_keeps_the_cap_and_drops_low_counts_first(tmp_path):
    path = tmp_path / "cache.npz"
    rng = random.Random(2)
    noise = [rng.randrange(400, 900) for _ in range(200)]
    drafter = NGramDrafter(VOCAB, persistent_path=path, persistent_cap=60)
    drafter.finish(PATTERN * 10 + noise)
    assert drafter.persistent_table.entries == 60
    everything = table_state(fresh_table(PATTERN * 10 + noise))
    kept = table_state(drafter.persistent_table)
    frequent = {(k, t) for k, (_, _, nxt) in everything.items() for t, (count, _) in nxt.items() if count >= 2}
    assert len(frequent) == 32 and all(t in kept.get(k, (0, 0, {}))[2] for k, t in frequent)
    rare_stamps = sorted((stamp for _, _, nxt in everything.values() for count, stamp in nxt.values() if count == 1),
                         reverse=True)
    kept_rare = sorted(stamp for _, _, nxt in kept.values() for count, stamp in nxt.values() if count == 1)
    assert sorted(kept_rare, reverse=True) == rare_stamps[:60 - 32]  # the most recent of the count-1 entries
    assert drafter.persistent_table.grams[(300, 301, 302)].next.keys() == {303}
    reloaded = NGramDrafter(VOCAB, persistent_path=path, persistent_cap=60)
    assert reloaded.persistent_table.entries == 60
    assert table_state(reloaded.persistent_table) == table_state(drafter.persistent_table)


def test_eviction_drops_the_least_recent_among_equal_counts(tmp_path):
    path = tmp_path / "cache.npz"
    old, new = [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]
    cap = fresh_table(new).entries
    drafter = NGramDrafter(VOCAB, persistent_path=path, persistent_cap=cap)
    drafter.finish(old)
    drafter.finish(new)
    assert table_state(drafter.persistent_table).keys() == fresh_table(new).grams.keys()
    # shares stay honest: an evicted continuation still counts in its n-gram's total
    table = NGramTable(1)
    table.add_tokens([1, 2, 1, 3, 1, 3], 0)
    arrays = ngram_table.evict_to_cap(table, table.to_arrays(), 3)
    assert table.grams[(1,)].next.keys() == {3} and table.grams[(1,)].total == 3
    assert arrays["key_total"].tolist() == [3, 1, 1] and len(arrays["entry_key"]) == 3  # (1,) -> 2 evicted


def test_default_cache_path_and_fingerprint(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"a": 1}')
    fp = tokenizer_fingerprint(tok)
    tok.write_text('{"a": 2}')
    assert fp != tokenizer_fingerprint(tok) and len(fp) == 16 and int(fp, 16) >= 0
    path = default_cache_path(tmp_path, "qwen/../x y", fp)
    assert path.parent == tmp_path and path.suffix == ".npz" and fp in path.name and "/" not in path.name[:-4]


# ------------------------------------------------------------------------------------------------ bad cache files
def write_cache(path, vocab=VOCAB, fingerprint="fp", **header_changes):
    table = fresh_table(PATTERN * 3)
    arrays = table.to_arrays()
    header = cachefile.make_header("persistent", 4, vocab, fingerprint, 24, arrays)
    header.update(header_changes)
    cachefile.write_cache_file(path, header, arrays)
    return arrays


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not a zip file at all"), "corrupt or truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupt or truncated"),
    (lambda p: write_cache(p, fingerprint="other"), "another tokenizer"),
    (lambda p: write_cache(p, vocab=VOCAB + 1), "vocabulary of 1001 tokens"),
    (lambda p: write_cache(p, version=99), "format version 99"),
    (lambda p: write_cache(p, magic="something-else"), "not an edgespec n-gram cache"),
    (lambda p: write_cache(p, kind="mystery"), "'mystery' cache"),
    (lambda p: np.savez(p, x=np.zeros(3)), "no header"),
])
def test_unusable_cache_file_warns_and_starts_fresh(tmp_path, damage, message):
    path = tmp_path / "cache.npz"
    write_cache(path)
    damage(path)
    with pytest.warns(NGramCacheWarning, match=message):
        drafter = NGramDrafter(VOCAB, fingerprint="fp", persistent_path=path)
    assert drafter.persistent_table is not None and drafter.persistent_table.entries == 0
    assert len(drafter.propose([9, 300, 301], 8)) == 0
    drafter.finish([1, 2, 3])  # replaced by a valid cache
    assert NGramDrafter(VOCAB, fingerprint="fp", persistent_path=path).persistent_table.entries == 3


def test_out_of_vocabulary_ids_in_a_file_are_refused(tmp_path):
    path = tmp_path / "cache.npz"
    arrays = write_cache(path)
    arrays["entry_next"][0] = VOCAB + 5
    cachefile.write_cache_file(path, cachefile.make_header("persistent", 4, VOCAB, "fp", 0, arrays), arrays)
    with pytest.warns(NGramCacheWarning, match="outside the vocabulary"):
        drafter = NGramDrafter(VOCAB, fingerprint="fp", persistent_path=path)
    assert drafter.persistent_table.entries == 0


def test_inconsistent_arrays_are_refused(tmp_path):
    path = tmp_path / "cache.npz"
    arrays = write_cache(path)
    arrays["key_total"][0] = 0  # below its entries' counts
    cachefile.write_cache_file(path, cachefile.make_header("persistent", 4, VOCAB, "fp", 0, arrays), arrays)
    with pytest.warns(NGramCacheWarning, match="total is below"):
        NGramDrafter(VOCAB, fingerprint="fp", persistent_path=path)


def test_repeated_keys_and_odd_padding_in_a_file_are_merged(tmp_path):
    path = tmp_path / "cache.npz"
    table = NGramTable(2)
    table.add_tokens([1, 2, 1, 3])
    arrays = table.to_arrays()
    arrays["key_total"] += 1  # one evicted continuation each
    twice = ngram_table.concat_arrays(arrays, arrays)  # every key and entry written twice
    twice["key_tokens"][twice["key_len"] == 1, 1] = 7  # padding that is not -1
    cachefile.write_cache_file(path, cachefile.make_header("persistent", 2, VOCAB, "fp", 4, twice), twice)
    drafter = NGramDrafter(VOCAB, fingerprint="fp", max_n=2, persistent_path=path)
    state = table_state(drafter.persistent_table)
    assert state[(1,)] == (6, 2, {2: (2, 1), 3: (2, 3)}) and state[(2, 1)] == (4, 2, {3: (2, 3)})
    drafter.finish([1, 2, 9])
    reloaded = NGramDrafter(VOCAB, fingerprint="fp", max_n=2, persistent_path=path)
    assert table_state(reloaded.persistent_table) == table_state(drafter.persistent_table)
    assert reloaded.persistent_table.grams[(1,)].total == 7

    padded = dict(arrays, key_tokens=arrays["key_tokens"].copy())  # odd padding alone: saving must not repeat keys
    padded["key_tokens"][padded["key_len"] == 1, 1] = 7
    cachefile.write_cache_file(path, cachefile.make_header("persistent", 2, VOCAB, "fp", 4, padded), padded)
    drafter = NGramDrafter(VOCAB, fingerprint="fp", max_n=2, persistent_path=path)
    drafter.finish([1, 2, 9])
    _, saved = cachefile.read_cache_file(path, ("persistent",), VOCAB, "fp")
    assert len(saved["key_len"]) == len(drafter.persistent_table.grams)
    assert table_state(NGramDrafter(VOCAB, fingerprint="fp", max_n=2, persistent_path=path).persistent_table) == \
        table_state(drafter.persistent_table)


def test_a_static_cache_as_persistent_path_is_used_read_only(tmp_path):
    path = tmp_path / "static.npz"
    arrays = fresh_table(PATTERN * 3).to_arrays()
    cachefile.write_cache_file(path, cachefile.make_header("static", 4, VOCAB, "fp", 0, arrays), arrays)
    before = path.read_bytes()
    with pytest.warns(NGramCacheWarning, match="static cache, not a persistent one"):
        drafter = NGramDrafter(VOCAB, fingerprint="fp", persistent_path=path)
    drafter.finish([1, 2, 3, 4])
    assert path.read_bytes() == before and drafter.static_table.entries == len(arrays["entry_key"])


def test_longer_keys_in_a_file_are_dropped_for_a_smaller_max_n(tmp_path):
    path = tmp_path / "cache.npz"
    write_cache(path)
    drafter = NGramDrafter(VOCAB, fingerprint="fp", max_n=2, persistent_path=path)
    assert max(map(len, drafter.persistent_table.grams)) == 2
    assert table_state(drafter.persistent_table) == table_state(fresh_table(PATTERN * 3, max_n=2))
    drafter.finish([1, 2, 3])
    assert max(map(len, NGramDrafter(VOCAB, fingerprint="fp", max_n=4, persistent_path=path)
                   .persistent_table.grams)) == 2


# ------------------------------------------------------------------------------------------------ static caches
class WordTokenizer:
    """A tiny tokenizer: one id per whitespace-separated word, ids handed out in order of first sight."""

    def __init__(self, vocab_size=VOCAB):
        self.vocab_size = vocab_size
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(word, len(self.ids)) for word in text.split()]


CORPUS_A = "the cat sat on the mat . " * 6
CORPUS_B = "a dog sat on the rug . the cat sat on the mat . " * 3


def test_static_build_and_drafting(tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text(CORPUS_A)
    files[1].write_text(CORPUS_B)
    tokenizer = WordTokenizer()
    out = tmp_path / "static.npz"
    report = build_static_cache(files, tokenizer, out, max_n=3, fingerprint="fp", vocab_size=VOCAB)
    ids = tokenizer.ids
    a_ids, b_ids = tokenizer.encode(CORPUS_A), tokenizer.encode(CORPUS_B)
    assert report.files == 2 and report.tokens == len(a_ids) + len(b_ids) and report.evicted == 0
    expected = NGramTable(3)
    expected.add_tokens(a_ids)
    expected.add_tokens(b_ids)  # n-grams never span two files
    assert report.entries == expected.entries and report.keys == len(expected.grams)

    drafter = NGramDrafter(VOCAB, fingerprint="fp", static_path=out, recycling=False)
    loaded = {k: (c.total, {t: ngram_table.entry_count(e) for t, e in c.next.items()})
              for k, c in drafter.static_table.grams.items()}
    assert loaded == {k: (c.total, {t: ngram_table.entry_count(e) for t, e in c.next.items()})
                      for k, c in expected.grams.items()}
    tree = drafter.propose([ids["a"], ids["dog"], ids["cat"], ids["sat"]], 4)
    assert tree.tokens.tolist()[:2] == [ids["on"], ids["the"]] and set(drafter.last_sources) == {"static"}


def test_static_build_caps_entries_by_count(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text(CORPUS_B + " x y z w v u")
    report = build_static_cache([text], WordTokenizer(), tmp_path / "s.npz", max_n=2, max_entries=10)
    assert report.entries == 10 and report.evicted > 0
    header, arrays = cachefile.read_cache_file(tmp_path / "s.npz", ("static",), VOCAB, "")
    assert header["kind"] == "static" and len(arrays["entry_key"]) == 10 and arrays["entry_count"].min() >= 2


def test_static_build_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_static_cache([tmp_path / "missing.txt"], WordTokenizer(), tmp_path / "s.npz")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        build_static_cache([tmp_path / "bad.txt"], WordTokenizer(), tmp_path / "s.npz")
    (tmp_path / "ok.txt").write_text("w " * 20 + " ".join(str(i) for i in range(20)))
    with pytest.raises(ValueError, match="outside the vocabulary of 5"):
        build_static_cache([tmp_path / "ok.txt"], WordTokenizer(), tmp_path / "s.npz", vocab_size=5)
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(FileNotFoundError, match="static n-gram cache not found"):
        NGramDrafter(VOCAB, static_path=tmp_path / "nothing.npz")


def test_static_cache_of_another_tokenizer_warns(tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS_A)
    build_static_cache([tmp_path / "a.txt"], WordTokenizer(), tmp_path / "s.npz", fingerprint="one")
    with pytest.warns(NGramCacheWarning, match="another tokenizer"):
        drafter = NGramDrafter(VOCAB, fingerprint="two", static_path=tmp_path / "s.npz")
    assert drafter.static_table.entries == 0


def make_word_level_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set((CORPUS_A + CORPUS_B).split())) + ["[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_register_cli_builds_a_static_cache(tmp_path, monkeypatch, capsys):
    tokenizer_path = tmp_path / "tokenizer.json"
    make_word_level_tokenizer(tokenizer_path)
    bundle = tmp_path / "bundle"
    target = SimpleNamespace(tokenizer_path=tokenizer_path, vocab_size=64)
    seen = []

    def fake_load_manifest(folder):
        seen.append(Path(folder))
        return SimpleNamespace(target_model=target)

    monkeypatch.setattr("edgespec.runtimes.manifest.load_manifest", fake_load_manifest)
    (tmp_path / "a.txt").write_text(CORPUS_A)
    (tmp_path / "b.txt").write_text(CORPUS_B)
    parser = argparse.ArgumentParser(prog="edgespec")
    register_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "static.npz"
    args = parser.parse_args(["ngram", "build", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "-o", str(out),
                              "--bundle", str(bundle), "--max-n", "3"])
    assert args.func(args) == 0
    assert seen == [bundle]
    printed = capsys.readouterr().out
    assert "2 files" in printed and f"{len((CORPUS_A + CORPUS_B).split())} tokens" in printed
    header, _ = cachefile.read_cache_file(out, ("static",), 64, tokenizer_fingerprint(tokenizer_path))
    assert header["max_n"] == 3 and header["kind"] == "static"
    drafter = NGramDrafter(64, fingerprint=tokenizer_fingerprint(tokenizer_path), static_path=out)
    assert drafter.static_table.entries > 0

    args = parser.parse_args(["ngram", "build", str(tmp_path / "nope.txt"), "-o", str(out), "--bundle", str(bundle)])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["ngram", "build", str(tmp_path / "a.txt"), "--bundle", str(bundle)])  # no -o


# ------------------------------------------------------------------------------------------------ the vocabulary
@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=150), st.integers(1, 40))
def test_proposed_tokens_are_always_inside_the_vocabulary(tokens, vocab):
    drafter = NGramDrafter(vocab, min_node_prob=0.0)
    drafter.finish(tokens)  # the session tier holds out-of-vocabulary ids too
    drafter.observe(step_after(tokens[-1], [39, 38, 1], vocab=41))
    tree = drafter.propose(tokens, 16)
    assert all(0 <= t < vocab for t in tree.tokens.tolist())
    tree.validate(vocab)


def _verified(tree: DraftTree, accepted_nodes: list[int], vocab: int = VOCAB) -> VerifiedStep:
    """The engine's report of verifying `tree` (as proposed) with `accepted_nodes` accepted."""
    fed = np.concatenate([[0], tree.tokens])
    parents = np.concatenate([[-1], np.where(tree.parents < 0, 0, tree.parents + 1)])
    accepted = [int(tree.tokens[n]) for n in accepted_nodes] + [0]
    return VerifiedStep(fed, parents, np.zeros((len(fed), vocab), np.float32), accepted_nodes, accepted, 1)


def test_tier_estimates_learn_from_acceptance():
    """A tier whose drafts are always rejected gets lower estimates (smaller trees); one whose drafts are always
    accepted gets higher ones (capped at 1); only nodes the target reached count."""
    context = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2]
    doubter = NGramDrafter(VOCAB, recycling=False, min_node_prob=0.01)
    first = doubter.propose(context, 4)
    assert len(first) == 4 and doubter.last_sources == ["context"] * 4
    for _ in range(30):
        tree = doubter.propose(context, 4)
        doubter.observe(_verified(tree, []))  # the first node is rejected: its children were never reached
    assert doubter.tier_factor("context") < 0.5
    assert doubter.tier_estimated["context"] > 0 and doubter.tier_accepted["context"] == 0
    assert doubter.propose(context, 4).scores[0] < first.scores[0] * 0.5

    believer = NGramDrafter(VOCAB, recycling=False, min_node_prob=0.01)
    for _ in range(30):
        tree = believer.propose(context, 4)
        believer.observe(_verified(tree, list(range(len(tree)))))
    assert believer.tier_factor("context") > 1.2
    again = believer.propose(context, 4)
    assert again.scores[0] > first.scores[0] and np.all(again.scores <= 1.0)
    assert believer.counters["accepted"]["context"] >= 30


def test_under_a_planner_the_tier_estimates_stay_uncorrected_but_keep_learning():
    """`planned(True)`: estimates are the tiers' own (the planner's buckets calibrate), so rejections cannot push
    proposals into buckets that are never verified; the sums still learn, and `planned(False)` uses them again."""
    context = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2]
    drafter = NGramDrafter(VOCAB, recycling=False, min_node_prob=0.01)
    first = drafter.propose(context, 4)
    drafter.planned(True)
    for _ in range(30):
        tree = drafter.propose(context, 4)
        drafter.observe(_verified(tree, []))
    assert drafter.tier_factor("context") == 1.0
    assert drafter.propose(context, 4).scores.tolist() == first.scores.tolist()
    assert drafter.tier_estimated["context"] > 0  # still learnt
    drafter.planned(False)
    assert drafter.tier_factor("context") < 0.5
