"""Machine and process memory (edgespec.devices.memory): psutil when it is installed, the operating system's own
reports (/proc, sysconf, getrusage) without it, and $EDGESPEC_MEMORY_MB over both."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from edgespec.devices import memory
from edgespec.devices.memory import MB

LINUX = Path("/proc/meminfo").is_file() and Path("/proc/self/status").is_file()


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(memory.MEMORY_ENV, raising=False)


@pytest.fixture
def no_psutil(monkeypatch):
    """psutil not installed: `import psutil` raises ImportError."""
    monkeypatch.setitem(sys.modules, "psutil", None)


def fake_psutil(monkeypatch, total: int, available: int, rss: int, fail: bool = False, **process_fields):
    """A psutil module reporting the given bytes (or raising OSError everywhere with `fail`)."""
    module = types.ModuleType("psutil")

    def virtual_memory():
        if fail:
            raise OSError("permission denied: /proc/meminfo")
        return types.SimpleNamespace(total=total, available=available)

    class Process:
        def memory_info(self):
            if fail:
                raise OSError("no such process")
            return types.SimpleNamespace(rss=rss, **process_fields)

    module.virtual_memory, module.Process = virtual_memory, Process
    monkeypatch.setitem(sys.modules, "psutil", module)


def meminfo_mb(field: str) -> float:
    """A /proc/meminfo field in MB, read independently of the module under test."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) / 1024
    raise KeyError(field)


# ------------------------------------------------------------------------------------------------ with psutil
def test_psutil_figures_are_used_when_installed(monkeypatch):
    fake_psutil(monkeypatch, total=16 * 1024 * MB, available=5000 * MB, rss=300 * MB)
    assert memory.total_memory_mb() == 16 * 1024
    assert memory.available_memory_mb() == 5000
    assert memory.process_rss_mb() == 300


def test_real_psutil_agrees_with_the_module():
    psutil = pytest.importorskip("psutil")
    assert memory.total_memory_mb() == round(psutil.virtual_memory().total / MB, 1)
    available = memory.available_memory_mb()
    assert available == pytest.approx(psutil.virtual_memory().available / MB, rel=0.1)  # it moves while we look
    assert memory.process_rss_mb() == pytest.approx(psutil.Process().memory_info().rss / MB, rel=0.1)


def test_a_failing_psutil_falls_back_to_the_system(monkeypatch):
    fake_psutil(monkeypatch, total=1, available=1, rss=1, fail=True)
    if LINUX:
        assert memory.total_memory_mb() == round(meminfo_mb("MemTotal"), 1)
        assert memory.process_rss_mb() > 1
    else:  # the other fallbacks may or may not know: they never raise
        memory.total_memory_mb()
        memory.process_rss_mb()


def test_windows_peak_comes_from_psutil_when_nothing_else_knows(monkeypatch):
    fake_psutil(monkeypatch, total=MB, available=MB, rss=MB, peak_wset=777 * MB)
    monkeypatch.setattr(memory, "_proc_status_kb", lambda field: None)
    monkeypatch.setitem(sys.modules, "resource", None)  # Windows has no resource module
    assert memory.process_peak_rss_mb() == 777
    fake_psutil(monkeypatch, total=MB, available=MB, rss=MB)  # psutil without peak_wset (not Windows): unknown
    assert memory.process_peak_rss_mb() is None


# ------------------------------------------------------------------------------------------------ without psutil
@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_without_psutil_the_proc_files_are_read(no_psutil):
    assert memory._psutil() is None
    assert memory.total_memory_mb() == round(meminfo_mb("MemTotal"), 1)
    assert memory.available_memory_mb() == pytest.approx(meminfo_mb("MemAvailable"), rel=0.1)
    rss = memory.process_rss_mb()
    assert rss is not None and 1 < rss < memory.total_memory_mb()
    peak = memory.process_peak_rss_mb()
    assert peak is not None and peak >= rss - 1


def test_without_psutil_or_proc_sysconf_is_used(no_psutil, monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_mb", lambda field: None)
    pages = {"SC_PHYS_PAGES": 1000, "SC_AVPHYS_PAGES": 250, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(memory.os, "sysconf", lambda name: pages[name])
    assert memory.total_memory_mb() == round(1000 * 4096 / MB, 1)
    assert memory.available_memory_mb() == round(250 * 4096 / MB, 1)


def test_without_any_source_memory_is_unknown(no_psutil, monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_mb", lambda field: None)
    monkeypatch.setattr(memory, "_proc_status_kb", lambda field: None)
    monkeypatch.setattr(memory, "_sysconf_mb", lambda name: None)
    monkeypatch.setattr(memory.platform, "system", lambda: "Windows")
    assert memory.total_memory_mb() is None
    assert memory.available_memory_mb() is None
    assert memory.process_rss_mb() is None


# ------------------------------------------------------------------------------------------------ the override
@pytest.mark.parametrize("value, expected", [("150", 150.0), ("0.5", 0.5), ("1e9", 1e9)])
def test_override_wins_over_psutil(monkeypatch, value, expected):
    fake_psutil(monkeypatch, total=16 * 1024 * MB, available=5000 * MB, rss=MB)
    monkeypatch.setenv(memory.MEMORY_ENV, value)
    assert memory.available_memory_mb() == expected


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "lots"])
def test_override_must_be_a_positive_number(monkeypatch, value):
    monkeypatch.setenv(memory.MEMORY_ENV, value)
    with pytest.raises(ValueError, match=memory.MEMORY_ENV):
        memory.available_memory_mb()
