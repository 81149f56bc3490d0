"""The bundle manifest: the single contract between the exporter and the runtime (docs/contracts.md).

`load_manifest` validates everything the runtime relies on and raises `BundleError` with a specific message for
each way a bundle can be wrong. `write_manifest` is what the exporter uses (atomic write).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "edgespec-bundle"
SCHEMA_VERSION = 1
ARCHITECTURES = ("qwen2", "llama", "gemma3")


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
    """Resolve `relative` under `root`, refusing absolute paths and anything escaping the bundle."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"{what}: expected a relative path string, got {relative!r}")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise BundleError(f"{what}: absolute path {relative!r} is not allowed in a bundle")
    path = (root / relative).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{what}: path {relative!r} points outside the bundle")
    return path


def _require(d: dict, key: str, kind, where: str):
    if key not in d:
        raise BundleError(f"{where}: missing field {key!r}")
    value = d[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BundleError(f"{where}: field {key!r} must be an integer, got {value!r}")
    if kind is int and value <= 0:
        raise BundleError(f"{where}: field {key!r} must be positive, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise BundleError(f"{where}: field {key!r} must be a string, got {value!r}")
    if kind is dict and not isinstance(value, dict):
        raise BundleError(f"{where}: field {key!r} must be an object")
    return value


def _model_entry(root: Path, name: str, d: dict, check_files: bool) -> ModelEntry:
    where = f"manifest model {name!r}"
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object")
    arch = _require(d, "architecture", str, where)
    if arch not in ARCHITECTURES:
        raise BundleError(f"{where}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    role = _require(d, "role", str, where)
    if role not in ("target", "drafter"):
        raise BundleError(f"{where}: role must be 'target' or 'drafter', got {role!r}")
    ints = {k: _require(d, k, int, where) for k in (
        "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "context_length")}
    if ints["num_heads"] % ints["num_kv_heads"]:
        raise BundleError(f"{where}: num_heads is not a multiple of num_kv_heads")
    graph = _require(d, "graph", dict, where)
    graph_path = _inside(root, _require(graph, "file", str, where + " graph"), where + " graph.file")
    tokenizer_path = _inside(root, _require(d, "tokenizer", str, where), where + " tokenizer")
    if check_files:
        for path, what in ((graph_path, "graph"), (tokenizer_path, "tokenizer")):
            if not path.is_file():
                raise BundleError(f"{where}: {what} file {path} is missing")
    layer_types = tuple(d.get("layer_types") or ("full",) * ints["num_layers"])
    if len(layer_types) != ints["num_layers"] or any(t not in ("full", "sliding") for t in layer_types):
        raise BundleError(f"{where}: layer_types must list 'full' or 'sliding' once per layer")
    window = d.get("sliding_window")
    if "sliding" in layer_types and (not isinstance(window, int) or window <= 0):
        raise BundleError(f"{where}: sliding layers need a positive sliding_window")
    special = d.get("special_tokens") or {}
    eos = special.get("eos", [])
    eos = [eos] if isinstance(eos, int) else list(eos)
    for tok in [*eos, special.get("bos"), special.get("pad")]:
        if tok is not None and (not isinstance(tok, int) or not 0 <= tok < ints["vocab_size"]):
            raise BundleError(f"{where}: special token id {tok!r} is outside the vocabulary")
    self_spec = _self_speculation(root, d.get("self_speculation"), where, check_files)
    return ModelEntry(
        name=name,
        role=role,
        architecture=arch,
        graph_path=graph_path,
        tokenizer_path=tokenizer_path,
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=special.get("bos"),
        eos_token_ids=tuple(eos),
        pad_token_id=special.get("pad"),
        add_bos=bool(special.get("add_bos", False)),
        chat_template=d.get("chat_template"),
        quantization=d.get("quantization") or {},
        accuracy=d.get("accuracy") or {},
        source=d.get("source") or {},
        self_speculation=self_spec,
        **ints,
    )


def _self_speculation(root: Path, value, where: str, check_files: bool) -> dict:
    """The optional `self_speculation` object: {"layer_gates": true, "draft_head_tokens": "<path>" or null}."""
    if value is None:
        return {}
    where = where + " self_speculation"
    if not isinstance(value, dict):
        raise BundleError(f"{where}: must be an object")
    gates = value.get("layer_gates", False)
    if not isinstance(gates, bool):
        raise BundleError(f"{where}: layer_gates must be true or false, got {gates!r}")
    tokens = value.get("draft_head_tokens")
    path = None
    if tokens is not None:
        if not gates:
            raise BundleError(f"{where}: a draft head (draft_head_tokens) needs layer_gates")
        path = _inside(root, tokens, where + ".draft_head_tokens")
        if check_files and not path.is_file():
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
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
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
    entries = {name: _model_entry(root, name, d, check_files) for name, d in models.items()}
    target = raw.get("target")
    if target not in entries:
        raise BundleError(f"{where}: target {target!r} is not one of the models ({', '.join(entries)})")
    if entries[target].role != "target":
        raise BundleError(f"{where}: model {target!r} is named as target but has role {entries[target].role!r}")
    return Manifest(root=root, target=target, models=entries, raw=raw)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON to `path` through a temporary file and an atomic rename."""
    write_bytes_atomic(path, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by `data`: a temporary file in the same folder, fsynced, then os.replace (the old file stays
    intact if anything fails, and no temporary file is left behind)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
