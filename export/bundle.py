"""`edgespec export`: sources -> ONNX graphs + tokenizers + manifest, written atomically as one bundle folder.

Each model is built into a temporary folder beside the destination, checked against the torch reference
(teacher-forced top-1 agreement and perplexity on a fixed text), and only then is the manifest written and the
folder renamed into place. A failed or interrupted export never leaves a half-written bundle.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import errno
import gc
import glob
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..runtimes.files import write_json_atomic
from ..runtimes.manifest import FORMAT, SCHEMA_VERSION, load_manifest, manifest_from_dict, model_entry
from . import reference
from .graph import BuildOptions, build_decoder
from .progress import ExportProgress, PhaseReporter
from .sources import ResolvedSource, resolve
from .weights import GGUFWeights, HFWeights

Log = Callable[[str], None]

# Export fails when the ONNX graph agrees with its reference less often than this (teacher-forced top-1).
MIN_AGREEMENT = {"gguf": 0.97, "fp32": 0.97, "int8": 0.80, "int4": 0.40}
# At accuracy level 4 (int8 activations; what fast drafters use); lossy int8/int4 weights keep their own lower bar.
MIN_AGREEMENT_INT8_ACTIVATIONS = 0.85
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>", "</s>", "<|end_of_text|>", "<|eot_id|>")
# Rows of the reduced draft LM head of a self-speculative export (fewer than the vocabulary, else no draft head).
DRAFT_HEAD_SIZE = 32768


class ExportError(RuntimeError):
    """An export step failed (the message names the model and the step)."""


@dataclass
class ModelRequest:
    """One model to put in the bundle."""

    source: str | ResolvedSource  # short name, .gguf path or HF folder (or one already resolved)
    role: str = "target"
    name: str | None = None
    quant: str | None = None  # None: "gguf" for GGUF sources, "fp32" for HF folders


@dataclass
class ExportReport:
    """What an export did: per-model timings and accuracy."""

    bundle: Path
    models: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def _model_name(source: ResolvedSource, requested: str | None) -> str:
    name = requested or source.name
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-.")
    if not safe:
        raise ExportError(f"cannot derive a folder name from {name!r}; pass an explicit name")
    return safe


def _special_tokens(weights, tokenizer) -> dict:
    """bos / eos / pad ids and whether to add BOS, from GGUF metadata or the HF config."""
    if isinstance(weights, GGUFWeights):
        f = weights.fields
        bos, eos, pad = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id"), f.get(
            "tokenizer.ggml.padding_token_id")
        add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False))
    else:
        c = weights.config
        bos, eos, pad = c.get("bos_token_id"), c.get("eos_token_id"), c.get("pad_token_id")
        add_bos = False
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for text in _END_TOKENS:  # chat models end turns with these; generation stops on any of them
        tid = tokenizer.token_to_id(text)
        if tid is not None and tid not in eos_ids:
            eos_ids.append(tid)
    return {"bos": None if bos is None else int(bos), "eos": [int(e) for e in eos_ids],
            "pad": None if pad is None else int(pad), "add_bos": add_bos}


def _open_weights(source: ResolvedSource, quant: str):
    return GGUFWeights(source.path, quant) if source.kind == "gguf" else HFWeights.from_folder(source.path, quant)


def _parity_ids(tokenizer, special: dict) -> np.ndarray:
    """Token ids of the fixed parity text (at most 256, BOS first when the model wants one)."""
    ids = tokenizer.encode(reference.REFERENCE_TEXT, add_special_tokens=False).ids[:256]
    if special["add_bos"] and special["bos"] is not None:
        ids = [special["bos"]] + ids[:255]
    return np.asarray(ids, dtype=np.int64)


def draft_head_token_ids(tokenizer, vocab_size: int, special: dict, size: int = DRAFT_HEAD_SIZE) -> np.ndarray | None:
    """Token ids of the reduced draft head: every special / added token plus the lowest ordinary ids, `size` in all.

    With no corpus statistics at hand, BPE ids are the proxy for frequency (byte tokens first, then merges in the
    order they were learnt, i.e. roughly by frequency). Returns sorted int64 ids, or None when `size` would cover
    the whole usable vocabulary (the draft head would then be the full head again).
    """
    usable = min(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
    if size <= 0 or size >= usable:
        return None
    added = {int(i) for i in tokenizer.get_added_tokens_decoder()}
    specials = {int(t) for t in [*special.get("eos", []), special.get("bos"), special.get("pad")] if t is not None}
    chosen = {t for t in added | specials if 0 <= t < vocab_size}
    for t in range(usable):
        if len(chosen) >= size:
            break
        chosen.add(t)
    return np.array(sorted(chosen), dtype=np.int64)


def _reference_stats(source: ResolvedSource, ids: np.ndarray, log: Log,
                     steps: PhaseReporter) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced argmax and next-token NLL of the torch reference (run first: it is the memory peak)."""
    log("  torch reference (fp32, same weights) on the parity text")
    steps.phase("reference load", unit="tensors")
    model = reference.load_reference_model(source.kind, source.path, steps.counter("tensors"))
    steps.phase("reference run", detail=f"reference run on {len(ids)} tokens")
    stats = reference.teacher_forced_stats(reference.reference_logits(model, ids), ids)
    reference.free(model)
    return stats


def _accuracy(entry, ids: np.ndarray, ref_stats, threads: int, steps: PhaseReporter) -> dict:
    """Teacher-forced top-1 agreement and perplexity of the ONNX graph against the torch reference (two steps
    reported: the graph loaded, the parity text run)."""
    from ..runtimes.runner import ModelRunner

    steps.phase("parity check", 2, "steps", "parity check: load graph")
    runner = ModelRunner(entry, threads=threads, max_context=len(ids) + 8)
    steps.advance(1, 2, "steps", f"parity check: run {len(ids)} tokens")
    onnx_top1, onnx_nll = reference.teacher_forced_stats(runner.forward(ids), ids)
    steps.advance(2, 2, "steps", "parity check")
    del runner
    gc.collect()
    ref_top1, ref_nll = ref_stats
    return {
        "text_tokens": int(len(ids)),
        "top1_agreement": round(float((onnx_top1 == ref_top1).mean()), 4),
        "perplexity": round(float(np.exp(onnx_nll.mean())), 4),
        "reference_perplexity": round(float(np.exp(ref_nll.mean())), 4),
        "max_nll_difference": round(float(np.abs(onnx_nll - ref_nll).max()), 5),
    }


def _request_label(req: ModelRequest) -> str:
    """What the progress display calls a model before its source is resolved: its name when given or known,
    else the last part of the path (without .gguf), the model name it will most likely get."""
    if req.name:
        return req.name
    if isinstance(req.source, ResolvedSource):
        return req.source.name
    text = os.fspath(req.source).rstrip("/\\")
    base = re.split(r"[/\\]", text)[-1] or text
    return base[:-5] if base.lower().endswith(".gguf") else base


def _export_model(req: ModelRequest, root: Path, opts: BuildOptions, threads: int, parity: bool,
                  log: Log, cache_dir: str | None, progress: ExportProgress | None = None,
                  self_speculative: bool = False, draft_head_size: int = DRAFT_HEAD_SIZE,
                  folder: str | None = None) -> tuple[str, dict, dict]:
    """Export one model into `root/<folder>` (default: its name); returns its name, manifest entry and stats.
    Its phases go to `progress` (see export/progress.py)."""
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    steps = PhaseReporter(progress, _request_label(req))
    source = req.source if isinstance(req.source, ResolvedSource) else resolve(req.source, cache_dir,
                                                                                progress=steps.source_counter())
    name = _model_name(source, req.name)
    folder = folder or name
    quant = req.quant or ("gguf" if source.kind == "gguf" else "fp32")
    log(f"[{name}] {source.kind} source {source.path} -> quantization {quant}")
    steps.phase("read", detail=f"read {'GGUF' if source.kind == 'gguf' else 'Hugging Face'} weights")
    weights = _open_weights(source, quant)
    spec = weights.spec
    model_dir = root / folder
    model_dir.mkdir(parents=True)
    tokenizer_file = model_dir / "tokenizer.json"
    steps.phase("tokenizer")
    reference.save_tokenizer_json(source.kind, source.path, tokenizer_file,
                                  gguf_fields=weights.fields if isinstance(weights, GGUFWeights) else None)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    if tokenizer.get_vocab_size() > spec.vocab_size:
        raise ExportError(f"[{name}] tokenizer has {tokenizer.get_vocab_size()} tokens, model vocabulary {spec.vocab_size}")
    special = _special_tokens(weights, tokenizer)
    if isinstance(weights, GGUFWeights):
        template = weights.fields.get("tokenizer.chat_template")
    else:
        template = reference.hf_chat_template(source.path)
    tensor_types = dict(weights.tensor_types)
    if parity:  # the torch reference is the memory peak: run it with nothing else resident
        del weights
        reference.release_memory()
        ids = _parity_ids(tokenizer, special)
        ref_stats = _reference_stats(source, ids, log, steps)
        reference.release_memory()
        weights = _open_weights(source, quant)
    self_spec = None
    if self_speculative:
        draft_ids = draft_head_token_ids(tokenizer, spec.vocab_size, special, draft_head_size)
        opts = dataclasses.replace(opts, layer_gates=True, draft_head_tokens=draft_ids)
        self_spec = {"layer_gates": True, "draft_head_tokens": None}
        if draft_ids is not None:
            np.save(model_dir / "draft_head_tokens.npy", draft_ids, allow_pickle=False)
            self_spec["draft_head_tokens"] = f"{folder}/draft_head_tokens.npy"
        log(f"[{name}] self-speculative graph: layer gates, draft head "
            f"{'none' if draft_ids is None else f'{len(draft_ids)} tokens'}")
    log(f"[{name}] building graph: {spec.architecture}, {spec.num_layers} layers, vocabulary {spec.vocab_size}")
    t_graph = time.perf_counter()
    build_decoder(spec, weights, str(model_dir), opts, progress=steps.counter("layers"))
    graph_seconds = time.perf_counter() - t_graph
    d = {
        "role": req.role,
        "architecture": spec.architecture,
        "source": source.to_manifest(),
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "context_length": spec.context_length,
        "sliding_window": spec.sliding_window,
        "layer_types": list(spec.layer_types),
        "special_tokens": special,
        "chat_template": template,
        "quantization": {"mode": quant, "accuracy_level": opts.accuracy_level, "eight_bit": opts.eight_bit, "fused_ops": opts.fused_ops,
                         "tensor_types": tensor_types, "t_invariant": True},
        "graph": {"file": f"{folder}/model.onnx", "data": f"{folder}/model.onnx.data", "kv_dtype": "float32"},
        "tokenizer": f"{folder}/tokenizer.json",
        "config": spec.to_dict(),
    }
    if self_spec is not None:
        d["self_speculation"] = self_spec
    del weights
    reference.release_memory()
    if parity:
        entry = model_entry(root, name, d, check_files=True)
        acc = _accuracy(entry, ids, ref_stats, threads, steps)
        d["accuracy"] = acc
        log(f"[{name}] top-1 agreement {acc['top1_agreement']:.2%}, perplexity {acc['perplexity']:.3f} "
            f"(reference {acc['reference_perplexity']:.3f})")
        minimum = MIN_AGREEMENT[quant] if opts.accuracy_level == 0 else min(MIN_AGREEMENT[quant],
                                                                            MIN_AGREEMENT_INT8_ACTIVATIONS)
        if acc["top1_agreement"] < minimum:
            raise ExportError(f"[{name}] parity check failed: top-1 agreement {acc['top1_agreement']:.2%} < "
                              f"{minimum:.0%} for {quant} at accuracy level {opts.accuracy_level}")
    stats = {"seconds": round(time.perf_counter() - t0, 1), "graph_seconds": round(graph_seconds, 1),
             "graph_bytes": sum(f.stat().st_size for f in model_dir.iterdir())}
    steps.finish()
    return name, d, stats


def export_bundle(target: str | ModelRequest, out_dir: str | os.PathLike, drafters=(), *, quant: str | None = None,
                  name: str | None = None,
                  accuracy_level: int = 4, eight_bit: str = "nbits", fused_ops: bool = True, threads: int | None = None, parity: bool = True,
                  cache_dir: str | None = None, overwrite: bool = False, log: Log = print,
                  progress: ExportProgress | None = None, self_speculative: bool = False,
                  draft_head_size: int = DRAFT_HEAD_SIZE, drafter_kernels: str = "fast") -> ExportReport:
    """Export `target` (and `drafters`) into the bundle folder `out_dir`; see the module docstring.

    `progress` (optional) is called with an `ExportStep` as each model moves through its phases (download, read,
    tokenizer, reference, build graph, save, parity check, done; see export/progress.py); `log` gets the
    one-line messages.

    `drafter_kernels="fast"` (default) builds drafters with int8-activation MatMulNBits (accuracy level 4, 8-bit
    blocks as 8-bit MatMulNBits): a drafter's rounding only moves acceptance, never the output, and these kernels
    are 2-3x faster on CPUs; "exact" gives drafters the target's settings.

    `self_speculative` builds the target with layer gates (any subset of its layers can run, sharing the weights)
    and, when `draft_head_size` is below its vocabulary, a reduced draft LM head over that many token ids.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if not out.exists():
        _restore_moved_aside(out)  # an earlier export over `out` was interrupted between its two renames
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True (--force) to replace it")
    requests = [target if isinstance(target, ModelRequest) else ModelRequest(target, "target", name=name, quant=quant)]
    requests += [d if isinstance(d, ModelRequest) else ModelRequest(d, "drafter", quant=quant) for d in drafters]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    report = ExportReport(bundle=out)
    try:
        models, target_name = {}, None
        if drafter_kernels not in ("fast", "exact"):
            raise ExportError(f"drafter_kernels must be 'fast' or 'exact', got {drafter_kernels!r}")
        target_opts = BuildOptions(accuracy_level=accuracy_level, eight_bit=eight_bit, fused_ops=fused_ops)
        drafter_opts = (BuildOptions(accuracy_level=4, eight_bit="nbits", fused_ops=fused_ops)
                        if drafter_kernels == "fast" else target_opts)
        for req in requests:
            opts = target_opts if req.role == "target" else drafter_opts
            name, d, stats = _export_model(req, tmp, opts, threads or 2, parity, log, cache_dir, progress,
                                           self_speculative=self_speculative and req.role == "target",
                                           draft_head_size=draft_head_size)
            if name in models:
                raise ExportError(f"two models would share the name {name!r}; name them explicitly")
            models[name] = d
            report.models[name] = stats
            target_name = target_name or name
        vocab = {m["vocab_size"] for m in models.values()}
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created_by": f"edgespec {__version__}",
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "target": target_name,
            "models": models,
            "shared_vocabulary": len(vocab) == 1,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
        load_manifest(tmp)  # the runtime must accept what we wrote
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = round(time.perf_counter() - t0, 1)
    return report


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder into place. An existing bundle is swapped with the new one in one atomic step where
    the system allows it (Linux renameat2 RENAME_EXCHANGE), so `dest` always holds a complete bundle, old or new;
    elsewhere it is renamed aside first (a crash between the two renames leaves it at `.<name>.old-<pid>`, which the
    next `export_bundle` to `dest` puts back first). The old bundle is removed afterwards."""
    if dest.exists():
        if _exchange_paths(new, dest):
            shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old bundle
            return
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, dest)


def _restore_moved_aside(dest: Path) -> None:
    """Put back a bundle that an interrupted `_replace_dir` (no atomic exchange) moved aside and never replaced."""
    if not dest.parent.is_dir():
        return
    for old in sorted(dest.parent.glob(f".{glob.escape(dest.name)}.old-*")):
        match = re.fullmatch(r"\.(.+)\.old-(\d+)", old.name)
        if match and match.group(1) == dest.name and old.is_dir() and not dest.exists() \
                and not _process_alive(int(match.group(2))) and (old / "manifest.json").is_file():
            os.rename(old, dest)


def _exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # old kernel or file system
        return False
    raise OSError(err, os.strerror(err), str(b))


# ------------------------------------------------------------------------------------------------------------------
# Editing an existing bundle: one model in or out, atomically
# ------------------------------------------------------------------------------------------------------------------


def _block_bits(tensor_type: str) -> int | None:
    """Bits per weight of a GGUF block type's name (Q4_K -> 4, Q8_0 -> 8, IQ4_XS -> 4); None for F32/F16/BF16."""
    match = re.match(r"I?Q(\d)", tensor_type.upper())
    return int(match.group(1)) if match else None


def quant_following(quantization: dict, source_kind: str) -> str:
    """The quantization mode that re-exports a model from a `source_kind` ("gguf" or "hf") source the way its
    manifest `quantization` says it is built now.

    The same mode wherever the source allows it. GGUF blocks cannot come from a Hugging Face folder (fp32/bf16
    weights), so a "gguf" model re-exported from one gets round-to-nearest blocks of its most common width, in the
    classes the graph builder uses: Q2..Q4 -> "int4", Q5..Q8 -> "int8"; only float tensors -> "fp32".
    """
    mode = quantization.get("mode") or "fp32"
    if mode != "gguf" or source_kind == "gguf":
        return mode
    counts = {"int4": 0, "int8": 0}
    for tensor_type, count in (quantization.get("tensor_types") or {}).items():
        bits = _block_bits(tensor_type)
        if bits is not None:
            counts["int4" if bits <= 4 else "int8"] += int(count)
    if not any(counts.values()):
        return "fp32"
    return "int4" if counts["int4"] > counts["int8"] else "int8"


def build_options_of(quantization: dict) -> BuildOptions:
    """The graph build options a model's manifest `quantization` object records (defaults for older bundles)."""
    return BuildOptions(accuracy_level=int(quantization.get("accuracy_level") or 0),
                        eight_bit=quantization.get("eight_bit") or "fp32",
                        fused_ops=bool(quantization.get("fused_ops", True)))


def drafter_build_options(target_quantization: dict, drafter_kernels: str = "fast") -> BuildOptions:
    """Build options of a drafter beside a target built with `target_quantization` (as `export_bundle` does)."""
    if drafter_kernels not in ("fast", "exact"):
        raise ExportError(f"drafter_kernels must be 'fast' or 'exact', got {drafter_kernels!r}")
    target_opts = build_options_of(target_quantization)
    if drafter_kernels == "exact":
        return target_opts
    return BuildOptions(accuracy_level=4, eight_bit="nbits", fused_ops=target_opts.fused_ops)


def _entry_folders(entry: dict) -> set[str]:
    """The bundle folders a manifest model entry's files live in (first component of each relative path)."""
    paths = [entry.get("graph", {}).get("file"), entry.get("graph", {}).get("data"), entry.get("tokenizer"),
             (entry.get("self_speculation") or {}).get("draft_head_tokens")]
    return {p.replace("\\", "/").split("/")[0] for p in paths if isinstance(p, str) and "/" in p}


def _fresh_folder(bundle: Path, name: str, models: dict) -> str:
    """A folder name for model `name` that no model uses and nothing occupies: `name`, else `name.r1`, `name.r2`..."""
    used = set().union(*(_entry_folders(e) for e in models.values() if isinstance(e, dict)))
    candidates = (name if k == 0 else f"{name}.r{k}" for k in itertools.count())
    return next(c for c in candidates if c not in used and not (bundle / c).exists())


def _resolved(request: ModelRequest, cache_dir: str | None, progress: ExportProgress | None) -> ModelRequest:
    """`request` with its source resolved (a short name is fetched; its download reported to `progress`) and its
    model name fixed."""
    source = request.source if isinstance(request.source, ResolvedSource) else resolve(
        request.source, cache_dir, progress=PhaseReporter(progress, _request_label(request)).source_counter())
    return dataclasses.replace(request, source=source, name=_model_name(source, request.name))


def _shared_vocabulary(models: dict) -> bool:
    return len({m["vocab_size"] for m in models.values()}) == 1


def _commit_model(bundle: Path, old_raw: dict, request: ModelRequest, opts: BuildOptions, *, entry_update: dict,
                  self_speculative: bool, threads: int | None, parity: bool, cache_dir: str | None, log: Log,
                  progress) -> ExportReport:
    """Export `request` into a temporary folder inside `bundle`, then put it in with one atomic manifest write.

    Order (a crash at any point leaves a loadable bundle): build and check the model in `bundle/.<name>.*.partial`;
    rename its folder to a fresh folder of the bundle (unused by the old manifest); validate the new manifest;
    replace manifest.json atomically (the commit); only then remove the folders of a replaced model. Before the
    commit, a failure removes everything this call wrote.
    """
    t0 = time.perf_counter()
    name = request.name
    remove_stale_work_folders(bundle)
    tmp = Path(tempfile.mkdtemp(prefix=work_folder_prefix(name), suffix=".partial", dir=bundle))
    moved = None
    try:
        folder = _fresh_folder(bundle, name, old_raw["models"])
        _, entry, stats = _export_model(request, tmp, opts, threads or 2, parity, log, cache_dir, progress,
                                        self_speculative=self_speculative, folder=folder)
        entry.update(entry_update)
        new_raw = copy.deepcopy(old_raw)
        new_raw["models"][name] = entry
        new_raw["shared_vocabulary"] = _shared_vocabulary(new_raw["models"])
        os.rename(tmp / folder, bundle / folder)
        moved = bundle / folder
        manifest_from_dict(bundle, new_raw, check_files=True, where=f"new manifest of {bundle}")
        if _read_raw(bundle) != old_raw:
            raise ExportError(f"{bundle / 'manifest.json'} changed while {name!r} was exported (another edit of "
                              "the bundle?); nothing was changed: run again")
        write_json_atomic(bundle / "manifest.json", new_raw)  # the commit point
        moved = None
    except BaseException:
        if moved is not None:
            shutil.rmtree(moved, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if name in old_raw["models"]:
        still_used = set().union(*(_entry_folders(e) for e in new_raw["models"].values()))
        for stale in _entry_folders(old_raw["models"][name]) - still_used:
            path = bundle / stale  # a folder directly in the bundle, never through a link
            if not path.is_symlink() and path.resolve().parent == bundle.resolve() and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    log(f"[{name}] now in {bundle} (folder {folder})")
    return ExportReport(bundle=bundle, models={name: stats}, seconds=round(time.perf_counter() - t0, 1))


def work_folder_prefix(name: str) -> str:
    """Prefix of a temporary folder inside a bundle: hidden, naming the model and this process."""
    return f".{name}.pid{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (PermissionError), or cannot tell: treat as alive
        return True
    return True


def remove_stale_work_folders(bundle: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders (see `work_folder_prefix`) that bundle edits of processes no longer running
    left in `bundle` (a crash or a kill); returns them. Folders of running processes are left alone."""
    removed = []
    for path in Path(bundle).iterdir():
        match = re.fullmatch(r"\..+\.pid(\d+)\.[^/]+\.(?:partial|adapt)", path.name)
        if match and path.is_dir() and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _read_raw(bundle: Path) -> dict | None:
    """manifest.json as a dictionary, or None when it cannot be read."""
    try:
        return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def replace_model(bundle_dir: str | os.PathLike, request_or_source: str | os.PathLike | ModelRequest | ResolvedSource,
                  name: str, role: str = "drafter", *, quant: str | None = None,
                  build_options: BuildOptions | None = None, entry_update: dict | None = None,
                  threads: int | None = None, parity: bool = True, cache_dir: str | None = None, log: Log = print,
                  progress: ExportProgress | None = None) -> ExportReport:
    """Re-export the bundle's model `name` (role `role`) from a new source, atomically.

    The source is anything `edgespec export` accepts (short name, .gguf file, HF folder), a ResolvedSource or a
    ModelRequest. Quantization follows the model's current one (`quant_following`) unless `quant` (or the
    request's) says otherwise; the graph is built with the options the model was built with (`build_options_of`
    its manifest entry) unless `build_options` is given. `entry_update` keys are set on the new manifest entry
    (e.g. "adaptation"). The model goes into a fresh folder and manifest.json is replaced in one atomic step, so an
    interruption at any point leaves the old bundle loadable; the old folder is removed afterwards.
    Raises BundleError for a missing or corrupt bundle, ExportError for an unknown name, a role mismatch or a
    failed export (the bundle is then unchanged).
    """
    bundle = Path(bundle_dir)
    manifest = load_manifest(bundle)
    old = manifest.raw["models"].get(name)
    if old is None:
        raise ExportError(f"bundle {bundle} has no model {name!r} (models: {', '.join(manifest.models)})")
    if old.get("role") != role:
        raise ExportError(f"model {name!r} of bundle {bundle} is a {old.get('role')}, not a {role}")
    request = request_or_source if isinstance(request_or_source, ModelRequest) else ModelRequest(request_or_source)
    request = _resolved(dataclasses.replace(request, role=role, name=name), cache_dir, progress)
    if request.name != name:
        raise ExportError(f"model name {name!r} of bundle {bundle} cannot be a folder name (it would become "
                          f"{request.name!r}); export the bundle again")
    mode = request.quant or quant or quant_following(old.get("quantization") or {}, request.source.kind)
    request = dataclasses.replace(request, quant=mode)
    opts = build_options or build_options_of(old.get("quantization") or {})
    self_spec = bool((old.get("self_speculation") or {}).get("layer_gates"))
    return _commit_model(bundle, manifest.raw, request, opts, entry_update=dict(entry_update or {}),
                         self_speculative=self_spec, threads=threads, parity=parity, cache_dir=cache_dir, log=log,
                         progress=progress)


def add_drafter(bundle_dir: str | os.PathLike, source: str | os.PathLike | ResolvedSource, *, name: str | None = None,
                quant: str | None = None, drafter_kernels: str = "fast", threads: int | None = None,
                parity: bool = True, cache_dir: str | None = None, log: Log = print,
                progress: ExportProgress | None = None) -> ExportReport:
    """Add a drafter model to an existing bundle without re-exporting its target, atomically.

    `source` is anything `edgespec export --drafter` accepts; `name` defaults to the source's name and must not be
    taken. `drafter_kernels` as in `export_bundle` ("fast": accuracy level 4, 8-bit blocks as MatMulNBits;
    "exact": the target's build options); `quant` as in `export_bundle` (default gguf for GGUF, fp32 for HF).
    Raises BundleError for a missing or corrupt bundle, ExportError for a duplicate name or a failed export (the
    bundle is then unchanged).
    """
    bundle = Path(bundle_dir)
    manifest = load_manifest(bundle)
    request = _resolved(ModelRequest(source, "drafter", name=name, quant=quant), cache_dir, progress)
    if request.name in manifest.raw["models"]:
        raise ExportError(f"bundle {bundle} already has a model named {request.name!r}; give the drafter another "
                          "name (--name)")
    opts = drafter_build_options(manifest.raw["models"][manifest.target].get("quantization") or {}, drafter_kernels)
    return _commit_model(bundle, manifest.raw, request, opts, entry_update={}, self_speculative=False,
                         threads=threads, parity=parity, cache_dir=cache_dir, log=log, progress=progress)
