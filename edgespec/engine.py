"""The engine: a loaded bundle that generates text (`edgespec.load(...)` returns one).

Generation is split into small phases in the manner of gpt-fast: `_prefill` feeds the prompt (reusing the cached
prefix of the previous call), `_decode_step` scores one token (plain decoding), and `_speculate_step` runs one
draft -> verify -> commit round (speculative decoding with any `Drafter`). `_generate` drives them and applies the
stop rules. Every path yields token ids one at a time, so stop strings, EOS and `max_new_tokens` behave the same
with and without speculation; `stream` turns the ids into text pieces that never split a character.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Protocol

import numpy as np

from .budget import Calibration, ProfileCost, VerifyCost, choose_nodes
from .chat import render_chat
from .drafters.base import DraftTree, Drafter, VerifiedStep
from .drafters.config import DEFAULT_DRAFT_BUDGET, SpeculationConfig
from .drafters.factory import DrafterContext, make_drafter
from .planner import Planner, StepPrediction, fit_to_shape, fixed_shape, rank_paths
from .runtimes.manifest import BundleError, Manifest, ModelEntry, load_manifest
from .runtimes.runner import ContextOverflow, ModelRunner, default_threads, resolve_providers
from .sampling import (GenerationConfig, HistoryRules, TokenLogprob, check_single_prompt, generation_options, greedy,
                       probabilities, sample, token_logprob)
from .text import StopMatcher, StreamDecoder, Tokenizer, common_prefix_length
from .verify import apply_history_rules, verify_exact

if TYPE_CHECKING:
    from .devices.profile import DeviceProfile


@dataclass
class GenerationStats:
    """Counts and timings of one generation."""

    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # target forward passes that produced tokens (prefill counts as one)
    drafted_tokens: int = 0  # draft tree nodes scored by the target
    accepted_tokens: int = 0  # draft tokens the target accepted (bonus tokens not counted)
    drafter: str = "none"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # everything after the first token: drafting + verifying + bookkeeping
    draft_seconds: float = 0.0  # inside the drafter (propose and observe)
    verify_seconds: float = 0.0  # target forwards of the decode phase
    bookkeeping_seconds: float = 0.0  # tree checks, acceptance, KV commit
    # decoding steps whose drafter proposed nothing (sat out, or found nothing) and the drafter's time on them: what
    # merely following the text costs
    idle_steps: int = 0
    idle_draft_seconds: float = 0.0
    # of those, the steps the drafter sat out (it did no work: drafting was losing) and its time on them
    sat_out_steps: int = 0
    sat_out_draft_seconds: float = 0.0
    # the tree planner's predictions for its steps, and what those steps produced (how good the model is)
    predicted_steps: int = 0
    predicted_tokens: float = 0.0
    predicted_seconds: float = 0.0
    observed_tokens: int = 0
    observed_seconds: float = 0.0
    # steps that verified a replayed path (an accepted off-branch path cut by exactness; not planned) and their tokens
    replayed_steps: int = 0
    replayed_tokens: int = 0
    stopped_early: bool = False  # the caller closed the stream (or cancelled) before the generation ended
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of decoding (after the first token)."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 and self.new_tokens > 1 else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Spec-Bench's metric: tokens produced per target forward (1.0 for plain decoding)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def to_dict(self) -> dict:
        """Plain dict, with the derived rates."""
        d = dict(self.__dict__)
        d["tokens_per_second"] = round(self.tokens_per_second, 3)
        d["mean_accepted_tokens"] = round(self.mean_accepted_tokens, 3)
        d["acceptance_rate"] = round(self.acceptance_rate, 3)
        return d


@dataclass
class GenerationResult:
    """Text, tokens and stats of one generation.

    >>> result = engine.generate("def add(a, b):", max_new_tokens=32)   # doctest: +SKIP
    >>> result.finish_reason, result.stats.mean_accepted_tokens          # doctest: +SKIP
    ('length', 2.4)
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_new_tokens or the context) or "cancelled"
    stats: GenerationStats = field(default_factory=GenerationStats)
    # with logprobs=True: one TokenLogprob per token of token_ids (the raw model's log probabilities), else None
    logprobs: list[TokenLogprob] | None = None


class CancelFlag(Protocol):
    """Anything with `is_set()`, such as a `threading.Event`: generation stops once it returns True."""

    def is_set(self) -> bool: ...


class _Cancel:
    """The stop signals of one generation: the caller's flag, `TextStream.cancel` and `Engine.cancel`."""

    def __init__(self, flag: CancelFlag | None):
        if flag is not None and not callable(getattr(flag, "is_set", None)):
            raise TypeError(f"cancel must have an is_set() method (a threading.Event), got {type(flag).__name__}")
        self.flag = flag
        self.event = threading.Event()
        self.hit = False  # generation stopped because of it

    def is_set(self) -> bool:
        if self.event.is_set() or (self.flag is not None and self.flag.is_set()):
            self.hit = True
        return self.hit


class TextStream:
    """The text pieces of one generation, produced as they are iterated (`Engine.stream`, `Engine.chat_stream`).

    Iterate it for the pieces (never splitting a multi-byte character); `result` holds the GenerationResult once it
    ends. `close()` stops early (the result keeps the tokens so far, finish_reason "cancelled"); `cancel()` asks it
    to stop from any thread, also during the prompt's prefill. While open, the stream holds the engine: other
    threads' generations wait for it, and a second one from the same thread raises RuntimeError.

    >>> with engine.stream("def add(a, b):", max_new_tokens=32) as stream:   # doctest: +SKIP
    ...     for piece in stream:
    ...         print(piece, end="", flush=True)
    >>> stream.result.stats.tokens_per_second                                # doctest: +SKIP
    41.7
    """

    def __init__(self, engine: "Engine", ids: list[int], config: GenerationConfig, cancel: CancelFlag | None = None):
        self._cancel = _Cancel(cancel)
        self._pieces: list[str] = []
        self._result: GenerationResult | None = None
        self._token_ids: list[int] = []  # the tokens kept so far
        self._logprobs: list[TokenLogprob] | None = [] if config.logprobs else None  # one per token produced
        self._generator = engine._generate(ids, config, self._cancel, self._finished, self._token_ids,
                                           self._logprobs)

    def _finished(self, result: GenerationResult) -> None:
        result.text = "".join(self._pieces)
        self._result = result

    @property
    def result(self) -> GenerationResult | None:
        """The GenerationResult once the stream has ended or been closed (None before)."""
        return self._result

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """With logprobs=True, one TokenLogprob per token kept so far (read it after each piece for the new ones;
        a token's text may still be held back: a stop string's start, an unfinished character); None otherwise."""
        if self._logprobs is None:
            return None
        return self._logprobs[:len(self._token_ids)]

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        piece = next(self._generator)  # StopIteration carries the GenerationResult, as a generator's return would
        self._pieces.append(piece)
        return piece

    def cancel(self) -> None:
        """Ask the generation to stop (thread-safe): it ends at the next prefill chunk or decoding step."""
        self._cancel.event.set()

    def close(self) -> None:
        """Stop now and release the engine; the result keeps what was generated."""
        self._generator.close()
        if self._result is None:  # closed before the first piece was asked for: nothing ran
            self._result = GenerationResult("", [], "cancelled", GenerationStats(stopped_early=True),
                                            None if self._logprobs is None else [])

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


PLAIN_STEP_EVERY = 48  # speculative steps between two measured plain steps
TREE_POLICIES = ("auto", "plan", "scores")  # besides fixed shapes: chain:K, tree:WxD


def check_tree_policy(tree: str) -> str:
    """Validate a tree policy: "auto" (plan with a device profile, else scores), "plan" (Sequoia-style plan from
    measured costs and acceptance), "scores" (cut each proposal by the drafter's own estimates) or a fixed shape
    ("chain:K", "tree:WxD")."""
    if not isinstance(tree, str):
        raise TypeError(f"tree must be a string, got {type(tree).__name__}")
    if tree not in TREE_POLICIES:
        fixed_shape(tree)  # raises ValueError naming the accepted forms
    return tree


class Engine:
    """A loaded bundle (`edgespec.load` returns one): the target model, its tokenizer and chat template, and the
    drafter that speculates for it.

    One generation runs at a time: an engine shared by several threads serves them one after another (each waits
    for the lock), and a thread that opens a second generation while its own stream is still open gets a
    RuntimeError instead of waiting for itself. `cancel()` stops the running generation from any thread; `close()`
    (or a `with` block) persists the drafters' caches and releases the ONNX Runtime sessions.

    >>> with edgespec.load("bundles/qwen") as engine:                              # doctest: +SKIP
    ...     print(engine.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=20).text)
    Hello! How can I help you today?
    """

    def __init__(self, manifest: Manifest, threads: int | None = None, max_context: int | None = None,
                 model: str | None = None, speculation: SpeculationConfig | None = None, history=None, *,
                 session=None, providers=None):
        """`speculation`: the drafter, budget, tree policy, device profile and n-gram caches (default: plain
        decoding with the default budget, tree policy and no profile); `providers`: the target's execution
        providers; see `edgespec.load`."""
        if speculation is None:
            speculation = SpeculationConfig(drafter=None)
        elif not isinstance(speculation, SpeculationConfig):
            raise TypeError(f"speculation must be a SpeculationConfig, got {type(speculation).__name__}")
        tree, draft_budget = speculation.tree, speculation.draft_budget
        self._manifest = manifest
        self.entry: ModelEntry = manifest.models[model] if model else manifest.target_model
        self.threads = threads or default_threads()
        chosen_providers = resolve_providers(providers)  # ProviderError (a ValueError) before anything loads
        self.providers: list[str] = [name for name, _ in chosen_providers]  # the target's, CPU last
        try:
            self.tokenizer = Tokenizer(str(self.entry.tokenizer_path))
        except ValueError as exc:
            raise BundleError(f"model {self.entry.name!r}: {exc}") from None
        if self.tokenizer.vocab_size > self.entry.vocab_size:
            raise BundleError(f"tokenizer {self.entry.tokenizer_path} has {self.tokenizer.vocab_size} tokens but the "
                             f"model's vocabulary is {self.entry.vocab_size}: wrong tokenizer for this model")
        self._tree = check_tree_policy(tree)
        # a fixed shape's rank paths (None for the adaptive policies)
        self._fixed_paths = None if tree in TREE_POLICIES else frozenset(rank_paths(fixed_shape(tree)))
        # the device profile (measured verification costs) drives the tree plan; without one, costs are measured as
        # we go
        self.profile = _resolve_profile(speculation.device, manifest, self.entry, self.threads, self.providers)
        if session is None:  # a shared session (Engine.variant) loads no weights
            _check_memory(manifest, [self.entry], max_context, self.profile)
        self._runner = ModelRunner(self.entry, threads=self.threads, max_context=max_context, session=session,
                                   providers=chosen_providers)
        self._cached_ids: list[int] = []  # token ids whose K/V are committed in the runner's cache
        self._lock = threading.Lock()  # one generation at a time: other threads wait for it
        self._owner: int | None = None  # the thread holding the lock (its second generation would deadlock)
        self._running: _Cancel | None = None  # the stop signals of the generation running now
        self._ngram_files = (speculation.ngram_cache, speculation.ngram_static)  # as given (the rest is derived)
        self._closed = False
        self._simulated_clock = False  # forwards are simulated and costed by the runner (see _use_target_runner)
        self.last_stats: GenerationStats | None = None
        self._warned_no_template = False
        if not isinstance(draft_budget, int) or isinstance(draft_budget, bool) or draft_budget < 0:
            raise ValueError(f"draft_budget must be an int >= 0, got {draft_budget!r}")
        self._draft_budget = draft_budget
        self._verify_cost = ProfileCost(self.profile) if self.profile is not None else VerifyCost()
        self._replay: list[int] = []  # an accepted off-branch path to verify again as a chain (next step's draft)
        self._replaying = False  # this step verifies the replay
        self._steps_to_plain = 0  # speculative steps until the next plain (one-token) step is measured
        self._calibration = Calibration()  # how the drafter's acceptance estimates compare with what happens
        # what the drafter factory knows of this engine (built once; never its private fields)
        self._drafter_context = DrafterContext(manifest, self.entry, self.tokenizer, self.threads, self.context_length,
                                               self.profile, self._verify_cost.cost, self._runner)
        speculation, self._drafter_reason = self._resolve_auto(speculation)
        self.drafter: Drafter | None = make_drafter(speculation, self._drafter_context)
        self._planner: Planner | None = self._make_planner()
        self._warn_if_inexact_verification()
        self._history = _session_log(history, manifest.root, self.entry.name)

    # ---- public API -------------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Tokens of context this engine can hold."""
        return self._runner.max_context

    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> token ids (BOS added when the model wants one)."""
        ids = self.tokenizer.encode(prompt)
        if self.entry.add_bos and self.entry.bos_token_id is not None and (not ids or ids[0] != self.entry.bos_token_id):
            ids = [self.entry.bos_token_id] + ids
        return ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` under the model's chat template (plain-text fallback without one)."""
        if not self.entry.chat_template and not self._warned_no_template:
            self._warned_no_template = True
            warnings.warn(f"model {self.entry.name!r} has no chat template (a base model): using a plain-text "
                          "'User: ... / Assistant:' fallback", UserWarning, stacklevel=2)
        tok = self.tokenizer
        bos = tok.id_to_token(self.entry.bos_token_id) if self.entry.bos_token_id is not None else ""
        eos = tok.id_to_token(self.entry.eos_token_ids[0]) if self.entry.eos_token_ids else ""
        text = render_chat(self.entry.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos or "", eos_token=eos or "")
        if self.entry.chat_template and bos and self.entry.add_bos and text.startswith(bos):
            text = text[len(bos):]  # encode() adds the BOS id itself
        return text

    def generate(self, prompt: str | list[int], *, cancel: CancelFlag | None = None,
                 generation_config: "GenerationConfig | Mapping | object | None" = None,
                 **config) -> GenerationResult:
        """Generate a completion of `prompt` (one text or one list of token ids; a list of prompts raises
        TypeError: there is no batching, call once per prompt). Keyword arguments are GenerationConfig fields
        (max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, min_new_tokens, seed, stop,
        logprobs, top_logprobs...); `generation_config` is a transformers-like GenerationConfig or dict whose
        fields the keyword arguments override (see `edgespec.sampling.generation_options`: what is read, what is
        ignored, what raises); `cancel` is an optional flag (a threading.Event) that stops the generation once
        set, as `Engine.cancel()` does.

        >>> engine.generate("def fib(n):", max_new_tokens=48, stop=["\\n\\n"]).text   # doctest: +SKIP
        >>> engine.generate("def fib(n):", generation_config={"do_sample": True, "temperature": 0.7})  # doctest: +SKIP
        """
        stream = self.stream(prompt, cancel=cancel, generation_config=generation_config, **config)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str | list[int], *, cancel: CancelFlag | None = None,
               generation_config: "GenerationConfig | Mapping | object | None" = None, **config) -> TextStream:
        """Generate like `generate`, yielding text pieces as they come (never splitting a multi-byte character).

        Options and the prompt are checked at once (errors raise here, not at the first piece); the stream's
        `result` holds the GenerationResult once it ends, and with logprobs=True `stream.logprobs` holds the
        log probabilities of the tokens kept so far.

        >>> for piece in engine.stream("def fib(n):", max_new_tokens=48):   # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        check_single_prompt(prompt)
        config = self._config(config, generation_config)
        return TextStream(self, self._prompt_ids(prompt, config), config, cancel)

    def chat(self, messages: list[dict], *, cancel: CancelFlag | None = None,
             generation_config: "GenerationConfig | Mapping | object | None" = None, **config) -> GenerationResult:
        """Answer the conversation `messages` ([{"role": ..., "content": ...}, ...]) under the model's chat template.
        Successive turns reuse the cached prefix, and the n-gram drafter learns the session as it goes. Options as
        `generate`.

        >>> engine.chat([{"role": "user", "content": "Write hello world in C."}]).text   # doctest: +SKIP
        """
        return self.generate(self.render_chat(messages), cancel=cancel, generation_config=generation_config,
                             **config)

    def chat_stream(self, messages: list[dict], *, cancel: CancelFlag | None = None,
                    generation_config: "GenerationConfig | Mapping | object | None" = None,
                    **config) -> TextStream:
        """Streaming form of `chat`.

        >>> for piece in engine.chat_stream([{"role": "user", "content": "Hi!"}]):   # doctest: +SKIP
        ...     print(piece, end="")
        """
        return self.stream(self.render_chat(messages), cancel=cancel, generation_config=generation_config, **config)

    def cancel(self) -> bool:
        """Stop the generation running now, from any thread. It ends at its next prefill chunk or decoding step with
        finish_reason "cancelled" and keeps the tokens produced so far; generations waiting for the engine are not
        affected. Returns whether a generation was running.

        >>> threading.Timer(2.0, engine.cancel).start()                 # doctest: +SKIP
        >>> engine.generate(long_prompt, max_new_tokens=2000).finish_reason   # doctest: +SKIP
        'cancelled'
        """
        running = self._running
        if running is None:
            return False
        running.event.set()
        return True

    @property
    def bundle_path(self) -> str:
        """The bundle folder this engine was loaded from."""
        return str(self._manifest.root)

    @property
    def speculation(self) -> SpeculationConfig:
        """The speculation settings in force (the drafter by name, the tree policy resolved, the device profile by
        name), with `reason`: why this drafter (for the default "auto": the choice and the costs it rests on)."""
        drafter = None if self.drafter is None else self.drafter.name
        device = None if self.profile is None else self.profile.name
        return SpeculationConfig(drafter, self._draft_budget, self.tree_policy, device, *self._ngram_files,
                                 reason=self._drafter_reason)

    def _resolve_auto(self, speculation: SpeculationConfig) -> tuple[SpeculationConfig, str]:
        """`speculation` with drafter "auto" replaced by the choice of `edgespec.drafters.choice` (n-grams when the
        chosen drafter model cannot be loaded: too big for the memory left, say), and the reason."""
        from dataclasses import replace

        from .drafters.choice import AUTO, choose_drafter
        from .drafters.factory import same_vocabulary

        spec = speculation.drafter
        if not (isinstance(spec, str) and spec == AUTO):
            named = "plain decoding" if spec is None or spec == "none" else "given"
            return speculation, named
        chosen, reason = choose_drafter(self._manifest, self.entry, self.profile, same_vocabulary)
        if chosen != "ngram":
            from .devices.memory import MemoryBudgetError

            try:
                _check_memory(self._manifest, [self.entry, self._manifest.models[chosen.rsplit(":", 1)[1]]],
                              self.context_length, self.profile)
            except MemoryBudgetError as exc:
                chosen, reason = "ngram", f"auto: n-grams ({chosen} would not fit in memory: {exc})"
        return replace(speculation, drafter=chosen), reason

    @contextmanager
    def _exclusive(self, timeout: float | None = None):
        """Hold the engine (one generation or state change at a time). Other threads wait; the thread that already
        holds it gets a RuntimeError (waiting would deadlock)."""
        if self._owner == threading.get_ident():
            raise RuntimeError("this thread still has a generation open on this engine (an unfinished stream): "
                               "finish or close it first")
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise RuntimeError(f"engine still generating after {timeout:.0f} s: close the stream first")
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    def close(self, timeout: float = 30.0) -> None:
        """Finish with this engine: wait (up to `timeout` seconds) for a running generation, save the drafters'
        persistent caches, and release the ONNX Runtime sessions. Later generations raise RuntimeError; closing
        twice is harmless. Also `with edgespec.load(...) as engine:`."""
        with self._exclusive(timeout):
            if self._closed:
                return
            self._closed = True
            stage = self.drafter
            while stage is not None:  # the drafter and its first stages
                try:
                    stage.save()
                except OSError as exc:
                    warnings.warn(f"drafter {stage.name!r} cache not saved: {exc}", UserWarning, stacklevel=2)
                stage = stage.stage
            self.drafter = self._planner = None
            self._runner = None  # the sessions go with the last reference

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed (Engine.close): load the bundle again")

    def reset(self) -> None:
        """Forget the cached prefix and the drafter's session state (a new conversation)."""
        with self._exclusive():
            if self._closed:
                return
            self._runner.reset()
            self._cached_ids = []
            if self.drafter is not None:
                self.drafter.reset()

    def variant(self, drafter: "str | Drafter | None" = SpeculationConfig.drafter, *, draft_budget: int | None = None,
                device: "str | os.PathLike | DeviceProfile | None" = None, tree: str = SpeculationConfig.tree,
                ngram_cache: "str | os.PathLike | bool | None" = None,
                ngram_static: "str | os.PathLike | None" = None) -> "Engine":
        """A second engine over this one's loaded target: the ONNX Runtime session (the weights) is shared, while
        the KV cache, drafter, device profile, tree policy and planner are the variant's own (arguments as `load`;
        `draft_budget` defaults to this engine's). For comparing speculation settings side by side in one process
        (`edgespec bench --interleave`) without loading the model twice. Both engines stay usable; closing one
        leaves the other's session alone.

        >>> chains = engine.variant("ngram", tree="chain:4")              # doctest: +SKIP
        >>> chains.generate("def fib(n):", max_new_tokens=32).token_ids == \
        ...     engine.generate("def fib(n):", max_new_tokens=32).token_ids  # doctest: +SKIP
        True
        """
        self._check_open()
        speculation = SpeculationConfig(drafter, self._draft_budget if draft_budget is None else draft_budget, tree,
                                        device, ngram_cache, ngram_static)
        return Engine(self._manifest, threads=self.threads, max_context=self.context_length, model=self.entry.name,
                      speculation=speculation, history=False, session=self._runner.session, providers=self.providers)

    def set_drafter(self, drafter: "str | Drafter | None", **options) -> None:
        """Switch drafting: None or "none" (plain decoding), "auto" (the default choice), "ngram", a drafter model
        spec (as `load`), or any Drafter instance. Waits for a running generation."""
        with self._exclusive():
            self._check_open()
            unknown = set(options) - {"ngram_cache", "ngram_static"}
            if unknown:
                raise TypeError(f"set_drafter() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
            speculation = SpeculationConfig(drafter, self._draft_budget, self._tree, None, **options)
            speculation, self._drafter_reason = self._resolve_auto(speculation)
            self.drafter = make_drafter(speculation, self._drafter_context)
            self._calibration = Calibration()  # what was learnt about the previous drafter's estimates is dropped
            self._planner = self._make_planner()
            self._ngram_files = (speculation.ngram_cache, speculation.ngram_static)
        self._warn_if_inexact_verification()

    @property
    def tree_policy(self) -> str:
        """The tree policy in force: "plan", "scores" or a fixed shape ("auto" resolved)."""
        if self._tree == "auto":
            return "plan" if self.profile is not None else "scores"
        return self._tree

    def plans(self, context: int | None = None) -> list[dict]:
        """The planner's current plan per confidence bucket (empty without a planner)."""
        if self._planner is None:
            return []
        return self._planner.describe(len(self._cached_ids) if context is None else context)

    def _make_planner(self) -> Planner | None:
        planned = self.drafter is not None and self.tree_policy == "plan"
        if self.drafter is not None:
            self.drafter.planned(planned)
        if not planned:
            return None
        dynamic = bool(self.drafter.dynamic)
        return Planner(self._verify_seconds, self._draft_seconds if dynamic else None,
                       max_nodes=min(self._draft_budget, 64), dynamic=dynamic)

    def _verify_seconds(self, tokens: int, context: int) -> float:
        """The target's forward time for `tokens` tokens at `context` (the profile's, else measured online)."""
        if isinstance(self._verify_cost, ProfileCost):
            return self._verify_cost.seconds(tokens, context)
        return self._verify_cost.cost(tokens)

    def _use_target_runner(self, runner) -> None:
        """Replace the target's runner by `runner`, whose forwards are simulated (`edgespec bench --replay`): each
        forward's time is then its `last_seconds`, not the clock's."""
        self._runner = runner
        self._cached_ids = []
        self._simulated_clock = True

    def _observe_cost(self, tokens: int, seconds: float) -> None:
        """Feed one forward's time to the cost model. When the engine's timings contradict the device profile (see
        `ProfileCost`), say so once per change and let the planner plan again with the corrected costs."""
        if self._simulated_clock:
            seconds = self._runner.last_seconds
        cost = self._verify_cost
        cost.observe(tokens, seconds)
        if isinstance(cost, ProfileCost) and cost.changed:
            cost.changed = False
            if self._planner is not None:
                self._planner.forget_plans()
            if cost.scale != 1.0 or cost.corrections:
                shown = ", ".join([f"all sizes x{cost.scale:.2f}"] * (cost.scale != 1.0) +
                                  [f"T={t} x{f:.2f}" for t, f in sorted(cost.corrections.items())])
                warnings.warn(f"device profile {self.profile.name!r} does not match this session's timings "
                              f"(observed / profile: {shown}); planning with the observed costs. Measure the "
                              f"device again with `edgespec profile --bundle {self.bundle_path}`", UserWarning,
                              stacklevel=4)

    def _draft_seconds(self, depth: int, nodes: int) -> float:
        """A model drafter's time for a tree `depth` deep: its own estimate from the proposals it measured (staged
        and cross-vocabulary drafters included: following the text, forwards with a stage's guesses riding along,
        translation), else one forward per level (measured online, else from the device profile's drafter
        measurements)."""
        own = self.drafter.draft_seconds(depth, nodes)
        if own is not None:
            return own
        cost, runner = self.drafter.forward_cost, self.drafter.runner
        per_forward = cost.seconds if cost is not None else None
        if per_forward is None and self.profile is not None and runner is not None:
            if runner.entry.name != self.entry.name:
                per_forward = self.profile.drafter_seconds(runner.entry.name, 4)
        return depth * per_forward if per_forward else 0.0

    def _warn_if_inexact_verification(self) -> None:
        """Bundles exported with int8 activations (`--accuracy-level` > 0) before attention summed in slot order
        (no `quantization.t_invariant` in the manifest) round a T-token forward differently from T single steps, so
        speculative output may differ from their own plain output."""
        quantization = self.entry.quantization or {}
        level = int(quantization.get("accuracy_level") or 0)
        if self.drafter is not None and level > 0 and quantization.get("t_invariant") is not True:
            warnings.warn(f"model {self.entry.name!r} was exported with accuracy level {level} (int8 activations) "
                          "by an older edgespec whose attention is not T-invariant: speculative output can differ "
                          "from this bundle's plain output; export it again for exact speculation", UserWarning,
                          stacklevel=3)

    # ---- phases -----------------------------------------------------------------------------------------------
    def _config(self, overrides: dict, generation_config=None) -> GenerationConfig:
        """The checked GenerationConfig of keyword arguments `overrides` over `generation_config` (if any)."""
        unknown = set(overrides) - set(GenerationConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        if generation_config is not None:
            overrides = generation_options(generation_config, overrides)
        config = GenerationConfig(**overrides)
        config.validate()
        return config

    def _stop_ids(self, config: GenerationConfig) -> set[int]:
        if config.ignore_eos:
            return set()
        if config.eos_token_ids is not None:
            return set(config.eos_token_ids)
        return set(self.entry.eos_token_ids)

    def _prefill(self, ids: list[int], stats: GenerationStats, cancel: _Cancel) -> np.ndarray | None:
        """Feed the prompt, reusing the longest cached prefix; returns the logits after the last prompt token, or
        None when cancelled between two chunks (the chunks fed so far stay cached for the next call)."""
        common = common_prefix_length(self._cached_ids, ids[:-1])  # always re-run at least the last prompt token
        self._runner.rewind(common)
        self._cached_ids = self._cached_ids[:common]
        stats.reused_prompt_tokens = common
        logits = self._runner.prefill(ids[common:], stop=cancel.is_set)
        self._cached_ids = list(ids[:self._runner.length])
        return logits

    def _log(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Append the prompt and output to the session history (for `edgespec adapt`); a failed write warns."""
        if self._history is None or not output_ids:
            return
        try:
            self._history.append(self.tokenizer.decode(prompt_ids, skip_special_tokens=False),
                                self.tokenizer.decode(output_ids, skip_special_tokens=False),
                                prompt_ids, output_ids, self.entry.name)
        except OSError as exc:
            warnings.warn(f"session history {self._history.path} not written: {exc}", UserWarning, stacklevel=3)

    def _decode_step(self, token: int) -> np.ndarray:
        """Append one token and return the logits that follow it."""
        logits = self._runner.forward([token])[0]
        self._runner.commit()
        self._cached_ids.append(token)
        return logits

    def _choose(self, logits: np.ndarray, config: GenerationConfig, rng) -> int:
        """The next token from logits the history rules were applied to: argmax, or a draw from `config`'s
        distribution."""
        if config.is_greedy:
            return greedy(logits)
        return sample(probabilities(logits, config), rng)

    def _tokens(self, ids: list[int], config: GenerationConfig, stats: GenerationStats,
                budget: int, cancel: _Cancel, logprobs: list[TokenLogprob] | None = None) -> Iterator[int]:
        """The decoding loop: yields each new token id (the caller decides when to stop; `cancel` ends it before
        the next prefill chunk or step).

        Without a drafter every step scores one token; with one, each step verifies a draft tree and yields the
        accepted tokens and the target's bonus token. `budget` bounds how many tokens the caller can take. Both
        paths choose from the logits after the same history rules (repetition penalty, min_new_tokens), and append
        each token's TokenLogprob to `logprobs` (when given) before yielding it."""
        rng = np.random.default_rng(config.seed)
        rules = HistoryRules(config, ids, self._stop_ids(config))
        self._replay = []
        drafter = self.drafter if self._draft_budget > 0 else None
        stats.drafter = drafter.name if drafter is not None else "none"
        start = time.perf_counter()
        logits = self._prefill(ids, stats, cancel)
        stats.prefill_seconds = time.perf_counter() - start
        if logits is None:
            return
        stats.steps = 1  # the prefill forward yields the first token (Spec-Bench counts it as a step)
        token = self._choose(rules.row(logits), config, rng)
        if logprobs is not None:
            logprobs.append(token_logprob(logits, token, config.top_logprobs))
        if drafter is None:
            while True:
                yield token
                rules.push(token)
                if cancel.is_set():
                    return
                t = time.perf_counter()
                logits = self._decode_step(token)
                seconds = time.perf_counter() - t
                stats.decode_seconds += seconds
                self._observe_cost(1, seconds)
                stats.steps += 1
                token = self._choose(rules.row(logits), config, rng)
                if logprobs is not None:
                    logprobs.append(token_logprob(logits, token, config.top_logprobs))
        context = list(ids)
        produced = 0
        started = False
        try:
            while True:
                yield token
                produced += 1
                context.append(token)
                rules.push(token)
                if cancel.is_set():
                    return
                t = time.perf_counter()
                if not started:  # after the first token is out: the drafter's prefill does not delay it
                    drafter.start(list(ids), config)
                    started = True
                    stats.draft_seconds += time.perf_counter() - t
                accepted, token = self._speculate_step(context, config, rng, stats, budget - produced, rules,
                                                       logprobs)
                stats.decode_seconds += time.perf_counter() - t
                stats.steps += 1
                for accepted_token in accepted:
                    yield accepted_token
                    produced += 1
                    context.append(accepted_token)
                    rules.push(accepted_token)
        finally:
            if started:
                t = time.perf_counter()
                drafter.finish(context)
                stats.draft_seconds += time.perf_counter() - t

    def _draft(self, context: list[int], remaining: int,
               stats: GenerationStats) -> tuple[DraftTree, StepPrediction | None]:
        """Ask the drafter for a tree and cut it to what this step verifies: the node budget, the tokens still
        wanted, the room left in the context (the pending token and the tree must fit), and the tree policy (the
        planner's plan for the proposal's confidence bucket, a fixed shape, or the drafter's scores against the
        verification cost). Returns the tree and, under a plan, the planner's prediction for the step."""
        t = time.perf_counter()
        room = self.context_length - len(context)  # slots left once the pending token is cached
        max_nodes = min(self._draft_budget, room)
        if isinstance(self._verify_cost, ProfileCost):
            self._verify_cost.context = len(context)
        else:
            # a plain step now and then keeps the cost of scoring one token measured (what drafting must beat); it
            # is not extrapolated from multi-token forwards, which take another kernel path on CPUs
            self._steps_to_plain -= 1
            if 1 not in self._verify_cost.seconds or self._steps_to_plain < 0:
                max_nodes, self._steps_to_plain = 0, PLAIN_STEP_EVERY
        max_depth = min(remaining - 1, room)  # accepted + bonus never exceed what the caller can take
        if max_depth <= 0:
            max_nodes = 0
        ask = max_nodes
        if self._planner is not None and max_nodes:
            wanted = self._planner.request(len(context))
            # a static drafter (n-grams) grows best-first: ask for more than the plan, then fit its shape
            ask = min(max_nodes, wanted if self._planner.dynamic else 3 * wanted)
        elif self._fixed_paths is not None and max_nodes:
            ask = min(max_nodes, 3 * len(self._fixed_paths))
        replay, self._replay, self._replaying = self._replay, [], False
        if replay and max_nodes:  # an accepted off-branch path, verified again as a chain at its own slots
            self.drafter.propose(context, 0)
            stats.draft_seconds += time.perf_counter() - t
            self._replaying = True
            return DraftTree.chain(replay).prune(max_nodes, max_depth), None
        # always asked (with no budget when no node can be verified), so the drafter knows this step was not its own
        tree = self.drafter.propose(context, ask)
        stats.draft_seconds += time.perf_counter() - t
        if not isinstance(tree, DraftTree):
            raise TypeError(f"drafter {self.drafter.name!r} returned {type(tree).__name__}, not a DraftTree")
        tree.validate(self.entry.vocab_size)
        if len(tree):
            tree = tree.prune(max_nodes, max_depth)
        if not len(tree):
            return tree, self._planner.predict(tree, 0, len(context)) if self._planner is not None else None
        prediction = None
        if self._planner is not None:
            tree, prediction = self._planner.fit(tree, len(context))
        elif self._fixed_paths is not None:
            tree = fit_to_shape(tree, self._fixed_paths)
        elif tree.scores is not None:  # keep only as many nodes as pay off at this device's verification cost
            adjusted = self._calibration.adjust(tree.scores, tree.parents)
            tree = tree.subtree(choose_nodes(adjusted, tree.parents, self._verify_cost.cost))
        # the main branch at the slots plain decoding uses: its logits are exact (see verify.cut_to_exact_prefix)
        return tree.chain_first(), prediction

    def _speculate_step(self, context: list[int], config: GenerationConfig, rng, stats: GenerationStats,
                        remaining: int, rules: HistoryRules | None = None,
                        logprobs: list[TokenLogprob] | None = None) -> tuple[list[int], int]:
        """One draft -> verify -> commit round. `context[-1]` is the pending token (yielded, not yet cached).

        The target scores the pending token and every tree node in one forward with the tree mask; the history
        `rules` are applied at each node with its own path, the accepted path's K/V are kept (no re-run) and the
        drafter learns what happened (from the raw logits). Returns (accepted draft tokens, bonus token); the bonus
        is the new pending token. Appends their TokenLogprobs to `logprobs` when given."""
        t0 = time.perf_counter()
        draft_before, verify_before = stats.draft_seconds, stats.verify_seconds
        tree, prediction = self._draft(context, remaining, stats)
        pending = context[-1]
        fed_tokens = np.concatenate([[pending], tree.tokens]).astype(np.int64)
        fed_parents = np.concatenate([[-1], np.where(tree.parents < 0, 0, tree.parents + 1)]).astype(np.int64)
        t = time.perf_counter()
        logits = self._runner.forward(fed_tokens, fed_parents)
        seconds = time.perf_counter() - t
        stats.verify_seconds += seconds
        self._observe_cost(len(fed_tokens), seconds)
        scored = logits if rules is None else apply_history_rules(tree, logits, rules)
        accepted_nodes, bonus, self._replay = verify_exact(tree, scored, config, rng)
        self._runner.commit([0] + [node + 1 for node in accepted_nodes])
        accepted = [int(tree.tokens[node]) for node in accepted_nodes]
        if logprobs is not None:  # token i of accepted + [bonus] was chosen at row 0, then below each accepted node
            rows = [0] + [node + 1 for node in accepted_nodes]
            logprobs.extend(token_logprob(logits[row], token, config.top_logprobs)
                            for row, token in zip(rows, accepted + [bonus]))
        if tree.scores is not None and len(tree):
            self._calibration.update(tree.scores, tree.parents, accepted_nodes)
        if prediction is not None:
            self._planner.observe(tree, accepted_nodes, prediction.bucket)
        self._cached_ids.append(pending)
        self._cached_ids.extend(accepted)
        stats.drafted_tokens += len(tree)
        stats.accepted_tokens += len(accepted)
        t = time.perf_counter()
        self.drafter.observe(VerifiedStep(fed_tokens, fed_parents, logits, accepted_nodes, accepted + [bonus],
                                          context_length=len(context)))
        stats.draft_seconds += time.perf_counter() - t
        elapsed = time.perf_counter() - t0
        if not len(tree):
            stats.idle_steps += 1
            stats.idle_draft_seconds += stats.draft_seconds - draft_before
            if self.drafter.sat_out:
                stats.sat_out_steps += 1
                stats.sat_out_draft_seconds += stats.draft_seconds - draft_before
        inner = (stats.draft_seconds - draft_before) + (stats.verify_seconds - verify_before)
        stats.bookkeeping_seconds += elapsed - inner
        if self._replaying:
            stats.replayed_steps += 1
            stats.replayed_tokens += len(accepted) + 1
        if prediction is not None:
            stats.predicted_steps += 1
            stats.predicted_tokens += prediction.tokens
            stats.predicted_seconds += prediction.seconds
            stats.observed_tokens += len(accepted) + 1
            stats.observed_seconds += elapsed
        return accepted, bonus

    def _prompt_ids(self, prompt: str | list[int], config: GenerationConfig | None = None) -> list[int]:
        """Token ids of `prompt`, checked against the vocabulary and the context length.

        A prompt that does not fit raises ContextOverflow, unless `config.truncate_prompt` asks to keep its tail
        (room is left for min(max_new_tokens, half the context) new tokens)."""
        self._check_open()
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.context_length:
            if config is None or not config.truncate_prompt:
                raise ContextOverflow(f"prompt has {len(ids)} tokens; the context length is {self.context_length} "
                                      "(pass truncate_prompt=True to keep the prompt's tail)")
            room = max(1, min(config.max_new_tokens, self.context_length // 2))
            ids = ids[len(ids) - (self.context_length - room):]
        bad = [i for i in ids if not 0 <= i < self.entry.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.entry.vocab_size}")
        return ids

    def _generate(self, ids: list[int], config: GenerationConfig, cancel: _Cancel,
                  finished: "Callable[[GenerationResult], None]", out_ids: list[int] | None = None,
                  logprobs: list[TokenLogprob] | None = None):
        """Generator of text pieces (what a TextStream iterates); returns the GenerationResult and hands it to
        `finished` also when the caller closes it early. The kept tokens are appended to `out_ids` as they come,
        and (with `logprobs`, a list) every produced token's TokenLogprob to `logprobs`."""
        with self._exclusive():
            self._check_open()
            stats = GenerationStats(prompt_tokens=len(ids))
            budget = min(config.max_new_tokens, self.context_length - len(ids))
            decoder = StreamDecoder(self.tokenizer)
            matcher = StopMatcher(list(config.stop))
            out_ids = [] if out_ids is None else out_ids
            finish = "cancelled"
            t0 = time.perf_counter()
            self._running = cancel
            tokens = self._tokens(ids, config, stats, budget, cancel, logprobs) if budget > 0 else iter(())
            try:
                finish = yield from self._pieces(tokens, stats, t0, self._stop_ids(config), decoder, matcher, out_ids,
                                                 budget, config.min_new_tokens)
                if cancel.hit:
                    finish = "cancelled"
            finally:  # also when the caller closed the stream early: the stats and the history stay right
                self._running = None
                stats.new_tokens = len(out_ids)
                stats.total_seconds = time.perf_counter() - t0
                stats.stopped_early = finish == "cancelled"
                self.last_stats = stats
                self._log(ids, out_ids)
                result = GenerationResult(text="", token_ids=list(out_ids), finish_reason=finish, stats=stats,
                                          logprobs=None if logprobs is None else logprobs[:len(out_ids)])
                finished(result)
        return result

    def _pieces(self, tokens, stats: GenerationStats, t0: float, stop_ids: set[int], decoder: StreamDecoder,
                matcher: StopMatcher, out_ids: list[int], budget: int, min_new_tokens: int = 0):
        """Text pieces of the token stream under the stop rules (EOS, stop strings, the budget); returns the finish
        reason. Appends every kept token to `out_ids`. Stop strings are looked for only in the text that comes
        after the first `min_new_tokens` tokens (EOS cannot come earlier: the history rules mask it)."""
        finish = "length"
        try:
            for token in tokens:
                if not out_ids:
                    stats.time_to_first_token = time.perf_counter() - t0
                if token in stop_ids:
                    finish = "stop"
                    break
                out_ids.append(token)
                text = decoder.push(token)
                piece = matcher.push(text) if len(out_ids) > min_new_tokens else text
                if piece:
                    yield piece
                if matcher.stopped:
                    finish = "stop"
                    break
                if len(out_ids) >= budget:
                    break
        finally:
            tokens.close() if hasattr(tokens, "close") else None
        if not matcher.stopped:
            tail = matcher.push(decoder.flush()) + (matcher.flush() if not matcher.stopped else "")
            if tail:
                yield tail
            if matcher.stopped:
                finish = "stop"
        return finish


def load(bundle_dir: "str | os.PathLike", threads: int | None = None, max_context: int | None = None,
         model: str | None = None, drafter: "str | Drafter | None" = SpeculationConfig.drafter,
         draft_budget: int = DEFAULT_DRAFT_BUDGET, ngram_cache: "str | os.PathLike | bool | None" = None,
         ngram_static: "str | os.PathLike | None" = None, history: "str | os.PathLike | bool | None" = None,
         device: "str | os.PathLike | DeviceProfile | None" = None, tree: str = SpeculationConfig.tree, *,
         speculation: SpeculationConfig | None = None,
         providers: "str | tuple[str, dict] | list[str | tuple[str, dict]] | None" = None) -> Engine:
    """Load a bundle folder (made by `edgespec export`) and return an Engine for its target (or the named model).

    `threads`: ONNX Runtime intra-op threads (default: the physical cores). `max_context`: tokens of context (default:
    the bundle's). Decoding is speculative by default (exact: greedy output is the target's own greedy output):
    `drafter="auto"` takes the n-gram drafter, staged in front of a bundled drafter model when its measured cost makes
    it pay (`engine.speculation.reason` says which and why); `drafter=None` gives plain decoding. `draft_budget` caps the draft tree's nodes per step.
    `history`: whether and where each prompt and output is logged for `edgespec adapt` (clear text, file mode
    0600): off by default. True: the default file under $EDGESPEC_HISTORY_DIR (~/.cache/edgespec/history); a path:
    that file; False: never; None (the default): on only when the environment variable EDGESPEC_HISTORY is 1 / on /
    true / yes.
    `device`: the device profile whose measured verification costs size the draft trees: None (costs measured as
    generation runs), "auto" (this device's profile for this bundle and thread count, measured quickly on first use
    and cached), a profile name (`edgespec profile --list`), a profile file, or a DeviceProfile. `tree`: how draft
    trees are sized: "auto" (planned from the profile when there is one, else cut by the drafter's scores), "plan",
    "scores", or a fixed shape "chain:K" / "tree:WxD". `speculation`: the same settings as one SpeculationConfig
    (then leave drafter, draft_budget, tree, device, ngram_cache and ngram_static at their defaults).
    `providers`: ONNX Runtime execution providers for the target, in order of preference, as onnxruntime takes them:
    names ("XnnpackExecutionProvider", or short: "xnnpack", "coreml", "nnapi", "qnn", "dml") and (name, options
    dict) pairs, at most 8; the CPU provider is always added last and runs every node the others do not take
    (default: CPU only). Device profiles are kept per provider list. Drafter models run on the CPU provider.

    Raises BundleError (missing or corrupt bundle), MemoryBudgetError (it would not fit in memory) and ValueError
    (bad settings; ProviderError for a provider this onnxruntime build lacks, naming the available ones), each
    naming the problem.

    >>> engine = edgespec.load("bundles/qwen", device="auto")        # doctest: +SKIP
    >>> engine.generate("def add(a, b):", max_new_tokens=32).text   # doctest: +SKIP
    """
    given = SpeculationConfig(drafter, draft_budget, tree, device, ngram_cache, ngram_static)  # the keyword sugar
    if speculation is not None:
        if not isinstance(speculation, SpeculationConfig):
            raise TypeError(f"speculation must be a SpeculationConfig, got {type(speculation).__name__}")
        default = SpeculationConfig()
        changed = [name for name in SpeculationConfig.__dataclass_fields__
                   if getattr(given, name) is not getattr(default, name)
                   and getattr(given, name) != getattr(default, name)]
        if changed:
            raise TypeError(f"give the speculation settings either as speculation=... or as arguments, not both "
                            f"({', '.join(sorted(changed))} given too)")
    return Engine(load_manifest(bundle_dir), threads=threads, max_context=max_context, model=model,
                  speculation=given if speculation is None else speculation, history=history, providers=providers)


def _check_memory(manifest: Manifest, models: list[ModelEntry], max_context: int | None, profile) -> None:
    """Refuse (MemoryBudgetError, naming a configuration that would fit) when `models` would not fit in the
    available memory; see `edgespec.devices.check_memory`."""
    from .devices.memory import check_memory

    check_memory(manifest, models, max_context, profile=profile)


def _resolve_profile(device, manifest: Manifest, entry: ModelEntry, threads: int, providers: list[str]):
    """The DeviceProfile for `device` (see `load`) on the execution `providers`, or None."""
    if device is None or device is False:
        return None
    from .devices.profile import DeviceProfile, resolve_device

    if isinstance(device, DeviceProfile):
        return device
    return resolve_device(str(device), manifest, threads, entry=entry, providers=providers)


def _session_log(history, bundle_root, target_name: str):
    """The SessionLog for `history` (see `load`), or None when logging is off: off unless `history` is True or a
    path, or None with EDGESPEC_HISTORY set to an on value (`history_enabled`)."""
    from .history import SessionLog, default_history_path, history_enabled

    if history is False or (history is None and not history_enabled()):
        return None
    if history is None or history is True:
        return SessionLog(default_history_path(bundle_root, target_name))
    return SessionLog(history)
