"""`edgespec export`: sources -> ONNX graphs + tokenizers + manifest, written atomically as one bundle folder.

Each model is built into a temporary folder beside the destination, checked against the torch reference
(teacher-forced top-1 agreement and perplexity on a fixed text), and only then is the manifest written and the
folder renamed into place. A failed or interrupted export never leaves a half-written bundle.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..runtimes.manifest import FORMAT, SCHEMA_VERSION, _model_entry, load_manifest, write_json_atomic
from . import reference
from .graph import BuildOptions, build_decoder
from .sources import ResolvedSource, resolve
from .weights import GGUFWeights, HFWeights

Log = Callable[[str], None]

# Export fails when the ONNX graph agrees with its reference less often than this (teacher-forced top-1).
MIN_AGREEMENT = {"gguf": 0.97, "fp32": 0.97, "int8": 0.80, "int4": 0.40}
MIN_AGREEMENT_INT8_ACTIVATIONS = 0.85  # accuracy level 4 (int8 activations; what fast drafters use)
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>", "</s>", "<|end_of_text|>", "<|eot_id|>")
# Rows of the reduced draft LM head of a self-speculative export (fewer than the vocabulary, else no draft head).
DRAFT_HEAD_SIZE = 32768


class ExportError(RuntimeError):
    """An export step failed (the message names the model and the step)."""


@dataclass
class ModelRequest:
    """One model to put in the bundle."""

    source: str  # short name, .gguf path or HF folder
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


def _reference_stats(source: ResolvedSource, ids: np.ndarray, log: Log) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced argmax and next-token NLL of the torch reference (run first: it is the memory peak)."""
    log("  torch reference (fp32, same weights) on the parity text")
    model = reference.load_reference_model(source.kind, source.path)
    stats = reference.teacher_forced_stats(reference.reference_logits(model, ids), ids)
    reference.free(model)
    return stats


def _accuracy(entry, ids: np.ndarray, ref_stats, threads: int) -> dict:
    """Teacher-forced top-1 agreement and perplexity of the ONNX graph against the torch reference."""
    from ..runtimes.runner import ModelRunner

    runner = ModelRunner(entry, threads=threads, max_context=len(ids) + 8)
    onnx_top1, onnx_nll = reference.teacher_forced_stats(runner.forward(ids), ids)
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


def _export_model(req: ModelRequest, root: Path, opts: BuildOptions, threads: int, parity: bool,
                  log: Log, cache_dir: str | None, progress=None, self_speculative: bool = False,
                  draft_head_size: int = DRAFT_HEAD_SIZE) -> tuple[str, dict, dict]:
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    source = resolve(req.source, cache_dir, progress=progress)
    name = _model_name(source, req.name)
    quant = req.quant or ("gguf" if source.kind == "gguf" else "fp32")
    log(f"[{name}] {source.kind} source {source.path} -> quantization {quant}")
    weights = _open_weights(source, quant)
    spec = weights.spec
    model_dir = root / name
    model_dir.mkdir(parents=True)
    tokenizer_file = model_dir / "tokenizer.json"
    reference.save_tokenizer_json(source.kind, source.path, tokenizer_file)
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
        ref_stats = _reference_stats(source, ids, log)
        reference.release_memory()
        weights = _open_weights(source, quant)
    self_spec = None
    if self_speculative:
        draft_ids = draft_head_token_ids(tokenizer, spec.vocab_size, special, draft_head_size)
        opts = dataclasses.replace(opts, layer_gates=True, draft_head_tokens=draft_ids)
        self_spec = {"layer_gates": True, "draft_head_tokens": None}
        if draft_ids is not None:
            np.save(model_dir / "draft_head_tokens.npy", draft_ids, allow_pickle=False)
            self_spec["draft_head_tokens"] = f"{name}/draft_head_tokens.npy"
        log(f"[{name}] self-speculative graph: layer gates, draft head "
            f"{'none' if draft_ids is None else f'{len(draft_ids)} tokens'}")
    log(f"[{name}] building graph: {spec.architecture}, {spec.num_layers} layers, vocabulary {spec.vocab_size}")
    t_graph = time.perf_counter()
    build_decoder(spec, weights, str(model_dir), opts)
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
                         "tensor_types": tensor_types},
        "graph": {"file": f"{name}/model.onnx", "data": f"{name}/model.onnx.data", "kv_dtype": "float32"},
        "tokenizer": f"{name}/tokenizer.json",
        "config": spec.to_dict(),
    }
    if self_spec is not None:
        d["self_speculation"] = self_spec
    del weights
    reference.release_memory()
    if parity:
        entry = _model_entry(root, name, d, check_files=True)
        acc = _accuracy(entry, ids, ref_stats, threads)
        d["accuracy"] = acc
        log(f"[{name}] top-1 agreement {acc['top1_agreement']:.2%}, perplexity {acc['perplexity']:.3f} "
            f"(reference {acc['reference_perplexity']:.3f})")
        minimum = MIN_AGREEMENT[quant] if opts.accuracy_level == 0 else MIN_AGREEMENT_INT8_ACTIVATIONS
        if acc["top1_agreement"] < minimum:
            raise ExportError(f"[{name}] parity check failed: top-1 agreement {acc['top1_agreement']:.2%} < "
                              f"{minimum:.0%} for {quant} at accuracy level {opts.accuracy_level}")
    stats = {"seconds": round(time.perf_counter() - t0, 1), "graph_seconds": round(graph_seconds, 1),
             "graph_bytes": sum(f.stat().st_size for f in model_dir.iterdir())}
    return name, d, stats


def export_bundle(target: str | ModelRequest, out_dir: str | os.PathLike, drafters=(), *, quant: str | None = None,
                  name: str | None = None,
                  accuracy_level: int = 0, eight_bit: str = "fp32", fused_ops: bool = True, threads: int | None = None, parity: bool = True,
                  cache_dir: str | None = None, overwrite: bool = False, log: Log = print,
                  progress=None, self_speculative: bool = False, draft_head_size: int = DRAFT_HEAD_SIZE,
                  drafter_kernels: str = "fast") -> ExportReport:
    """Export `target` (and `drafters`) into the bundle folder `out_dir`; see the module docstring.

    `drafter_kernels="fast"` (default) builds drafters with int8-activation MatMulNBits (accuracy level 4, 8-bit
    blocks as 8-bit MatMulNBits): a drafter's rounding only moves acceptance, never the output, and these kernels
    are 2-3x faster on CPUs; "exact" gives drafters the target's settings.

    `self_speculative` builds the target with layer gates (any subset of its layers can run, sharing the weights)
    and, when `draft_head_size` is below its vocabulary, a reduced draft LM head over that many token ids.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
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
    """Move the finished folder into place; an existing bundle is swapped out, then removed."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, dest)
