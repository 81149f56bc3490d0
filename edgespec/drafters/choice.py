"""The default drafter (`drafter="auto"`): which drafter set a bundle gets when the caller names none, from what
the bundle holds and what its models cost on this device.

The n-gram caches cost almost nothing and always come first. A bundled drafter model is added behind them when one
of its forwards costs at most `MAX_DRAFTER_COST_SHARE` of a target step (the device profile's measured times when
there is one, else the models' file sizes, which track CPU decoding time): below that share, a drafter that is
right about half the time pays, and one that is not sits out (`PaysOff`) at almost no cost. The threshold comes from
Spec-Bench on the 1.5B target (see README, "Which drafter"). The cheapest such drafter wins; a cross-vocabulary one
is staged as `ngram>cross:NAME`, a same-vocabulary one as `ngram>draft:NAME`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtimes.manifest import Manifest, ModelEntry

if TYPE_CHECKING:
    from ..devices.profile import DeviceProfile

AUTO = "auto"
MAX_DRAFTER_COST_SHARE = 0.15  # a drafter forward / a target step, at most (see the module docstring)
PROFILE_CONTEXT = 512  # the context at which profile costs are compared


def model_bytes(entry: ModelEntry) -> int:
    """Bytes of a model's graph and its weight files (what a CPU streams per decoded token)."""
    folder = entry.graph_path.parent
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in (".onnx", ".data", ".bin")) \
        or entry.graph_path.stat().st_size


def cost_share(target: ModelEntry, drafter: ModelEntry, profile: "DeviceProfile | None") -> tuple[float, str]:
    """One drafter forward's cost as a share of one target step, and where the figure comes from."""
    if profile is not None and profile.matches(target):
        seconds = profile.drafter_seconds(drafter.name, 1)
        if seconds is not None:
            target_seconds = profile.verify_seconds(1, PROFILE_CONTEXT)
            return seconds / target_seconds, f"device profile {profile.name}"
    return model_bytes(drafter) / max(model_bytes(target), 1), "model sizes"


def choose_drafter(manifest: Manifest, target: ModelEntry, profile: "DeviceProfile | None",
                   same_vocabulary) -> tuple[str, str]:
    """The default drafter spec for `target` in `manifest` and why: `ngram`, or the n-grams staged in front of the
    cheapest bundled drafter model whose forward costs at most MAX_DRAFTER_COST_SHARE of a target step.
    `same_vocabulary(a, b)`: whether two models share a tokenizer."""
    best = None
    for drafter in manifest.drafters():
        if drafter.name == target.name:
            continue
        share, source = cost_share(target, drafter, profile)
        if best is None or share < best[0]:
            best = (share, source, drafter)
    if best is None:
        return "ngram", "auto: n-grams (the bundle has no drafter model)"
    share, source, drafter = best
    if share > MAX_DRAFTER_COST_SHARE:
        return "ngram", (f"auto: n-grams (the cheapest drafter model, {drafter.name}, costs {share:.0%} of a target "
                         f"step by {source}, over the {MAX_DRAFTER_COST_SHARE:.0%} at which drafter models pay)")
    kind = "draft" if same_vocabulary(drafter, target) else "cross"
    return f"ngram>{kind}:{drafter.name}", (f"auto: n-grams, then {drafter.name} ({share:.0%} of a target step by "
                                            f"{source}, within {MAX_DRAFTER_COST_SHARE:.0%})")
