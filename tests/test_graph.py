"""The graph contract: tree-masked forwards, KV subset commits, and parity with the torch reference."""

from __future__ import annotations

import numpy as np
import pytest

from edgespec.export import reference
from edgespec.runtimes.manifest import load_manifest
from edgespec.runtimes.runner import ModelRunner

ARCHS = ("qwen2", "llama", "gemma3")


def runner_for(bundle, max_context=256) -> ModelRunner:
    return ModelRunner(load_manifest(bundle).target_model, threads=1, max_context=max_context)


def random_tree(rng, size: int) -> np.ndarray:
    """Parents of a random tree of `size` nodes in topological order (-1 = attached to the context)."""
    return np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, size)], dtype=np.int64)


def path_to(parents: np.ndarray, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_torch(arch, tiny_models, tiny_bundles, torch_reference):
    ids = np.random.default_rng(1).integers(0, 300, size=40)
    runner = runner_for(tiny_bundles[arch])
    ours = runner.forward(ids)  # every position's logits
    ref = reference.reference_logits(torch_reference("hf", tiny_models[arch]), ids)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_logits_equal_path_by_path_decoding(arch, tiny_bundles):
    """Every node of a random tree scored in one call equals decoding its root-to-node path token by token."""
    rng = np.random.default_rng(7)
    runner = runner_for(tiny_bundles[arch])
    prefix = rng.integers(0, 300, size=13)  # > the tiny Gemma's sliding window of 8
    for trial in range(3):
        parents = random_tree(rng, 12)
        tokens = rng.integers(0, 300, size=len(parents))
        runner.reset()
        runner.prefill(prefix)
        tree_logits = runner.forward(tokens, parents=parents)
        for node in range(len(parents)):
            runner.rewind(len(prefix))
            for tok in tokens[path_to(parents, node)]:
                step_logits = runner.forward([tok])[0]
                runner.commit()
            np.testing.assert_allclose(tree_logits[node], step_logits, atol=1e-4, rtol=1e-4,
                                       err_msg=f"{arch} trial {trial} node {node}")


@pytest.mark.parametrize("arch", ARCHS)
def test_commit_subset_keeps_the_accepted_path(arch, tiny_bundles):
    """After committing one root-to-leaf path of a tree, the cache equals having fed that path as a chain."""
    rng = np.random.default_rng(3)
    runner = runner_for(tiny_bundles[arch])
    prefix = rng.integers(0, 300, size=10)
    parents = np.array([-1, 0, 0, 1, 2, 3, 3, 5], dtype=np.int64)
    tokens = rng.integers(0, 300, size=len(parents))
    runner.prefill(prefix)
    runner.forward(tokens, parents=parents)
    keep = path_to(parents, 7)  # nodes 0, 1, 3, 5, 7
    runner.commit(keep)
    nxt = runner.forward([42])[0]
    fresh = runner_for(tiny_bundles[arch])
    fresh.prefill(np.concatenate([prefix, tokens[keep]]))
    expect = fresh.forward([42])[0]
    np.testing.assert_allclose(nxt, expect, atol=1e-4, rtol=1e-4)


def test_capacity_growth_keeps_the_cache(tiny_bundles):
    """Growing the KV buffers past their initial capacity does not change any logits."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 300, size=300)
    big = runner_for(tiny_bundles["qwen2"], max_context=512)
    big.cache._allocate(512)
    small = runner_for(tiny_bundles["qwen2"], max_context=512)
    small.cache._allocate(16)
    a = [big.forward(ids[i:i + 37], logit_positions=[0, 36 if i + 37 <= 300 else 300 - i - 1]) for i in range(0, 300, 37)]
    for _ in a:
        pass
    big.reset()
    small.reset()
    for chunk in (ids[:5], ids[5:70], ids[70:300]):
        x = big.forward(chunk)
        big.commit()
        y = small.forward(chunk)
        small.commit()
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert small.cache.capacity >= 300


@pytest.mark.parametrize("quant,min_agreement", [("int8", 0.9), ("int4", 0.4)])
def test_quantized_hf_export_is_close(quant, min_agreement, tiny_models, tmp_path):
    from edgespec.export.bundle import export_bundle

    report = export_bundle(str(tiny_models["qwen2"]), tmp_path / quant, quant=quant, log=lambda m: None)
    acc = load_manifest(report.bundle).target_model.accuracy
    assert acc["top1_agreement"] >= min_agreement
    assert load_manifest(report.bundle).target_model.quantization["mode"] == quant


@pytest.mark.parametrize("arch", ("qwen2", "gemma3"))
def test_standard_ops_build_matches_fused(arch, tiny_models, tiny_bundles, tmp_path):
    """The fused-operator graph and the standard-operator graph compute the same logits."""
    from edgespec.export.bundle import export_bundle

    plain = export_bundle(str(tiny_models[arch]), tmp_path / "std", fused_ops=False, parity=False,
                          log=lambda m: None).bundle
    ids = np.random.default_rng(2).integers(0, 300, size=24)
    a = runner_for(tiny_bundles[arch]).forward(ids)
    b = runner_for(plain).forward(ids)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert load_manifest(plain).target_model.quantization["fused_ops"] is False
