"""`edgespec adapt`: adapt a bundle's drafter to its target from the generation history (OmniDraft-style).

The history (edgespec/history.py) holds what the target produced: prompt and output as text and as the target's
token ids. For a drafter with another tokenizer, the drafter re-tokenizes prompt + output and learns to predict its
own tokens of the output, weighted by how they line up with the target's tokens (OmniDraft's hybrid distillation,
with the target's tokens as hard labels):

* a drafter token whose character span equals exactly one target token's span is *directly mapped* (weight 1);
* a drafter token inside a span where several drafter tokens make one target token, or spanning several target
  tokens, is *n-gram mapped* (weight ``mapped_weight``, default 0.5);
* prompt tokens are context only (weight 0).

Training: LoRA (peft) on the attention and MLP projections of the drafter's base weights (its manifest source:
a GGUF file, dequantized to fp32 by the exporter's torch reference loader, or an HF folder), AdamW, next-token
cross-entropy with those weights. Records are split into training and held-out ones (by record; the held-out ones
are never trained on); the weighted loss on the held-out records is reported before and after. The LoRA weights are
then merged, saved as an HF folder, and re-exported with the exporter into the bundle atomically
(`bundle.replace_model`): quantization follows the drafter's (`bundle.quant_following`), graph options are the ones
it was built with, and its manifest entry gains an ``adaptation`` object. Each adaptation starts again from the base
weights and trains on the whole history; the entry's ``source`` stays the base model.

This module imports no torch, transformers, peft or onnx at module level (the CLI registers its subcommands
without them); the training functions import them when called.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..history import HOW_TO_TURN_ON, default_history_path, read_history
from ..runtimes.manifest import Manifest, ModelEntry, load_manifest

Log = Callable[[str], None]
Span = tuple[int, int]

DIRECT, NGRAM, NONE = "direct", "ngram", "none"
DEFAULT_STEPS = 300
DEFAULT_RANK = 16
DEFAULT_ALPHA = 32.0
DEFAULT_LR = 2e-4
DEFAULT_MAPPED_WEIGHT = 0.5
DEFAULT_HOLDOUT = 0.2
DEFAULT_MAX_TOKENS = 1024  # drafter tokens per training sequence (prompt context is cut from the left first)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdaptError(ValueError):
    """Adaptation cannot run as asked (no history, too few records, unknown drafter, ...); the message says why."""


# ------------------------------------------------------------------------------------------------------------------
# Alignment (pure functions)
# ------------------------------------------------------------------------------------------------------------------


def align_spans(drafter_offsets: Sequence[Span], target_offsets: Sequence[Span]) -> list[str]:
    """The kind of each drafter token against the target's tokens, both given as character spans [start, end) in
    the same text: "direct" (its span equals exactly one target token's span, and no other drafter token has that
    span), "ngram" (it overlaps target tokens in any other way) or "none" (empty, or overlapping no target token).

    Spans of several tokens may be equal (the bytes of one character); empty target spans (skipped special
    tokens) are ignored. Both lists must be in text order.
    """
    targets = sorted((int(s), int(e)) for s, e in target_offsets if e > s)
    target_count = Counter(targets)
    drafter_count = Counter((int(s), int(e)) for s, e in drafter_offsets)
    ends = [e for _, e in targets]
    kinds = []
    for start, end in ((int(s), int(e)) for s, e in drafter_offsets):
        if end <= start:
            kinds.append(NONE)
            continue
        first = bisect.bisect_right(ends, start)  # first target ending after this token starts
        if first == len(targets) or targets[first][0] >= end:
            kinds.append(NONE)
        elif target_count.get((start, end)) == 1 and drafter_count[(start, end)] == 1:
            kinds.append(DIRECT)
        else:
            kinds.append(NGRAM)
    return kinds


def close_gaps(offsets: Sequence[Span]) -> list[Span]:
    """Token spans with the gaps between consecutive tokens given to the later token.

    Some tokenizers report offsets without a token's leading whitespace (trimmed offsets); the whitespace is still
    the token's, and alignment must see it. Equal spans (bytes of one character) stay equal."""
    out: list[Span] = []
    previous_end = None
    for start, end in offsets:
        start, end = int(start), int(end)
        if previous_end is not None and end > start > previous_end:
            start = previous_end
        out.append((start, end))
        if end > start:
            previous_end = end if previous_end is None else max(previous_end, end)
    return out


def decoded_spans(tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> tuple[str, list[Span]]:
    """The text of `ids` and each token's character span in it, by decoding every prefix.

    A prefix whose text is not a prefix of the whole text (it ends inside a multi-byte character) gives no
    boundary: the tokens of one character share that character's span. Skipped special tokens get empty spans.
    """
    ids = [int(t) for t in ids]
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    prefixes = tokenizer.decode_batch([ids[:k] for k in range(1, len(ids))],
                                      skip_special_tokens=skip_special_tokens) if len(ids) > 1 else []
    bounds: list[int | None] = [0] + [len(p) if text.startswith(p) else None for p in prefixes] + [len(text)]
    spans = []
    for k in range(len(ids)):
        start = next(b for b in reversed(bounds[:k + 1]) if b is not None)
        end = next(b for b in bounds[k + 1:] if b is not None)
        spans.append((start, end))
    return text, spans


def token_weights(kinds: Sequence[str], mapped_weight: float) -> np.ndarray:
    """Loss weight per token: 1 for "direct", `mapped_weight` for "ngram", 0 for "none"."""
    table = {DIRECT: 1.0, NGRAM: float(mapped_weight), NONE: 0.0}
    return np.array([table[k] for k in kinds], dtype=np.float32)


def split_holdout(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split record indices 0..count-1 into (training, held-out), both sorted: round(fraction * count) held out,
    at least one when `fraction` > 0 and at least one left to train on."""
    if not 0.0 <= fraction < 1.0:
        raise AdaptError(f"--holdout must be in [0, 1), got {fraction}")
    held = 0 if fraction == 0 else min(count - 1, max(1, round(fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    return sorted(int(i) for i in order[held:]), sorted(int(i) for i in order[:held])


# ------------------------------------------------------------------------------------------------------------------
# Training examples
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One record as drafter tokens: `ids` [N] and the loss weight of predicting each token `weights` [N]."""

    index: int  # the record's index in the history (readable records, oldest first)
    ids: np.ndarray
    weights: np.ndarray
    kinds: Counter = field(default_factory=Counter)


def target_spans_of_output(target_tokenizer, output_ids: Sequence[int], output: str) -> list[Span]:
    """The target tokens' spans in `output` (the record's output text).

    They come from decoding `output_ids`, special tokens written out (as the engine logs them) or else skipped;
    when that text is longer than `output` (a stop string cut the text), the spans are clipped to it; when neither
    text starts with `output`, the whole output is one span (every drafter token then counts as n-gram mapped)."""
    if not output:
        return []
    for skip in (False, True):
        text, spans = decoded_spans(target_tokenizer, output_ids, skip_special_tokens=skip)
        if text.startswith(output):
            return [(min(s, len(output)), min(e, len(output))) for s, e in spans]
    return [(0, len(output))]


def _text(text: str) -> str:
    """`text` with each lone surrogate (a history may hold them: JSON can escape them) replaced by U+FFFD, one
    character for one, so that tokenizers (which take only valid Unicode) accept it and offsets stay put."""
    return _SURROGATES.sub("\ufffd", text)


_SURROGATES = re.compile("[\ud800-\udfff]")


def build_example(index: int, record: dict, drafter_tokenizer, target_tokenizer, *, bos: int | None,
                  mapped_weight: float, max_tokens: int = DEFAULT_MAX_TOKENS) -> Example | None:
    """Drafter tokens of prompt + output with their loss weights (see the module docstring), or None when no
    token of the output gets a weight. `bos` is prepended when given (the drafter wants BOS)."""
    prompt, output = _text(record["prompt"]), _text(record["output"])
    spans = [(s + len(prompt), e + len(prompt))
             for s, e in target_spans_of_output(target_tokenizer, record["output_ids"], output)]
    encoding = drafter_tokenizer.encode(prompt + output, add_special_tokens=False)
    kinds = align_spans(close_gaps(encoding.offsets), spans)
    ids, weights = list(encoding.ids), token_weights(kinds, mapped_weight)
    if bos is not None and ids[:1] != [bos]:  # the logged prompt may already start with it written out
        ids, weights, kinds = [bos] + ids, np.concatenate([[0.0], weights]).astype(np.float32), [NONE] + kinds
    if len(ids) > max_tokens:
        first_output = int(np.argmax(weights > 0)) if weights.any() else len(ids)
        start = max(0, min(first_output - 1, len(ids) - max_tokens))
        ids, weights, kinds = ids[start:start + max_tokens], weights[start:start + max_tokens], \
            kinds[start:start + max_tokens]
    if len(ids) < 2:
        return None
    weights = weights.copy()
    weights[0] = 0.0  # the first token has no prediction
    if not weights.any():
        return None
    counted = Counter(k for k, w in zip(kinds, weights) if w > 0)
    return Example(index=index, ids=np.asarray(ids, dtype=np.int64), weights=weights, kinds=counted)


# ------------------------------------------------------------------------------------------------------------------
# Bundle, drafter and source
# ------------------------------------------------------------------------------------------------------------------


def _tokenizer_bytes(entry: ModelEntry) -> bytes:
    return entry.tokenizer_path.read_bytes()


def pick_drafter(manifest: Manifest, name: str | None = None) -> ModelEntry:
    """The drafter to adapt: `name`, else the first drafter whose tokenizer differs from the target's, else the
    first drafter. AdaptError when the bundle has no drafter or `name` is not one of them."""
    drafters = manifest.drafters()
    if not drafters:
        raise AdaptError(f"bundle {manifest.root} has no drafter model to adapt; add one with "
                         f"`edgespec add-drafter {manifest.root} MODEL`")
    if name is not None:
        found = [d for d in drafters if d.name == name]
        if not found:
            raise AdaptError(f"bundle {manifest.root} has no drafter {name!r} "
                             f"(drafters: {', '.join(d.name for d in drafters)})")
        return found[0]
    target_tokenizer = _tokenizer_bytes(manifest.target_model)
    return next((d for d in drafters if _tokenizer_bytes(d) != target_tokenizer), drafters[0])


def find_drafter_source(entry: ModelEntry, override: str | None = None, cache_dir: str | None = None):
    """The drafter's base weights as a ResolvedSource: `override` when given (anything `edgespec export` takes),
    else the manifest source's path, else (GGUF) `<cache>/<name>.gguf` in $EDGESPEC_CACHE, else a known model
    of that name fetched like `edgespec export` does. A GGUF with a recorded sha256 must match it."""
    from .sources import MODELS, ResolvedSource, SourceError, default_cache_dir, resolve, sha256_file

    try:
        if override is not None:
            return resolve(override, cache_dir)
        source = entry.source or {}
        kind, name, digest = source.get("kind"), source.get("name"), source.get("sha256")
        candidates = [Path(source["path"]).expanduser()] if source.get("path") else []
        if kind == "gguf" and name:
            candidates.append((Path(cache_dir) if cache_dir else default_cache_dir()) / f"{name}.gguf")
        mismatched = []
        for path in candidates:
            if kind == "gguf" and path.is_file():
                if digest and sha256_file(path) != digest:
                    mismatched.append(str(path))
                    continue
                return ResolvedSource(kind="gguf", path=path.resolve(), name=name or path.stem, sha256=digest,
                                      origin=source.get("origin") or f"local file {path}")
            if kind == "hf" and (path / "config.json").is_file():
                return ResolvedSource(kind="hf", path=path.resolve(), name=name or path.name, sha256=None,
                                      origin=source.get("origin") or f"local Hugging Face folder {path}")
        if kind == "gguf" and name in MODELS:
            return resolve(name, cache_dir)
    except SourceError as exc:
        raise AdaptError(f"drafter {entry.name!r}: {exc}") from exc
    looked = ", ".join(str(p) for p in candidates) or "nowhere (the manifest names no source path)"
    extra = f"; these differ from the recorded sha256: {', '.join(mismatched)}" if mismatched else ""
    raise AdaptError(f"drafter {entry.name!r}: its base weights ({kind or 'unknown'} source) are not on this "
                     f"machine; looked at {looked}{extra}; pass the GGUF file or HF folder with --source")


def _load_history(manifest: Manifest, history: str | os.PathLike | None) -> tuple[Path, list[dict]]:
    """(path, records) of the history file (the bundle's default one unless `history` names one); AdaptError, saying
    how history is turned on, when there is none, and when the path is not a regular file."""
    path = Path(history) if history else default_history_path(manifest.root, manifest.target)
    try:
        return path, read_history(path)
    except (FileNotFoundError, ValueError) as exc:  # missing (the message says how to turn history on), a FIFO
        raise AdaptError(str(exc)) from None


def build_examples(records: list[dict], drafter: ModelEntry, target: ModelEntry, mapped_weight: float,
                   max_tokens: int = DEFAULT_MAX_TOKENS) -> list[Example]:
    """Training examples of every record that gives the drafter at least one weighted output token."""
    from tokenizers import Tokenizer

    drafter_tokenizer = Tokenizer.from_file(str(drafter.tokenizer_path))
    target_tokenizer = Tokenizer.from_file(str(target.tokenizer_path))
    bos = drafter.bos_token_id if drafter.add_bos else None
    examples = (build_example(i, r, drafter_tokenizer, target_tokenizer, bos=bos, mapped_weight=mapped_weight,
                              max_tokens=max_tokens) for i, r in enumerate(records))
    return [e for e in examples if e is not None]


# ------------------------------------------------------------------------------------------------------------------
# Training (torch, transformers, peft: imported when called)
# ------------------------------------------------------------------------------------------------------------------


def load_drafter_model(source):
    """The drafter's base weights as a float32 transformers model (the exporter's reference loader), with a real
    Linear LM head (the loader keeps a big untied GGUF head quantized; training and saving need it dense)."""
    import torch

    from . import reference

    model = reference.load_reference_model(source.kind, source.path)
    if source.kind == "gguf" and not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        from gguf import GGUFReader, dequantize

        tensor = next(t for t in GGUFReader(str(source.path)).tensors if t.name == "output.weight")
        weight = torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight.data = weight
        model.set_output_embeddings(head)
    return model


def with_lora(model, rank: int, alpha: float, seed: int):
    """`model` wrapped by peft with LoRA adapters on its attention and MLP projections."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise AdaptError("edgespec adapt needs peft: pip install 'edgespec[export]' (or pip install peft)") from exc
    present = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_MODULES})
    if not present:
        raise AdaptError(f"no attention/MLP projections ({', '.join(LORA_MODULES)}) found to adapt")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=present, bias="none",
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def weighted_loss(model, example: Example):
    """Weighted next-token cross-entropy of `model` on one example (a 0-dim torch tensor), logits computed only
    where a weighted token is predicted."""
    import torch

    ids = torch.from_numpy(example.ids)[None]
    positions = np.nonzero(example.weights[1:])[0]  # position p predicts token p + 1
    out = model(input_ids=ids, logits_to_keep=torch.from_numpy(positions.astype(np.int64)))
    logits = out.logits[0].float()
    labels = torch.from_numpy(example.ids[positions + 1])
    weights = torch.from_numpy(example.weights[positions + 1])
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return (nll * weights).sum() / weights.sum()


def heldout_loss(model, examples: list[Example]) -> float | None:
    """Weighted cross-entropy over all held-out tokens (total weighted NLL / total weight); None with none."""
    import torch

    if not examples:
        return None
    total, weight = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for example in examples:
            w = float(example.weights[1:].sum())
            total += weighted_loss(model, example).item() * w
            weight += w
    return total / weight


def train(model, examples: list[Example], steps: int, lr: float, seed: int, log: Log) -> list[float]:
    """AdamW on the trainable (LoRA) parameters, one example per step in a reshuffled cycle; the loss per step."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(steps):
        if not order:
            order = list(rng.permutation(len(examples)))
        loss = weighted_loss(model, examples[order.pop()])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            window = losses[-max(1, steps // 10):]
            log(f"  step {step + 1}/{steps}: training loss {sum(window) / len(window):.4f}")
    model.eval()
    return losses


def save_merged(peft_model, folder: Path, drafter: ModelEntry) -> None:
    """Merge the LoRA weights and save an HF folder: config + safetensors (float32), the drafter's tokenizer.json
    and its chat template."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(folder))
    shutil.copyfile(drafter.tokenizer_path, folder / "tokenizer.json")
    if drafter.chat_template:
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": drafter.chat_template}))


# ------------------------------------------------------------------------------------------------------------------
# The whole job
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class AdaptReport:
    """What an adaptation did (losses are weighted cross-entropies on the held-out records)."""

    bundle: str
    drafter: str
    history: str
    records: int  # usable records (each gives at least one weighted drafter token)
    skipped_records: int
    train_records: int
    heldout_indices: list[int]
    tokens: dict  # weighted output tokens of the training records by kind: {"direct": n, "ngram": n}
    steps: int
    rank: int
    alpha: float
    lr: float
    mapped_weight: float
    seed: int
    quant: str | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    train_seconds: float = 0.0  # loading the base weights, training, merging and saving
    export_seconds: float = 0.0  # re-exporting into the bundle
    seconds: float = 0.0  # the whole adaptation
    dry_run: bool = False
    replaced: bool = False  # the adapted drafter was written into the bundle

    def to_dict(self) -> dict:
        """The report as a JSON-ready dictionary."""
        return asdict(self)


def _adaptation_entry(report: AdaptReport, target: str, base_quantization: dict) -> dict:
    """The manifest's `adaptation` object of an adapted drafter."""
    keys = ("history", "records", "train_records", "heldout_indices", "tokens", "steps", "rank", "alpha", "lr",
            "mapped_weight", "seed", "loss_before", "loss_after")
    out = {"method": "lora-hybrid-ce", "target": target,
           "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out.update({k: getattr(report, k) for k in keys})
    for k in ("loss_before", "loss_after"):
        out[k] = None if out[k] is None else round(out[k], 5)
    out["seconds"] = report.train_seconds
    out["base_quantization"] = base_quantization
    return out


def adapt_drafter(bundle_dir: str | os.PathLike, *, drafter: str | None = None,
                  history: str | os.PathLike | None = None, holdout: float = DEFAULT_HOLDOUT,
                  steps: int = DEFAULT_STEPS, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
                  lr: float = DEFAULT_LR, mapped_weight: float = DEFAULT_MAPPED_WEIGHT, threads: int = 2,
                  seed: int = 0, dry_run: bool = False, source: str | None = None, quant: str | None = None,
                  parity: bool = True, max_tokens: int = DEFAULT_MAX_TOKENS, cache_dir: str | None = None,
                  force: bool = False, log: Log = print) -> AdaptReport:
    """Adapt the bundle's drafter to its target from the history (see the module docstring) and re-export it
    into the bundle atomically, provided the loss on the held-out records fell (or `force`, or no records were
    held out; `report.replaced` says whether it was written). `dry_run` checks everything (bundle, drafter,
    history, alignment, base weights) and reports the data without training or writing. Raises AdaptError (or
    BundleError for a corrupt bundle); on any failure the bundle is unchanged."""
    t0 = time.perf_counter()
    for what, value, low in (("--steps", steps, 1), ("--rank", rank, 1), ("--threads", threads, 1)):
        if value < low:
            raise AdaptError(f"{what} must be at least {low}, got {value}")
    if lr <= 0 or alpha <= 0 or not 0.0 <= mapped_weight <= 1.0:
        raise AdaptError(f"need --lr > 0, --alpha > 0 and 0 <= --mapped-weight <= 1 (got {lr}, {alpha}, "
                         f"{mapped_weight})")
    manifest = load_manifest(bundle_dir)
    entry = pick_drafter(manifest, drafter)
    history_path, records = _load_history(manifest, history)
    examples = build_examples(records, entry, manifest.target_model, mapped_weight, max_tokens)
    if len(examples) < 2:
        raise AdaptError(f"history {history_path} has {len(examples)} usable record(s) of {len(records)} (a record "
                         f"needs output text the drafter can learn from); at least 2 are needed: {HOW_TO_TURN_ON}")
    train_idx, held_idx = split_holdout(len(examples), holdout, seed)
    train_examples = [examples[i] for i in train_idx]
    held_examples = [examples[i] for i in held_idx]
    tokens = sum((e.kinds for e in train_examples), Counter())
    raw_entry = manifest.raw["models"][entry.name]
    base_quantization = (raw_entry.get("adaptation") or {}).get("base_quantization") or raw_entry.get("quantization")
    report = AdaptReport(
        bundle=str(manifest.root), drafter=entry.name, history=str(history_path), records=len(examples),
        skipped_records=len(records) - len(examples), train_records=len(train_examples),
        heldout_indices=[e.index for e in held_examples],
        tokens={DIRECT: tokens.get(DIRECT, 0), NGRAM: tokens.get(NGRAM, 0)}, steps=steps, rank=rank, alpha=alpha,
        lr=lr, mapped_weight=mapped_weight, seed=seed, dry_run=dry_run)
    log(f"[{entry.name}] {report.records} records ({report.train_records} to train on, "
        f"{len(held_examples)} held out), output tokens {report.tokens[DIRECT]} direct / {report.tokens[NGRAM]} "
        f"n-gram mapped; history {history_path}")
    base = find_drafter_source(entry, source, cache_dir)
    from .bundle import quant_following

    report.quant = quant or quant_following(base_quantization or {}, "hf")
    if dry_run:
        log(f"[{entry.name}] dry run: base weights {base.path}; would train {steps} steps and re-export as "
            f"{report.quant}")
        report.seconds = round(time.perf_counter() - t0, 1)
        return report
    _train_and_replace(manifest, entry, base, report, train_examples, held_examples, base_quantization, parity,
                       threads, force, log)
    report.seconds = round(time.perf_counter() - t0, 1)
    return report


def _train_and_replace(manifest: Manifest, entry: ModelEntry, base, report: AdaptReport,
                       train_examples: list[Example], held_examples: list[Example], base_quantization: dict,
                       parity: bool, threads: int, force: bool, log: Log) -> None:
    """Train LoRA, merge, save into a temporary HF folder inside the bundle, re-export the drafter atomically
    (unless the held-out loss did not fall and not `force`)."""
    import torch

    from . import reference
    from .bundle import remove_stale_work_folders, replace_model, work_folder_prefix

    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    remove_stale_work_folders(manifest.root)
    work = Path(tempfile.mkdtemp(prefix=work_folder_prefix(entry.name), suffix=".adapt", dir=manifest.root))
    try:
        log(f"[{entry.name}] loading base weights {base.path}")
        model = with_lora(load_drafter_model(base), report.rank, report.alpha, report.seed)
        report.loss_before = heldout_loss(model, held_examples)
        losses = train(model, train_examples, report.steps, report.lr, report.seed, log)
        report.train_loss_first, report.train_loss_last = losses[0], losses[-1]
        report.loss_after = heldout_loss(model, held_examples)
        if report.loss_before is not None:
            log(f"[{entry.name}] held-out loss {report.loss_before:.4f} -> {report.loss_after:.4f}")
            if not report.loss_after < report.loss_before and not force:  # NaN counts as worse
                log(f"[{entry.name}] the held-out loss did not fall: the drafter is left as it was (force=True / "
                    "--force writes it anyway)")
                return
        save_merged(model, work / "merged", entry)
        del model
        reference.release_memory()
        report.train_seconds = round(time.perf_counter() - t0, 1)
        update = {"source": base.to_manifest(), "special_tokens": manifest.raw["models"][entry.name].get(
                      "special_tokens"), "chat_template": entry.chat_template,
                  "adaptation": _adaptation_entry(report, manifest.target, base_quantization)}
        t_export = time.perf_counter()
        replace_model(manifest.root, str(work / "merged"), entry.name, role="drafter", quant=report.quant,
                      entry_update=update, threads=threads, parity=parity, log=log)
        report.export_seconds = round(time.perf_counter() - t_export, 1)
        report.replaced = True
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------------
# Command line (`edgespec adapt`, `edgespec add-drafter`)
# ------------------------------------------------------------------------------------------------------------------


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_adapt(args) -> int:
    """`edgespec adapt BUNDLE ...`."""
    report = adapt_drafter(args.bundle, drafter=args.drafter, history=args.history, holdout=args.holdout,
                           steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
                           mapped_weight=args.mapped_weight, threads=args.threads, seed=args.seed,
                           dry_run=args.dry_run, source=args.source, quant=args.quant, parity=not args.no_parity,
                           force=args.force, log=_stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif report.dry_run:
        print(f"dry run: {report.drafter} would train on {report.train_records} records "
              f"({len(report.heldout_indices)} held out); nothing written")
    else:
        before = "-" if report.loss_before is None else f"{report.loss_before:.4f}"
        after = "-" if report.loss_after is None else f"{report.loss_after:.4f}"
        done = "adapted" if report.replaced else "kept (held-out loss did not fall; --force writes it anyway)"
        print(f"{report.drafter} {done} in {report.bundle}: held-out loss {before} -> {after}, "
              f"{report.seconds:.1f} s (training {report.train_seconds:.1f} s, export {report.export_seconds:.1f} s)")
    return 0


def cmd_add_drafter(args) -> int:
    """`edgespec add-drafter BUNDLE MODEL ...`."""
    from .bundle import add_drafter
    from .sources import SourceError

    try:
        report = add_drafter(args.bundle, args.model, name=args.name, quant=args.quant,
                             drafter_kernels=args.drafter_kernels, threads=args.threads, parity=not args.no_parity,
                             log=_stderr)
    except SourceError as exc:
        raise AdaptError(str(exc)) from exc
    for name, stats in report.models.items():
        print(f"added drafter {name} to {report.bundle}: {stats['graph_bytes'] / 1e6:.0f} MB, {report.seconds:.1f} s")
    return 0


MAX_STEPS = 100_000
MAX_RANK = 1024
MAX_ALPHA = 10_000.0


def register_cli(sub) -> None:
    """Add the `adapt` and `add-drafter` subcommands to the `edgespec` argument parser's subparsers (numbers
    bounded, files regular: see edgespec.cliargs)."""
    from ..cliargs import MAX_SEED, bounded_float, bounded_int, new_or_regular_file, not_special_file, threads_arg

    p = sub.add_parser("adapt", help="adapt a drafter to the target from the generation history (LoRA, OmniDraft)")
    p.add_argument("bundle")
    p.add_argument("--drafter", metavar="NAME", default=None,
                   help="drafter to adapt (default: the first one whose tokenizer differs from the target's)")
    p.add_argument("--history", metavar="FILE", type=new_or_regular_file, default=None,
                   help="history file, a regular file (default: the bundle's under ~/.cache/edgespec/history or "
                        "$EDGESPEC_HISTORY_DIR)")
    p.add_argument("--holdout", metavar="FRAC", type=bounded_float(0.0, 1.0, hi_open=True), default=DEFAULT_HOLDOUT,
                   help="share of records held out (never trained on) to measure the loss before and after, in [0, 1)")
    p.add_argument("--steps", type=bounded_int(1, MAX_STEPS), default=DEFAULT_STEPS, help=f"1 to {MAX_STEPS}")
    p.add_argument("--rank", type=bounded_int(1, MAX_RANK), default=DEFAULT_RANK, help=f"LoRA rank, 1 to {MAX_RANK}")
    p.add_argument("--alpha", type=bounded_float(0.0, MAX_ALPHA, lo_open=True), default=DEFAULT_ALPHA,
                   help=f"LoRA alpha, in (0, {MAX_ALPHA:g}]")
    p.add_argument("--lr", type=bounded_float(0.0, 1.0, lo_open=True), default=DEFAULT_LR, help="in (0, 1]")
    p.add_argument("--mapped-weight", type=bounded_float(0.0, 1.0), default=DEFAULT_MAPPED_WEIGHT,
                   help="loss weight of n-gram mapped drafter tokens, in [0, 1] (directly mapped ones weigh 1)")
    p.add_argument("--threads", type=threads_arg(), default=2, help="1 to 4x the CPU count (default 2)")
    p.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0, help="0 to 2**64-1")
    p.add_argument("--source", type=not_special_file, default=None,
                   help="the drafter's base weights, when the manifest's path is gone")
    p.add_argument("--quant", choices=["fp32", "int8", "int4"], default=None,
                   help="quantization of the re-exported drafter (default: follows the drafter's)")
    p.add_argument("--no-parity", action="store_true", help="skip the torch reference check of the re-export")
    p.add_argument("--force", action="store_true", help="write the adapted drafter even if its held-out loss rose")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--dry-run", action="store_true", help="check and report the data; train and write nothing")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("add-drafter", help="add a drafter model to an existing bundle")
    p.add_argument("bundle")
    p.add_argument("model", type=not_special_file, help="short model name, .gguf file or Hugging Face folder")
    p.add_argument("--name", default=None, help="name of the drafter inside the bundle")
    p.add_argument("--drafter-kernels", choices=["fast", "exact"], default="fast",
                   help="fast (int8 activations; default) or exact (the target's settings)")
    p.add_argument("--quant", choices=["gguf", "fp32", "int8", "int4"], default=None,
                   help="default: gguf for GGUF sources, fp32 for HF folders")
    p.add_argument("--threads", type=threads_arg(), default=2, help="1 to 4x the CPU count (default 2)")
    p.add_argument("--no-parity", action="store_true", help="skip the torch reference check")
    p.set_defaults(func=cmd_add_drafter)
