"""Hardening (docs/hardening.md): no file a manifest names can lie outside its bundle (every path field, drafters and
self-speculation included; absolute paths, `..`, links, NUL bytes, link loops), no pickle / eval / exec / torch.load
anywhere in the package sources, and the smaller guarantees of the other loaders (profile file names, history token
ids, draft head files, chat templates that try to read files)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgespec.runtimes.manifest import BundleError, load_manifest

import fuzz_targets as ft

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ path traversal
@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    """A bundle folder (files exist, contents unread by load_manifest) with the fuzz seed manifest, a folder
    `outside` beside it holding the same file names, a link `evil` -> outside and a link loop `loop`."""
    ft.manifest_setup(tmp_path)
    bundle = tmp_path / "manifest"
    (bundle / "manifest.json").write_bytes(ft.get_target("manifest")._seeds[0])
    load_manifest(bundle)  # valid as it is
    return bundle


FIELDS = {
    "target graph.file": ("t", ("graph", "file")),
    "target graph.data": ("t", ("graph", "data")),
    "target tokenizer": ("t", ("tokenizer",)),
    "target draft_head_tokens": ("t", ("self_speculation", "draft_head_tokens")),
    "drafter graph.file": ("d", ("graph", "file")),
    "drafter graph.data": ("d", ("graph", "data")),
    "drafter tokenizer": ("d", ("tokenizer",)),
}
ESCAPES = {
    "dotdot": ("../outside/model.onnx", "points outside the bundle"),
    "dotdot inside": ("t/../../outside/model.onnx", "points outside the bundle"),
    "absolute": (None, "absolute path"),  # filled with the real outside file
    "windows drive": ("C:/outside/model.onnx", "absolute path"),
    "backslash root": ("\\outside\\model.onnx", "absolute path"),
    "symlink": ("evil/model.onnx", "points outside the bundle"),
    "nul byte": ("t/model.onnx\u0000x", "NUL byte"),
    "link loop": ("loop/model.onnx", "cannot be resolved"),
    "the bundle itself": (".", "points outside the bundle"),
    "not a string": (["t/model.onnx"], "must be a string|expected a relative path string"),
}


@pytest.mark.parametrize("escape", list(ESCAPES))
@pytest.mark.parametrize("field", list(FIELDS))
def test_no_manifest_path_can_leave_the_bundle(fake_bundle, field, escape):
    model, keys = FIELDS[field]
    value, match = ESCAPES[escape]
    if value is None:
        value = str(fake_bundle.parent / "outside" / "model.onnx")
    raw = json.loads((fake_bundle / "manifest.json").read_text())
    node = raw["models"][model]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    (fake_bundle / "manifest.json").write_text(json.dumps(raw))
    for check_files in (True, False):  # refused before any file is looked at
        with pytest.raises(BundleError, match=match) as info:
            load_manifest(fake_bundle, check_files=check_files)
        assert str(fake_bundle / "manifest.json") in str(info.value)


def test_links_inside_the_bundle_are_fine(fake_bundle):
    os.symlink(fake_bundle / "t", fake_bundle / "alias")
    raw = json.loads((fake_bundle / "manifest.json").read_text())
    raw["models"]["t"]["tokenizer"] = "alias/tokenizer.json"
    (fake_bundle / "manifest.json").write_text(json.dumps(raw))
    entry = load_manifest(fake_bundle).models["t"]
    assert entry.tokenizer_path == (fake_bundle / "t" / "tokenizer.json").resolve()


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.__setitem__("target", ["t"]), "target"),  # was a TypeError (unhashable list)
    (lambda m: m["models"]["t"].__setitem__("layer_types", 5), "layer_types"),  # was a TypeError
    (lambda m: m["models"]["t"].__setitem__("special_tokens", [1]), "special_tokens"),  # was an AttributeError
    (lambda m: m["models"]["t"]["special_tokens"].__setitem__("eos", None), None),  # was a TypeError: now fine
    (lambda m: m["models"]["t"]["special_tokens"].__setitem__("add_bos", "yes"), "add_bos"),
    (lambda m: m["models"]["t"].__setitem__("chat_template", 7), "chat_template"),
    (lambda m: m["models"]["t"].__setitem__("quantization", [1]), "quantization"),
    (lambda m: m["models"]["t"].__setitem__("sliding_window", True), "sliding_window"),
    (lambda m: m["models"]["t"].__setitem__("num_layers", 10 ** 5000), "not valid JSON"),  # int too long to read
])
def test_manifest_fields_of_the_wrong_type_are_bundle_errors(fake_bundle, edit, match):
    raw = json.loads((fake_bundle / "manifest.json").read_text())
    edit(raw)
    try:
        text = json.dumps(raw)
    except ValueError:  # 10**5000 cannot be written by json either: write its digits by hand
        raw["models"]["t"]["num_layers"] = "@@"
        text = json.dumps(raw).replace('"@@"', "9" * 5000)
    (fake_bundle / "manifest.json").write_text(text)
    if match is None:
        assert load_manifest(fake_bundle).models["t"].eos_token_ids == ()
        return
    with pytest.raises(BundleError, match=match):
        load_manifest(fake_bundle)


def test_draft_head_file_that_is_an_npz_is_a_bundle_error(tmp_path):
    """np.load returns an NpzFile for a zip archive even with allow_pickle=False: the runner must refuse it."""
    from edgespec.runtimes.runner import ModelRunner

    class FakeInput:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class FakeSession:
        def get_inputs(self):
            names = ["input_ids", "position_ids", "attention_bias", "logit_positions", "layer_gates", "draft_head"]
            names += [f"past_{k}_{i}" for i in range(2) for k in ("key", "value")]
            return [FakeInput(n, [1, 2, 1, 16] if n.startswith("past") else [2]) for n in names]

        def get_outputs(self):
            return [FakeInput("logits", [1, 1, 384])]

    ft.manifest_setup(tmp_path)
    bundle = tmp_path / "manifest"
    (bundle / "manifest.json").write_bytes(ft.get_target("manifest")._seeds[0])
    np.savez(bundle / "t" / "draft_head_tokens.npy", ids=np.arange(4))
    os.replace(bundle / "t" / "draft_head_tokens.npy.npz", bundle / "t" / "draft_head_tokens.npy")
    entry = load_manifest(bundle).models["t"]
    with pytest.raises(BundleError, match="not an .npz archive"):
        ModelRunner(entry, threads=1, max_context=8, session=FakeSession())


def test_chat_templates_cannot_read_files(tmp_path):
    from edgespec.chat import ChatTemplateError, render_chat

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    for template in (f"{{% include '{secret}' %}}", f"{{% import '{secret}' as x %}}",
                     "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
        try:
            out = render_chat(template, [{"role": "user", "content": "hi"}])
        except (ChatTemplateError, ValueError):
            continue
        assert "TOP SECRET" not in out and "subprocess" not in out


def test_profile_file_names_never_leave_the_profiles_folder():
    from edgespec.devices.profile import default_profile_name

    assert default_profile_name("amd-epyc-2c-24gb", 2, "03f60ad30bf6d88e") == "amd-epyc-2c-24gb-2t-03f60ad30b"
    for key in ("../../../etc/passwd", "/abs", "..", "a/b\\c"):
        name = default_profile_name("../x", 2, key)
        assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")


def test_history_ids_beyond_any_vocabulary_are_skipped(tmp_path):
    from edgespec.history import HistoryWarning, read_history

    path = tmp_path / "h.jsonl"
    good = {"v": 1, "time": "t", "model": "m", "prompt": "p", "output": "o", "prompt_ids": [1], "output_ids": [2]}
    bad = dict(good, output_ids=[1 << 40])
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.warns(HistoryWarning, match="token ids"):
        assert read_history(path) == [good]


# ------------------------------------------------------------------------------------------------ no pickle
SCANNED = ("edgespec", "export", "runtimes", "devices")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
BANNED_CALLS = {"eval", "exec"}
# (file, line text) pairs allowed, with the reason. torch.load, pickle, eval and exec are never allowed. Empty: the
# last entry (the HF peer of `edgespec bench`) went once the bench's HF peer (now edgespec/bench/peers/hf.py) passed use_safetensors=True.
ALLOW_LIST: dict[tuple[str, str], str] = {}


def _problems(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []

    def report(node, what):
        line = lines[node.lineno - 1].strip()
        shown = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        if (shown, line) not in ALLOW_LIST:
            found.append(f"{shown}:{node.lineno}: {what}: {line}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    report(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in BANNED_MODULES:
            report(node, f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and name in BANNED_CALLS | {"__import__"}:
                report(node, f"calls {name}()")
            if owner == "torch" and name == "load":
                report(node, "calls torch.load (unpickles)")
            if name in ("read_pickle", "loads") and owner in ("pd", "pandas", "pickle", "marshal"):
                report(node, f"calls {owner}.{name}")
            if owner == "yaml" and name == "load":
                report(node, "calls yaml.load (use yaml.safe_load)")
            pickle_flag = keywords.get("allow_pickle")
            if pickle_flag is not None and not (isinstance(pickle_flag, ast.Constant) and pickle_flag.value is False):
                report(node, "allow_pickle is not False")
            if owner in ("np", "numpy") and name == "load" and pickle_flag is None:
                report(node, "np.load without allow_pickle=False")
            if name == "from_pretrained" and owner.startswith("AutoModel") and not (
                    "gguf_file" in keywords or (isinstance(keywords.get("use_safetensors"), ast.Constant)
                                                and keywords["use_safetensors"].value is True)):
                report(node, "from_pretrained of weights without use_safetensors=True (a .bin is unpickled)")
    return found


def test_no_pickle_eval_or_exec_in_the_package_sources():
    files = sorted(p for folder in SCANNED for p in (REPO / folder).rglob("*.py"))
    assert len(files) > 20
    problems = [problem for path in files for problem in _problems(path)]
    assert not problems, "\n".join(problems)


def test_the_scanner_sees_what_it_bans(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch\nimport numpy as np\n"
                   "x = eval('1')\nexec('y = 2')\ntorch.load('f')\nnp.load('f')\nnp.load('f', allow_pickle=True)\n"
                   "AutoModelForCausalLM.from_pretrained('folder')\n")
    problems = _problems(bad)
    assert len(problems) == 7, problems
