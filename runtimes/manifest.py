"""The bundle manifest: the single contract between the exporter and the runtime (docs/contracts.md).

`load_manifest` validates everything the runtime relies on and raises `BundleError` with a specific message for
each way a bundle can be wrong. The exporter writes it with
`runtimes.files.write_json_atomic` and checks each entry with `model_entry`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checks import is_finite_number, is_int, short_repr
from .files import is_regular_file, read_json_capped

FORMAT = "edgespec-bundle"
SCHEMA_VERSION = 1
ARCHITECTURES = ("qwen2", "llama", "gemma3")
# A manifest is a few kB (chat templates included); anything much bigger is not one, and is refused unread.
MAX_MANIFEST_BYTES = 16 << 20
# Upper bounds of the shape fields: far above any real model, low enough that nothing sized from them (KV caches,
# input name lists, layer tables) can be asked for absurd amounts of memory by a corrupt or hostile manifest.
SHAPE_LIMITS = {"num_layers": 1024, "hidden_size": 1 << 18, "num_heads": 1 << 12, "num_kv_heads": 1 << 12,
                "head_dim": 1 << 12, "vocab_size": 1 << 24, "context_length": 1 << 24}


class BundleError(ValueError):
    """A bundle is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of a bundle, as the runtime sees it."""

    name: str
    role: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    graph_path: Path
    tokenizer_path: Path
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    quantization: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    # Self-speculative target graphs: {"layer_gates": bool, "draft_head_tokens": resolved Path or None}; empty for
    # ordinary graphs. (In manifest.json the path is relative to the bundle, or null.)
    self_speculation: dict = field(default_factory=dict)
    # The graph's external data file named by the manifest (`graph.data`), resolved inside the bundle; None when
    # the manifest names none. ONNX Runtime finds external data through the graph itself; this is informational.
    graph_data_path: Path | None = None

    @property
    def has_sliding_layers(self) -> bool:
        """True when some layers attend through a sliding window (Gemma 3)."""
        return "sliding" in self.layer_types


@dataclass(frozen=True)
class Manifest:
    """A validated bundle manifest."""

    root: Path
    target: str
    models: dict[str, ModelEntry]
    raw: dict

    @property
    def target_model(self) -> ModelEntry:
        """The target model entry."""
        return self.models[self.target]

    def drafters(self) -> list[ModelEntry]:
        """Drafter entries in manifest order."""
        return [m for m in self.models.values() if m.role == "drafter"]


def _inside(root: Path, relative: str, what: str) -> Path:
    """Resolve `relative` under `root`, refusing absolute paths and anything escaping the bundle: `..` components
    and symlinks (the path is resolved, links followed, before the check), NUL bytes, symlink loops."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"{what}: expected a relative path string, got {short_repr(relative)}")
    if "\0" in relative:
        raise BundleError(f"{what}: path {short_repr(relative)} contains a NUL byte")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise BundleError(f"{what}: absolute path {short_repr(relative)} is not allowed in a bundle")
    try:
        base = root.resolve()
        path = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, name too long, ...
        raise BundleError(f"{what}: path {short_repr(relative)} cannot be resolved ({exc})") from None
    if base not in path.parents:
        raise BundleError(f"{what}: path {short_repr(relative)} points outside the bundle")
    return path


def _require(d: dict, key: str, kind, where: str):
    if key not in d:
        raise BundleError(f"{where}: missing field {key!r}")
    value = d[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BundleError(f"{where}: field {key!r} must be an integer, got {short_repr(value)}")
    if kind is int and value <= 0:
        raise BundleError(f"{where}: field {key!r} must be positive, got {value!r}")
    if kind is int and key in SHAPE_LIMITS and value > SHAPE_LIMITS[key]:
        raise BundleError(f"{where}: field {key!r} is {value}, above the limit of {SHAPE_LIMITS[key]}")
    if kind is str and not isinstance(value, str):
        raise BundleError(f"{where}: field {key!r} must be a string, got {short_repr(value)}")
    if kind is dict and not isinstance(value, dict):
        raise BundleError(f"{where}: field {key!r} must be an object")
    return value


def _optional(d: dict, key: str, kind, where: str, default=None):
    """d[key] when it is of `kind` (a type or tuple of types), `default` when absent or null; BundleError else."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BundleError(f"{where}: field {key!r} must be {names} or null, got {short_repr(value)}")
    return value


def model_entry(root: Path, name: str, d: dict, check_files: bool, manifest: str = "manifest") -> ModelEntry:
    """The validated ModelEntry of model `name` (its manifest object `d`) in the bundle at `root`; BundleError
    naming what is wrong. `check_files`: also check its files exist inside the bundle."""
    where = f"{manifest} model {short_repr(name)}"
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: a model name must be a non-empty string")
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object")
    arch = _require(d, "architecture", str, where)
    if arch not in ARCHITECTURES:
        raise BundleError(f"{where}: unsupported architecture {short_repr(arch)} (supported: {', '.join(ARCHITECTURES)})")
    role = _require(d, "role", str, where)
    if role not in ("target", "drafter"):
        raise BundleError(f"{where}: role must be 'target' or 'drafter', got {short_repr(role)}")
    ints = {k: _require(d, k, int, where) for k in (
        "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "context_length")}
    if ints["num_heads"] % ints["num_kv_heads"]:
        raise BundleError(f"{where}: num_heads is not a multiple of num_kv_heads")
    graph = _require(d, "graph", dict, where)
    graph_path = _inside(root, _require(graph, "file", str, where + " graph"), where + " graph.file")
    data = graph.get("data")
    data_path = None if data is None else _inside(root, data, where + " graph.data")
    tokenizer_path = _inside(root, _require(d, "tokenizer", str, where), where + " tokenizer")
    if check_files:
        for path, what in ((graph_path, "graph"), (tokenizer_path, "tokenizer")):
            if not is_regular_file(path):
                raise BundleError(f"{where}: {what} file {path} is missing")
    layer_types = d.get("layer_types")
    if layer_types is None:
        layer_types = ("full",) * ints["num_layers"]
    if not isinstance(layer_types, list | tuple) or len(layer_types) != ints["num_layers"] or any(
            t not in ("full", "sliding") for t in layer_types):
        raise BundleError(f"{where}: layer_types must list 'full' or 'sliding' once per layer")
    layer_types = tuple(layer_types)
    window = d.get("sliding_window")
    if window is not None and (not is_int(window) or not 0 < window <= SHAPE_LIMITS["context_length"]):
        raise BundleError(f"{where}: sliding_window must be a positive integer or null, got {short_repr(window)}")
    if "sliding" in layer_types and window is None:
        raise BundleError(f"{where}: sliding layers need a positive sliding_window")
    special = _optional(d, "special_tokens", dict, where, {})
    eos = special.get("eos")
    eos = [] if eos is None else [eos] if not isinstance(eos, list) else eos
    for tok in [*eos, special.get("bos"), special.get("pad")]:
        if tok is not None and (not is_int(tok) or not 0 <= tok < ints["vocab_size"]):
            raise BundleError(f"{where}: special token id {short_repr(tok)} is outside the vocabulary")
    add_bos = special.get("add_bos", False)
    if not isinstance(add_bos, bool):
        raise BundleError(f"{where}: special_tokens.add_bos must be true or false, got {short_repr(add_bos)}")
    chat_template = _optional(d, "chat_template", str, where)
    dicts = {key: _optional(d, key, dict, where, {}) for key in ("quantization", "accuracy", "source")}
    check_quantization(dicts["quantization"], where)
    check_accuracy(dicts["accuracy"], where)
    self_spec = _self_speculation(root, d.get("self_speculation"), where, check_files)
    return ModelEntry(
        name=name,
        role=role,
        architecture=arch,
        graph_path=graph_path,
        graph_data_path=data_path,
        tokenizer_path=tokenizer_path,
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=special.get("bos"),
        eos_token_ids=tuple(eos),
        pad_token_id=special.get("pad"),
        add_bos=add_bos,
        chat_template=chat_template,
        quantization=dicts["quantization"],
        accuracy=dicts["accuracy"],
        source=dicts["source"],
        self_speculation=self_spec,
        **ints,
    )


# `quantization` fields the runtime or the exporter reads: name -> (check, what it must be). MatMulNBits knows the
# accuracy levels 0 (fp32 math) to 4 (int8 activations).
ACCURACY_LEVELS = range(0, 5)
_QUANTIZATION_FIELDS = {
    "mode": (lambda v: isinstance(v, str), "a string"),
    "accuracy_level": (lambda v: is_int(v) and v in ACCURACY_LEVELS, "an integer from 0 to 4"),
    "eight_bit": (lambda v: isinstance(v, str), "a string"),
    "fused_ops": (lambda v: isinstance(v, bool), "true or false"),
    "t_invariant": (lambda v: isinstance(v, bool), "true or false"),
    "tensor_types": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_int(n) and n >= 0
                                                           for k, n in v.items()),
                     "an object of tensor type -> count"),
}
# `accuracy` (the export's parity check): these three are required together, each a finite number in its range.
_ACCURACY_REQUIRED = {
    "top1_agreement": (lambda v: is_finite_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "perplexity": (lambda v: is_finite_number(v) and v > 0, "a positive number"),
    "reference_perplexity": (lambda v: is_finite_number(v) and v > 0, "a positive number"),
}
_ACCURACY_OPTIONAL = {
    "text_tokens": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    "max_nll_difference": (lambda v: is_finite_number(v) and v >= 0, "a non-negative number"),
}


def check_quantization(quantization: dict, where: str) -> None:
    """Raise BundleError unless each known field of a model's `quantization` object (absent or null is fine) has
    the type and range the runtime and the exporter expect (`accuracy_level` an integer 0..4, ...)."""
    for key, (ok, what) in _QUANTIZATION_FIELDS.items():
        value = quantization.get(key)
        if value is not None and not ok(value):
            raise BundleError(f"{where}: quantization.{key} must be {what}, got {short_repr(value)}")


def check_accuracy(accuracy: dict, where: str) -> None:
    """Raise BundleError unless a model's `accuracy` object is empty (no parity check was run) or holds
    top1_agreement, perplexity and reference_perplexity as finite numbers in range (other known fields typed)."""
    if not accuracy:
        return
    for key, (ok, what) in _ACCURACY_REQUIRED.items():
        if key not in accuracy:
            raise BundleError(f"{where}: accuracy.{key} is missing (an accuracy object holds "
                              f"{', '.join(_ACCURACY_REQUIRED)})")
        if not ok(accuracy[key]):
            raise BundleError(f"{where}: accuracy.{key} must be {what}, got {short_repr(accuracy[key])}")
    for key, (ok, what) in _ACCURACY_OPTIONAL.items():
        if accuracy.get(key) is not None and not ok(accuracy[key]):
            raise BundleError(f"{where}: accuracy.{key} must be {what}, got {short_repr(accuracy[key])}")


def _self_speculation(root: Path, value, where: str, check_files: bool) -> dict:
    """The optional `self_speculation` object: {"layer_gates": true, "draft_head_tokens": "<path>" or null}."""
    if value is None:
        return {}
    where = where + " self_speculation"
    if not isinstance(value, dict):
        raise BundleError(f"{where}: must be an object")
    gates = value.get("layer_gates", False)
    if not isinstance(gates, bool):
        raise BundleError(f"{where}: layer_gates must be true or false, got {short_repr(gates)}")
    tokens = value.get("draft_head_tokens")
    path = None
    if tokens is not None:
        if not gates:
            raise BundleError(f"{where}: a draft head (draft_head_tokens) needs layer_gates")
        path = _inside(root, tokens, where + ".draft_head_tokens")
        if check_files and not is_regular_file(path):
            raise BundleError(f"{where}: draft head token file {path} is missing")
    return {"layer_gates": gates, "draft_head_tokens": path} if gates else {}


def load_manifest(bundle_dir: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and validate `bundle_dir/manifest.json`; raises BundleError naming what is wrong."""
    root = Path(bundle_dir)
    if not root.exists():
        raise BundleError(f"bundle folder {root} does not exist")
    if not root.is_dir():
        raise BundleError(f"{root} is not a folder (a bundle is a folder with manifest.json)")
    path = root / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{root} has no manifest.json: not an edgespec bundle (export one with `edgespec export`)")
    raw = read_json_capped(path, MAX_MANIFEST_BYTES, BundleError, "a bundle manifest")
    return manifest_from_dict(root, raw, check_files, where=str(path))


def manifest_from_dict(root: str | os.PathLike, raw, check_files: bool = True, where: str = "manifest") -> Manifest:
    """Validate a manifest dictionary for the bundle folder `root` (what `load_manifest` does after reading the
    file); lets a writer check a manifest before it replaces the one on disk. `where` names it in errors."""
    root = Path(root)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{where} is not an edgespec bundle manifest (format field must be {FORMAT!r})")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})")
    models = raw.get("models")
    if not isinstance(models, dict) or not models:
        raise BundleError(f"{where}: 'models' must be a non-empty object")
    entries = {name: model_entry(root, name, d, check_files, where) for name, d in models.items()}
    target = raw.get("target")
    if not isinstance(target, str) or target not in entries:
        raise BundleError(f"{where}: target {short_repr(target)} is not one of the models ({', '.join(entries)})")
    if entries[target].role != "target":
        raise BundleError(f"{where}: model {target!r} is named as target but has role {entries[target].role!r}")
    return Manifest(root=root, target=target, models=entries, raw=raw)


