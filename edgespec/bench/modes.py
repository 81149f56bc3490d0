"""The bench's decoding modes: the registry (`MODES`, `register_mode`), the systems they expand to
(`mode[@tree][~device]`), and the modes themselves.

A mode is a function `(system, prompt_text, gen_config) -> (token_ids, stats)` where `system` is a `BenchSystem`
(the engine plus what the bench remembers about it between prompts; a bare engine is wrapped, see
`BenchSystem.of`) and `stats` has GenerationStats' keys. `plain` is the baseline of every ratio. Later modes
register themselves with `@register_mode("name")`; a mode that cannot run on a bundle (no drafter, say) raises
`ModeUnavailable` and is reported as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

BASELINE = "plain"
WARMUP_TOKENS = 16  # new tokens of each untimed warm-up generation (modes and peers)


@dataclass
class BenchSystem:
    """One engine as the bench drives it, with the bench's own state about it (nothing is stored on the engine):
    the static n-gram cache its job names, and the drafter spec a model-drafter mode installed (with the drafter
    it made, so a mode run prompt after prompt keeps one drafter and what it learns)."""

    engine: Any
    ngram_static: str | None = None
    drafter_spec: str | None = None
    drafter: Any = None

    @classmethod
    def of(cls, target) -> "BenchSystem":
        """`target` itself when it is a BenchSystem, else a fresh one around the engine `target`."""
        return target if isinstance(target, cls) else cls(target)

    def use_drafter(self, spec: str) -> Any:
        """Make drafter `spec` the engine's (`Engine.set_drafter`), unless the one installed for `spec` still is;
        returns the engine's drafter."""
        engine = self.engine
        if self.drafter_spec != spec or engine.drafter is not self.drafter:
            engine.set_drafter(spec, ngram_cache=False, ngram_static=self.ngram_static)
            self.drafter_spec, self.drafter = spec, engine.drafter
        return engine.drafter


ModeFn = Callable[[BenchSystem, str, dict], "tuple[list[int], dict]"]
MODES: dict[str, ModeFn] = {}


class ModeUnavailable(RuntimeError):
    """A mode cannot run on this bundle (reported as skipped, not as a failure)."""


def register_mode(name: str):
    """Decorator: register `fn(system, prompt_text, gen_config) -> (token_ids, stats dict)` as bench mode `name`."""
    def deco(fn: ModeFn) -> ModeFn:
        MODES[name] = fn
        return fn
    return deco


def bench_gen_config(max_new_tokens: int) -> dict:
    """GenerationConfig fields every mode gets: greedy, exactly `max_new_tokens` tokens (EOS ignored)."""
    return {"max_new_tokens": int(max_new_tokens), "temperature": 0.0, "ignore_eos": True}


def split_system(system: str) -> tuple[str, str | None, str | None]:
    """`mode[@tree][~device]` -> (mode, tree policy or None, device profile or None)."""
    rest, _, device = system.partition("~")
    mode, _, tree = rest.partition("@")
    return mode, tree or None, device or None


def expand_modes(modes: list[str], trees: list[str], devices: list[str]) -> list[str]:
    """Systems to run: each speculative mode once per tree policy (`mode@tree`) and, with several device profiles,
    once per profile (`mode@tree~device`); plain decoding once. Policies are checked here."""
    from ..engine import check_tree_policy

    out: list[str] = []
    for tree in trees:
        check_tree_policy(tree)
    for mode in modes:
        base, tree, device = split_system(mode)
        if tree is not None:
            check_tree_policy(tree)
        if base == BASELINE or tree is not None or not trees:
            variants = [mode]
        else:
            variants = [f"{mode}@{t}" for t in trees]
        if len(devices) > 1 and base != BASELINE and device is None:
            variants = [f"{v}~{d}" for v in variants for d in devices]
        out += [v for v in variants if v not in out]
    return out


def _run(engine, prompt: str, gen_config: dict):
    result = engine.generate(prompt, **gen_config)
    stats = {**result.stats.to_dict(), "finish_reason": result.finish_reason}
    plans = engine.plans() if hasattr(engine, "plans") else []
    if plans:
        stats["plans"] = plans  # the plan per confidence bucket at the end of this prompt
    return result.token_ids, stats


@register_mode("plain")
def plain_mode(system, prompt: str, gen_config: dict):
    """Ordinary autoregressive decoding: one target forward per token."""
    engine = BenchSystem.of(system).engine
    if getattr(engine, "drafter", None) is not None:
        engine.set_drafter(None)
    return _run(engine, prompt, gen_config)


@register_mode("ngram")
def ngram_mode(system, prompt: str, gen_config: dict):
    """Speculative decoding with the n-gram drafter: context and recycling tiers (the session tier is cleared
    between prompts by the bench's reset; no persistent cache, so prompts do not learn from each other; a static
    cache when the job names one)."""
    system = BenchSystem.of(system)
    engine = system.engine
    if getattr(engine.drafter, "name", None) != "ngram":
        engine.set_drafter("ngram", ngram_cache=False, ngram_static=system.ngram_static)
    counters = engine.drafter.counters
    before = {tier: (counters["drafted"][tier], counters["accepted"][tier]) for tier in counters["drafted"]}
    token_ids, stats = _run(engine, prompt, gen_config)
    stats["tiers"] = {tier: [counters["drafted"][tier] - d, counters["accepted"][tier] - a]
                      for tier, (d, a) in before.items()}  # nodes proposed and accepted per tier
    return token_ids, stats


def _model_drafter_mode(spec: str, doc: str) -> ModeFn:
    """A mode that decodes with drafter `spec` (see `edgespec.drafters.factory.make_drafter`); skipped when the
    bundle lacks what the spec needs (a drafter model, a self-speculative export)."""
    def mode(system, prompt: str, gen_config: dict):
        from ..runtimes.manifest import BundleError

        system = BenchSystem.of(system)
        try:
            drafter = system.use_drafter(spec)
        except BundleError as exc:
            raise ModeUnavailable(str(exc)) from None
        before = dict(drafter.counters)
        runner = None if getattr(drafter, "shared_cache", False) else getattr(drafter, "runner", None)
        timing = getattr(runner, "timing", None)  # the drafter model's own ONNX Runtime time (not self-speculation's)
        model_before = (timing.run_seconds, timing.calls, timing.tokens) if timing is not None else None
        token_ids, stats = _run(system.engine, prompt, gen_config)
        stats["drafter_counters"] = {k: v - before.get(k, 0) for k, v in drafter.counters.items()
                                     if isinstance(v, (int, float))}
        if model_before is not None:
            stats["drafter_counters"].update(model_seconds=timing.run_seconds - model_before[0],
                                             model_calls=timing.calls - model_before[1],
                                             model_tokens=timing.tokens - model_before[2])
        if getattr(drafter, "layer_search", None) is not None:
            stats["layers"] = drafter.layer_search.describe()
        if getattr(drafter, "cache", None) is not None and hasattr(drafter.cache, "sizes"):
            stats["learned_cache"] = drafter.cache.sizes()  # cross-vocabulary mappings learned so far
        return token_ids, stats
    mode.__doc__ = doc
    return mode


register_mode("draft")(_model_drafter_mode(
    "draft", "Speculative decoding with the bundle's same-vocabulary drafter model (tree drafts)."))
register_mode("staged")(_model_drafter_mode(
    "ngram>draft", "Staged speculation: the n-gram caches draft for the drafter model, which drafts for the target."))
register_mode("self")(_model_drafter_mode(
    "self", "Self-speculation: the target drafts with a subset of its layers, chosen online."))
register_mode("crossvocab")(_model_drafter_mode(
    "cross", "Cross-vocabulary drafting: a drafter model with another tokenizer, translated through text and learned "
             "mappings (OmniDraft-style)."))
register_mode("crossstaged")(_model_drafter_mode(
    "ngram>cross", "Staged cross-vocabulary drafting: n-grams (in the drafter's vocabulary) draft for the "
                   "cross-vocabulary drafter, which drafts for the target."))


@register_mode("auto")
def auto_mode(system, prompt: str, gen_config: dict):
    """The engine's default drafter ("auto": n-grams, staged in front of a bundled drafter model when its measured
    cost makes it pay; see `edgespec.drafters.choice`): what `edgespec.load(bundle)` decodes with."""
    system = BenchSystem.of(system)
    drafter = system.use_drafter("auto")
    if getattr(drafter, "name", None) == "ngram":
        token_ids, stats = ngram_mode(system, prompt, gen_config)
    else:
        token_ids, stats = _model_drafter_mode("auto", "")(system, prompt, gen_config)
    stats["drafter_choice"] = system.engine.speculation.reason
    return token_ids, stats
