"""Self-speculative graphs: per-layer gates (any subset of the target's layers runs, on the same weights) and the
reduced draft LM head, checked against the ungated export and against torch models with layers removed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest

from edgespec.export.bundle import export_bundle
from edgespec.runtimes.manifest import BundleError, load_manifest
from edgespec.runtimes.runner import ModelRunner

ARCHS = ("qwen2", "llama", "gemma3")
DRAFT_ROWS = 128  # below the tiny vocabulary (384), so the draft head is a real subset


def quiet(_msg):
    pass


def runner_for(bundle, max_context=256) -> ModelRunner:
    return ModelRunner(load_manifest(bundle).target_model, threads=1, max_context=max_context)


@pytest.fixture(scope="module")
def gated_bundles(tiny_models, tmp_path_factory) -> dict:
    """Self-speculative fp32 exports of the tiny models (layer gates and a 128-token draft head)."""
    root = tmp_path_factory.mktemp("gated-bundles")
    return {arch: export_bundle(str(folder), root / arch, name=f"tiny-{arch}", parity=False, log=quiet,
                                self_speculative=True, draft_head_size=DRAFT_ROWS).bundle
            for arch, folder in tiny_models.items()}


def gates_for(num_layers: int, keep) -> np.ndarray:
    gates = np.zeros(num_layers, dtype=bool)
    gates[list(keep)] = True
    return gates


def truncated_torch_logits(folder, keep, ids) -> np.ndarray:
    """Logits of the torch model of `folder` with only layers `keep` (each keeps its own layer type / window)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    config = model.model.config
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(ids, dtype=np.int64)[None]), use_cache=False)
    return out.logits[0].float().numpy()


def random_tree(rng, size: int) -> np.ndarray:
    return np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, size)], dtype=np.int64)


# ------------------------------------------------------------------------------------------------- all gates on
@pytest.mark.parametrize("arch", ARCHS)
def test_all_gates_on_equals_ungated_graph(arch, gated_bundles, tiny_bundles):
    rng = np.random.default_rng(11)
    gated, plain = runner_for(gated_bundles[arch]), runner_for(tiny_bundles[arch])
    assert gated.has_layer_gates and not plain.has_layer_gates
    ids = rng.integers(0, 300, size=40)
    np.testing.assert_allclose(gated.forward(ids), plain.forward(ids), atol=1e-5, rtol=0)  # prefill, all positions
    gated.reset()
    plain.reset()
    prefix = rng.integers(0, 300, size=13)  # longer than the tiny Gemma's sliding window
    gated.prefill(prefix)
    plain.prefill(prefix)
    parents = random_tree(rng, 10)
    tokens = rng.integers(0, 300, size=10)
    every = np.ones(gated.entry.num_layers, dtype=bool)
    a = gated.forward(tokens, parents=parents, layer_gates=every)
    b = plain.forward(tokens, parents=parents)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    gated.commit()
    plain.commit()
    np.testing.assert_allclose(gated.forward([7]), plain.forward([7]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- subsets vs torch models
LAYER_SETS = {  # kept layers; () = every layer skipped (embedding -> final norm -> head)
    "qwen2": [(0,), (1,), ()],
    "llama": [(0,), (1,), ()],
    "gemma3": [(0, 2), (1, 2), (0,), (2,), ()],
}


@pytest.mark.parametrize("arch,keep", [(a, k) for a in ARCHS for k in LAYER_SETS[a]])
def test_skipped_layers_equal_torch_without_them(arch, keep, tiny_models, gated_bundles):
    ids = np.random.default_rng(4).integers(0, 300, size=30)
    runner = runner_for(gated_bundles[arch])
    gates = gates_for(runner.entry.num_layers, keep)
    ours = runner.forward(ids, layer_gates=gates)
    ref = truncated_torch_logits(tiny_models[arch], keep, ids)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    # the kept layers' cached K/V are right: decoding on with the same gates continues the truncated model
    runner.commit()
    nxt = runner.forward([int(ids[-1])], layer_gates=gates)[0]
    ref_next = truncated_torch_logits(tiny_models[arch], keep, np.append(ids, ids[-1]))[-1]
    np.testing.assert_allclose(nxt, ref_next, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_early_exit_equals_truncated_torch(arch, tiny_models, gated_bundles):
    """Gates on for layers 0..E and off after: the torch model cut to its first E+1 layers."""
    ids = np.random.default_rng(6).integers(0, 300, size=25)
    runner = runner_for(gated_bundles[arch])
    n = runner.entry.num_layers
    for exit_layer in range(n - 1):
        runner.reset()
        gates = np.arange(n) <= exit_layer
        ours = runner.forward(ids, layer_gates=gates)
        ref = truncated_torch_logits(tiny_models[arch], range(exit_layer + 1), ids)
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4, err_msg=f"{arch} exit after {exit_layer}")


@pytest.mark.parametrize("arch", ARCHS)
def test_skipped_layer_stages_zero_kv_and_keeps_the_others(arch, gated_bundles):
    """A gated-off layer emits zero K/V; the K/V of the layers before it are those of the full model."""
    ids = np.random.default_rng(8).integers(0, 300, size=12)
    runner = runner_for(gated_bundles[arch])
    n = runner.entry.num_layers
    runner.forward(ids)
    runner.commit()
    full_keys = [runner.cache.keys[i][:, :, :len(ids)].copy() for i in range(n)]
    runner.reset()
    runner.forward(ids, layer_gates=np.arange(n) == 0)
    runner.commit()
    np.testing.assert_allclose(runner.cache.keys[0][:, :, :len(ids)], full_keys[0], atol=1e-6)
    for i in range(1, n):
        assert not np.any(runner.cache.keys[i][:, :, :len(ids)])
        assert not np.any(runner.cache.values[i][:, :, :len(ids)])


# ------------------------------------------------------------------------------------------------- draft head
@pytest.mark.parametrize("arch", ARCHS)
def test_draft_head_equals_full_logits_at_its_tokens(arch, gated_bundles):
    rng = np.random.default_rng(2)
    runner = runner_for(gated_bundles[arch])
    ids_kept = runner.draft_head_tokens
    assert ids_kept is not None and len(ids_kept) == DRAFT_ROWS
    assert np.all(np.diff(ids_kept) > 0) and ids_kept[-1] < runner.entry.vocab_size
    for special in (*runner.entry.eos_token_ids, runner.entry.bos_token_id):
        assert special in ids_kept
    runner.prefill(rng.integers(0, 300, size=9))
    parents = random_tree(rng, 8)
    tokens = rng.integers(0, 300, size=8)
    n = runner.entry.num_layers
    for gates in (None, np.arange(n) == 0):
        full = runner.forward(tokens, parents=parents, layer_gates=gates)
        draft = runner.forward(tokens, parents=parents, layer_gates=gates, draft_head=True)
        assert draft.shape == (len(tokens), DRAFT_ROWS)
        np.testing.assert_allclose(draft, full[:, ids_kept], atol=1e-5, rtol=0)
    assert runner.forward(tokens, parents=parents, logit_positions=[2, 5], draft_head=True).shape == (2, DRAFT_ROWS)


def test_draft_head_of_block_quantized_head(tiny_models, tmp_path):
    """A 4-bit head keeps its blocks in the draft head (rows of blocks): same logits at the chosen ids; all gates
    on equal the ungated int4 export."""
    folder = tiny_models["llama"]  # tied embeddings: the head is the (quantized) embedding table
    gated = export_bundle(str(folder), tmp_path / "g", quant="int4", parity=False, log=quiet, self_speculative=True,
                          draft_head_size=DRAFT_ROWS).bundle
    plain = export_bundle(str(folder), tmp_path / "p", quant="int4", parity=False, log=quiet).bundle
    ids = np.random.default_rng(3).integers(0, 300, size=20)
    g, p = runner_for(gated), runner_for(plain)
    full = g.forward(ids)
    np.testing.assert_allclose(full, p.forward(ids), atol=1e-5, rtol=0)
    g.reset()
    np.testing.assert_allclose(g.forward(ids, draft_head=True), full[:, g.draft_head_tokens], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- weights stored only once
def test_gates_do_not_duplicate_weights(tiny_models, tiny_bundles, tmp_path):
    bundle = export_bundle(str(tiny_models["qwen2"]), tmp_path / "g", name="tiny-qwen2", parity=False, log=quiet,
                           self_speculative=True, draft_head_size=0).bundle
    entry = load_manifest(bundle).target_model
    assert entry.self_speculation == {"layer_gates": True, "draft_head_tokens": None}
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["models"]["tiny-qwen2"]["self_speculation"] == {"layer_gates": True, "draft_head_tokens": None}
    plain = load_manifest(tiny_bundles["qwen2"]).target_model
    size = os.path.getsize(entry.graph_path.parent / "model.onnx.data")
    plain_size = os.path.getsize(plain.graph_path.parent / "model.onnx.data")
    assert abs(size - plain_size) <= 0.01 * plain_size
    model = onnx.load(str(entry.graph_path), load_external_data=False)
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == entry.num_layers
    for node in ifs:
        for attr in node.attribute:
            assert len(attr.g.initializer) == 0  # branches read the outer initializers
    runner = runner_for(bundle)
    assert runner.has_layer_gates and runner.draft_head_tokens is None
    with pytest.raises(ValueError, match="no draft head"):
        runner.forward([1, 2], draft_head=True)


@pytest.mark.parametrize("arch", ("qwen2", "gemma3"))
def test_standard_ops_gated_build_matches_fused(arch, tiny_models, gated_bundles, tmp_path):
    plain = export_bundle(str(tiny_models[arch]), tmp_path / "std", fused_ops=False, parity=False, log=quiet,
                          self_speculative=True, draft_head_size=DRAFT_ROWS).bundle
    ids = np.random.default_rng(9).integers(0, 300, size=24)
    a, b = runner_for(gated_bundles[arch]), runner_for(plain)
    n = a.entry.num_layers
    for gates in (None, np.arange(n) != 1):
        for draft in (False, True):
            a.reset()
            b.reset()
            np.testing.assert_allclose(a.forward(ids, layer_gates=gates, draft_head=draft),
                                       b.forward(ids, layer_gates=gates, draft_head=draft), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ errors
def test_gates_on_an_ungated_graph_raise(tiny_bundles):
    runner = runner_for(tiny_bundles["qwen2"])
    assert not runner.has_layer_gates and runner.draft_head_tokens is None
    with pytest.raises(ValueError, match="no layer gates"):
        runner.forward([1, 2, 3], layer_gates=np.ones(runner.entry.num_layers, dtype=bool))
    with pytest.raises(ValueError, match="no draft head"):
        runner.forward([1, 2, 3], draft_head=True)
    assert runner.length == 0
    runner.forward([1, 2, 3])  # the failed calls left the runner usable


def test_bad_gates_raise(gated_bundles):
    runner = runner_for(gated_bundles["llama"])
    with pytest.raises(ValueError, match="bool array of shape"):
        runner.forward([1, 2], layer_gates=np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="bool array of shape"):
        runner.forward([1, 2], layer_gates=[1, 0])


@pytest.fixture
def gated_copy(gated_bundles, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(gated_bundles["qwen2"], dest)
    return dest


def _edit(bundle, change):
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw["models"]["tiny-qwen2"])
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("value,match", [
    ("yes", "self_speculation: must be an object"),
    ({"layer_gates": "yes"}, "layer_gates must be true or false"),
    ({"layer_gates": True, "draft_head_tokens": "/etc/passwd"}, "absolute path"),
    ({"layer_gates": True, "draft_head_tokens": "../x.npy"}, "outside the bundle"),
    ({"layer_gates": True, "draft_head_tokens": "tiny-qwen2/none.npy"}, "draft head token file .* is missing"),
    ({"layer_gates": False, "draft_head_tokens": "tiny-qwen2/draft_head_tokens.npy"}, "needs layer_gates"),
])
def test_bad_self_speculation_field(gated_copy, value, match):
    _edit(gated_copy, lambda m: m.__setitem__("self_speculation", value))
    with pytest.raises(BundleError, match=match):
        load_manifest(gated_copy)


def test_corrupt_draft_head_tokens(gated_copy):
    np.save(gated_copy / "tiny-qwen2" / "draft_head_tokens.npy", np.array([5, 3, 10**6]), allow_pickle=False)
    with pytest.raises(BundleError, match="increasing ids inside the vocabulary"):
        runner_for(gated_copy)


def test_manifest_claims_gates_the_graph_lacks(tiny_bundles, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(tiny_bundles["qwen2"], dest)
    path = dest / "manifest.json"
    raw = json.loads(path.read_text())
    raw["models"]["tiny-qwen2"]["self_speculation"] = {"layer_gates": True, "draft_head_tokens": None}
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="no layer_gates input"):
        runner_for(dest)
