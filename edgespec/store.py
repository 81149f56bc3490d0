"""Models in one step: a managed cache of exported bundles, by model name.

`edgespec pull NAME` fetches a model (a short name of edgespec.export.sources.MODELS, or a Hugging Face Hub id
``hf:owner/repo[/file.gguf]``) and exports it, with its default drafters (:data:`DEFAULT_DRAFTERS`), into
``<bundles>/<name>``; `edgespec run NAME` / `edgespec chat NAME` find it there (:func:`ensure_bundle`, pulling it on
first use); `edgespec models` lists what is downloaded and exported; `edgespec rm NAME` deletes it.

Where: ``$EDGESPEC_BUNDLES``, else ``$EDGESPEC_CACHE/bundles``, else ``~/.cache/edgespec/bundles`` (the GGUF files
stay in the sources' cache, ``$EDGESPEC_CACHE`` or ``~/.cache/edgespec/models``). A pull exports into a temporary
folder beside its destination and renames it into place once the manifest is written (export_bundle), under a
per-name lock file, so an interrupted pull never leaves a folder that looks like a finished bundle, and two pulls
of one name export it once.

The export runs as `edgespec export NAME -o <bundles>/<name> --drafter D ...` does with its defaults, except that the
torch parity check is off unless asked for (``parity=True``, `--parity`): the exporter then needs no torch (GGUF
byte-level tokenizers are built from the file's own vocabulary).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = ["DEFAULT_DRAFTERS", "MAX_NAME_CHARS", "MAX_PULL_DRAFTERS", "StoreError", "ModelStatus", "bundles_dir",
           "bundle_name_for", "validate_name", "is_bundle", "pull", "ensure_bundle", "list_models", "remove",
           "register_cli"]

# Drafters exported with a short-named target when `pull` is given none: candidates for the default drafter ("auto",
# edgespec/drafters/choice.py), which stages one behind the n-grams only where the device profile says it is cheap
# enough. On the 2-core Xeon of the README (2026-12-06) SmolLM2 costs 17-19% of a 1.5B step and loses (0.94x), so
# "auto" keeps the n-grams there; a drafter costs export time and 141 MB of disk until a device makes it pay.
DEFAULT_DRAFTERS: dict[str, tuple[str, ...]] = {
    "qwen2.5-coder-1.5b": ("smollm2-135m",),  # cross-vocabulary (`--drafter cross`): 98 MB GGUF, ~30 s export
}
MAX_NAME_CHARS = 128  # a bundle name in the store (a folder name)
MAX_PULL_DRAFTERS = 16  # as `edgespec export --drafter`
MAX_SOURCE_CHARS = 400  # a model name or hf: id as typed (sources.MAX_HUB_ID_CHARS)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MANIFEST = "manifest.json"

Log = Callable[[str], None]


class StoreError(ValueError):
    """A store operation cannot be done (an invalid or unknown name, nothing to remove); the message says why."""


# ------------------------------------------------------------------------------------------------------ names
def bundles_dir() -> Path:
    """``$EDGESPEC_BUNDLES``, else ``$EDGESPEC_CACHE/bundles``, else ``~/.cache/edgespec/bundles`` (not created)."""
    env = os.environ.get("EDGESPEC_BUNDLES")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("EDGESPEC_CACHE")
    if cache:
        return Path(cache).expanduser() / "bundles"
    return Path.home() / ".cache" / "edgespec" / "bundles"


def validate_name(name: str) -> str:
    """`name` when it is a valid store name: 1 to MAX_NAME_CHARS letters, digits, '.', '_', '-', starting with a
    letter or digit, no '..' (so never a path); StoreError otherwise."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS:
        size = len(name) if isinstance(name, str) else type(name).__name__
        raise StoreError(f"a model name has 1 to {MAX_NAME_CHARS} characters, got {size}")
    if not _NAME.fullmatch(name) or ".." in name:
        raise StoreError(f"invalid model name {name[:60]!r}: letters, digits, '.', '_' and '-' only, starting with a "
                         f"letter or digit, no '..' and no path separators")
    return name


def _sources():
    """edgespec.export.sources (standard library only: importing it pulls in no exporter dependency)."""
    from .export import sources

    return sources


def bundle_name_for(source: str) -> str:
    """The store name of a pullable source: a short name is its own; ``hf:owner/repo[@rev][/dir/file.gguf]`` becomes
    ``owner--repo[--at-rev][--dir--file]`` (the Hub forbids '--' in owner and repo names), with a hash of the id
    appended when characters had to be replaced or it was cut to MAX_NAME_CHARS. StoreError for anything else."""
    sources = _sources()
    if len(source) > MAX_SOURCE_CHARS:
        raise StoreError(f"a model name has at most {MAX_SOURCE_CHARS} characters, got {len(source)}")
    if source in sources.MODELS:
        return source
    if not sources.is_hub_id(source):
        raise StoreError(f"unknown model {source[:60]!r}; known models: {', '.join(sources.known_names())} "
                         f"(or a Hugging Face Hub id {sources.HUB_PREFIX}owner/repo[/file.gguf])")
    try:
        ref = sources.parse_hub_id(source)
    except sources.SourceError as exc:
        raise StoreError(str(exc)) from None
    parts = ref.repo_id.split("/")
    if ref.revision:
        parts.append(f"at-{ref.revision}")
    if ref.filename:
        parts.append(ref.filename[:-len(".gguf")].replace("/", "--"))
    raw = "--".join(parts)
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]", "-", raw))
    if name != raw or len(name) > MAX_NAME_CHARS:  # respelled or shortened: a hash of the id keeps names apart
        import hashlib

        name = f"{name[:MAX_NAME_CHARS - 17]}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"
    return validate_name(name)


def is_bundle(folder: Path) -> bool:
    """True when `folder` is a folder holding a manifest.json regular file (a finished bundle)."""
    return folder.is_dir() and (folder / MANIFEST).is_file()


# ------------------------------------------------------------------------------------------------------ pull
@contextlib.contextmanager
def _name_lock(root: Path, name: str) -> Iterator[None]:
    """Hold ``<root>/.<name>.lock`` (an exclusive flock) for the block: one pull of a name at a time; a second one
    waits and then finds the bundle done. No lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_partials(root: Path, name: str) -> None:
    """Delete export leftovers of `name` (the ``.<name>.XXXXXXXX.partial`` folders, tempfile.mkdtemp's 8 random
    characters, of a killed export; never another name's); called under its lock."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.partial")
    for leftover in root.iterdir():
        if pattern.fullmatch(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _drafter_sources(name: str, drafters: Sequence[str] | None) -> list[str]:
    """The drafters to export with `name`: `drafters` as given (each a known name or hf: id, at most
    MAX_PULL_DRAFTERS), or DEFAULT_DRAFTERS' entry when None."""
    chosen = list(DEFAULT_DRAFTERS.get(name, ()) if drafters is None else drafters)
    if len(chosen) > MAX_PULL_DRAFTERS:
        raise StoreError(f"at most {MAX_PULL_DRAFTERS} drafters, got {len(chosen)}")
    for drafter in chosen:
        bundle_name_for(drafter)  # a known name or a valid hf: id
    return chosen


def pull(name: str, drafters: Sequence[str] | None = None, force: bool = False, *, parity: bool = False,
         threads: int | None = None, log: Log | None = None, progress=None) -> Path:
    """Fetch model `name` (short name or hf: id) and export it, with `drafters` (default: DEFAULT_DRAFTERS[name];
    ``()`` for none), into the store; return the bundle folder.

    An existing bundle is kept (returned as is) unless `force`. The export is `edgespec export`'s with its defaults
    (GGUF blocks kept, accuracy level 4, fast drafter kernels), `parity` off by default (no torch needed), written
    to a temporary folder and renamed into place. `log` gets one-line messages, `progress` the exporter's steps
    (edgespec.export.progress). Raises StoreError for a bad name, SourceError / ExportError when fetching or
    exporting fails.
    """
    store_name = bundle_name_for(name)
    chosen = _drafter_sources(name, drafters)
    root = bundles_dir()
    dest = root / store_name
    root.mkdir(parents=True, exist_ok=True)
    with _name_lock(root, store_name):
        if is_bundle(dest) and not force:
            if log is not None:
                log(f"{name}: already exported at {dest} (pull --force to export again)")
            return dest
        _remove_partials(root, store_name)
        from .export.bundle import ModelRequest, export_bundle

        target = ModelRequest(name, "target")
        requests = [ModelRequest(d, "drafter") for d in chosen]
        export_bundle(target, dest, requests, parity=parity, threads=threads, overwrite=True,
                      log=log or (lambda message: None), progress=progress)
    return dest


# ------------------------------------------------------------------------------------------------------ ensure
def _looks_like_path(text: str) -> bool:
    return os.sep in text or (os.altsep is not None and os.altsep in text) or text.startswith((".", "~"))


def ensure_bundle(name_or_path: str | os.PathLike, *, log: Log | None = None, progress=None,
                  announce: bool = True) -> Path:
    """The bundle folder for `name_or_path`, pulling it first when it is a known model not exported yet.

    In order: a folder holding a manifest is returned as is; a known short name or hf: id is found in the store or
    pulled (with its default drafters; progress on stderr when `announce` and no `progress` is given); any other
    valid name of a bundle in the store is returned. StoreError otherwise (a folder without manifest, an unknown
    name: the message lists the known models).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if is_bundle(path):
        return path
    sources = _sources()
    pullable = text in sources.MODELS or sources.is_hub_id(text)
    if path.exists() and not pullable:
        raise StoreError(f"{text} is not a bundle folder (no {MANIFEST} in it)")
    if not pullable and _looks_like_path(text):
        raise StoreError(f"{text}: no such bundle folder")
    if pullable:
        dest = bundles_dir() / bundle_name_for(text)
        if is_bundle(dest):
            return dest
        if progress is None and announce:
            return _pull_with_display(text, None, False, parity=False, first_use=True)
        return pull(text, log=log, progress=progress)
    if len(text) <= MAX_NAME_CHARS and _NAME.fullmatch(text) and ".." not in text and is_bundle(bundles_dir() / text):
        return bundles_dir() / text
    raise StoreError(f"unknown model {text[:60]!r}: not a bundle folder, a bundle in {bundles_dir()}, or a known "
                     f"model ({', '.join(sources.known_names())}, or {sources.HUB_PREFIX}owner/repo[/file.gguf])")


def _pull_with_display(name: str, drafters, force: bool, *, parity: bool, first_use: bool = False) -> Path:
    """`pull` with the exporter's progress display and messages on stderr (as `edgespec export` shows them)."""
    from rich.console import Console

    from .export.progress import export_display

    console = Console(stderr=True, highlight=False)

    def log(message: str) -> None:  # verbatim: "[name]" is a model's name, not markup
        console.print(message, markup=False, emoji=False, soft_wrap=True)

    if first_use:
        log(f"{name} is not exported yet: fetching and exporting it once into {bundles_dir()}")
    with export_display(console) as progress:
        return pull(name, drafters, force, parity=parity, log=log, progress=progress)


# ------------------------------------------------------------------------------------------------------ list
@dataclass(frozen=True)
class ModelStatus:
    """One row of `edgespec models`: a known model (with its description, GGUF size, bundle size) or another bundle
    of the store. Sizes in bytes; None when absent. `gguf_complete` is False for a GGUF of the wrong size."""

    name: str
    description: str
    known: bool
    downloaded_bytes: int | None
    gguf_complete: bool
    exported_bytes: int | None
    bundle: str | None


def _tree_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (links not followed)."""
    total = 0
    for base, _dirs, files in os.walk(folder):
        for file in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(base, file))
                if not os.path.islink(os.path.join(base, file)):
                    total += st.st_size
    return total


def _bundle_status(folder: Path) -> tuple[int | None, str | None]:
    return (_tree_bytes(folder), str(folder)) if is_bundle(folder) else (None, None)


def list_models() -> list[ModelStatus]:
    """The known models (downloaded GGUF and exported bundle, if any), then every other bundle in the store."""
    sources = _sources()
    cache, root = sources.default_cache_dir(), bundles_dir()
    rows = []
    for name in sources.known_names():
        src = sources.MODELS[name]
        gguf = cache / f"{name}.gguf"
        size = gguf.stat().st_size if gguf.is_file() else None
        exported, bundle = _bundle_status(root / name)
        rows.append(ModelStatus(name, src.description, True, size, size == src.size, exported, bundle))
    others = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.name not in sources.MODELS) \
        if root.is_dir() else []
    for folder in others:
        exported, bundle = _bundle_status(folder)
        if bundle is not None:
            rows.append(ModelStatus(folder.name, _bundle_description(folder), False, None, False, exported, bundle))
    return rows


def _bundle_description(folder: Path) -> str:
    """'target + drafters' of a bundle's manifest, or '(unreadable manifest)'."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        models = manifest["models"]
        target = manifest["target"]
        origin = models[target].get("source", {}).get("origin", "")
        drafters = [n for n in models if n != target]
        return f"{target}" + (f" + {', '.join(drafters)}" if drafters else "") + (f" ({origin})" if origin else "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "(unreadable manifest)"


# ------------------------------------------------------------------------------------------------------ remove
def remove(name: str, *, gguf: bool = False) -> list[Path]:
    """Delete the store's bundle `name` (and, with `gguf`, a known model's downloaded GGUF and its sidecar); return
    what was deleted. A known name or hf: id may be given as pulled. StoreError for an invalid name or when there is
    nothing to delete (the message lists what the store holds)."""
    sources = _sources()
    store_name = bundle_name_for(name) if (name in sources.MODELS or sources.is_hub_id(name)) else validate_name(name)
    root = bundles_dir()
    removed = []
    dest = root / store_name
    if dest.is_dir() and not dest.is_symlink():
        root.mkdir(parents=True, exist_ok=True)
        with _name_lock(root, store_name):
            doomed = Path(tempfile.mkdtemp(prefix=f".{store_name}.", suffix=".removing", dir=root))
            os.rename(dest, doomed / store_name)  # gone from its name in one step, then deleted
            shutil.rmtree(doomed, ignore_errors=True)
            _remove_partials(root, store_name)
        removed.append(dest)
    if gguf and store_name in sources.MODELS:
        for path in (sources.default_cache_dir() / f"{store_name}.gguf",
                     sources.default_cache_dir() / f"{store_name}.gguf.json"):
            if path.is_file():
                path.unlink()
                removed.append(path)
    if not removed:
        held = [row.name for row in list_models() if row.bundle or (gguf and row.downloaded_bytes)]
        what = "bundle or GGUF" if gguf else "bundle"
        raise StoreError(f"no {what} of {name!r} to remove; the store holds: {', '.join(held) or 'nothing'}"
                         + ("" if gguf or store_name not in sources.MODELS else " (--gguf deletes a downloaded GGUF)"))
    return removed


# ------------------------------------------------------------------------------------------------------ CLI
def _human(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}" if count < 10 * size else f"{count / size:.0f} {unit}"
    return f"{count} B"


def models_table(rows: Sequence[ModelStatus]) -> str:
    """The `edgespec models` table: name, downloaded (GGUF) size, exported (bundle) size, description."""
    lines = [f"{'name':24s} {'downloaded':>11s} {'exported':>9s}  description"]
    for row in rows:
        downloaded = _human(row.downloaded_bytes) + ("" if row.gguf_complete or row.downloaded_bytes is None else "*")
        lines.append(f"{row.name:24s} {downloaded:>11s} {_human(row.exported_bytes):>9s}  {row.description}")
    if any(r.downloaded_bytes is not None and not r.gguf_complete and r.known for r in rows):
        lines.append("* incomplete or wrong size: fetched again on the next pull")
    return "\n".join(lines)


def cmd_pull(args) -> int:
    """`edgespec pull NAME [--drafter D ...] [--no-drafters] [--force] [--parity]`: print the bundle folder."""
    drafters = () if args.no_drafters else args.drafter
    print(_pull_with_display(args.name, drafters, args.force, parity=args.parity))
    return 0


def cmd_models(args) -> int:
    """`edgespec models [--json] [--fetch NAME]`: the table of models, or fetch one GGUF and print its path."""
    if args.fetch:
        print(_sources().resolve(args.fetch).path)
        return 0
    rows = list_models()
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else models_table(rows))
    return 0


def cmd_rm(args) -> int:
    """`edgespec rm NAME [--gguf]`: delete a bundle of the store (and the downloaded GGUF)."""
    for path in remove(args.name, gguf=args.gguf):
        print(f"removed {path}", file=sys.stderr)
    return 0


def register_cli(sub) -> None:
    """Add `pull`, `models` and `rm` to the `edgespec` subcommands (`sub`: argparse's subparsers)."""
    from .cliargs import at_most, bounded_text

    name_type = bounded_text(MAX_SOURCE_CHARS)
    p = sub.add_parser("pull", help="fetch a model and export it into the model store (once)",
                       description=f"Fetch model NAME and export it (with its default drafters) into {bundles_dir()} "
                                   f"($EDGESPEC_BUNDLES); `edgespec run NAME` then uses it.")
    p.add_argument("name", type=name_type, metavar="NAME",
                   help="a known model (`edgespec models`) or a Hugging Face Hub id hf:owner/repo[/file.gguf]")
    p.add_argument("--drafter", action=at_most(MAX_PULL_DRAFTERS), type=name_type, metavar="D",
                   help=f"drafter model to export with it (repeatable, at most {MAX_PULL_DRAFTERS}; default: "
                        f"the model's default drafters)")
    p.add_argument("--no-drafters", action="store_true", help="export no drafter model")
    p.add_argument("--force", action="store_true", help="export again even if the bundle exists")
    p.add_argument("--parity", action="store_true",
                   help="check the export against the torch reference (needs torch: pip install 'edgespec[export]')")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list the known models: downloaded, exported; or fetch one GGUF")
    p.add_argument("--fetch", type=name_type, metavar="NAME", help="download NAME's GGUF only and print its path")
    p.add_argument("--json", action="store_true", help="the list as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("rm", help="delete a model's bundle from the store")
    p.add_argument("name", type=name_type, metavar="NAME", help="a model name as pulled (see `edgespec models`)")
    p.add_argument("--gguf", action="store_true", help="also delete the downloaded GGUF file of a known model")
    p.set_defaults(func=cmd_rm)
