"""Tests for edgespec.sampling: GenerationConfig, process_logits, sample, greedy."""

from __future__ import annotations

import numpy as np
import pytest

from edgespec.sampling import GenerationConfig, greedy, process_logits, sample


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# GenerationConfig
# ---------------------------------------------------------------------------------------------


def test_config_defaults():
    c = GenerationConfig().validate()
    assert (c.max_new_tokens, c.temperature, c.top_k, c.top_p) == (128, 0.0, 0, 1.0)
    assert c.seed is None and c.stop == () and c.eos_token_ids is None
    assert c.ignore_eos is False and c.do_sample is None
    assert c.is_greedy


def test_config_is_greedy():
    assert GenerationConfig(temperature=0.0).is_greedy
    assert not GenerationConfig(temperature=0.7).is_greedy
    assert GenerationConfig(temperature=0.7, do_sample=False).is_greedy
    assert not GenerationConfig(temperature=0.7, do_sample=True).is_greedy


def test_config_normalizes():
    c = GenerationConfig(stop="\n\n", eos_token_ids=7)
    assert c.stop == ("\n\n",) and c.eos_token_ids == (7,)
    c = GenerationConfig(stop=["a", "b"], eos_token_ids=[1, 2])
    assert c.stop == ("a", "b") and c.eos_token_ids == (1, 2)
    c.validate()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(max_new_tokens=1.5), "max_new_tokens must be an int"),
        (dict(max_new_tokens=True), "max_new_tokens must be an int"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature="hot"), "temperature must be a finite number"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_k=2.5), "top_k must be an int"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=-0.2), r"top_p must be in \(0, 1\]"),
        (dict(seed=-3), "seed must be None or an int >= 0"),
        (dict(seed="x"), "seed must be None or an int >= 0"),
        (dict(stop=["ok", 3]), "stop must be a sequence of strings"),
        (dict(stop=["ok", ""]), "stop strings must be non-empty"),
        (dict(eos_token_ids=[1, -2]), "eos_token_ids must be None or a sequence of ints"),
        (dict(ignore_eos="yes"), "ignore_eos must be a bool"),
        (dict(do_sample="yes", temperature=1.0), "do_sample must be None or a bool"),
        (dict(do_sample=True, temperature=0.0), "do_sample=True needs temperature > 0"),
    ],
)
def test_config_validate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs).validate()


def test_config_valid_edge_values():
    GenerationConfig(max_new_tokens=0, temperature=1e-3, top_k=1, top_p=1e-9, seed=0).validate()
    c = GenerationConfig(temperature=2, seed=np.int64(5), eos_token_ids=np.array([3, 4])).validate()
    assert c.eos_token_ids == (3, 4) and all(type(t) is int for t in c.eos_token_ids)


# ---------------------------------------------------------------------------------------------
# process_logits
# ---------------------------------------------------------------------------------------------


def test_softmax_plain():
    logits = np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32)
    p = process_logits(logits)
    assert p.dtype == np.float64 and p.shape == (4,)
    np.testing.assert_allclose(p, softmax(logits.astype(np.float64)), rtol=1e-12)
    np.testing.assert_allclose(process_logits(logits, temperature=0.5), softmax(logits * 2.0), rtol=1e-12)
    np.testing.assert_allclose(process_logits(logits, temperature=1e6).sum(), 1.0)


def test_temperature_zero_is_one_hot_argmax():
    p = process_logits(np.array([1.0, 5.0, 5.0, -np.inf]), temperature=0.0)
    np.testing.assert_array_equal(p, [0.0, 1.0, 0.0, 0.0])


def test_top_k_mask():
    logits = np.array([0.1, 3.0, 2.0, -1.0, 2.5])
    p = process_logits(logits, top_k=2)
    np.testing.assert_array_equal(p > 0, [False, True, False, False, True])
    np.testing.assert_allclose(p[[1, 4]], softmax([3.0, 2.5]))
    assert process_logits(logits, top_k=1)[1] == 1.0
    # top_k >= V or 0 is off
    np.testing.assert_allclose(process_logits(logits, top_k=5), softmax(logits))
    np.testing.assert_allclose(process_logits(logits, top_k=0), softmax(logits))
    # ties at the k-th value are all kept (as in Hugging Face)
    p = process_logits(np.array([1.0, 2.0, 2.0, 0.0]), top_k=2)
    np.testing.assert_allclose(p, [0, 0.5, 0.5, 0])
    p = process_logits(np.array([3.0, 2.0, 2.0, 0.0]), top_k=2)
    assert (p > 0).tolist() == [True, True, True, False]


def test_top_p_mask():
    # probabilities 0.5, 0.25, 0.15, 0.1 (in shuffled order)
    probs = np.array([0.15, 0.5, 0.1, 0.25])
    logits = np.log(probs)
    keep = lambda top_p: (process_logits(logits, top_p=top_p) > 0).tolist()  # noqa: E731
    assert keep(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert keep(0.5) == [False, True, False, False]  # exactly reaching counts
    assert keep(0.6) == [False, True, False, True]  # 0.5 + 0.25
    assert keep(0.75) == [False, True, False, True]
    assert keep(0.8) == [True, True, False, True]  # 0.9
    assert keep(0.95) == [True, True, True, True]
    assert keep(1e-9) == [False, True, False, False]  # always at least one token
    np.testing.assert_allclose(process_logits(logits, top_p=0.6)[[1, 3]], [2 / 3, 1 / 3])
    np.testing.assert_allclose(process_logits(logits, top_p=1.0), probs)


def test_top_p_ties_prefer_lower_index():
    p = process_logits(np.zeros(4), top_p=0.5)
    np.testing.assert_allclose(p, [0.5, 0.5, 0, 0])
    p = process_logits(np.zeros(4), top_p=0.3)
    np.testing.assert_allclose(p, [0.5, 0.5, 0, 0])
    p = process_logits(np.zeros(4), top_p=0.2)
    np.testing.assert_allclose(p, [1, 0, 0, 0])


def test_top_k_then_top_p():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    # after top_k=3 -> [4/9, 3/9, 2/9, 0]; top_p=0.7 keeps 4/9 + 3/9 = 7/9 >= 0.7
    p = process_logits(logits, top_k=3, top_p=0.7)
    np.testing.assert_allclose(p, [4 / 7, 3 / 7, 0, 0])
    # without top_k, 0.4 + 0.3 = 0.7 also reaches it
    np.testing.assert_allclose(process_logits(logits, top_p=0.7), [4 / 7, 3 / 7, 0, 0])
    np.testing.assert_allclose(process_logits(logits, top_p=0.71), [4 / 9, 3 / 9, 2 / 9, 0])


def test_batch_rows_match_single_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 50)).astype(np.float32) * 3
    for kw in [dict(), dict(temperature=0.7, top_k=10), dict(temperature=1.3, top_p=0.8),
               dict(temperature=0.9, top_k=7, top_p=0.5), dict(temperature=0.0)]:
        batch = process_logits(logits, **kw)
        assert batch.shape == logits.shape
        np.testing.assert_allclose(batch.sum(-1), 1.0, rtol=1e-12)
        for i in range(2):
            for j in range(5):
                np.testing.assert_array_equal(batch[i, j], process_logits(logits[i, j], **kw))


def test_masked_logits_and_errors():
    p = process_logits(np.array([-np.inf, 0.0, -np.inf]))
    np.testing.assert_array_equal(p, [0, 1, 0])
    with pytest.raises(ValueError, match="NaN"):
        process_logits(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="finite maximum"):
        process_logits(np.array([-np.inf, -np.inf]))
    with pytest.raises(ValueError, match="temperature"):
        process_logits(np.zeros(3), temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        process_logits(np.zeros(3), top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        process_logits(np.zeros(3), top_p=0)
    with pytest.raises(ValueError, match="shape"):
        process_logits(np.zeros(0))


# ---------------------------------------------------------------------------------------------
# sample / greedy
# ---------------------------------------------------------------------------------------------


def test_greedy():
    assert greedy(np.array([0.1, 3.0, 2.0])) == 1
    assert greedy(np.array([1.0, 3.0, 3.0, 3.0])) == 1  # ties -> lowest index
    assert greedy(np.array([-np.inf, -5.0])) == 1
    assert isinstance(greedy(np.array([1.0], dtype=np.float32)), int)
    with pytest.raises(ValueError):
        greedy(np.zeros((2, 3)))


def test_sample_is_reproducible():
    probs = process_logits(np.random.default_rng(1).normal(size=1000), temperature=0.8, top_p=0.9)
    a = [sample(probs, np.random.default_rng(42)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    s1 = [sample(probs, r1) for _ in range(200)]
    s2 = [sample(probs, r2) for _ in range(200)]
    assert s1 == s2
    assert all(isinstance(t, int) for t in s1)
    assert all(probs[t] > 0 for t in s1)


def test_sample_never_picks_zero_probability():
    probs = np.array([0.0, 0.3, 0.0, 0.7, 0.0])
    rng = np.random.default_rng(3)
    assert {sample(probs, rng) for _ in range(2000)} == {1, 3}
    assert sample(np.array([0.0, 0.0, 1.0]), rng) == 2

    class Edge:  # a draw that lands exactly on the total
        def random(self):
            return 1.0

    assert sample(probs, Edge()) == 3


def test_sample_unnormalized_and_errors():
    rng = np.random.default_rng(0)
    assert sample(np.array([0.0, 5.0]), rng) == 1
    for bad in (np.zeros(3), np.array([0.5, -0.1, 0.6]), np.array([np.nan, 1.0]), np.zeros((2, 2)), np.zeros(0)):
        with pytest.raises(ValueError):
            sample(bad, rng)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sample_distribution_matches_probs():
    """Pearson chi-square over 20 000 draws. With 7 degrees of freedom the 99.99th percentile
    is about 29.9; the fixed threshold 40 is generous (seeded, so the test is deterministic)."""
    probs = process_logits(np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]), temperature=1.0)
    rng = np.random.default_rng(2024)
    n = 20_000
    counts = np.bincount([sample(probs, rng) for _ in range(n)], minlength=probs.size).astype(np.float64)
    assert chi_square(counts, probs) < 40.0
    # and a sampler that is off by a little is caught
    skewed = probs.copy()
    skewed[0] *= 1.1
    skewed /= skewed.sum()
    assert chi_square(counts, skewed) > 40.0


def test_sample_distribution_after_top_k_top_p():
    logits = np.array([3.0, 2.5, 2.0, 1.0, 0.0, -1.0])
    probs = process_logits(logits, temperature=0.9, top_k=4, top_p=0.9)
    support = np.flatnonzero(probs > 0)
    rng = np.random.default_rng(5)
    draws = np.array([sample(probs, rng) for _ in range(10_000)])
    assert set(np.unique(draws)) <= set(support.tolist())
    counts = np.bincount(draws, minlength=probs.size)[support].astype(np.float64)
    assert chi_square(counts, probs[support]) < 30.0
