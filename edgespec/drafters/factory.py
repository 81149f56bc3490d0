"""Drafter specs -> drafters.

`make_drafter(speculation, context)` turns the drafter spec of a `SpeculationConfig` ("ngram", "draft[:NAME]",
"self[:...]", "cross[:NAME]", stages joined by ">", "none" or a `Drafter` instance) into a drafter. Everything it
needs from the engine comes in one explicit `DrafterContext`, which the engine builds once: the bundle's manifest,
the target's entry, tokenizer and runner, threads, context length, device profile and the target's cost function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..runtimes.manifest import BundleError, Manifest, ModelEntry
from ..runtimes.runner import ModelRunner
from ..text import Tokenizer
from .base import Drafter
from .cachefile import default_cache_path, default_cache_root, tokenizer_fingerprint
from .config import SpeculationConfig
from .crossvocab import CrossVocabDrafter, open_cache, pair_fingerprint
from .model import LayerSearch, ModelDrafter, candidate_layer_sets, parse_layer_option
from .ngram import NGramDrafter

if TYPE_CHECKING:
    from ..devices.profile import DeviceProfile


@dataclass(frozen=True)
class DrafterContext:
    """What building a drafter needs to know about the engine it drafts for (built once by the engine).

    `target_cost(T)`: the target's forward time for T tokens (the engine's cost model, measured as it goes);
    `target_runner`: the target's own runner (self-speculation drafts with it)."""

    manifest: Manifest
    target: ModelEntry
    tokenizer: Tokenizer
    threads: int
    max_context: int
    profile: "DeviceProfile | None"
    target_cost: Callable[[int], float]
    target_runner: ModelRunner


def make_drafter(speculation: SpeculationConfig, context: DrafterContext) -> Drafter | None:
    """The drafter for `speculation.drafter`.

    * None / "none": plain decoding; a Drafter instance is used as is.
    * "ngram": the n-gram caches (context, session, recycling, persistent and static tiers). `ngram_cache`: None =
      the default persistent cache file for this bundle (under $EDGESPEC_NGRAM_DIR, default ~/.cache/edgespec/ngram),
      False = none, or a path; `ngram_static`: a cache built by `edgespec ngram build`.
    * "draft" or "draft:NAME": a drafter model of the bundle sharing the target's tokenizer.
    * "self", "self:exit=E", "self:skip=3,5,7" or "self:layers=0-13": the target itself with a subset of its
      layers (a bundle exported with --self-speculative); plain "self" picks the layer set online. Add
      ",head=full" to draft through the full LM head instead of the reduced one.
    * "cross" or "cross:NAME": a drafter model with another tokenizer (OmniDraft-style cross-vocabulary drafting:
      its text is translated into target tokens, with mappings learned online; see `edgespec.drafters.crossvocab`).
    * Stages joined by ">" compose (staged speculation): "ngram>draft" lets the n-gram caches draft for the
      drafter model, which drafts the tree for the target.
    """
    spec = speculation.drafter
    if spec is None or spec == "none":
        return None
    if isinstance(spec, Drafter):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"drafter must be a name or a Drafter, got {spec!r}")
    stages = [part.strip() for part in spec.split(">")]
    drafter = None
    for part in stages:
        drafter = _make_stage(part, context, drafter, speculation)
    return drafter


def _make_stage(part: str, context: DrafterContext, stage: Drafter | None,
                speculation: SpeculationConfig) -> Drafter:
    """One stage of a drafter spec, drafting on top of `stage` (None for the first)."""
    kind, _, options = part.partition(":")
    if kind == "ngram":
        if stage is not None:
            raise ValueError(f"'ngram' can only be the first stage of {part!r}")
        fingerprint = tokenizer_fingerprint(context.target.tokenizer_path)
        ngram_cache = speculation.ngram_cache
        if ngram_cache is None:
            ngram_cache = default_cache_path(default_cache_root(), context.target.name, fingerprint)
        return NGramDrafter(context.target.vocab_size, fingerprint=fingerprint,
                            persistent_path=ngram_cache or None, static_path=speculation.ngram_static)
    if kind == "draft":
        entry = _drafter_entry(context, options or None)
        _check_memory(context, entry)
        runner = ModelRunner(entry, threads=context.threads, max_context=context.max_context)
        return ModelDrafter(runner, name=f"draft:{entry.name}", stage=stage, target_cost=context.target_cost)
    if kind == "self":
        return self_drafter(context, options, stage=stage)
    if kind == "cross":
        return _cross_drafter(context, options or None, stage, speculation.ngram_cache)
    raise ValueError(f"unknown drafter {part!r}: use 'ngram', 'draft[:NAME]', 'self[:...]', 'cross[:NAME]', stages "
                     "joined by '>', 'none' or a Drafter instance")


def _check_memory(context: DrafterContext, entry: ModelEntry) -> None:
    """Refuse (MemoryBudgetError) when the target and drafter model `entry` would not fit together."""
    from ..devices.memory import check_memory

    check_memory(context.manifest, [context.target, entry], context.max_context, profile=context.profile)


def _named_drafter(context: DrafterContext, name: str) -> ModelEntry:
    """The bundle's model `name`, which must be one of its models other than the target."""
    manifest = context.manifest
    if name not in manifest.models or name == context.target.name:
        names = [d.name for d in manifest.drafters()] or "none"
        raise BundleError(f"bundle has no drafter {name!r} (drafters: {names})")
    return manifest.models[name]


def _cross_drafter(context: DrafterContext, name: str | None, stage: Drafter | None, ngram_cache) -> Drafter:
    """A drafter model with another tokenizer (OmniDraft-style cross-vocabulary drafting). A first-stage n-gram
    drafter is rebuilt in the drafter's vocabulary (it drafts for the drafter). The learned mappings persist next
    to the n-gram caches unless `ngram_cache` is False."""
    manifest, target = context.manifest, context.target
    drafters = manifest.drafters()
    if name is not None:
        entry = _named_drafter(context, name)
    else:
        others = [d for d in drafters if not same_vocabulary(d, target)]
        if not drafters:
            raise BundleError(f"bundle {manifest.root} has no drafter model: export one with "
                              f"`edgespec export TARGET --drafter MODEL`")
        entry = (others or drafters)[0]
    if stage is not None and not isinstance(stage, NGramDrafter):
        raise ValueError("a cross-vocabulary drafter takes only 'ngram' as its first stage")
    try:
        draft_tokenizer = Tokenizer(str(entry.tokenizer_path))
    except ValueError as exc:
        raise BundleError(f"drafter {entry.name!r}: {exc}") from None
    if stage is not None:  # n-grams over the drafter's own token stream
        stage = NGramDrafter(entry.vocab_size, fingerprint=tokenizer_fingerprint(entry.tokenizer_path),
                             recycling=False)
    fingerprint = pair_fingerprint(entry.tokenizer_path, target.tokenizer_path)
    path = None
    if ngram_cache is not False:
        path = default_cache_path(default_cache_root(), f"{target.name}--{entry.name}-crossvocab", fingerprint)
    cache = open_cache(path, fingerprint, entry.vocab_size, target.vocab_size)
    _check_memory(context, entry)
    runner = ModelRunner(entry, threads=context.threads, max_context=min(context.max_context, entry.context_length))
    return CrossVocabDrafter(runner, draft_tokenizer, context.tokenizer, target.vocab_size,
                             name=f"cross:{entry.name}", bos_id=entry.bos_token_id if entry.add_bos else None,
                             cache=cache, cache_path=path, fingerprint=fingerprint, stage=stage,
                             target_cost=context.target_cost)


def _drafter_entry(context: DrafterContext, name: str | None) -> ModelEntry:
    """The bundle's drafter model `name` (default: the first), checked to share the target's tokenizer."""
    manifest, target = context.manifest, context.target
    drafters = manifest.drafters()
    if name is not None:
        entry = _named_drafter(context, name)
    elif drafters:  # the first one sharing the tokenizer (others are for 'cross')
        entry = next((d for d in drafters if same_vocabulary(d, target)), drafters[0])
    else:
        raise BundleError(f"bundle {manifest.root} has no drafter model: export one with "
                          f"`edgespec export TARGET --drafter MODEL`")
    if entry.vocab_size != target.vocab_size or not same_vocabulary(entry, target):
        raise BundleError(f"drafter {entry.name!r} does not share the tokenizer of {target.name!r} "
                          f"(vocabulary {entry.vocab_size} vs {target.vocab_size}): a same-vocabulary drafter "
                          "is needed")
    return entry


def same_vocabulary(a: ModelEntry, b: ModelEntry) -> bool:
    """True when two models' tokenizers map the same strings to the same ids (each file checked against the
    tokenizer size cap before it is read)."""
    from ..text import check_tokenizer_file

    for entry in (a, b):
        try:
            check_tokenizer_file(str(entry.tokenizer_path))
        except ValueError as exc:
            raise BundleError(f"model {entry.name!r}: {exc}") from None
    if a.tokenizer_path.read_bytes() == b.tokenizer_path.read_bytes():
        return True
    from tokenizers import Tokenizer as HFTokenizer

    return (HFTokenizer.from_file(str(a.tokenizer_path)).get_vocab(with_added_tokens=True)
            == HFTokenizer.from_file(str(b.tokenizer_path)).get_vocab(with_added_tokens=True))


def self_drafter(context: DrafterContext, options: str = "", stage: Drafter | None = None) -> ModelDrafter:
    """The target drafting for itself with a subset of its layers (`options`: 'exit=E', 'skip=...',
    'layers=...', optionally ',head=full'; empty: choose the layer set online)."""
    runner = context.target_runner
    if not getattr(runner, "has_layer_gates", False):
        raise BundleError(f"model {context.target.name!r} cannot skip layers: export the bundle with "
                          "`edgespec export ... --self-speculative`")
    parts = [p for p in options.split(",") if p] if options else []
    head = "reduced"
    layer_parts = []
    for p in parts:
        if p.startswith("head="):
            head = p.split("=", 1)[1]
            if head not in ("full", "reduced"):
                raise ValueError(f"head must be 'full' or 'reduced', got {head!r}")
        else:
            layer_parts.append(p)
    n = context.target.num_layers
    if layer_parts:
        candidates = [parse_layer_option(",".join(layer_parts), n)]
    else:
        candidates = candidate_layer_sets(n)
    use_head = head == "reduced" and getattr(runner, "draft_head_tokens", None) is not None
    cost = context.target_cost
    search = LayerSearch(candidates, plain_rate=None if layer_parts else (lambda: 1.0 / max(cost(1), 1e-9)))
    return ModelDrafter(runner, name="self", stage=stage, target_cost=cost, shared_cache=True,
                        layer_search=search, draft_head=use_head)
