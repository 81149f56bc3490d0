"""Spec-Bench questions: reading a `question.jsonl` and choosing which questions (per category, limit) to run.

The package ships Spec-Bench's question file (480 questions in 13 categories, Apache-2.0; see data/NOTICE) as
package data, read through importlib.resources: `DEFAULT_DATA`.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]
# The packaged Spec-Bench questions (a Traversable; a pathlib.Path wherever the package is installed as files).
DEFAULT_DATA = resources.files(__package__).joinpath("data", "question.jsonl")


def read_spec_bench(path: str | os.PathLike = DEFAULT_DATA) -> list[dict]:
    """Every question of a Spec-Bench `question.jsonl`: [{question_id, category, prompt[, second_turn]}] (prompt: the
    first turn; second_turn: the follow-up, for the questions that have one). Default: the packaged copy."""
    path = path if path is DEFAULT_DATA else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Spec-Bench questions not found at {path} (pass --data PATH)")
    questions = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            turns = d.get("turns") if isinstance(d, dict) else None
            if not turns or not isinstance(turns[0], str) or not isinstance(d.get("category"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with 'category' and a non-empty 'turns' list")
            question = {"question_id": d.get("question_id", lineno), "category": d["category"], "prompt": turns[0]}
            if len(turns) > 1 and isinstance(turns[1], str) and turns[1]:
                question["second_turn"] = turns[1]  # MT-bench's follow-up question
            questions.append(question)
    return questions


def select_questions(questions: list[dict], per_category: int | None = 2, categories: Iterable[str] | None = None,
                     limit: int | None = None) -> list[dict]:
    """The first `per_category` questions of each wanted category (0/None = all), in file order, then `limit`."""
    known = list(dict.fromkeys(q["category"] for q in questions))
    wanted = None
    if categories:
        wanted = set(categories)
        unknown = sorted(wanted - set(known))
        if unknown:
            raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"this Spec-Bench file has: {', '.join(known)}")
    counts: dict[str, int] = {}
    out = []
    for q in questions:
        cat = q["category"]
        if wanted is not None and cat not in wanted:
            continue
        if per_category and counts.get(cat, 0) >= per_category:
            continue
        counts[cat] = counts.get(cat, 0) + 1
        out.append(q)
    return out[:limit] if limit else out


def load_spec_bench(path: str | os.PathLike = DEFAULT_DATA, per_category: int | None = 2,
                    categories: Iterable[str] | None = None, limit: int | None = None) -> list[dict]:
    """`read_spec_bench` then `select_questions`."""
    return select_questions(read_spec_bench(path), per_category, categories, limit)
