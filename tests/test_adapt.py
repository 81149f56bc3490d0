"""`edgespec adapt` (edgespec/export/adapt.py) and the bundle edits under it (export/bundle.py `replace_model`,
`add_drafter`): span alignment on hand-made examples, training examples, then on a tiny bundle (tiny random target +
a tiny drafter with another tokenizer) adaptation from synthetic history records, its atomicity under injected
failures, and the error cases."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgespec.export.adapt import (DIRECT, NGRAM, NONE, AdaptError, adapt_drafter, align_spans, build_example,
                                   close_gaps, decoded_spans, pick_drafter, split_holdout, target_spans_of_output,
                                   token_weights)
from edgespec.history import SessionLog
from edgespec.runtimes.manifest import BundleError, load_manifest

OUTPUT = " Berlin is the capital of Germany. The quick brown fox jumps over the lazy dog."


# ------------------------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------------------------


def test_align_spans_hand_made_example():
    # text:   "Q: Hello world!!\u00e9"   (prompt "Q:" = 0..2, output from 2)
    target = [(2, 8), (8, 14), (14, 15), (15, 16), (16, 17), (17, 17)]  # " Hello", " world", "!", "!", "é", EOS
    drafter = [
        (0, 2),    # "Q:" prompt: covers no target token
        (2, 8),    # " Hello" = one target token: direct
        (8, 11),   # " wo"  } two drafter tokens make one target token: n-gram
        (11, 14),  # "rld"  }
        (14, 16),  # "!!" spans two target tokens: n-gram
        (16, 17),  # first byte of "é" }  same span twice (a character split in bytes): n-gram, even though the
        (16, 17),  # second byte       }  span equals one target token's
        (17, 17),  # empty: none
    ]
    assert align_spans(drafter, target) == [NONE, DIRECT, NGRAM, NGRAM, NGRAM, NGRAM, NGRAM, NONE]


def test_align_spans_target_split_characters_and_partial_overlap():
    target = [(0, 1), (0, 1), (1, 4)]  # a character made of two target byte tokens, then a word
    drafter = [(0, 1), (1, 4), (3, 6)]
    assert align_spans(drafter, target) == [NGRAM, DIRECT, NGRAM]
    assert align_spans([], target) == [] and align_spans(drafter, []) == [NONE] * 3


def test_close_gaps_gives_trimmed_whitespace_to_the_next_token():
    assert close_gaps([(0, 5), (6, 11), (11, 12)]) == [(0, 5), (5, 11), (11, 12)]
    assert close_gaps([(0, 1), (0, 1), (2, 3)]) == [(0, 1), (0, 1), (1, 3)]
    assert close_gaps([(0, 0), (0, 3)]) == [(0, 0), (0, 3)]


def test_token_weights():
    assert token_weights([DIRECT, NGRAM, NONE], 0.25).tolist() == [1.0, 0.25, 0.0]


def test_split_holdout_is_by_record_disjoint_and_seeded():
    train, held = split_holdout(10, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8 and not set(train) & set(held)
    assert sorted(train + held) == list(range(10))
    assert split_holdout(10, 0.2, seed=3) == (train, held)
    assert split_holdout(2, 0.9, seed=0)[0] != []  # always something to train on
    assert split_holdout(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(split_holdout(3, 0.01, seed=0)[1]) == 1  # any positive fraction holds out at least one
    with pytest.raises(AdaptError, match="holdout"):
        split_holdout(10, 1.0, seed=0)


def test_quant_following_maps_gguf_blocks_to_hf_quantization():
    from edgespec.export.bundle import quant_following

    smollm2 = {"mode": "gguf", "tensor_types": {"Q8_0": 1, "F32": 61, "Q4_1": 210}}
    qwen05 = {"mode": "gguf", "tensor_types": {"Q8_0": 13, "Q5_0": 133, "F32": 121, "Q6_K": 12, "Q4_K": 12}}
    assert quant_following(smollm2, "hf") == "int4" and quant_following(smollm2, "gguf") == "gguf"
    assert quant_following(qwen05, "hf") == "int8"
    assert quant_following({"mode": "gguf", "tensor_types": {"F32": 3, "F16": 9}}, "hf") == "fp32"
    assert quant_following({"mode": "int4", "tensor_types": {"INT4": 9}}, "hf") == "int4"
    assert quant_following({}, "hf") == "fp32"


def test_drafter_build_options_follow_export_bundle():
    from edgespec.export.bundle import ExportError, drafter_build_options

    target = {"mode": "gguf", "accuracy_level": 0, "eight_bit": "split", "fused_ops": False}
    fast = drafter_build_options(target, "fast")
    assert (fast.accuracy_level, fast.eight_bit, fast.fused_ops) == (4, "nbits", False)
    exact = drafter_build_options(target, "exact")
    assert (exact.accuracy_level, exact.eight_bit, exact.fused_ops) == (0, "split", False)
    with pytest.raises(ExportError, match="drafter_kernels"):
        drafter_build_options(target, "quick")


def test_stale_work_folders_of_dead_processes_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from edgespec.export.bundle import remove_stale_work_folders, work_folder_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".small.pid{dead_pid}.abc.partial"
    mine = tmp_path / f"{work_folder_prefix('small')}xyz.adapt"
    other = tmp_path / ".keep.partial"
    for folder in (stale, mine, other, tmp_path / "small"):
        folder.mkdir()
    assert f".pid{os.getpid()}." in mine.name
    assert remove_stale_work_folders(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and other.exists() and (tmp_path / "small").exists()


def _train_tokenizer(path: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer like conftest's, with another vocabulary size (so other merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """(target tokenizer, drafter tokenizer): byte-level BPEs with different merges."""
    from tokenizers import Tokenizer

    from conftest import TINY_VOCAB

    root = tmp_path_factory.mktemp("adapt-tokenizers")
    return (Tokenizer.from_file(str(_train_tokenizer(root / "t.json", TINY_VOCAB - 8))),
            Tokenizer.from_file(str(_train_tokenizer(root / "d.json", 300))))


def test_decoded_spans_cover_the_text_and_share_split_characters(tokenizers_pair):
    target, _ = tokenizers_pair
    text = "Caf\u00e9 \U0001F600 ok<|im_end|>"
    ids = target.encode(text, add_special_tokens=False).ids
    decoded, spans = decoded_spans(target, ids)
    assert decoded == "Caf\u00e9 \U0001F600 ok"  # the special token is skipped: its span is empty
    assert spans[-1][0] == spans[-1][1] == len(decoded)
    assert spans[0][0] == 0 and all(a[1] <= b[0] or a == b for a, b in zip(spans, spans[1:]))
    emoji = decoded.index("\U0001F600")
    shared = [s for s in spans if s[0] <= emoji < s[1]]
    assert len(shared) > 1 and len(set(shared)) == 1  # the emoji's byte tokens share one span


def test_target_spans_follow_the_record_text(tokenizers_pair):
    target, _ = tokenizers_pair
    ids = target.encode(" Berlin is", add_special_tokens=False).ids
    assert target_spans_of_output(target, ids, " Berlin is")[-1][1] == len(" Berlin is")
    assert max(e for _, e in target_spans_of_output(target, ids, " Berl")) == len(" Berl")  # cut by a stop string
    assert target_spans_of_output(target, ids, "something else") == [(0, len("something else"))]
    assert target_spans_of_output(target, ids, "") == []
    with_end = ids + [target.token_to_id("<|im_end|>")]  # the engine logs special tokens written out
    assert target_spans_of_output(target, with_end, " Berlin is<|im_end|>")[-1] == (10, 20)
    assert target_spans_of_output(target, with_end, " Berlin is")[-1] == (10, 10)  # or skipped


def test_build_example_weights_only_the_output(tokenizers_pair):
    target, drafter = tokenizers_pair
    record = {"prompt": "Q: capital?\nA:", "output": OUTPUT,
              "output_ids": target.encode(OUTPUT, add_special_tokens=False).ids}
    example = build_example(0, record, drafter, target, bos=None, mapped_weight=0.5)
    prompt_tokens = len(drafter.encode(record["prompt"], add_special_tokens=False).ids)
    assert example.ids.tolist() == drafter.encode(record["prompt"] + OUTPUT, add_special_tokens=False).ids
    assert not example.weights[:prompt_tokens].any()
    assert set(example.weights[prompt_tokens:].tolist()) <= {1.0, 0.5} and example.weights[-1] > 0
    assert example.kinds[DIRECT] > 0 and example.kinds[NGRAM] > 0  # other merges: some tokens line up, some not
    same = build_example(0, record, target, target, bos=0, mapped_weight=0.5)
    assert same.ids[0] == 0 and same.weights[0] == 0
    assert same.kinds[NGRAM] <= 1 and same.kinds[DIRECT] > 10  # same tokenizer: all direct but the boundary token
    short = build_example(0, record, drafter, target, bos=None, mapped_weight=0.5, max_tokens=8)
    assert len(short.ids) == 8 and short.weights[1:].all()  # the prompt is cut first, then the output's tail
    assert build_example(0, {**record, "output": "", "output_ids": []}, drafter, target, bos=None,
                         mapped_weight=0.5) is None


# ------------------------------------------------------------------------------------------------------------------
# On a tiny bundle
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine_bundle(tmp_path_factory) -> Path:
    """A bundle: tiny random qwen2 target, tiny random llama drafter "small" whose tokenizer has other merges."""
    import torch

    from conftest import make_tiny_model
    from edgespec.export.bundle import ModelRequest, export_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapt-bundle")
    target = make_tiny_model("qwen2", root / "target", seed=0)
    drafter = make_tiny_model("llama", root / "drafter", seed=5)
    _train_tokenizer(drafter / "tokenizer.json", 300)
    return export_bundle(str(target), root / "bundle", [ModelRequest(str(drafter), "drafter", name="small")],
                         name="tiny-qwen2", parity=False, threads=1, log=lambda m: None).bundle


@pytest.fixture
def bundle(pristine_bundle, tmp_path) -> Path:
    """A fresh copy of the pristine bundle for a test to change."""
    return Path(shutil.copytree(pristine_bundle, tmp_path / "bundle"))


def write_history(path: Path, bundle: Path, count: int = 8) -> Path:
    """`count` records of the same output (so held-out loss must fall when training on the others)."""
    from tokenizers import Tokenizer

    manifest = load_manifest(bundle)
    target = Tokenizer.from_file(str(manifest.target_model.tokenizer_path))
    log = SessionLog(path)
    for i in range(count):
        prompt = f"Question {i}: what is the capital of Germany?\nAnswer:"
        log.append(prompt, OUTPUT, target.encode(prompt, add_special_tokens=False).ids,
                   target.encode(OUTPUT, add_special_tokens=False).ids, manifest.target)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` (hidden ones too) -> sha256 of its bytes ("dir" for folders)."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


QUICK = dict(rank=4, alpha=8.0, threads=1, seed=0, log=lambda m: None)


def _drafter_nll(bundle: Path, name: str, text: str) -> float:
    """Mean next-token NLL of the bundle's ONNX model `name` over `text` (its own tokens)."""
    from edgespec.export.reference import teacher_forced_stats
    from edgespec.runtimes.runner import ModelRunner
    from tokenizers import Tokenizer

    entry = load_manifest(bundle).models[name]
    ids = np.array(Tokenizer.from_file(str(entry.tokenizer_path)).encode(text, add_special_tokens=False).ids)
    runner = ModelRunner(entry, threads=1, max_context=len(ids) + 8)
    return float(teacher_forced_stats(runner.forward(ids), ids)[1].mean())


@pytest.mark.slow
def test_adapt_lowers_heldout_loss_and_swaps_the_drafter_in(bundle, tmp_path):
    import edgespec

    history = write_history(tmp_path / "h.jsonl", bundle)
    old = load_manifest(bundle).raw["models"]["small"]
    text = "Question 9: what is the capital of Germany?\nAnswer:" + OUTPUT
    nll_before = _drafter_nll(bundle, "small", text)

    report = adapt_drafter(bundle, history=history, steps=40, lr=5e-3, **QUICK)
    assert report.replaced

    assert report.drafter == "small" and report.records == 8 and report.train_records == 6
    assert len(report.heldout_indices) == 2 and report.loss_after < 0.8 * report.loss_before, report
    assert report.tokens[DIRECT] > 0 and report.tokens[NGRAM] > 0
    manifest = load_manifest(bundle)
    entry = manifest.raw["models"]["small"]
    adaptation = entry["adaptation"]
    assert adaptation["heldout_indices"] == report.heldout_indices and adaptation["records"] == 8
    assert adaptation["steps"] == 40 and adaptation["rank"] == 4
    assert adaptation["loss_after"] < adaptation["loss_before"] and adaptation["seconds"] > 0
    assert entry["source"] == old["source"] and entry["special_tokens"] == old["special_tokens"]
    assert entry["quantization"]["mode"] == old["quantization"]["mode"] == "fp32"
    assert entry["quantization"]["accuracy_level"] == 4 and entry["accuracy"]["top1_agreement"] > 0.97
    assert entry["graph"]["file"] == "small.r1/model.onnx"  # a fresh folder; the old one is gone
    assert not (bundle / "small").exists() and (bundle / "small.r1" / "model.onnx").is_file()
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert manifest.raw["models"]["tiny-qwen2"] == load_manifest(bundle).raw["models"]["tiny-qwen2"]

    assert _drafter_nll(bundle, "small", text) < nll_before  # the ONNX graph carries the adaptation
    engine = edgespec.load(bundle, threads=1, drafter=None, ngram_cache=False)
    assert len(engine.generate("The quick brown", max_new_tokens=6, ignore_eos=True).token_ids) == 6
    drafter = edgespec.load(bundle, threads=1, model="small", drafter=None, ngram_cache=False)
    assert len(drafter.generate("The quick brown", max_new_tokens=6, ignore_eos=True).token_ids) == 6

    again = adapt_drafter(bundle, history=history, steps=2, lr=1e-3, force=True, **QUICK)  # again from the base
    assert again.loss_before == pytest.approx(report.loss_before, rel=1e-4)
    assert load_manifest(bundle).raw["models"]["small"]["graph"]["file"] == "small/model.onnx"
    assert not (bundle / "small.r1").exists()


@pytest.mark.slow
def test_a_worse_drafter_is_not_written_unless_forced(bundle, tmp_path, monkeypatch):
    from edgespec.export import adapt as adapt_module

    history = write_history(tmp_path / "h.jsonl", bundle)
    before = snapshot(bundle)
    for worse in (float("nan"), 7.0):
        losses = iter([6.0, worse])  # held-out loss before, after
        monkeypatch.setattr(adapt_module, "heldout_loss", lambda model, examples: next(losses))
        report = adapt_drafter(bundle, history=history, steps=2, lr=1e-3, **QUICK)
        assert report.loss_before == 6.0 and not report.replaced
        assert snapshot(bundle) == before
    losses = iter([6.0, 7.0])
    forced = adapt_drafter(bundle, history=history, steps=2, lr=1e-3, force=True, parity=False, **QUICK)
    assert forced.replaced and load_manifest(bundle).raw["models"]["small"]["adaptation"]["loss_after"] == 7.0


@pytest.mark.slow
@pytest.mark.parametrize("where", ["export", "commit"])
def test_failed_adaptation_leaves_the_bundle_byte_identical(bundle, tmp_path, monkeypatch, where):
    from edgespec.export import bundle as bundle_module

    history = write_history(tmp_path / "h.jsonl", bundle)
    before = snapshot(bundle)

    def fail(*args, **kwargs):
        raise RuntimeError(f"injected failure at {where}")

    monkeypatch.setattr(bundle_module, "build_decoder" if where == "export" else "write_json_atomic", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        adapt_drafter(bundle, history=history, steps=2, lr=1e-3, force=True, **QUICK)
    assert snapshot(bundle) == before
    load_manifest(bundle)


@pytest.mark.slow
def test_a_crash_just_before_the_commit_leaves_a_loadable_bundle(bundle, tmp_path, monkeypatch):
    """Simulated hard crash after the new folder is in place: no cleanup runs; the old manifest still rules."""
    import edgespec
    from edgespec.export import bundle as bundle_module

    history = write_history(tmp_path / "h.jsonl", bundle)
    manifest_bytes = (bundle / "manifest.json").read_bytes()

    def crash(*args, **kwargs):
        raise SystemExit("crash")

    monkeypatch.setattr(bundle_module, "write_json_atomic", crash)
    monkeypatch.setattr(bundle_module.shutil, "rmtree", lambda *a, **k: None)  # a crash cleans nothing up
    with pytest.raises(SystemExit):
        adapt_drafter(bundle, history=history, steps=1, lr=1e-3, force=True, **QUICK)
    monkeypatch.undo()
    assert (bundle / "manifest.json").read_bytes() == manifest_bytes
    assert (bundle / "small.r1").is_dir()  # the orphan new folder
    engine = edgespec.load(bundle, threads=1, model="small", drafter=None, ngram_cache=False)
    assert len(engine.generate("The quick", max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_dry_run_reports_and_writes_nothing(bundle, tmp_path):
    history = write_history(tmp_path / "h.jsonl", bundle, count=5)
    before = snapshot(bundle)
    report = adapt_drafter(bundle, history=history, holdout=0.4, dry_run=True, **QUICK)
    assert report.dry_run and report.records == 5 and len(report.heldout_indices) == 2
    assert report.loss_before is None and report.quant == "fp32"
    assert snapshot(bundle) == before


def test_history_logged_by_the_engine_aligns(bundle, tmp_path):
    import edgespec
    from tokenizers import Tokenizer

    path = tmp_path / "engine.jsonl"
    engine = edgespec.load(bundle, threads=1, drafter=None, ngram_cache=False, history=path)
    for prompt in ("The quick brown", "def add(a, b):", "Caf\u00e9"):
        engine.generate(prompt, max_new_tokens=12)
    engine.chat([{"role": "user", "content": "Hi"}], max_new_tokens=6)
    report = adapt_drafter(bundle, history=path, dry_run=True, **QUICK)
    assert report.records == 4 and report.tokens[DIRECT] > 0
    target = Tokenizer.from_file(str(load_manifest(bundle).target_model.tokenizer_path))
    for record in json_lines(path):  # every record's ids line up with its text (no whole-output fallback span)
        spans = target_spans_of_output(target, record["output_ids"], record["output"])
        assert len(spans) == len(record["output_ids"]) and spans[-1][1] == len(record["output"])


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_pick_drafter_prefers_another_tokenizer(bundle):
    raw = json.loads((bundle / "manifest.json").read_text())
    same = {**raw["models"]["tiny-qwen2"], "role": "drafter"}  # a drafter sharing the target's files and tokenizer
    raw["models"] = {"tiny-qwen2": raw["models"]["tiny-qwen2"], "same": same, "small": raw["models"]["small"]}
    (bundle / "manifest.json").write_text(json.dumps(raw))
    manifest = load_manifest(bundle)
    assert pick_drafter(manifest).name == "small"
    assert pick_drafter(manifest, "same").name == "same"
    with pytest.raises(AdaptError, match="no drafter 'nope'.*same, small"):
        pick_drafter(manifest, "nope")
    with pytest.raises(AdaptError, match="no drafter 'tiny-qwen2'"):
        pick_drafter(manifest, "tiny-qwen2")


def test_error_no_history(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_HISTORY_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(AdaptError, match="no generation history.*EDGESPEC_HISTORY"):
        adapt_drafter(bundle, **QUICK)


def test_error_too_few_records(bundle, tmp_path):
    history = write_history(tmp_path / "h.jsonl", bundle, count=1)
    with open(history, "a") as f:
        f.write('{"v": 1, "broken": true}\n')
    with pytest.warns(UserWarning, match="missing field"):
        with pytest.raises(AdaptError, match="1 usable record.*at least 2"):
            adapt_drafter(bundle, history=history, **QUICK)


def test_error_unknown_drafter_and_bad_options(bundle, tmp_path):
    history = write_history(tmp_path / "h.jsonl", bundle, count=3)
    with pytest.raises(AdaptError, match="no drafter 'other'.*small"):
        adapt_drafter(bundle, drafter="other", history=history, **QUICK)
    with pytest.raises(AdaptError, match="--steps"):
        adapt_drafter(bundle, history=history, steps=0, **QUICK)
    with pytest.raises(AdaptError, match="mapped-weight"):
        adapt_drafter(bundle, history=history, mapped_weight=2.0, **QUICK)


def test_error_bundle_without_drafters(bundle, tmp_path):
    raw = json.loads((bundle / "manifest.json").read_text())
    del raw["models"]["small"]
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(AdaptError, match="no drafter model to adapt.*add-drafter"):
        adapt_drafter(bundle, history=tmp_path / "h.jsonl", **QUICK)


def test_error_corrupt_or_missing_bundle(bundle, tmp_path):
    (bundle / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        adapt_drafter(bundle, **QUICK)
    with pytest.raises(BundleError, match="does not exist"):
        adapt_drafter(tmp_path / "missing", **QUICK)


def test_error_base_weights_gone(bundle, tmp_path):
    history = write_history(tmp_path / "h.jsonl", bundle, count=3)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["models"]["small"]["source"]["path"] = str(tmp_path / "gone")
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(AdaptError, match="base weights.*not on this machine.*--source"):
        adapt_drafter(bundle, history=history, dry_run=True, **QUICK)


def test_cli_errors_are_one_line_and_exit_2(bundle, tmp_path, capsys):
    from edgespec import cli

    rc = cli.main(["adapt", str(bundle), "--history", str(tmp_path / "none.jsonl")])
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no generation history" in err and "Traceback" not in err
    rc = cli.main(["add-drafter", str(bundle), str(tmp_path / "missing.gguf")])
    assert rc == 2 and "no such file" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_cli_dry_run(bundle, tmp_path, capsys):
    from edgespec import cli

    history = write_history(tmp_path / "h.jsonl", bundle, count=4)
    rc = cli.main(["adapt", str(bundle), "--history", str(history), "--dry-run", "--json", "--threads", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["drafter"] == "small" and report["records"] == 4 and report["dry_run"] is True


@pytest.mark.slow
def test_add_drafter_and_replace_model(bundle, pristine_bundle, tmp_path):
    import edgespec
    from edgespec.export.bundle import ExportError, add_drafter, replace_model

    drafter_source = load_manifest(pristine_bundle).models["small"].source["path"]
    before = snapshot(bundle)
    with pytest.raises(ExportError, match="already has a model named 'small'"):
        add_drafter(bundle, drafter_source, name="small", parity=False, log=lambda m: None)
    with pytest.raises(ExportError, match="no model 'nope'"):
        replace_model(bundle, drafter_source, "nope", log=lambda m: None)
    with pytest.raises(ExportError, match="is a target, not a drafter"):
        replace_model(bundle, drafter_source, "tiny-qwen2", log=lambda m: None)
    assert snapshot(bundle) == before

    report = add_drafter(bundle, drafter_source, name="extra", drafter_kernels="exact", parity=False, threads=1,
                         log=lambda m: None)
    assert set(report.models) == {"extra"}
    manifest = load_manifest(bundle)
    assert [d.name for d in manifest.drafters()] == ["small", "extra"]
    target_quantization = manifest.raw["models"]["tiny-qwen2"]["quantization"]
    for key in ("accuracy_level", "eight_bit"):  # the target's options
        assert manifest.raw["models"]["extra"]["quantization"][key] == target_quantization[key]
    assert manifest.raw["models"]["extra"]["graph"]["file"] == "extra/model.onnx"
    engine = edgespec.load(bundle, threads=1, model="extra", drafter=None, ngram_cache=False)
    assert len(engine.generate("The quick", max_new_tokens=3, ignore_eos=True).token_ids) == 3
