"""Machine info and memory: CPU model, cores, load average, versions, and the process's peak RSS."""

from __future__ import annotations

import os
import platform

from ..devices.memory import process_peak_rss_mb as peak_rss_mb, process_rss_mb as current_rss_mb

__all__ = ["current_rss_mb", "load_average", "machine_info", "peak_rss_mb", "reset_peak_rss"]


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU model, core counts, memory and the versions of everything measured (without importing torch)."""
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "hardware", "cpu model") and ":" in line:
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": cpu or platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
            "physical_cores": None, "memory_gb": None, "platform": platform.platform(),
            "python": platform.python_version(), "load_average": load_average()}
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info["versions"] = {name: _version(dist) for name, dist in (
        ("edgespec", "edgespec"), ("onnxruntime", "onnxruntime"), ("numpy", "numpy"), ("tokenizers", "tokenizers"),
        ("torch", "torch"), ("transformers", "transformers"), ("llama_cpp", "llama_cpp_python"))}
    return info


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (other work on the machine skews every rate; compare with the thread count)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def reset_peak_rss() -> bool:
    """Restart the peak RSS count (Linux: /proc/self/clear_refs); False when it cannot (in-process runs only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
