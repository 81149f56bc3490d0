"""What the package ships and declares: Spec-Bench's questions as package data (with their licence and notice,
read through importlib.resources, `--data` still overriding them), the project licence, and pyproject's metadata
(SPDX licence, licence files, extras, classifiers, URLs, package data)."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from importlib import resources
from pathlib import Path

from edgespec import bench
from edgespec.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DATA = resources.files("edgespec.bench").joinpath("data")
SPEC_BENCH_CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
                         "translation", "summarization", "qa", "math_reasoning", "rag"}


def test_default_questions_are_the_packaged_spec_bench():
    questions = bench.read_spec_bench()  # no path: the package's own copy
    assert len(questions) == 480
    assert {q["category"] for q in questions} == SPEC_BENCH_CATEGORIES
    assert questions[0]["question_id"] == 81 and questions[0]["category"] == "writing"
    assert len(bench.load_spec_bench(per_category=2)) == 26
    assert bench.DEFAULT_DATA.is_file() and bench.DEFAULT_DATA.name == "question.jsonl"


def test_packaged_questions_carry_their_licence_and_notice():
    data = DATA.joinpath("question.jsonl").read_bytes()
    assert len(data) < 1 << 20  # under 1 MiB in the wheel
    notice = DATA.joinpath("NOTICE").read_text(encoding="utf-8")
    assert hashlib.sha256(data).hexdigest() in notice  # the notice names the very file shipped
    assert "https://github.com/hemingkx/Spec-Bench" in notice and "Heming Xia" in notice
    assert DATA.joinpath("LICENSE").read_text(encoding="utf-8").startswith("Apache License\n")


def test_data_option_overrides_the_packaged_questions(tmp_path):
    own = tmp_path / "q.jsonl"
    own.write_text(json.dumps({"question_id": 7, "category": "mine", "turns": ["hello"]}) + "\n", encoding="utf-8")
    args = build_parser().parse_args(["bench", "-b", "B", "--data", str(own)])
    assert [q["category"] for q in bench.read_spec_bench(args.data)] == ["mine"]
    default = build_parser().parse_args(["bench", "-b", "B"]).data
    assert len(bench.read_spec_bench(default)) == 480


def test_project_licence_file():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text.splitlines()[1] and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_pyproject_metadata():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # SPDX expression (PEP 639)
    for name in project["license-files"]:
        assert (ROOT / name).is_file(), name
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # superseded by the expression
    versions = {c.rsplit(" ", 1)[-1] for c in project["classifiers"] if re.fullmatch(r".*:: 3\.\d+", c)}
    assert versions == {"3.11", "3.12", "3.13"}
    assert project["requires-python"] == ">=3.11"
    assert set(project["urls"]) == {"Homepage", "Repository", "Issues"}
    extras = project["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["plot"])
    assert any(d.startswith("matplotlib") for d in extras["test"])  # CI draws the pictures
    setuptools_floor = re.search(r"setuptools>=(\d+)", " ".join(PYPROJECT["build-system"]["requires"]))
    assert int(setuptools_floor.group(1)) >= 77  # license expressions and license-files


def test_package_data_is_declared_and_present():
    declared = PYPROJECT["tool"]["setuptools"]["package-data"]["edgespec.bench"]
    for name in declared:
        assert (ROOT / "edgespec" / "bench" / name).is_file(), name
    assert {"data/question.jsonl", "data/LICENSE", "data/NOTICE"} <= set(declared)
