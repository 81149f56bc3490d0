"""Generation settings and the logits -> probabilities -> token functions (numpy only).

Speculative decoding stays exact only if the drafter's and the target's distributions come from
the same function, so everything here is deterministic, float64, and works row-wise on
``[..., V]`` arrays (e.g. the ``[K, V]`` logits of one verification step).

Order of the transforms, as in Hugging Face ``generate``: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["GenerationConfig", "process_logits", "sample", "greedy"]


@dataclass
class GenerationConfig:
    """Decoding settings, with Hugging Face names.

    Greedy decoding when ``temperature == 0`` or ``do_sample is False``; otherwise sampling at
    ``temperature`` with optional ``top_k`` (0 = off) and ``top_p`` (1.0 = off).  ``stop`` holds
    stop strings (a single string is accepted and wrapped).  ``eos_token_ids`` None means the
    model's own EOS ids; ``ignore_eos`` keeps generating past EOS.  ``seed`` None draws fresh
    entropy.  Call :meth:`validate` before use.  The engine's ``generate`` / ``stream`` / ``chat`` take these
    fields as keyword arguments; sampled output follows the target's distribution with or without speculation.

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
        return self


def process_logits(
    logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
    """Turn logits ``[..., V]`` into float64 probabilities ``[..., V]`` (each row sums to 1).

    * ``temperature == 0``: one-hot on the argmax (ties -> lowest index), i.e. greedy as a distribution.
    * otherwise softmax of ``logits / temperature`` in float64, then
    * ``top_k > 0``: keep the tokens whose logit is >= the k-th largest (ties at the boundary are
      all kept, like Hugging Face's ``TopKLogitsWarper``), renormalize;
    * ``top_p < 1``: nucleus: sort by probability (ties -> lower index first), keep the smallest
      prefix whose cumulative probability reaches ``top_p`` (always at least one token), renormalize.

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
    return p


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
