"""Memory facts about this machine and a budget check for loading a bundle.

`estimate_memory_mb` predicts what loading some of a bundle's models needs: their graph and weight files times a
ratio (ONNX Runtime's copy of the weights plus its working buffers; a device profile measures the real ratio), the
KV cache at the chosen context length, and cache files (n-gram, cross-vocabulary) read into memory.
`check_memory` compares the estimate with the memory available now and raises `MemoryBudgetError`, naming smaller
configurations that would fit, when it exceeds 90% of it. `EDGESPEC_MEMORY_MB` overrides the available memory
(tests, and phones whose reports are unreliable).

The machine's and the process's memory come from psutil when it is installed (Linux, macOS, Windows, BSD alike),
else from the operating system by hand: /proc/meminfo and /proc/self/status (Linux, Android), os.sysconf, `sysctl
hw.memsize` (macOS) and getrusage. psutil stays optional, not a core dependency: it has no wheel for Android or iOS,
where the runtime must still install with pip alone; without it, Windows reports no memory (the check is skipped).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from ..runtimes.manifest import BundleError, Manifest, ModelEntry

MB = 1024 * 1024
DEFAULT_RATIO = 1.15  # resident bytes per byte of graph + weight files, when no profile has measured it
BUDGET_SHARE = 0.9  # the estimate may use at most this share of the available memory
KV_BYTES_PER_VALUE = 4  # float32 keys and values (graph kv_dtype "float32")
MEMORY_ENV = "EDGESPEC_MEMORY_MB"
CONTEXT_STEP = 256  # suggested context lengths are multiples of this


class MemoryBudgetError(BundleError):
    """Loading the requested models would need more memory than the machine has available.

    Attributes: `estimate` (the `estimate_memory_mb` dict), `available_mb`, `suggestions` (list of
    (description, total MB) pairs of smaller configurations that fit)."""

    def __init__(self, message: str, estimate: dict, available_mb: float, suggestions: list[tuple[str, float]]):
        super().__init__(message)
        self.estimate = estimate
        self.available_mb = available_mb
        self.suggestions = suggestions


# ------------------------------------------------------------------------------------------- what the machine has
def _psutil():
    """The psutil module when it is installed, else None."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _psutil_memory_mb(field: str) -> float | None:
    """psutil.virtual_memory().`field` ("total", "available") in MB; None without psutil or when it fails (a
    sandbox that hides /proc/meminfo, an unsupported platform)."""
    psutil = _psutil()
    if psutil is None:
        return None
    try:
        value = getattr(psutil.virtual_memory(), field)
    except (OSError, RuntimeError, AttributeError, NotImplementedError):
        return None
    return value / MB if value and value > 0 else None


def _meminfo_mb(field: str) -> float | None:
    """A /proc/meminfo field (kB there) in MB, or None off Linux or when absent."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_mb(pages_name: str) -> float | None:
    """os.sysconf(pages_name) x page size in MB, or None where the platform lacks it."""
    try:
        pages = os.sysconf(pages_name)
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    if pages <= 0 or page_size <= 0:
        return None
    return pages * page_size / MB


def _sysctl_int(name: str) -> int | None:
    """An integer from `sysctl -n name` (macOS, BSD), or None."""
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def total_memory_mb() -> float | None:
    """Physical memory of this machine in MB: psutil's when installed, else MemTotal (/proc/meminfo), os.sysconf,
    or `sysctl hw.memsize` (macOS); None when unknown."""
    total = _psutil_memory_mb("total") or _meminfo_mb("MemTotal") or _sysconf_mb("SC_PHYS_PAGES")
    if total is None and platform.system() == "Darwin":
        size = _sysctl_int("hw.memsize")
        total = size / MB if size else None
    return round(total, 1) if total else None


def memory_override_mb() -> float | None:
    """The available memory set by the environment variable EDGESPEC_MEMORY_MB (None when unset).

    Raises ValueError when it is set to anything but a positive number."""
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{MEMORY_ENV} must be a positive number of MB, got {raw!r}")
    return value


def available_memory_mb() -> float | None:
    """Memory available to a new allocation now, in MB: $EDGESPEC_MEMORY_MB when set, else psutil's available
    memory when installed (every platform), else MemAvailable from /proc/meminfo (Linux, Android), else free pages
    from os.sysconf; None when unknown (macOS and Windows without psutil)."""
    override = memory_override_mb()
    if override is not None:
        return override
    available = _psutil_memory_mb("available") or _meminfo_mb("MemAvailable") or _sysconf_mb("SC_AVPHYS_PAGES")
    return round(available, 1) if available else None


def _proc_status_kb(field: str) -> float | None:
    """A kB figure of /proc/self/status (Linux), None when there is none."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _psutil_process_bytes(field: str) -> int | None:
    """psutil.Process().memory_info().`field` of this process in bytes; None without psutil, without that field
    on this platform (`peak_wset` is Windows's) or when it fails."""
    psutil = _psutil()
    if psutil is None:
        return None
    try:
        value = getattr(psutil.Process().memory_info(), field, None)
    except (OSError, RuntimeError, NotImplementedError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def process_rss_mb() -> float | None:
    """Resident memory of this process now, MB: psutil's RSS when installed, else VmRSS (/proc/self/status);
    None when unknown."""
    rss = _psutil_process_bytes("rss")
    if rss is not None:
        return rss / MB
    kb = _proc_status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def process_peak_rss_mb() -> float | None:
    """Peak resident memory of this process, MB: VmHWM (Linux), else getrusage's ru_maxrss (macOS, BSD), else
    psutil's peak working set (Windows); None when unknown."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere
    except (ImportError, OSError):
        peak = _psutil_process_bytes("peak_wset")
        return peak / MB if peak is not None else None


# ------------------------------------------------------------------------------------------- what a bundle needs
def model_files(entry: ModelEntry) -> list[Path]:
    """The graph file and its external data files (siblings named `<graph file name>.*`, e.g. model.onnx.data)."""
    graph = Path(entry.graph_path)
    files = [graph] if graph.is_file() else []
    if graph.parent.is_dir():
        files += sorted(p for p in graph.parent.iterdir() if p.name.startswith(graph.name + ".") and p.is_file())
    return files


def model_file_bytes(entry: ModelEntry) -> int:
    """Bytes of a model's graph plus external data files."""
    return sum(p.stat().st_size for p in model_files(entry))


def kv_cache_bytes(entry: ModelEntry, context: int) -> int:
    """Bytes of a float32 KV cache holding `context` tokens: 2 x layers x kv heads x head dim x context x 4."""
    return 2 * entry.num_layers * entry.num_kv_heads * entry.head_dim * int(context) * KV_BYTES_PER_VALUE


def _file_bytes(paths) -> int:
    """Total size of the files among `paths` that exist (missing ones count 0: a cache not yet written)."""
    total = 0
    for p in paths or ():
        try:
            total += Path(p).stat().st_size
        except OSError:
            pass
    return total


def estimate_memory_mb(manifest: Manifest, models: list[ModelEntry], max_context: int | None,
                       ratio: float = DEFAULT_RATIO, extra_files=()) -> dict:
    """Estimated memory (MB) to load `models` of `manifest` with a KV cache of `max_context` tokens each.

    Per model: (graph + external data bytes) x `ratio` + KV cache (2 x layers x kv_heads x head_dim x context x 4
    bytes, context = min(max_context, the model's context length); None = the model's context length, which the
    cache can grow to). `extra_files` (n-gram / cross-vocabulary caches) count their file size once.
    Returns {"models": {name: {"weights_mb", "kv_cache_mb", "context", "total_mb"}}, "extra_files_mb",
    "total_mb", "max_context", "ratio"}."""
    if not ratio > 0:
        raise ValueError(f"ratio must be positive, got {ratio!r}")
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 0):
        raise ValueError(f"max_context must be a non-negative int or None, got {max_context!r}")
    per_model = {}
    for entry in models:
        context = entry.context_length if max_context is None else min(max_context, entry.context_length)
        weights = model_file_bytes(entry) * ratio / MB
        kv = kv_cache_bytes(entry, context) / MB
        per_model[entry.name] = {"weights_mb": round(weights, 1), "kv_cache_mb": round(kv, 1), "context": context,
                                 "total_mb": round(weights + kv, 1)}
    extra = _file_bytes(extra_files) / MB
    total = sum(m["total_mb"] for m in per_model.values()) + extra
    return {"models": per_model, "extra_files_mb": round(extra, 1), "total_mb": round(total, 1),
            "max_context": max_context, "ratio": ratio}


def _profile_ratio(profile) -> float | None:
    """The measured resident bytes per file byte of a DeviceProfile, when plausible (0.5 .. 4)."""
    memory = getattr(profile, "memory", None) or {}
    ratio = memory.get("bytes_per_file_byte")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0.5 <= ratio <= 4.0:
        return float(ratio)
    return None


def _largest_context(manifest, models, budget_mb, ratio, extra_files, below: int) -> int | None:
    """The largest multiple of CONTEXT_STEP below `below` at which `models` fit in `budget_mb`, or None."""
    best, lo, hi = None, 1, (below - 1) // CONTEXT_STEP  # search k with k x STEP < below
    while lo <= hi:
        mid = (lo + hi) // 2
        if estimate_memory_mb(manifest, models, mid * CONTEXT_STEP, ratio, extra_files)["total_mb"] <= budget_mb:
            best, lo = mid * CONTEXT_STEP, mid + 1
        else:
            hi = mid - 1
    return best


def smaller_configurations(manifest: Manifest, models: list[ModelEntry], max_context: int | None,
                           budget_mb: float, ratio: float = DEFAULT_RATIO, extra_files=()) -> list[tuple[str, float]]:
    """Smaller configurations that fit in `budget_mb`, as (description, total MB): without each drafter, with only
    the target, and with the largest max_context (a multiple of 256) that fits with all models / only the target."""
    target = [m for m in models if m.name == manifest.target] or models[:1]
    others = [m for m in models if m not in target]
    out: list[tuple[str, float]] = []

    def total(subset, context):
        return estimate_memory_mb(manifest, subset, context, ratio, extra_files)["total_mb"]

    for drafter in others:
        rest = [m for m in models if m is not drafter]
        if total(rest, max_context) <= budget_mb:
            out.append((f"without drafter {drafter.name!r}", total(rest, max_context)))
    if len(others) > 1 and total(target, max_context) <= budget_mb:
        out.append(("with only the target", total(target, max_context)))
    current = max(m.context_length if max_context is None else min(max_context, m.context_length) for m in models)
    candidates = [(models, "")] + ([(target, " and only the target")] if others else [])
    for subset, suffix in candidates:
        context = _largest_context(manifest, subset, budget_mb, ratio, extra_files, current)
        if context is not None:
            out.append((f"with max_context {context}{suffix}", total(subset, context)))
            break
    return out


def _describe_estimate(estimate: dict) -> str:
    """'name 1,234 MB (weights 1,000 + KV cache 234 at 4096 tokens); ...' for an estimate dict."""
    parts = [f"{name} {m['total_mb']:,.0f} MB (weights {m['weights_mb']:,.0f} + KV cache {m['kv_cache_mb']:,.0f} at "
             f"{m['context']} tokens)" for name, m in estimate["models"].items()]
    if estimate["extra_files_mb"]:
        parts.append(f"cache files {estimate['extra_files_mb']:,.0f} MB")
    return "; ".join(parts)


def check_memory(manifest: Manifest, models: list[ModelEntry], max_context: int | None,
                 available_mb: float | None = None, profile=None, *, ratio: float | None = None,
                 extra_files=()) -> dict | None:
    """Raise MemoryBudgetError when loading `models` (with `max_context`, see `estimate_memory_mb`) would need more
    than 90% of the available memory; return the estimate otherwise, or None when the available memory is unknown
    (nothing is checked then).

    Available memory: `available_mb`, else $EDGESPEC_MEMORY_MB, else the live figure (`available_memory_mb`).
    Bytes per file byte: `ratio`, else the one measured in `profile` (a DeviceProfile) when plausible, else 1.15.
    The error names the total, the available memory, each model's figures and the smaller configurations that
    would fit (computed with the same estimator)."""
    if available_mb is None:
        available_mb = available_memory_mb()
    if available_mb is None:
        return None
    if ratio is None:
        ratio = _profile_ratio(profile) or DEFAULT_RATIO
    estimate = estimate_memory_mb(manifest, models, max_context, ratio, extra_files)
    budget = BUDGET_SHARE * available_mb
    if estimate["total_mb"] <= budget:
        return estimate
    suggestions = smaller_configurations(manifest, models, max_context, budget, ratio, extra_files)
    if suggestions:
        fits = "; ".join(f"{what} (~{mb:,.0f} MB)" for what, mb in suggestions)
        advice = f"would fit: {fits}"
    else:
        advice = "no smaller configuration of this bundle fits: free memory or use a smaller model"
    names = ", ".join(m.name for m in models)
    message = (f"not enough memory to load {names} from {manifest.root}: needs about {estimate['total_mb']:,.0f} MB "
               f"({_describe_estimate(estimate)}), but only {available_mb:,.0f} MB are available (budget "
               f"{BUDGET_SHARE:.0%}: {budget:,.0f} MB); {advice}. Set {MEMORY_ENV} to override the available memory.")
    raise MemoryBudgetError(message, estimate, available_mb, suggestions)
