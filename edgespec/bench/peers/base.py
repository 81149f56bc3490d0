"""What every peer shares: the unavailability it reports, and the loop over the prepared prompts."""

from __future__ import annotations

from ..modes import WARMUP_TOKENS
from ..report import progress
from ..summary import make_row


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (not installed, no suitable weights): skipped with a note."""


def run_peer_prompts(system: str, run, job: dict, result: dict) -> dict:
    """Warm up, then run every prompt of `job` through `run(ids, n)` and add its rows to `result`."""
    prompts, n_new = job["prompts"], job["max_new_tokens"]
    for _ in range(job.get("warmup", 1)):
        run(prompts[0]["ids"], min(n_new, WARMUP_TOKENS))
    for i, p in enumerate(prompts, 1):
        token_ids, stats = run(p["ids"], n_new)
        row = make_row(system, "peer", p, token_ids, stats)
        result["rows"].append(row)
        progress(system, i, len(prompts), row)
    return result
