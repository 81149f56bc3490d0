"""The package's layering, read with `ast` (tests/import_arrows.py): runtimes/ is a leaf, the drafters never reach
back into the engine, and no module imports another module's private names."""

from __future__ import annotations

import import_arrows as ia

MODULES = ia.modules()
EDGES = ia.imports(MODULES)


def test_the_scanner_sees_the_package():
    assert {"edgespec.engine", "edgespec.drafters.factory", "edgespec.bench.run", "edgespec.runtimes.files",
            "edgespec.export.bundle", "edgespec.devices.profile"} <= set(MODULES)
    assert ("edgespec.engine", "edgespec.drafters.factory", None) in {(a, b, None) for a, b, _ in EDGES}


def test_runtimes_is_a_leaf():
    outside = sorted({f"{a} -> {b}" for a, b, _ in EDGES
                      if ia.part_of(a) == "edgespec.runtimes" and ia.part_of(b) != "edgespec.runtimes"})
    assert outside == []


def test_drafters_and_the_runtime_never_import_the_engine_the_bench_or_the_server():
    banned = ("edgespec.engine", "edgespec.server", "edgespec.cli")
    wrong = sorted({f"{a} -> {b}" for a, b, _ in EDGES
                    if ia.part_of(a) in ("edgespec.drafters", "edgespec.runtimes", "edgespec.devices")
                    and (b in banned or ia.part_of(b) == "edgespec.bench")})
    assert wrong == []


def test_no_private_names_are_imported_from_another_module():
    assert ia.private_imports(EDGES) == []


def test_private_imports_are_detected(tmp_path):
    (tmp_path / "edgespec").mkdir()
    for folder in ("export", "runtimes", "devices"):
        (tmp_path / folder).mkdir()
    (tmp_path / "runtimes" / "manifest.py").write_text("def _hidden():\n    pass\n")
    (tmp_path / "export" / "bundle.py").write_text("from ..runtimes.manifest import _hidden\n")
    found = ia.modules(tmp_path)
    assert ia.private_imports(ia.imports(found)) == [
        "edgespec.export.bundle imports _hidden from edgespec.runtimes.manifest"]
