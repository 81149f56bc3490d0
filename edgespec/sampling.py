"""Generation settings and the logits -> probabilities -> token functions (numpy only).

Speculative decoding stays exact only if the drafter's and the target's distributions come from
the same function, so everything here is deterministic, float64, and works row-wise on
``[..., V]`` arrays (e.g. the ``[K, V]`` logits of one verification step).

Order of the transforms, as in Hugging Face ``generate``: the history rules on the raw logits (repetition penalty,
the stop ids masked until ``min_new_tokens``: :class:`HistoryRules`), then temperature, top-k, top-p and min-p.
The history rules depend on the tokens before each position, so the speculative verifier applies them per tree node
with that node's own path (``edgespec.verify.apply_history_rules``).

Log probabilities (:func:`token_logprob`) are the raw model's: the log-softmax of the target's logits before any of
these transforms, as OpenAI documents them (log(softmax(logit))) and vLLM returns them by default
(``logprobs_mode="raw_logprobs"``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["GenerationConfig", "process_logits", "probabilities", "sample", "greedy", "apply_repetition_penalty",
           "HistoryRules", "TokenLogprob", "token_logprob", "generation_options", "check_single_prompt",
           "MAX_REPETITION_PENALTY", "MAX_TOP_LOGPROBS"]

MAX_REPETITION_PENALTY = 10.0  # repetition_penalty in (0, 10]: 1 is off; beyond 10 a seen token is all but banned
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit)


@dataclass
class GenerationConfig:
    """Decoding settings, with Hugging Face names.

    Greedy decoding when ``temperature == 0`` or ``do_sample is False``; otherwise sampling at
    ``temperature`` with optional ``top_k`` (0 = off) and ``top_p`` (1.0 = off).  ``stop`` holds
    stop strings (a single string is accepted and wrapped).  ``eos_token_ids`` None means the
    model's own EOS ids; ``ignore_eos`` keeps generating past EOS.  ``seed`` None draws fresh
    entropy.  ``repetition_penalty`` (Hugging Face's: a positive logit of a token already in the prompt or the
    output is divided by it, a negative one multiplied; 1 = off, in (0, 10]), ``min_p`` (keep the tokens with
    probability >= min_p * the top probability, after top-p; 0 = off) and ``min_new_tokens`` (the EOS / stop ids are
    masked, and stop strings not looked for, until that many new tokens exist; at most ``max_new_tokens``) shape
    the distribution the same way with and without speculation.  ``logprobs=True`` returns each emitted token's
    log probability (``GenerationResult.logprobs``), with the ``top_logprobs`` (0 to 20) most likely alternatives.
    Call :meth:`validate` before use.  The engine's ``generate`` / ``stream`` / ``chat`` take these
    fields as keyword arguments (or a ``generation_config=``: see :func:`generation_options`); sampled output
    follows the target's distribution with or without speculation.

    >>> config = edgespec.GenerationConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1)   # doctest: +SKIP
    >>> engine.generate("Once upon a time", **dataclasses.asdict(config))                          # doctest: +SKIP
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    truncate_prompt: bool = False  # keep the prompt's tail instead of refusing one over the context length
    do_sample: bool | None = None
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_new_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif isinstance(self.stop, Iterable):
            self.stop = tuple(self.stop)
        if isinstance(self.eos_token_ids, numbers.Integral) and not isinstance(self.eos_token_ids, bool):
            self.eos_token_ids = (int(self.eos_token_ids),)
        elif isinstance(self.eos_token_ids, Iterable) and not isinstance(self.eos_token_ids, (str, bytes)):
            self.eos_token_ids = tuple(
                int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t
                for t in self.eos_token_ids
            )

    @property
    def is_greedy(self) -> bool:
        """True when decoding is argmax: ``do_sample is False`` or ``temperature == 0``."""
        return self.do_sample is False or self.temperature == 0

    def validate(self) -> "GenerationConfig":
        """Raise ``ValueError`` with a specific message for any invalid setting; return self."""

        def is_int(x) -> bool:
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def is_real(x) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        if not is_int(self.max_new_tokens):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not is_real(self.temperature) or not np.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not is_int(self.top_k):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a sequence of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        from .text import check_stop_strings

        check_stop_strings(self.stop)  # at most MAX_STOP_STRINGS of at most MAX_STOP_CHARS characters
        if self.eos_token_ids is not None:
            if not isinstance(self.eos_token_ids, tuple) or not all(
                is_int(t) and t >= 0 for t in self.eos_token_ids
            ):
                raise ValueError(f"eos_token_ids must be None or a sequence of ints >= 0, got {self.eos_token_ids!r}")
        if not isinstance(self.truncate_prompt, bool):
            raise ValueError(f"truncate_prompt must be a bool, got {self.truncate_prompt!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be None or a bool, got {self.do_sample!r}")
        if self.do_sample is True and self.temperature == 0:
            raise ValueError("do_sample=True needs temperature > 0 (temperature 0 means greedy)")
        if not is_real(self.repetition_penalty) or not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), "
                             f"got {self.repetition_penalty!r}")
        if not is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be a number in [0, 1] (0 = off), got {self.min_p!r}")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be at most max_new_tokens "
                             f"({self.max_new_tokens})")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a bool, got {self.logprobs!r}")
        if not is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an int from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        return self


def process_logits(
    logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> np.ndarray:
    """Turn logits ``[..., V]`` into float64 probabilities ``[..., V]`` (each row sums to 1).

    * ``temperature == 0``: one-hot on the argmax (ties -> lowest index), i.e. greedy as a distribution.
    * otherwise softmax of ``logits / temperature`` in float64, then
    * ``top_k > 0``: keep the tokens whose logit is >= the k-th largest (ties at the boundary are
      all kept, like Hugging Face's ``TopKLogitsWarper``), renormalize;
    * ``top_p < 1``: nucleus: sort by probability (ties -> lower index first), keep the smallest
      prefix whose cumulative probability reaches ``top_p`` (always at least one token), renormalize;
    * ``min_p > 0``: keep the tokens whose probability is >= ``min_p`` times the row's largest (Hugging Face's
      ``MinPLogitsWarper``, applied after top-p as there), renormalize.

    ``-inf`` logits get probability 0.  Raises ``ValueError`` for bad arguments or when a row has
    no finite logit / contains NaN.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0, got {x.shape}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if np.isnan(x).any():
        raise ValueError("logits contain NaN")
    V = x.shape[-1]
    if temperature == 0:
        out = np.zeros_like(x)
        np.put_along_axis(out, np.argmax(x, axis=-1)[..., None], 1.0, axis=-1)
        return out
    x = x / temperature
    if 0 < top_k < V:
        kth = np.partition(x, V - top_k, axis=-1)[..., V - top_k : V - top_k + 1]
        x = np.where(x >= kth, x, -np.inf)
    m = np.max(x, axis=-1, keepdims=True)
    if not np.isfinite(m).all():
        raise ValueError("each row of logits needs a finite maximum (no +inf, not all -inf)")
    p = np.exp(x - m)
    p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the strictly better tokens
        keep_sorted = before < top_p
        keep_sorted[..., 0] = True
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    if min_p > 0.0:
        p = np.where(p >= min_p * np.max(p, axis=-1, keepdims=True), p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def probabilities(logits: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """`process_logits` with `config`'s temperature, top-k, top-p and min-p (the history rules already applied)."""
    return process_logits(logits, config.temperature, config.top_k, config.top_p, config.min_p)


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a 1-D probability vector (need not be normalized) with ``rng``.

    Uses exactly one ``rng.random()`` draw (inverse CDF), so a seeded generator gives a
    reproducible sequence; tokens with probability 0 are never drawn.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probs must be a non-empty 1-D array, got shape {p.shape}")
    cdf = np.cumsum(p)
    total = cdf[-1]
    if not np.isfinite(total) or total <= 0 or (p < 0).any():
        raise ValueError("probs must be finite, non-negative and not all zero")
    u = rng.random() * total
    i = int(np.searchsorted(cdf, u, side="right"))
    if i >= p.size or p[i] <= 0:  # u rounded onto the total: take the last token with mass
        i = int(np.flatnonzero(p > 0)[-1])
    return i


def greedy(logits: np.ndarray) -> int:
    """Argmax of a 1-D logits (or probs) vector; ties go to the lowest index."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"greedy expects a non-empty 1-D array, got shape {x.shape}")
    return int(np.argmax(x))


# ---- history rules: what the tokens so far change in the next token's logits ------------------------------------
def apply_repetition_penalty(logits: np.ndarray, token_ids: Iterable[int], penalty: float) -> np.ndarray:
    """Hugging Face's ``RepetitionPenaltyLogitsProcessor`` on logits ``[..., V]``: at each distinct id of
    `token_ids`, a logit >= 0 is divided by `penalty` and a negative one multiplied by it (every row alike).
    Returns a copy in the logits' float type (float64 for integer input), as transformers computes in the logits'
    own dtype."""
    x = _float_copy(logits)
    _penalize(x, np.unique(np.fromiter((int(t) for t in token_ids), dtype=np.int64)), penalty)
    return x


def _float_copy(logits: np.ndarray) -> np.ndarray:
    """A copy of `logits` that the rules may write: float types kept, anything else as float64."""
    x = np.array(logits)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _penalize(x: np.ndarray, distinct_ids: np.ndarray, penalty: float) -> None:
    """The repetition penalty, in place, at `distinct_ids` (no repeats) of every row of `x`."""
    if penalty != 1.0 and distinct_ids.size:
        seen = x[..., distinct_ids]
        x[..., distinct_ids] = np.where(seen < 0, seen * penalty, seen / penalty)


class HistoryRules:
    """The logits rules of one generation that depend on the tokens before a position: the repetition penalty over
    every token seen (the prompt, the output so far and, in a draft tree, the node's path) and the stop ids masked
    (-inf) while fewer than ``min_new_tokens`` new tokens precede the position.

    `push` each emitted token; `row` / `rows` apply the rules to raw logits. Plain decoding calls ``row(logits)``;
    the speculative verifier calls ``rows(logits, paths)`` where ``paths[r]`` holds the draft tokens between the
    emitted tokens and row r, so both see the same rules at the same position (exactness). With no rule in force
    the logits come back untouched (no copy)."""

    def __init__(self, config: GenerationConfig, prompt_ids: Iterable[int], stop_ids: Iterable[int]):
        self.penalty = float(config.repetition_penalty)
        self.min_new_tokens = int(config.min_new_tokens)
        self.stop_ids = np.array(sorted({int(t) for t in stop_ids}), dtype=np.int64)
        self.new_tokens = 0  # tokens pushed: the output so far
        self._seen: set[int] = {int(t) for t in prompt_ids} if self.penalty != 1.0 else set()
        self._seen_ids: np.ndarray | None = None  # `_seen` as an array, rebuilt after a new token

    def push(self, token: int) -> None:
        """One more emitted token."""
        self.new_tokens += 1
        if self.penalty != 1.0 and int(token) not in self._seen:
            self._seen.add(int(token))
            self._seen_ids = None

    @property
    def in_force(self) -> bool:
        """Whether any rule changes the next token's logits (the penalty is on, or the stops are masked)."""
        return self.penalty != 1.0 or self.masks_stops(0)

    def masks_stops(self, depth: int = 0) -> bool:
        """Whether the stop ids are masked `depth` tokens past the output so far."""
        return self.stop_ids.size > 0 and self.new_tokens + depth < self.min_new_tokens

    def row(self, logits: np.ndarray, path: Sequence[int] = ()) -> np.ndarray:
        """The rules applied to one row of raw logits ``[V]`` that follows the history plus `path`: `logits` itself
        when no rule is in force, else a copy (float32 logits stay float32)."""
        if not self.in_force:  # masking stops only ever ends: deeper rows are free when the first one is
            return logits
        x = _float_copy(logits)
        if self.penalty != 1.0:
            if self._seen_ids is None:
                self._seen_ids = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            _penalize(x, self._seen_ids, self.penalty)
            extra = [t for t in dict.fromkeys(int(t) for t in path) if t not in self._seen]
            _penalize(x, np.array(extra, dtype=np.int64), self.penalty)  # path tokens not penalized yet, once each
        if self.masks_stops(len(path)):
            x[self.stop_ids[self.stop_ids < x.shape[-1]]] = -np.inf
        return x

    def rows(self, logits: np.ndarray, paths: Sequence[Sequence[int]]) -> np.ndarray:
        """The rules applied to rows ``[R, V]``; row r follows the history plus ``paths[r]``. Returns `logits`
        itself when no rule is in force, else a copy."""
        if not self.in_force:
            return logits
        return np.stack([self.row(row, path) for row, path in zip(logits, paths)])


# ---- log probabilities --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token's log probability under the raw model (log-softmax of the target's logits, before the
    repetition penalty, temperature, top-k/p and min-p) and the ``top_logprobs`` most likely tokens there, best
    first (ties: lower id first): ``top`` holds (token id, log probability) pairs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax of a 1-D logits row."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def token_logprob(logits: np.ndarray, token_id: int, top: int = 0) -> TokenLogprob:
    """The TokenLogprob of `token_id` after the raw logits row `logits` ``[V]``, with the `top` best alternatives."""
    logp = log_softmax(logits)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(int(top), logp.size)
        candidates = np.argpartition(-logp, k - 1)[:k] if k < logp.size else np.arange(logp.size)
        # exact ties at the k-th value: the lowest ids win, as a stable sort of the whole row would pick
        kth = logp[candidates].min()
        candidates = np.union1d(candidates, np.flatnonzero(logp == kth))
        order = candidates[np.lexsort((candidates, -logp[candidates]))][:k]
        best = tuple((int(i), float(logp[i])) for i in order)
    return TokenLogprob(int(token_id), float(logp[int(token_id)]), best)


# ---- generation_config= and prompts ------------------------------------------------------------------------------
# transformers GenerationConfig fields read, under their GenerationConfig name here
HF_FIELDS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "min_p": "min_p", "repetition_penalty": "repetition_penalty", "do_sample": "do_sample",
             "min_new_tokens": "min_new_tokens", "stop_strings": "stop", "seed": "seed",
             "eos_token_id": "eos_token_ids"}
# fields that do not change which tokens are generated here: ignored whatever they hold
IGNORED_HF_FIELDS = frozenset({
    "bos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version", "use_cache",
    "cache_implementation", "cache_config", "max_cache_len", "return_legacy_cache", "return_dict_in_generate",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits", "compile_config",
    "disable_compile", "prefill_chunk_size", "low_memory", "generation_kwargs", "continuous_batching_config",
    # transformers' own assisted generation (speculation here is edgespec's, and exact either way)
    "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind",
    "target_lookbehind", "assistant_ensemble_weight", "speculation_type", "use_mtp",
})
# transformers' defaults of the fields edgespec cannot honour: such a field is accepted only at this value (or None)
NEUTRAL_HF_VALUES = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "typical_p": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0, "min_length": 0, "early_stopping": False,
    "renormalize_logits": False, "remove_invalid_values": False, "token_healing": False, "guidance_scale": 1.0,
    "top_h": 1.0, "penalty_alpha": 0.0, "max_time": None, "max_length": None,
}


def _set_fields(generation_config) -> dict:
    """The fields a generation_config holds: a Mapping's items, an edgespec GenerationConfig's fields, or any other
    object's public attributes (a transformers GenerationConfig, a SimpleNamespace); None values are unset."""
    if isinstance(generation_config, Mapping):
        items = dict(generation_config)
    elif isinstance(generation_config, GenerationConfig):
        return {f.name: getattr(generation_config, f.name) for f in fields(GenerationConfig)}
    else:
        try:
            items = dict(vars(generation_config))
        except TypeError:
            raise TypeError(f"generation_config must be a dict or an object with attributes (a transformers "
                            f"GenerationConfig), got {type(generation_config).__name__}") from None
    if not all(isinstance(k, str) for k in items):
        raise TypeError("generation_config keys must be strings")
    return {k: v for k, v in items.items() if not k.startswith("_") and v is not None}


def _unhonoured(name: str, value, options: dict) -> bool:
    """Whether a field edgespec does not read would change the output: not at its neutral value (max_length is
    ignored when max_new_tokens is given, as transformers does)."""
    if name in IGNORED_HF_FIELDS or (isinstance(value, (dict, list, tuple)) and not value):
        return False
    if name == "max_length":
        return "max_new_tokens" not in options
    return name not in NEUTRAL_HF_VALUES or value != NEUTRAL_HF_VALUES[name]


def generation_options(generation_config, overrides: Mapping | None = None) -> dict:
    """GenerationConfig keyword arguments from a transformers-like `generation_config` (a dict, an edgespec or a
    transformers GenerationConfig, any object with those attributes: duck-typed, transformers is never imported)
    under the explicit keyword arguments `overrides`, which win.

    Read: max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, do_sample, min_new_tokens,
    stop_strings (-> stop), seed, eos_token_id (-> eos_token_ids), and every edgespec GenerationConfig field by its
    own name. Unset fields (absent or None) keep edgespec's defaults, not transformers' (which adds top_k=50 when
    sampling). As in transformers, sampling needs ``do_sample=True`` (absent or False: greedy, whatever the
    temperature); do_sample=True without a temperature samples at 1.0. An explicit ``temperature`` overrides the
    config's do_sample unless ``do_sample`` is given too.
    Ignored: fields that do not change the tokens (pad/bos ids, output and cache flags, transformers' assisted
    generation settings, max_length when max_new_tokens is given). Anything else set to a value other than
    transformers' neutral default (num_beams=4, typical_p, no_repeat_ngram_size, max_length alone...) raises
    ValueError naming it; an unknown key raises too."""
    overrides = dict(overrides or {})
    given = _set_fields(generation_config)
    own = {f.name for f in fields(GenerationConfig)}
    options: dict = {}
    for name, value in given.items():
        target = HF_FIELDS.get(name, name if name in own else None)
        if target is not None:
            if target in options:
                raise ValueError(f"generation_config gives {target} twice (as {name} and under its other name)")
            options[target] = value
    unhonoured = sorted(f"{name}={value!r}" for name, value in given.items()
                        if name not in HF_FIELDS and name not in own
                        and _unhonoured(name, value, {**options, **overrides}))
    if unhonoured:
        raise ValueError(f"generation_config sets field(s) edgespec does not support: {', '.join(unhonoured)} "
                         f"(it reads {', '.join(HF_FIELDS)} and edgespec's own GenerationConfig fields; "
                         f"max_length counts the prompt too: give max_new_tokens instead)")
    if isinstance(generation_config, GenerationConfig):
        pass  # edgespec's own: temperature alone decides, as for keyword arguments
    elif options.get("do_sample") is True:
        options.setdefault("temperature", 1.0)
    else:
        options["do_sample"] = False  # transformers' default: greedy unless do_sample=True
    if "temperature" in overrides and "do_sample" not in overrides:
        options.pop("do_sample", None)
    options.update(overrides)
    return options


def check_single_prompt(prompt) -> None:
    """Refuse a batch: `prompt` must be one text or one sequence of token ids; a list of texts or of token-id
    lists raises TypeError naming the fix."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, np.ndarray):
        batch = prompt.ndim > 1
    elif isinstance(prompt, (list, tuple)):
        batch = any(isinstance(p, (str, bytes, list, tuple, np.ndarray)) for p in prompt)
    else:
        return
    if batch:
        raise TypeError(f"got a batch of {len(prompt)} prompts: batching is not supported; pass one prompt (a str "
                        "or a list of token ids) per call, looping over the prompts")
