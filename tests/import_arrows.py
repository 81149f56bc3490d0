"""Import arrows between edgespec's parts, read with `ast` (nothing is executed): `python tests/import_arrows.py`.

Prints each module of the package with its line count, the number of module imports from one part to another
(core `edgespec`, `edgespec.drafters`, `edgespec.bench`, `edgespec.export`, `edgespec.runtimes`,
`edgespec.devices`), and every import of a private name from another module. tests/test_structure.py checks the
layering with the same functions.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"edgespec": "edgespec", "export": "edgespec.export", "runtimes": "edgespec.runtimes",
           "devices": "edgespec.devices"}  # pyproject's package-dir mapping
SUBPARTS = ("export", "runtimes", "devices", "drafters", "bench")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (the mapped folders included)."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package] + list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def part_of(module: str) -> str:
    """The part a module belongs to: "edgespec.drafters", ..., or "edgespec" for the core."""
    names = module.split(".")
    return f"edgespec.{names[1]}" if len(names) > 1 and names[1] in SUBPARTS else "edgespec"


def _targets(module: str, node: ast.AST, is_package: bool) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for one import statement, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [(prefix, alias.name) for alias in node.names]


def imports(found: dict[str, Path]) -> list[tuple[str, str, str | None]]:
    """(importer, imported module of the package, name) for every import inside the package."""
    edges = []
    for module, path in found.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, name in _targets(module, node, path.name == "__init__.py"):
                if name is not None and f"{target}.{name}" in found:  # `from package import module`
                    target, name = f"{target}.{name}", None
                if target in found and target != module:
                    edges.append((module, target, name))
    return edges


def part_arrows(edges) -> collections.Counter:
    """(from part, to part) -> number of module-to-module imports."""
    pairs = {(a, b) for a, b, _ in edges}
    return collections.Counter((part_of(a), part_of(b)) for a, b in pairs if part_of(a) != part_of(b))


def private_imports(edges) -> list[str]:
    """Imports of a private name (one leading underscore) from another module."""
    return sorted({f"{a} imports {name} from {b}" for a, b, name in edges
                   if name and name.startswith("_") and not name.startswith("__")})


def main(root: Path = ROOT) -> None:
    """Print the module list, the arrows between parts and the private imports."""
    found = modules(root)
    edges = imports(found)
    print("## modules (lines)")
    for module, path in found.items():
        print(f"{module:44s} {len(path.read_text(encoding='utf-8').splitlines()):5d}")
    print("\n## arrows between parts (module imports)")
    for (a, b), n in sorted(part_arrows(edges).items()):
        print(f"{a} -> {b}: {n}")
    print("\n## private names imported from another module")
    for line in private_imports(edges) or ["(none)"]:
        print(line)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
