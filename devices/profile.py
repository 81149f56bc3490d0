"""Device profiles: measured forward times of one bundle's models on one machine at one thread count.

A profile answers "how long does the target take to score n tokens at context c here?" (`verify_seconds`) and
"how long does drafter X take?" (`drafter_seconds`), from a table measured once (`measure_profile`, `edgespec
profile`) and stored as JSON (schema in docs/device-profiles.md). Profiles live in the user folder
($EDGESPEC_PROFILES, else $EDGESPEC_CACHE/profiles, else ~/.cache/edgespec/profiles) and, shipped with the package,
as JSON files beside this module. `resolve_device` turns a `--device auto|NAME|path` option into a profile.

Files are read with `json` only (never eval or pickle) and validated field by field: anything wrong raises
`ProfileError` naming the file and the field.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtimes.checks import is_finite_number, is_int, short_repr as _r
from ..runtimes.files import read_json_capped, write_json_atomic
from ..runtimes.manifest import Manifest, ModelEntry
from .memory import available_memory_mb, model_file_bytes, process_rss_mb, total_memory_mb

FORMAT = "edgespec-device-profile"
SCHEMA_VERSION = 1
DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
DEFAULT_CONTEXTS = (128, 512, 1536)
DEFAULT_DRAFTER_SIZES = (1, 2, 4, 8, 16)
DEFAULT_REPEATS = 3
QUICK_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
QUICK_CONTEXT = 512
QUICK_DRAFTER_SIZES = (1, 4)
QUICK_REPEATS = 2
CONTEXT_MARGIN = 64  # measured contexts stay this far (or the largest size) below the model's context length
SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
MAX_PROFILE_BYTES = 16 << 20  # a profile is a few kB; a bigger file is refused unread
MAX_TOKENS = 1 << 24  # largest context or size a profile may list (the manifest's context_length limit)
MAX_MS = 1e9  # a forward of more than 11 days is no measurement (and would overflow the interpolation)
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)  # what a profile without a "providers" field measured
MAX_PROVIDERS = 8  # execution providers a profile may list
PROVIDER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
SAMPLE_TEXT = (
    "Speculative decoding lets a small draft propose several tokens that the large model checks in one pass. "
    "On a phone or a laptop the cost of that pass grows with the number of tokens, so the planner needs a table "
    "of measured times.\n\n"
    "def fibonacci(n: int) -> list[int]:\n"
    "    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
    "    out, a, b = [], 0, 1\n"
    "    for _ in range(n):\n"
    "        out.append(a)\n"
    "        a, b = b, a + b\n"
    "    return out\n\n"
    "The capital of France is Paris; the capital of Germany is Berlin. Water boils at 100 degrees Celsius.\n"
)

Progress = Callable[[int, int, str], None]


class ProfileError(ValueError):
    """A device profile file (or dictionary) is unreadable or has a wrong field; the message names both."""


class ProfileWarning(UserWarning):
    """A profile file was skipped, or a profile does not describe the model it is used for."""


# ------------------------------------------------------------------------------------------------ the machine
def _cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo "model name" (or "Hardware"/"Processor" on ARM boards and
    Android), sysctl on macOS, else platform.processor(), else platform.machine()."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if sep and value and key not in fields:
                    fields[key] = value
    except OSError:
        pass
    for key in ("model name", "hardware", "processor", "cpu model"):
        value = fields.get(key, "")
        if value and not value.isdigit():  # ARM's "processor: 0" is a core index
            return value
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=2)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown-cpu"


_DROPPED_WORDS = {"cpu", "processor", "platinum", "gold", "silver", "bronze", "with", "radeon", "graphics"}


def device_slug(cpu_model: str, cores: int | None, ram_mb: float | None) -> str:
    """A short stable id such as "intel-xeon-8480-2c-24gb": the CPU model without trade marks, clock and filler
    words, the core count and the RAM rounded to GB; lower case, [a-z0-9-] only."""
    text = cpu_model.lower().split("@")[0]
    text = re.sub(r"\((r|tm|c)\)|[®™]", " ", text)
    text = re.sub(r"\b\d+-core\b|\b\d+(\.\d+)?\s*ghz\b", " ", text)
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w and w not in _DROPPED_WORDS]
    name = "-".join(words)[:40].strip("-") or "cpu"
    parts = [name, f"{cores}c" if cores else "nc"]
    if ram_mb:
        parts.append(f"{max(1, round(ram_mb / 1024))}gb")
    return re.sub(r"-+", "-", "-".join(parts))


@functools.lru_cache(maxsize=1)
def describe_device() -> dict:
    """This machine: platform.machine, OS, CPU model, os.cpu_count(), total RAM (MB), onnxruntime version and
    the `device_id` slug (see `device_slug`)."""
    import onnxruntime

    cpu = _cpu_model()
    cores = os.cpu_count()
    ram = total_memory_mb()
    return {"device_id": device_slug(cpu, cores, ram), "machine": platform.machine(),
            "os": f"{platform.system()} {platform.release()}".strip(), "cpu_model": cpu, "cpu_count": cores,
            "ram_mb": round(ram) if ram else None, "onnxruntime": onnxruntime.__version__}


def current_device_id() -> str:
    """The `device_id` of this machine."""
    return describe_device()["device_id"]


# ------------------------------------------------------------------------------------------------ the bundle
def bundle_key(entry: ModelEntry) -> str:
    """A 16-hex key of a model: hash of name, quantization, graph + weight bytes, layer count and hidden size.
    A profile describes a bundle's model only when the keys are equal."""
    material = json.dumps([entry.name, entry.quantization, model_file_bytes(entry), entry.num_layers,
                           entry.hidden_size], sort_keys=True, default=str)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]


def describe_bundle(entry: ModelEntry) -> dict:
    """The profile's `bundle` field for a model entry."""
    return {"model": entry.name, "quantization": dict(entry.quantization), "graph_bytes": model_file_bytes(entry),
            "num_layers": entry.num_layers, "hidden_size": entry.hidden_size, "key": bundle_key(entry)}


# ------------------------------------------------------------------------------------------------ interpolation
def _interpolate_sizes(sizes: list[int], values: list[float], tokens: float) -> float:
    """Piecewise-linear in the size; below the first size: the first value; beyond the last: the line through the
    last two points (never decreasing)."""
    if tokens <= sizes[0] or len(sizes) == 1:
        return values[0] if tokens <= sizes[0] else values[-1]
    if tokens >= sizes[-1]:
        slope = max(0.0, (values[-1] - values[-2]) / (sizes[-1] - sizes[-2]))
        return values[-1] + slope * (tokens - sizes[-1])
    return float(np.interp(tokens, sizes, values))


def nondecreasing(values: list[float]) -> list[float]:
    """The least-squares non-decreasing fit of `values` (pool adjacent violators). Scoring more tokens never costs
    less; a measured dip is noise, and a plan built on it would chase the noise."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks[-1]
            blocks[-2:] = [[(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]]
    return [mean for mean, count in blocks for _ in range(int(count))]


def _check_tokens(tokens) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    return int(tokens)


# ------------------------------------------------------------------------------------------------ the profile
@dataclass
class DeviceProfile:
    """Measured costs of one bundle's models on one machine (schema: docs/device-profiles.md).

    `verify_ms`: {"contexts": [...], "sizes": [...], "ms": [[ms per size] per context]} (target forward of n chain
    tokens on top of a context); `drafters`: {name: {"sizes", "ms", "load_s", "memory_mb"}}; `memory`:
    {"total_mb", "available_mb", "target_rss_mb", "bytes_per_file_byte"} (None where unknown)."""

    name: str
    created: str
    device: dict
    threads: int
    bundle: dict
    verify_ms: dict
    drafters: dict = field(default_factory=dict)
    load_s: float = 0.0
    memory: dict = field(default_factory=dict)
    repeats: int = DEFAULT_REPEATS
    quick: bool = False
    providers: list[str] = field(default_factory=lambda: list(DEFAULT_PROVIDERS))  # ORT execution providers, CPU last

    @property
    def device_id(self) -> str:
        """The measured machine's slug."""
        return self.device["device_id"]

    @property
    def key(self) -> str:
        """The measured model's bundle key (see `bundle_key`)."""
        return self.bundle["key"]

    def matches(self, entry: ModelEntry) -> bool:
        """True when this profile measured `entry` (same bundle key)."""
        return self.key == bundle_key(entry)

    def verify_seconds(self, tokens: int, context: int) -> float:
        """Seconds for the target to score `tokens` new tokens on top of `context` cached ones, from the measured
        times made non-decreasing in the size (`nondecreasing`): linear in the size between measured sizes (the
        line through the last two beyond them), linear in the context between measured contexts, clamped outside
        them."""
        tokens = _check_tokens(tokens)
        contexts, sizes, ms = self.verify_ms["contexts"], self.verify_ms["sizes"], self.verify_ms["ms"]
        rows = [_interpolate_sizes(sizes, nondecreasing(row), tokens) for row in ms]
        if context <= contexts[0] or len(contexts) == 1:
            value = rows[0] if context <= contexts[0] else rows[-1]
        elif context >= contexts[-1]:
            value = rows[-1]
        else:
            value = float(np.interp(context, contexts, rows))
        return value / 1000.0

    def drafter_seconds(self, name: str, tokens: int = 1) -> float | None:
        """Seconds for drafter `name` to score `tokens` tokens (interpolated as in `verify_seconds`), or None when
        the profile did not measure that drafter."""
        tokens = _check_tokens(tokens)
        entry = self.drafters.get(name)
        if entry is None:
            return None
        return _interpolate_sizes(entry["sizes"], nondecreasing(entry["ms"]), tokens) / 1000.0

    def summary(self) -> str:
        """One line: name, device, threads, execution providers, model."""
        return (f"{self.name}: {self.device_id}, {self.threads} threads, {providers_label(self.providers)}, "
                f"{self.bundle.get('model')}")

    def to_dict(self) -> dict:
        """The JSON-ready dictionary (schema_version 1)."""
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "name": self.name, "created": self.created,
                "device": dict(self.device), "threads": self.threads, "bundle": dict(self.bundle),
                "load_s": self.load_s, "memory": dict(self.memory), "repeats": self.repeats, "quick": self.quick,
                "verify_ms": {k: self.verify_ms[k] for k in ("contexts", "sizes", "ms")},
                "drafters": {name: dict(d) for name, d in self.drafters.items()}, "providers": list(self.providers)}

    @classmethod
    def from_dict(cls, data, where: str = "profile") -> "DeviceProfile":
        """Validate `data` (a parsed profile file) and build the profile; ProfileError names `where` and the
        field on any problem."""
        return _parse_profile(data, where)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile to `path` atomically (temporary file + rename); its `name` becomes the file stem."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.name = path.stem
        write_json_atomic(path, self.to_dict())
        return path


# ------------------------------------------------------------------------------------------------ validation
def _fail(where: str, field_name: str, problem: str):
    raise ProfileError(f"{where}: field {_r(field_name)} {problem}")


def _get(d: dict, key: str, where: str, prefix: str = ""):
    if key not in d:
        _fail(where, prefix + key, "is missing")
    return d[key]


def _ascending_ints(value, where: str, name: str) -> list[int]:
    if not isinstance(value, list) or not value:
        _fail(where, name, f"must be a non-empty list of positive integers, got {_r(value)}")
    for item in value:
        if not is_int(item) or not 1 <= item <= MAX_TOKENS:
            _fail(where, name, f"must hold integers in 1..{MAX_TOKENS}, got {_r(item)}")
    if any(b <= a for a, b in zip(value, value[1:])):
        _fail(where, name, f"must be strictly ascending, got {value}")
    return list(value)


def _positive_ms(value, where: str, name: str, length: int) -> list[float]:
    if not isinstance(value, list) or len(value) != length:
        _fail(where, name, f"must be a list of {length} numbers (one per size), got {_r(value)}")
    for item in value:
        if not is_finite_number(item) or not 0 < item <= MAX_MS:
            _fail(where, name, f"must hold finite positive milliseconds (at most {MAX_MS:g}), got {_r(item)}")
    return [float(v) for v in value]


def _optional_number(d: dict, key: str, where: str, prefix: str) -> float | None:
    value = d.get(key)
    if value is not None and (not is_finite_number(value) or value < 0):
        _fail(where, prefix + key, f"must be a finite non-negative number or null, got {_r(value)}")
    return value


def _parse_verify(value, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, "verify_ms", "must be an object with contexts, sizes and ms")
    contexts = _ascending_ints(_get(value, "contexts", where, "verify_ms."), where, "verify_ms.contexts")
    sizes = _ascending_ints(_get(value, "sizes", where, "verify_ms."), where, "verify_ms.sizes")
    ms = _get(value, "ms", where, "verify_ms.")
    if not isinstance(ms, list) or len(ms) != len(contexts):
        _fail(where, "verify_ms.ms", f"must have one row per context ({len(contexts)} rows of {len(sizes)})")
    rows = [_positive_ms(row, where, f"verify_ms.ms[{i}]", len(sizes)) for i, row in enumerate(ms)]
    return {"contexts": contexts, "sizes": sizes, "ms": rows}


def _parse_drafters(value, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, "drafters", "must be an object (drafter name -> measurements)")
    out = {}
    for name, d in value.items():
        prefix = f"drafters.{name}."
        if not isinstance(d, dict):
            _fail(where, f"drafters.{name}", "must be an object with sizes, ms, load_s and memory_mb")
        sizes = _ascending_ints(_get(d, "sizes", where, prefix), where, prefix + "sizes")
        ms = _positive_ms(_get(d, "ms", where, prefix), where, prefix + "ms", len(sizes))
        load_s = _get(d, "load_s", where, prefix)
        if not is_finite_number(load_s) or load_s < 0:
            _fail(where, prefix + "load_s", f"must be a finite non-negative number, got {_r(load_s)}")
        out[name] = {"sizes": sizes, "ms": ms, "load_s": load_s,
                     "memory_mb": _optional_number(d, "memory_mb", where, prefix)}
    return out


def _finite_everywhere(value, where: str, name: str, depth: int = 0) -> None:
    """Informational objects (device, bundle) are kept as they are, so they may hold no NaN or infinity (the
    profile could not be written back as JSON) and no deep nesting."""
    if depth > 16:
        _fail(where, name, "is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(where, name, f"must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite_everywhere(item, where, f"{name}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite_everywhere(item, where, f"{name}[{i}]", depth + 1)


def _parse_profile(data, where: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: a profile must be a JSON object")
    if data.get("format") != FORMAT:
        _fail(where, "format", f"must be {FORMAT!r}, got {data.get('format')!r}: not a device profile")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        _fail(where, "schema_version", f"is {_r(version)}; this runtime reads version {SCHEMA_VERSION}")
    name = _get(data, "name", where)
    if not isinstance(name, str) or not name:
        _fail(where, "name", f"must be a non-empty string, got {_r(name)}")
    created = _get(data, "created", where)
    if not isinstance(created, str):
        _fail(where, "created", f"must be an ISO time string, got {_r(created)}")
    device = _get(data, "device", where)
    if not isinstance(device, dict):
        _fail(where, "device", "must be an object")
    device_id = _get(device, "device_id", where, "device.")
    if not isinstance(device_id, str) or not SLUG.match(device_id):
        _fail(where, "device.device_id", f"must be a slug of [a-z0-9-], got {_r(device_id)}")
    _finite_everywhere(device, where, "device")
    threads = _get(data, "threads", where)
    if not is_int(threads) or not 1 <= threads <= 4096:
        _fail(where, "threads", f"must be a positive integer, got {_r(threads)}")
    bundle = _get(data, "bundle", where)
    if not isinstance(bundle, dict):
        _fail(where, "bundle", "must be an object")
    for key in ("model", "key"):
        if not isinstance(_get(bundle, key, where, "bundle."), str) or not bundle[key]:
            _fail(where, f"bundle.{key}", f"must be a non-empty string, got {_r(bundle[key])}")
    if not isinstance(bundle.get("quantization", {}), dict):
        _fail(where, "bundle.quantization", "must be an object")
    _finite_everywhere(bundle, where, "bundle")
    graph_bytes = bundle.get("graph_bytes")
    if graph_bytes is not None and (not is_int(graph_bytes) or graph_bytes < 0):
        _fail(where, "bundle.graph_bytes", f"must be a non-negative integer, got {_r(graph_bytes)}")
    load_s = _get(data, "load_s", where)
    if not is_finite_number(load_s) or load_s < 0:
        _fail(where, "load_s", f"must be a finite non-negative number, got {_r(load_s)}")
    memory = data.get("memory", {})
    if not isinstance(memory, dict):
        _fail(where, "memory", "must be an object")
    memory = {key: _optional_number(memory, key, where, "memory.")
              for key in ("total_mb", "available_mb", "target_rss_mb", "bytes_per_file_byte")}
    repeats = data.get("repeats", DEFAULT_REPEATS)
    if not is_int(repeats) or not 1 <= repeats <= 1 << 20:
        _fail(where, "repeats", f"must be a positive integer, got {_r(repeats)}")
    quick = data.get("quick", False)
    if not isinstance(quick, bool):
        _fail(where, "quick", f"must be true or false, got {_r(quick)}")
    return DeviceProfile(name=name, created=created, device=dict(device), threads=threads, bundle=dict(bundle),
                         verify_ms=_parse_verify(_get(data, "verify_ms", where), where),
                         drafters=_parse_drafters(data.get("drafters", {}), where), load_s=load_s, memory=memory,
                         repeats=repeats, quick=quick, providers=_parse_providers(data, where))


def _parse_providers(data: dict, where: str) -> list[str]:
    """The "providers" field: 1 to MAX_PROVIDERS distinct ORT provider names; absent (profiles written before it
    existed): the CPU provider alone."""
    value = data.get("providers", list(DEFAULT_PROVIDERS))
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PROVIDERS:
        _fail(where, "providers", f"must be a list of 1 to {MAX_PROVIDERS} execution provider names, got {_r(value)}")
    for item in value:
        if not isinstance(item, str) or not PROVIDER_NAME.match(item):
            _fail(where, "providers", f"must hold provider names such as 'CPUExecutionProvider', got {_r(item)}")
    if len(set(value)) != len(value):
        _fail(where, "providers", f"lists a provider twice: {value}")
    return list(value)


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    """Read and validate a profile file. Its `name` is the file stem. Missing file: FileNotFoundError; unreadable
    JSON or a wrong field: ProfileError naming the file (and the field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"device profile {path} does not exist (make one with `edgespec profile --bundle "
                                f"BUNDLE --output {path}`)")
    data = read_json_capped(path, MAX_PROFILE_BYTES, ProfileError, "a device profile")
    profile = _parse_profile(data, str(path))
    profile.name = path.stem
    return profile


# ------------------------------------------------------------------------------------------------ measuring
def _sample_ids(entry: ModelEntry, count: int) -> list[int]:
    """`count` token ids inside the model's vocabulary: the tokenizer's encoding of a built-in English + code text,
    repeated; deterministic pseudo-random ids when the tokenizer cannot be used."""
    ids: list[int] = []
    try:
        from tokenizers import Tokenizer

        ids = [i for i in Tokenizer.from_file(str(entry.tokenizer_path)).encode(SAMPLE_TEXT).ids
               if 0 <= i < entry.vocab_size]
    except Exception:  # noqa: BLE001 - any tokenizer failure: fall back to pseudo-random ids
        ids = []
    if len(ids) < 8:
        ids = np.random.default_rng(0).integers(0, entry.vocab_size, size=256).tolist()
    repeats = count // len(ids) + 1
    return (ids * repeats)[:count]


def _interleaved_ms(runner, ids: list[int], context: int, sizes: list[int], repeats: int, warmup: bool,
                    tick: "Callable[[], None] | None" = None) -> list[float]:
    """Median wall time (ms) per size of `runner.forward(size chain tokens)` on top of `context` cached tokens
    (rewound after each). The sizes are timed in rounds, every size once per round, so drift during the
    measurement (a laptop's or phone's clock throttling, a neighbour's load) moves every size alike and leaves
    the curve's shape, which sizes the trees, intact. `warmup`: an untimed round first (else one untimed forward
    of the smallest size). `tick` is called after each timed forward."""
    def timed(size: int) -> float:
        start = time.perf_counter()
        runner.forward(ids[context:context + size])
        elapsed = time.perf_counter() - start
        runner.rewind(context)
        return elapsed

    for size in (sizes if warmup else sizes[:1]):
        timed(size)
    times: list[list[float]] = [[] for _ in sizes]
    for _ in range(repeats):
        # the forward right after a large one pays for it (measured: one token at 300 tokens of context took 183 ms
        # after a 64-token forward against 108 ms in a decode loop), and a decode loop never sees that: an untimed
        # forward of the first size opens each round
        timed(sizes[0])
        for index, size in enumerate(sizes):
            times[index].append(timed(size))
            if tick is not None:
                tick()
    return [max(round(statistics.median(t) * 1000.0, 4), 1e-4) for t in times]


def _check_sizes(values, what: str) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise ValueError(f"{what} must be positive integers, got {values!r}")
    return sorted(set(int(v) for v in values))


def measurable_contexts(entry: ModelEntry, contexts, largest_size: int) -> list[int]:
    """`contexts` capped so that a forward of `largest_size` tokens (at least CONTEXT_MARGIN) still fits in the
    model's context length; ascending, duplicates removed."""
    limit = entry.context_length - max(CONTEXT_MARGIN, largest_size)
    if limit < 1:
        raise ValueError(f"model {entry.name!r} has a context length of {entry.context_length}: too short to "
                         f"measure forwards of {largest_size} tokens")
    return sorted(set(min(int(c), limit) for c in _check_sizes(contexts, "contexts")))


def _load_runner(entry: ModelEntry, threads: int, providers=None):
    """(runner, load seconds, RSS increase in MB or None) for one model on `providers` (None: CPU)."""
    from ..runtimes.runner import ModelRunner

    rss_before = process_rss_mb()
    start = time.perf_counter()
    runner = ModelRunner(entry, threads=threads, providers=providers)
    load_s = time.perf_counter() - start
    rss_after = process_rss_mb()
    rss = round(max(0.0, rss_after - rss_before), 1) if rss_before is not None and rss_after is not None else None
    return runner, round(load_s, 4), rss


def _fill_context(runner, ids: list[int], context: int, synthetic: bool) -> None:
    """Bring the runner's cache to `context` tokens: a real prefill of `ids`, or (`synthetic`) the cache's zero K/V
    marked as committed. A forward's work does not depend on the cached values (same shapes, same mask), so both
    time the same; the synthetic one skips the prefill, which would dominate a quick profile."""
    if context <= runner.length:
        return
    if synthetic:
        runner.cache.reserve(context - runner.length)
        runner.cache.length = context
    else:
        runner.prefill(ids[runner.length:context])


def _measure_table(runner, entry, contexts, sizes, repeats, quick, progress, label, done, total):
    """Rows of median ms (one per context, one value per size; `_interleaved_ms`), filling the cache up to each
    context in turn. Full profiles prefill real tokens and warm up with a whole round; quick ones use a synthetic
    context and one warm-up forward per context. `progress(done, total, label)` counts timed forwards."""
    ids = _sample_ids(entry, contexts[-1] + sizes[-1])
    rows = []
    counter = [done]

    def tick() -> None:
        counter[0] += 1
        if progress:
            progress(counter[0], total, label)

    runner.reset()
    for context in contexts:
        _fill_context(runner, ids, context, synthetic=quick)
        rows.append(_interleaved_ms(runner, ids, context, sizes, repeats, warmup=not quick, tick=tick))
    runner.reset()
    return rows, counter[0]


def measure_profile(manifest: Manifest, threads: int | None = None, contexts=None, sizes=None,
                    repeats: int | None = None, drafters: bool = True, quick: bool = False,
                    progress: Progress | None = None, *, entry: ModelEntry | None = None,
                    drafter_sizes=None, providers=None) -> DeviceProfile:
    """Measure a profile of `manifest`'s target (or `entry`) and, with `drafters`, of every drafter model.

    For each context (default 128, 512, 1536, capped below the context length minus 64) the cache is prefilled
    with real-ish token ids, then each size n (default 1..64) is scored as a chain with `runner.forward` and
    rewound, in `repeats` (default 3) interleaved rounds after a warm-up round (`_interleaved_ms`); each size's
    median is kept. Drafters: sizes 1, 2, 4, 8, 16 at the first context. `quick`: one context (512 or less),
    sizes 1-16, 2 repeats, drafters at 1 and 4, a synthetic context instead of a prefill and one warm-up forward
    per context (a few seconds plus the model loads for a 1.5B 4-bit model on 2 threads). `progress(done, total,
    label)` is called after each timed forward. `providers`: the target's ONNX Runtime execution providers (see
    `edgespec.runtimes.runner.resolve_providers`; default CPU), recorded in the profile; drafters are measured on
    the CPU provider, where the engine runs them. The profile's name is its default file stem
    (`default_profile_path`); nothing is written here."""
    from ..runtimes.runner import default_threads, resolve_providers

    chosen_providers = resolve_providers(providers)
    entry = entry or manifest.target_model
    threads = threads or default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    sizes = _check_sizes(sizes if sizes is not None else (QUICK_SIZES if quick else DEFAULT_SIZES), "sizes")
    contexts = contexts if contexts is not None else ((QUICK_CONTEXT,) if quick else DEFAULT_CONTEXTS)
    contexts = measurable_contexts(entry, contexts, sizes[-1])
    repeats = repeats if repeats is not None else (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    drafter_sizes = _check_sizes(drafter_sizes if drafter_sizes is not None else
                                 (QUICK_DRAFTER_SIZES if quick else DEFAULT_DRAFTER_SIZES), "drafter sizes")
    drafter_entries = [m for m in manifest.drafters() if m.name != entry.name] if drafters else []
    total = (len(contexts) * len(sizes) + len(drafter_entries) * len(drafter_sizes)) * repeats

    device = dict(describe_device())
    memory = {"total_mb": total_memory_mb(), "available_mb": available_memory_mb()}
    runner, load_s, target_rss = _load_runner(entry, threads, chosen_providers)
    rows, done = _measure_table(runner, entry, contexts, sizes, repeats, quick, progress, "target", 0, total)
    file_bytes = model_file_bytes(entry)
    memory["target_rss_mb"] = target_rss
    memory["bytes_per_file_byte"] = round(target_rss * 1024 * 1024 / file_bytes, 3) if target_rss and file_bytes \
        else None

    drafter_results = {}
    for drafter in drafter_entries:
        try:
            context = measurable_contexts(drafter, contexts[:1], drafter_sizes[-1])
        except ValueError:
            continue  # a drafter with a context too short to measure: left out of the profile
        drafter_runner, drafter_load_s, drafter_rss = _load_runner(drafter, threads)
        (row,), done = _measure_table(drafter_runner, drafter, context, drafter_sizes, repeats, quick,
                                      progress, f"drafter {drafter.name}", done, total)
        drafter_results[drafter.name] = {"sizes": drafter_sizes, "ms": row, "load_s": drafter_load_s,
                                         "memory_mb": drafter_rss}
        del drafter_runner
    del runner

    bundle = describe_bundle(entry)
    provider_list = [name for name, _ in chosen_providers]
    profile = DeviceProfile(
        name=default_profile_name(device["device_id"], threads, bundle["key"], provider_list),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device, threads=threads,
        bundle=bundle, verify_ms={"contexts": contexts, "sizes": sizes, "ms": rows}, drafters=drafter_results,
        load_s=load_s, memory=memory, repeats=repeats, quick=quick, providers=provider_list)
    return DeviceProfile.from_dict(json.loads(json.dumps(profile.to_dict())), where="measured profile")


# ------------------------------------------------------------------------------------------------ where they live
def user_profiles_dir() -> Path:
    """$EDGESPEC_PROFILES, else $EDGESPEC_CACHE/profiles, else ~/.cache/edgespec/profiles (not created here)."""
    env = os.environ.get("EDGESPEC_PROFILES")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("EDGESPEC_CACHE")
    if cache:
        return Path(cache).expanduser() / "profiles"
    return Path.home() / ".cache" / "edgespec" / "profiles"


def shipped_profiles_dir() -> Path:
    """The folder of the profiles shipped with the package (JSON files beside this module)."""
    return Path(__file__).resolve().parent


def providers_slug(providers) -> str:
    """The execution providers other than CPU as a file-name part: short names, lower case, joined by "-"
    ("xnnpack", "qnn-xnnpack"); "" for the CPU provider alone."""
    short = (re.sub(r"[^a-z0-9]+", "", str(p).lower().removesuffix("executionprovider"))
             for p in providers if p not in DEFAULT_PROVIDERS)
    return "-".join(s for s in short if s)


def providers_label(providers) -> str:
    """The execution providers for people: "CPU", "Xnnpack+CPU", ..."""
    return "+".join(str(p).removesuffix("ExecutionProvider") for p in providers)


def default_profile_name(device_id: str, threads: int, key: str, providers=DEFAULT_PROVIDERS) -> str:
    """`{device_id}-{threads}t-{key[:10]}` (CPU), or `{device_id}-{threads}t-{providers}-{key[:10]}` on other
    execution providers (`providers_slug`): the file stem of a profile in the user folder (characters outside
    [a-z0-9-] dropped, so that a profile read from elsewhere can never name a path outside the folder)."""
    device = re.sub(r"[^a-z0-9-]+", "", str(device_id).lower()).strip("-") or "device"
    backend = providers_slug(providers)
    return (f"{device}-{int(threads)}t-" + (f"{backend}-" if backend else "")
            + (re.sub(r'[^a-z0-9]+', '', str(key).lower())[:10] or 'nokey'))


def default_profile_path(profile: DeviceProfile) -> Path:
    """Where `profile` goes in the user folder."""
    stem = default_profile_name(profile.device_id, profile.threads, profile.key, profile.providers)
    return user_profiles_dir() / (stem + ".json")


def list_profiles() -> list[tuple[Path, DeviceProfile]]:
    """Every readable profile: the user folder's first, then the shipped ones (each sorted by file name).
    Unreadable files are skipped with a ProfileWarning."""
    found = []
    for folder in (user_profiles_dir(), shipped_profiles_dir()):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                found.append((path, load_profile(path)))
            except (ProfileError, OSError) as exc:
                warnings.warn(f"skipping device profile {path}: {exc}", ProfileWarning, stacklevel=2)
    return found


def find_profile(manifest: Manifest, threads: int | None, entry: ModelEntry | None = None,
                 providers=None) -> DeviceProfile | None:
    """A profile of this machine, at `threads` (None: the runtime's default), on the execution `providers` (None:
    CPU; see `edgespec.runtimes.runner.resolve_providers`), for `manifest`'s target (or `entry`) with the same
    bundle key; the user folder's first. None when there is none."""
    from ..runtimes.runner import default_threads, provider_names

    entry = entry or manifest.target_model
    threads = threads or default_threads()
    wanted = provider_names(providers)
    device_id, key = current_device_id(), bundle_key(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProfileWarning)
        for _, profile in list_profiles():
            if (profile.device_id == device_id and profile.threads == threads and profile.key == key
                    and profile.providers == wanted):
                return profile
    return None


def _warn_if_foreign(profile: DeviceProfile, entry: ModelEntry, source: str, providers=None) -> None:
    if providers is not None and profile.providers != list(providers):
        warnings.warn(f"device profile {source} was measured on {providers_label(profile.providers)}, this session "
                      f"runs on {providers_label(providers)}: its costs describe another backend", ProfileWarning,
                      stacklevel=3)
    if not profile.matches(entry):
        warnings.warn(f"device profile {source} measured model {profile.bundle.get('model')!r} (key {profile.key}), "
                      f"not this bundle's {entry.name!r} (key {bundle_key(entry)}): its costs do not describe this "
                      f"model", ProfileWarning, stacklevel=3)


def resolve_device(spec: str | None, manifest: Manifest, threads: int | None, entry: ModelEntry | None = None,
                   progress: Progress | None = None, providers=None) -> DeviceProfile | None:
    """The profile for a `--device` option: None or "none" -> None; "auto" -> this machine's profile for the
    bundle at `threads` on the execution `providers` (None: CPU; `find_profile`), else one measured now (quick) on
    them and saved to the user folder; a path to a .json file -> that file; any other NAME -> the profile whose
    name (file stem) is NAME (`list_profiles`), else ProfileError listing the names. A file or named profile of
    another model or other providers gives a ProfileWarning (costs from another device, thread count or backend
    are allowed, for cross-evaluation). Prints nothing."""
    if spec is None or spec.strip().lower() == "none":
        return None
    from ..runtimes.runner import provider_names

    spec = spec.strip()
    entry = entry or manifest.target_model
    providers = provider_names(providers)
    if spec.lower() == "auto":
        profile = find_profile(manifest, threads, entry, providers)
        if profile is None:
            profile = measure_profile(manifest, threads=threads, quick=True, progress=progress, entry=entry,
                                      providers=providers)
            profile.save(default_profile_path(profile))
        return profile
    if spec.lower().endswith(".json") or os.sep in spec or (os.altsep and os.altsep in spec):
        profile = load_profile(Path(spec).expanduser())
        _warn_if_foreign(profile, entry, spec, providers)
        return profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProfileWarning)
        known = list_profiles()
    for path, profile in known:
        if profile.name == spec:
            _warn_if_foreign(profile, entry, str(path), providers)
            return profile
    names = ", ".join(sorted({p.name for _, p in known})) or "none"
    raise ProfileError(f"no device profile named {spec!r} (known: {names}; folders {user_profiles_dir()} and "
                       f"{shipped_profiles_dir()}); make one with `edgespec profile --bundle BUNDLE`, or pass "
                       f"auto, none or a .json path")


# ------------------------------------------------------------------------------------------------ command line
def _print_profile(profile: DeviceProfile, path: Path, written: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    verify = profile.verify_ms
    table = Table(title=f"target {profile.bundle['model']}: forward ms for n tokens ({profile.device_id}, "
                        f"{profile.threads} threads)")
    table.add_column("n", justify="right")
    for context in verify["contexts"]:
        table.add_column(f"ctx {context}", justify="right")
    for j, size in enumerate(verify["sizes"]):
        table.add_row(str(size), *(f"{row[j]:.1f}" for row in verify["ms"]))
    console.print(table)
    if profile.drafters:
        drafters = Table(title=f"drafters (ctx {verify['contexts'][0]})")
        for col in ("drafter", "load s", "memory MB", "ms per n"):
            drafters.add_column(col)
        for name, d in profile.drafters.items():
            cells = ", ".join(f"{n}: {ms:.1f}" for n, ms in zip(d["sizes"], d["ms"]))
            memory = f"{d['memory_mb']:.0f}" if d["memory_mb"] is not None else "?"
            drafters.add_row(name, f"{d['load_s']:.2f}", memory, cells)
        console.print(drafters)
    m = profile.memory

    def mb(value):
        return f"{value:,.0f} MB" if value is not None else "unknown"

    ratio = m.get("bytes_per_file_byte")
    console.print(f"target load {profile.load_s:.2f} s; memory: total {mb(m.get('total_mb'))}, available "
                  f"{mb(m.get('available_mb'))}, target RSS +{mb(m.get('target_rss_mb'))}"
                  + (f" ({ratio:.2f} x file size)" if ratio else ""))
    console.print(f"[bold green]profile {'written' if written else 'read'}:[/] {path}")


def _print_list() -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="device profiles")
    for col in ("name", "device", "threads", "providers", "model", "path"):
        table.add_column(col)
    for path, profile in list_profiles():
        table.add_row(profile.name, profile.device_id, str(profile.threads), providers_label(profile.providers),
                      str(profile.bundle.get("model")), str(path))
    Console().print(table)
    if not table.row_count:
        Console().print(f"no profiles yet in {user_profiles_dir()}; make one with `edgespec profile --bundle B`")
    return 0


def cmd_profile(args) -> int:
    """`edgespec profile`: measure a bundle on this machine and write the profile (or `--list` the known ones, or
    show a saved one with `--from`); `--plot` draws its verification cost curve."""
    if args.plot:
        from ..plot import require_matplotlib

        require_matplotlib()  # before measuring, not after it
    if args.list:
        if args.plot or args.from_path:
            raise ValueError("--list takes no --plot or --from")
        return _print_list()
    if args.from_path:
        if args.bundle:
            raise ValueError("--from shows a saved profile: leave out --bundle (nothing is measured)")
        profile = load_profile(args.from_path)
        _print_profile(profile, Path(args.from_path), written=False)
        _plot_profile(profile, args.plot)
        return 0
    if not args.bundle:
        raise ValueError("edgespec profile needs --bundle BUNDLE (or --list, or --from PROFILE.json)")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..runtimes.manifest import load_manifest

    manifest = load_manifest(args.bundle)
    console = Console(stderr=True, highlight=False)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    task = None

    def progress(done: int, total: int, label: str) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(label, total=total)
        bar.update(task, completed=done, total=total, description=label)

    with bar:
        profile = measure_profile(manifest, threads=args.threads, contexts=args.contexts, sizes=args.sizes,
                                  repeats=args.repeats, providers=args.provider,
                                  drafters=not args.no_drafters, quick=args.quick, progress=progress)
    path = profile.save(args.output or default_profile_path(profile))
    _print_profile(profile, path)
    _plot_profile(profile, args.plot)
    return 0


def _plot_profile(profile: DeviceProfile, path: str | None) -> None:
    """Draw the profile's verification cost picture to `path` (nothing when None)."""
    if path is None:
        return
    from rich.console import Console

    from ..plot import plot_profile

    plot_profile(profile, path)
    Console(stderr=True, highlight=False).print(f"picture written: {path}", markup=False)


def add_provider_option(parser) -> None:
    """The repeatable `--provider NAME` option of `profile`, `generate` and `chat` (at most MAX_PROVIDERS names of
    at most 64 characters; whether this onnxruntime build has them is checked when the session is made)."""
    from ..cliargs import at_most, bounded_text

    parser.add_argument("--provider", action=at_most(MAX_PROVIDERS), type=bounded_text(64), default=None,
                        metavar="NAME",
                        help=f"ONNX Runtime execution provider for the target, in order of preference (repeatable, "
                             f"at most {MAX_PROVIDERS}): xnnpack, coreml, nnapi, qnn, dml, ... or an ORT name such "
                             f"as XnnpackExecutionProvider; CPU is always the fallback (default: CPU only)")


MAX_REPEATS = 100
MAX_LIST_ITEMS = 64  # values of --contexts and of --sizes
MAX_CLI_SIZE = 1024  # the largest token count --sizes may ask a forward of


def register_cli(subparsers) -> None:
    """Add the `profile` command to an argparse subparsers object (numbers bounded: see edgespec.cliargs)."""
    from ..cliargs import MAX_TOKENS as MAX_CLI_CONTEXT, bounded_int, int_list, new_or_regular_file, regular_file, \
        threads_arg
    from ..plot import plot_path

    p = subparsers.add_parser("profile", help="measure forward times of a bundle on this machine (device profile)")
    p.add_argument("--bundle", "-b", default=None, help="bundle folder to measure")
    p.add_argument("--threads", type=threads_arg(), default=None,
                   help="intra-op threads, 1 to 4x the CPU count (default: the runtime's default)")
    p.add_argument("--quick", action="store_true",
                   help="one context, sizes up to 16, 2 repeats (what --device auto measures)")
    p.add_argument("--output", "-o", type=new_or_regular_file, default=None,
                   help="profile file to write (default: the user folder, $EDGESPEC_PROFILES or "
                        "~/.cache/edgespec/profiles)")
    p.add_argument("--repeats", type=bounded_int(1, MAX_REPEATS), default=None,
                   help=f"timed runs per size, 1 to {MAX_REPEATS} (median; default 3, quick 2)")
    p.add_argument("--contexts", type=int_list(1, MAX_CLI_CONTEXT, MAX_LIST_ITEMS), default=None, metavar="C1,C2",
                   help=f"context lengths, 1 to {MAX_CLI_CONTEXT}, at most {MAX_LIST_ITEMS} (default 128,512,1536)")
    p.add_argument("--sizes", type=int_list(1, MAX_CLI_SIZE, MAX_LIST_ITEMS), default=None, metavar="N1,N2",
                   help=f"token counts, 1 to {MAX_CLI_SIZE}, at most {MAX_LIST_ITEMS} (default 1,2,3,4,5,6,8,...,64)")
    p.add_argument("--no-drafters", action="store_true", help="measure the target only")
    add_provider_option(p)
    p.add_argument("--list", action="store_true", help="list the known profiles")
    p.add_argument("--from", dest="from_path", type=regular_file, default=None, metavar="PROFILE.json",
                   help="show a saved profile instead of measuring (with --plot: draw it)")
    p.add_argument("--plot", type=plot_path, default=None, metavar="PATH.svg|PATH.png",
                   help="draw the verification cost curve (ms against tokens, one line per context) with the "
                        "planner's tree sizes marked; needs matplotlib: pip install 'edgespec[plot]'")
    p.set_defaults(func=cmd_profile)
