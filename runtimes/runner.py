"""ONNX Runtime runner for one bundle model: owns the session and the KV cache.

One call to `forward` scores T new tokens that form a tree (a chain by default) on top of the committed cache and
stages their K/V; `commit(keep)` then keeps the accepted ones. Prefill runs in chunks through the same path.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort

from .kvcache import KVCache, attention_bias, tree_ancestors, tree_depths
from .manifest import BundleError, ModelEntry


class ContextOverflow(ValueError):
    """The prompt (plus what is to be generated) does not fit in the context length."""


def default_threads() -> int:
    """Threads to use by default: the physical-ish core count (os.cpu_count, at most 8)."""
    return max(1, min(8, os.cpu_count() or 1))


def make_session(path: str, threads: int | None = None) -> ort.InferenceSession:
    """An ORT CPU session with `threads` intra-op threads and full graph optimisation."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several exception types for unreadable graphs
        raise BundleError(f"cannot load ONNX graph {path}: {exc}") from None


_PAST_INPUT = re.compile(r"past_(?:key|value)_(\d+)")


def graph_kv_layers(input_names) -> int:
    """The layers a graph declares past key/value inputs for: one more than the largest N of its `past_key_N` /
    `past_value_N` inputs (0 without any)."""
    layers = [int(m.group(1)) for name in input_names if (m := _PAST_INPUT.fullmatch(name))]
    return max(layers) + 1 if layers else 0


@dataclass
class ForwardTiming:
    """Accumulated wall time spent inside ORT and preparing inputs."""

    run_seconds: float = 0.0
    calls: int = 0
    tokens: int = 0


class ModelRunner:
    """Runs one bundle model: tree-masked forwards over a speculation-ready KV cache."""

    def __init__(self, entry: ModelEntry, threads: int | None = None, max_context: int | None = None,
                 session: ort.InferenceSession | None = None):
        self.entry = entry
        self.threads = threads or default_threads()
        self.session = session or make_session(str(entry.graph_path), self.threads)
        self.max_context = min(max_context or entry.context_length, entry.context_length)
        self._check_graph()
        self.cache = KVCache(entry.num_layers, entry.num_kv_heads, entry.head_dim, self.max_context)
        self._slot_positions = np.arange(self.max_context, dtype=np.int64)  # position of the token in each cache slot
        self._windowed = entry.has_sliding_layers
        self._output_names = ["logits"] + [
            f"new_{kind}_{i}" for i in range(entry.num_layers) for kind in ("key", "value")]
        self.timing = ForwardTiming()
        self._all_layers = np.ones(entry.num_layers, dtype=bool)
        self._no_draft_head = np.array(False)
        self._draft_head = np.array(True)

    def _check_graph(self) -> None:
        names = {i.name: i for i in self.session.get_inputs()}
        e = self.entry
        expected = ["input_ids", "position_ids", "attention_bias", "logit_positions"]
        expected += [f"past_{k}_{i}" for i in range(e.num_layers) for k in ("key", "value")]
        missing = [n for n in expected if n not in names]
        if missing:
            raise BundleError(f"graph {e.graph_path} lacks inputs {missing[:4]}: it does not match the manifest")
        graph_layers = graph_kv_layers(names)
        if graph_layers != e.num_layers:
            raise BundleError(f"graph {e.graph_path} has past key/value inputs for {graph_layers} layers but the "
                              f"manifest's num_layers is {e.num_layers}: the graph does not match the manifest")
        optional = {"layer_gates", "draft_head"} | ({"attention_bias_local"} if e.has_sliding_layers else set())
        unknown = sorted(set(names) - set(expected) - optional)
        if unknown:
            raise BundleError(f"graph {e.graph_path} has inputs the runtime does not feed: {unknown[:4]}")
        shape = names["past_key_0"].shape
        if shape[1] != e.num_kv_heads or shape[3] != e.head_dim:
            raise BundleError(f"graph {e.graph_path} KV shape {shape} does not match the manifest "
                              f"(kv heads {e.num_kv_heads}, head dim {e.head_dim})")
        vocab = self.session.get_outputs()[0].shape[-1]
        if isinstance(vocab, int) and vocab != e.vocab_size:
            raise BundleError(f"graph {e.graph_path} has vocabulary {vocab}, the manifest says {e.vocab_size}")
        # self-speculation: per-layer gates (any subset of layers runs) and an optional reduced draft LM head
        self.has_layer_gates = "layer_gates" in names
        self.draft_head_tokens = None
        spec = e.self_speculation or {}
        if spec.get("layer_gates") and not self.has_layer_gates:
            raise BundleError(f"graph {e.graph_path} has no layer_gates input, the manifest says it has")
        if self.has_layer_gates and list(names["layer_gates"].shape) != [e.num_layers]:
            raise BundleError(f"graph {e.graph_path} layer_gates shape {names['layer_gates'].shape} does not match "
                              f"{e.num_layers} layers")
        path = spec.get("draft_head_tokens")
        if path is not None:
            if "draft_head" not in names:
                raise BundleError(f"graph {e.graph_path} has no draft_head input, the manifest names {path}")
            try:
                ids = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise BundleError(f"cannot read the draft head token ids {path}: {exc}") from None
            if not isinstance(ids, np.ndarray):  # an .npz archive behind the .npy name
                if hasattr(ids, "close"):
                    ids.close()
                raise BundleError(f"{path}: draft head token ids must be one .npy array, not an .npz archive")
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 \
                    or ids.max() >= e.vocab_size or np.any(np.diff(ids) <= 0):
                raise BundleError(f"{path}: draft head token ids must be increasing ids inside the vocabulary")
            self.draft_head_tokens = ids.astype(np.int64)
        self._draft_head_input = "draft_head" in names

    @property
    def length(self) -> int:
        """Committed tokens in the cache."""
        return self.cache.length

    def forward(self, tokens, parents=None, logit_positions=None, past_visible=None, positions=None, *,
                layer_gates=None, draft_head: bool = False) -> np.ndarray:
        """Score `tokens` (a tree given by `parents`, -1 = child of the committed context; None = a chain).

        Returns logits [K, vocab] for `logit_positions` (default: every node). The new K/V are staged; call
        `commit(keep)` to keep a subset. Drafters that grow a tree over several forwards cache the nodes of earlier
        forwards and pass `past_visible` ([T, k] bool: which of the last k cached nodes each new token descends
        from) and `positions` (each new token's position); see `attention_bias`.

        Self-speculative graphs (`has_layer_gates`): `layer_gates` (bool [num_layers], None = all) runs only the
        chosen layers; a skipped layer leaves the hidden state as it is and stages zero K/V for the new tokens.
        `draft_head=True` computes logits only for `draft_head_tokens` ([K, R]; column j is token
        `draft_head_tokens[j]`).
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        t = len(tokens)
        if t == 0:
            raise ValueError("forward() needs at least one token")
        gates = self._gates(layer_gates)
        if draft_head and self.draft_head_tokens is None:
            raise ValueError(f"draft_head=True: graph {self.entry.graph_path} has no draft head (export with "
                             f"self_speculative=True and a draft head smaller than the vocabulary)")
        if parents is None:
            parents = np.arange(-1, t - 1, dtype=np.int64)
        visible = tree_ancestors(parents)
        past = self.cache.length
        try:
            self.cache.reserve(t)
        except ValueError as exc:
            raise ContextOverflow(str(exc)) from None
        past_positions = None
        if positions is None:
            positions = past + tree_depths(parents)
        else:
            positions = np.asarray(positions, dtype=np.int64).reshape(-1)
            if past_visible is not None:
                past_positions = self._slot_positions[past - past_visible.shape[1]:past]
        self._slot_positions[past:past + t] = positions
        if logit_positions is None:
            logit_positions = np.arange(t, dtype=np.int64)
        feeds = {
            "input_ids": tokens[None, :],
            "position_ids": positions[None, :],
            "attention_bias": attention_bias(past, past, visible, positions,
                                             past_visible=past_visible, past_positions=past_positions),
            "logit_positions": np.asarray(logit_positions, dtype=np.int64).reshape(-1),
        }
        if self._windowed:
            feeds["attention_bias_local"] = attention_bias(
                past, past, visible, positions, window=self.entry.sliding_window,
                past_visible=past_visible, past_positions=past_positions)
        if self.has_layer_gates:
            feeds["layer_gates"] = gates
        if self._draft_head_input:
            feeds["draft_head"] = self._draft_head if draft_head else self._no_draft_head
        # the past sliced to its committed length: a token's K/V sit at its slot index in every forward (T-invariance)
        for i in range(self.entry.num_layers):
            feeds[f"past_key_{i}"] = self.cache.keys[i][:, :, :past]
            feeds[f"past_value_{i}"] = self.cache.values[i][:, :, :past]
        start = time.perf_counter()
        outputs = self.session.run(self._output_names, feeds)
        self.timing.run_seconds += time.perf_counter() - start
        self.timing.calls += 1
        self.timing.tokens += t
        self.cache.stage(outputs[1::2], outputs[2::2])
        return outputs[0][0]

    def _gates(self, layer_gates) -> np.ndarray | None:
        """The `layer_gates` feed: all layers when None; checked against the graph."""
        if layer_gates is None:
            return self._all_layers if self.has_layer_gates else None
        if not self.has_layer_gates:
            raise ValueError(f"layer_gates given, but graph {self.entry.graph_path} has no layer gates (export it "
                             f"with self_speculative=True)")
        gates = np.asarray(layer_gates)
        if gates.dtype != bool or gates.shape != (self.entry.num_layers,):
            raise ValueError(f"layer_gates must be a bool array of shape ({self.entry.num_layers},), got "
                             f"{gates.dtype} {gates.shape}")
        return gates

    def commit(self, keep=None) -> None:
        """Keep staged tokens `keep` (ascending indices into the last forward; None = all)."""
        self.cache.commit(keep)

    def select(self, start: int, keep) -> None:
        """Keep only cached tokens `start + keep` after the first `start` (a drafter keeping the accepted path)."""
        self.cache.select(start, keep)
        n = len(keep) if keep is not None else 0
        self._slot_positions[start:start + n] = np.arange(start, start + n)

    def rewind(self, length: int) -> None:
        """Drop cached tokens after `length`."""
        self.cache.rewind(length)

    def reset(self) -> None:
        """Empty the cache."""
        self.cache.rewind(0)

    def prefill(self, tokens, chunk_size: int = 256, stop: "Callable[[], bool] | None" = None) -> np.ndarray | None:
        """Feed `tokens` in chunks and commit them; returns the logits [vocab] after the last token. `stop` is asked
        before each chunk: when it returns True the chunks fed so far stay committed and None is returned."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise ValueError("prefill() needs at least one token")
        if self.cache.length + len(tokens) > self.max_context:
            raise ContextOverflow(
                f"prompt of {len(tokens)} tokens (+{self.cache.length} cached) exceeds the context length "
                f"{self.max_context}")
        logits = None
        for start in range(0, len(tokens), chunk_size):
            if stop is not None and stop():
                return None
            chunk = tokens[start:start + chunk_size]
            last = start + chunk_size >= len(tokens)
            logits = self.forward(chunk, logit_positions=[len(chunk) - 1] if last else [0])
            self.commit()
        return logits[-1]
