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

from .checks import short_repr
from .kvcache import KVCache, attention_bias, tree_ancestors, tree_depths
from .manifest import BundleError, ModelEntry


class ContextOverflow(ValueError):
    """The prompt (plus what is to be generated) does not fit in the context length."""


class ProviderError(ValueError):
    """An execution provider that is malformed, unknown, or missing from the installed onnxruntime build."""


CPU_PROVIDER = "CPUExecutionProvider"
MAX_PROVIDERS = 8  # providers in one list (ORT builds have at most a handful)
MAX_PROVIDER_OPTIONS = 64  # options per provider
MAX_OPTION_CHARS = 4096  # characters of one option key or value (a path, for QNN's backend_path)
PROVIDER_ALIASES = {"directml": "DmlExecutionProvider", "dml": "DmlExecutionProvider", "cpu": CPU_PROVIDER}
# where a provider that this onnxruntime build lacks can be had (the error message names it)
PROVIDER_PACKAGES = {
    "XnnpackExecutionProvider": "the Android and iOS packages (onnxruntime-android, onnxruntime-objc) or a build "
                                "with --use_xnnpack",
    "NnapiExecutionProvider": "the Android package (onnxruntime-android)",
    "CoreMLExecutionProvider": "the macOS wheels of onnxruntime and the iOS package",
    "QNNExecutionProvider": "onnxruntime-qnn (Snapdragon Windows/Android)",
    "DmlExecutionProvider": "onnxruntime-directml (Windows)",
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "TensorrtExecutionProvider": "onnxruntime-gpu",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
}


def default_threads() -> int:
    """Threads to use by default: the physical-ish core count (os.cpu_count, at most 8)."""
    return max(1, min(8, os.cpu_count() or 1))


def _provider_name(name, available: list[str]) -> str:
    """The ORT name of a provider written as its ORT name or, in any case, without "ExecutionProvider" ("xnnpack",
    "CoreML", "qnn") or as an alias ("directml", "dml", "cpu"). ProviderError when it is not a short text, names no
    provider ORT knows, or names one this onnxruntime build lacks (the message lists the available ones)."""
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise ProviderError(f"an execution provider name must be a non-empty text of at most 64 characters, got "
                            f"{short_repr(name)}")
    known = list(dict.fromkeys(available + ort.get_all_providers()))
    key = name.strip().lower()
    if key in PROVIDER_ALIASES:
        resolved = PROVIDER_ALIASES[key]
    else:
        matches = [p for p in known if key in (p.lower(), p.lower().removesuffix("executionprovider"))]
        if not matches:
            raise ProviderError(f"unknown execution provider {name!r}; onnxruntime knows "
                                f"{', '.join(sorted(p.removesuffix('ExecutionProvider') for p in known))}")
        resolved = matches[0]
    if resolved not in available:
        where = PROVIDER_PACKAGES.get(resolved)
        raise ProviderError(f"execution provider {resolved} is not in this onnxruntime build ({ort.__version__}); "
                            f"available: {', '.join(available)}" + (f". It comes with {where}" if where else ""))
    return resolved


def _provider_options(name: str, options) -> dict[str, str]:
    """`options` of provider `name` as ORT takes them: a dict of text keys and text values (numbers and bools are
    written as text; ORT reads "1"/"0" for flags), at most MAX_PROVIDER_OPTIONS of MAX_OPTION_CHARS each."""
    if not isinstance(options, dict):
        raise ProviderError(f"the options of {name} must be a dict, got {type(options).__name__}")
    if len(options) > MAX_PROVIDER_OPTIONS:
        raise ProviderError(f"{name} has {len(options)} options, over the limit of {MAX_PROVIDER_OPTIONS}")
    out = {}
    for key, value in options.items():
        if isinstance(value, bool):
            value = "1" if value else "0"
        if not isinstance(key, str) or not key or not isinstance(value, (str, int, float)):
            raise ProviderError(f"{name} option {short_repr(key)}: keys must be non-empty text and values text or "
                                f"numbers, got {short_repr(value)}")
        if len(key) > MAX_OPTION_CHARS or len(str(value)) > MAX_OPTION_CHARS:
            raise ProviderError(f"{name} option {short_repr(key)} is over {MAX_OPTION_CHARS} characters")
        out[key] = str(value)
    return out


def resolve_providers(providers=None) -> list[tuple[str, dict[str, str]]]:
    """The execution providers for a session, as (ORT name, options) pairs in order of preference, always ending
    with the CPU provider (the fallback for every node another provider does not take).

    `providers`: None (CPU only), one name, or a list of names and (name, options dict) pairs, as onnxruntime's
    `InferenceSession(providers=...)` takes them; names as `_provider_name` reads them ("xnnpack",
    "CoreMLExecutionProvider", ...). At most MAX_PROVIDERS of them, none twice. Raises ProviderError naming the
    problem; a provider missing from the installed onnxruntime build is named with the ones available
    (`onnxruntime.get_available_providers()`)."""
    if providers is None:
        return [(CPU_PROVIDER, {})]
    if isinstance(providers, str) or (isinstance(providers, tuple) and len(providers) == 2
                                      and isinstance(providers[1], dict)):
        providers = [providers]  # one name, or one (name, options) pair
    if not isinstance(providers, (list, tuple)):
        raise ProviderError(f"providers must be a name or a list of names and (name, options) pairs, got "
                            f"{type(providers).__name__}")
    if len(providers) > MAX_PROVIDERS:
        raise ProviderError(f"at most {MAX_PROVIDERS} execution providers, got {len(providers)}")
    available = ort.get_available_providers()
    resolved: list[tuple[str, dict[str, str]]] = []
    for item in providers:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ProviderError(f"a provider with options is a (name, options) pair, got {short_repr(item)}")
            name, options = item
        else:
            name, options = item, {}
        name = _provider_name(name, available)
        if any(name == seen for seen, _ in resolved):
            raise ProviderError(f"execution provider {name} is listed twice")
        resolved.append((name, _provider_options(name, options)))
    if not resolved or resolved[-1][0] != CPU_PROVIDER:
        if any(name == CPU_PROVIDER for name, _ in resolved):
            raise ProviderError(f"{CPU_PROVIDER} must come last: it runs every node the others do not take")
        resolved.append((CPU_PROVIDER, {}))
    return resolved


def provider_names(providers=None) -> list[str]:
    """The ORT names of `providers` (see `resolve_providers`), CPU last."""
    return [name for name, _ in resolve_providers(providers)]


def make_session(path: str, threads: int | None = None, providers=None) -> ort.InferenceSession:
    """An ORT session with `threads` intra-op threads and full graph optimisation, on `providers` (see
    `resolve_providers`; default: CPU only). Nodes that a provider does not take run on the CPU provider."""
    chosen = resolve_providers(providers)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=[name for name, _ in chosen],
                                    provider_options=[options for _, options in chosen])
    except Exception as exc:  # ORT raises several exception types for unreadable graphs
        raise BundleError(f"cannot load ONNX graph {path} on {', '.join(n for n, _ in chosen)}: {exc}") from None


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
                 session: ort.InferenceSession | None = None, providers=None):
        """`providers`: the execution providers (see `resolve_providers`; default CPU) of the session made here;
        a given `session` keeps its own."""
        self.entry = entry
        self.threads = threads or default_threads()
        self.session = session or make_session(str(entry.graph_path), self.threads, providers)
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
    def providers(self) -> list[str]:
        """The execution providers of the session, in order of preference (CPU last)."""
        return list(self.session.get_providers())

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
