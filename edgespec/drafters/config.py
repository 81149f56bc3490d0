"""`SpeculationConfig`: the one carrier of speculation settings, from `edgespec.load`, `Engine.variant`,
`Engine.set_drafter` and the CLI to the drafter factory (`edgespec.drafters.factory`). Its defaults are defined
here once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..devices.profile import DeviceProfile
    from .base import Drafter

DEFAULT_DRAFTER = "auto"  # n-grams, staged in front of a cheap bundled drafter model (see drafters.choice)
DEFAULT_DRAFT_BUDGET = 16  # the most draft nodes verified per step
DEFAULT_TREE = "auto"


@dataclass(frozen=True)
class SpeculationConfig:
    """How an engine drafts and verifies: the arguments of `edgespec.load` that shape speculation, in one object.

    `drafter`: "auto" (default: n-grams, staged in front of a bundled drafter model when its measured cost makes it
    pay; see `edgespec.drafters.choice`), "ngram", None / "none" (plain decoding), a drafter model of the bundle ("draft",
    "draft:NAME", "cross", "cross:NAME", "self"; staged specs such as "ngram>draft") or a `Drafter` instance. `draft_budget`: the
    most draft nodes verified per step. `tree`: "auto", "plan", "scores", "chain:K" or "tree:WxD". `device`: a device
    profile (None, "auto", a name, a file or a DeviceProfile). `ngram_cache` / `ngram_static`: the n-gram drafter's
    persistent cache and static tier. `reason`: set by the engine in `Engine.speculation` (why this drafter: the
"auto" choice and its figures); ignored on input. Speculation never changes greedy output and keeps sampling
lossless.

    >>> spec = edgespec.SpeculationConfig(drafter="ngram", tree="plan", device="auto")   # doctest: +SKIP
    >>> engine = edgespec.load("bundles/qwen", speculation=spec)                           # doctest: +SKIP
    >>> engine.speculation.tree                                                            # doctest: +SKIP
    'plan'
    """

    drafter: "str | Drafter | None" = DEFAULT_DRAFTER
    draft_budget: int = DEFAULT_DRAFT_BUDGET
    tree: str = DEFAULT_TREE
    device: "str | os.PathLike | DeviceProfile | None" = None
    ngram_cache: "str | os.PathLike | bool | None" = None
    ngram_static: "str | os.PathLike | None" = None
    reason: str | None = field(default=None, compare=False)
