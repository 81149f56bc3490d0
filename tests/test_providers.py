"""ONNX Runtime execution providers: `edgespec.load(..., providers=...)`, `--provider NAME`, the clear error for a
provider the installed onnxruntime lacks, and device profiles kept per provider list.

What runs here depends on the onnxruntime build: the PyPI wheel for Linux has CPU and Azure (a provider for remote
operators, which takes none of our nodes: a real non-CPU provider list whose every node falls back to CPU), no
XNNPACK. With XNNPACK in the build, a tiny bundle is run on it and compared with CPU."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest

from edgespec.cli import main
from edgespec.devices import ProfileError, ProfileWarning, find_profile, load_profile, measure_profile
from edgespec.devices.profile import (DeviceProfile, default_profile_name, default_profile_path, providers_slug,
                                      resolve_device)
from edgespec.engine import load
from edgespec.runtimes.manifest import load_manifest
from edgespec.runtimes.runner import (CPU_PROVIDER, MAX_OPTION_CHARS, MAX_PROVIDER_OPTIONS, MAX_PROVIDERS,
                                      ModelRunner, ProviderError, provider_names, resolve_providers)

AVAILABLE = ort.get_available_providers()
XNNPACK = "XnnpackExecutionProvider"
AZURE = "AzureExecutionProvider"
MISSING = [p for p in ("XnnpackExecutionProvider", "CoreMLExecutionProvider", "QNNExecutionProvider",
                       "NnapiExecutionProvider", "DmlExecutionProvider") if p not in AVAILABLE]
needs_azure = pytest.mark.skipif(AZURE not in AVAILABLE, reason="this onnxruntime build has no Azure provider")
PROMPT_IDS = [1, 5, 9, 12, 7, 3, 30, 2, 8]


@pytest.fixture(autouse=True)
def profiles_dir(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    monkeypatch.setenv("EDGESPEC_PROFILES", str(folder))
    monkeypatch.delenv("EDGESPEC_MEMORY_MB", raising=False)
    return folder


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles["qwen2"]


def greedy_ids(runner: ModelRunner, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Plain greedy decoding on a runner: the new ids and the logits of the prompt's last token."""
    logits = runner.prefill(prompt)
    first = logits.copy()
    out = []
    for _ in range(steps):
        token = int(np.argmax(logits))
        out.append(token)
        logits = runner.forward([token])[-1]
        runner.commit()
    return out, first


# ------------------------------------------------------------------------------------------------ the provider list
def test_default_is_cpu_only():
    assert resolve_providers(None) == [(CPU_PROVIDER, {})]
    assert resolve_providers([]) == [(CPU_PROVIDER, {})]
    assert provider_names("cpu") == provider_names("CPUExecutionProvider") == [CPU_PROVIDER]


@needs_azure
def test_names_short_or_full_any_case_and_cpu_always_last():
    assert provider_names("azure") == [AZURE, CPU_PROVIDER]
    assert provider_names(["AZURE", "cpu"]) == [AZURE, CPU_PROVIDER]
    assert provider_names([AZURE]) == [AZURE, CPU_PROVIDER]
    # onnxruntime's own form: (name, options) pairs; option values become text, flags "1"/"0"
    assert resolve_providers([(AZURE, {"a": 1, "b": True, "c": "x"})]) == \
        [(AZURE, {"a": "1", "b": "1", "c": "x"}), (CPU_PROVIDER, {})]
    assert resolve_providers((AZURE, {})) == [(AZURE, {}), (CPU_PROVIDER, {})]  # one pair on its own


@pytest.mark.skipif(not MISSING, reason="this onnxruntime build has every mobile provider")
def test_a_provider_missing_from_the_build_names_the_available_ones():
    missing = MISSING[0]
    short = missing.removesuffix("ExecutionProvider").lower()
    with pytest.raises(ProviderError) as info:
        resolve_providers([short])
    message = str(info.value)
    assert f"{missing} is not in this onnxruntime build ({ort.__version__})" in message
    assert all(p in message for p in AVAILABLE)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad, match", [
    ("tpu", "unknown execution provider 'tpu'; onnxruntime knows"),
    ("", "non-empty text"),
    ("x" * 65, "at most 64 characters"),
    (5, "must be a name or a list"),
    ([5], "non-empty text"),
    (["cpu", "cpu"], "listed twice"),
    ([("cpu",)], r"\(name, options\) pair"),
    ([("cpu", ["a"])], "must be a dict"),
    ([("cpu", {"": "1"})], "keys must be non-empty text"),
    ([("cpu", {"k": [1]})], "values text or numbers"),
])
def test_malformed_provider_lists_are_refused(bad, match):
    with pytest.raises(ProviderError, match=match):
        resolve_providers(bad)


@needs_azure
def test_cpu_must_come_last():
    with pytest.raises(ProviderError, match="must come last"):
        resolve_providers(["cpu", "azure"])


def test_provider_count_limit():
    with pytest.raises(ProviderError, match=f"at most {MAX_PROVIDERS} execution providers, got {MAX_PROVIDERS + 1}"):
        resolve_providers(["cpu"] * (MAX_PROVIDERS + 1))
    with pytest.raises(ProviderError, match="listed twice"):  # at the limit the count passes; the repeat does not
        resolve_providers(["cpu"] * MAX_PROVIDERS)


def test_option_limits():
    at_limit = {f"k{i}": "v" for i in range(MAX_PROVIDER_OPTIONS)}
    assert len(resolve_providers([("cpu", at_limit)])[0][1]) == MAX_PROVIDER_OPTIONS
    with pytest.raises(ProviderError, match=f"over the limit of {MAX_PROVIDER_OPTIONS}"):
        resolve_providers([("cpu", {**at_limit, "one_more": "v"})])
    assert resolve_providers([("cpu", {"path": "p" * MAX_OPTION_CHARS})])[0][1]["path"] == "p" * MAX_OPTION_CHARS
    with pytest.raises(ProviderError, match=f"over {MAX_OPTION_CHARS} characters"):
        resolve_providers([("cpu", {"path": "p" * (MAX_OPTION_CHARS + 1)})])


# ------------------------------------------------------------------------------------------------ sessions
def test_load_on_cpu_by_name_equals_the_default(bundle):
    with load(bundle, drafter=None, threads=1) as default, load(bundle, drafter=None, threads=1,
                                                               providers=["cpu"]) as named:
        assert default.providers == named.providers == [CPU_PROVIDER]
        a = default.generate("Hello there", max_new_tokens=12, temperature=0).token_ids
        b = named.generate("Hello there", max_new_tokens=12, temperature=0).token_ids
        assert a == b and len(a) > 0


@needs_azure
def test_a_provider_that_takes_no_node_falls_back_to_cpu_exactly(bundle):
    """Azure runs only remote operators: every node of our graph falls back to the CPU provider, and the output is
    the CPU output to the bit."""
    entry = load_manifest(bundle).target_model
    on_azure = ModelRunner(entry, threads=1, providers=["azure"])
    on_cpu = ModelRunner(entry, threads=1)
    assert on_azure.providers == [AZURE, CPU_PROVIDER] and on_cpu.providers == [CPU_PROVIDER]
    ids_azure, logits_azure = greedy_ids(on_azure, PROMPT_IDS, 8)
    ids_cpu, logits_cpu = greedy_ids(on_cpu, PROMPT_IDS, 8)
    assert ids_azure == ids_cpu
    np.testing.assert_array_equal(logits_azure, logits_cpu)
    with load(bundle, drafter=None, threads=1, providers=["azure"]) as engine:
        assert engine.providers == [AZURE, CPU_PROVIDER]
        variant = engine.variant(None)
        assert variant.providers == engine.providers  # the shared session's providers


@pytest.mark.skipif(XNNPACK not in AVAILABLE, reason="this onnxruntime build has no XNNPACK provider")
def test_xnnpack_runs_the_tiny_bundle_like_cpu(bundle):
    """XNNPACK takes float MatMul/Gemm nodes with constant weights (a fp32 bundle has them) and leaves the rest to
    CPU; its kernels round differently, so the greedy ids are compared, and the logits within a tolerance."""
    entry = load_manifest(bundle).target_model
    xnn = ModelRunner(entry, threads=1, providers=[("xnnpack", {"intra_op_num_threads": 1})])
    assert xnn.providers[0] == XNNPACK
    ids_xnn, logits_xnn = greedy_ids(xnn, PROMPT_IDS, 8)
    ids_cpu, logits_cpu = greedy_ids(ModelRunner(entry, threads=1), PROMPT_IDS, 8)
    np.testing.assert_allclose(logits_xnn, logits_cpu, rtol=1e-3, atol=1e-3)
    assert ids_xnn == ids_cpu


@pytest.mark.skipif(XNNPACK in AVAILABLE, reason="this onnxruntime build has XNNPACK")
def test_load_on_xnnpack_without_it_is_a_clear_error(bundle):
    with pytest.raises(ProviderError, match=r"XnnpackExecutionProvider is not in this onnxruntime build .*available: "
                                            + ", ".join(AVAILABLE)):
        load(bundle, drafter=None, providers=["xnnpack"])


# ------------------------------------------------------------------------------------------------ device profiles
def hand_made(providers=None) -> DeviceProfile:
    extra = {} if providers is None else {"providers": providers}
    return DeviceProfile(name="hand", created="2025-01-01T00:00:00+00:00", device={"device_id": "test-cpu-2c-8gb"},
                         threads=2, bundle={"model": "m", "key": "0" * 16},
                         verify_ms={"contexts": [100], "sizes": [1, 2], "ms": [[10.0, 12.0]]}, **extra)


def test_a_profile_without_providers_reads_as_cpu(tmp_path):
    data = hand_made().to_dict()
    del data["providers"]  # a profile written before the field existed
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert load_profile(path).providers == [CPU_PROVIDER]
    assert default_profile_name("dev", 2, "abcdef0123456789") == "dev-2t-abcdef0123"  # CPU names are unchanged


def test_profile_providers_round_trip_and_name_the_file(tmp_path):
    profile = hand_made([XNNPACK, CPU_PROVIDER])
    assert DeviceProfile.from_dict(profile.to_dict()).providers == [XNNPACK, CPU_PROVIDER]
    assert providers_slug([XNNPACK, CPU_PROVIDER]) == "xnnpack"
    assert providers_slug(["QNNExecutionProvider", XNNPACK, CPU_PROVIDER]) == "qnn-xnnpack"
    assert default_profile_path(profile).name == "test-cpu-2c-8gb-2t-xnnpack-0000000000.json"
    assert "Xnnpack+CPU" in profile.summary()


@pytest.mark.parametrize("value, match", [
    ("CPUExecutionProvider", "must be a list of 1 to"),
    ([], "must be a list of 1 to"),
    ([CPU_PROVIDER] * (MAX_PROVIDERS + 1), "must be a list of 1 to"),
    (["../etc"], "provider names"),
    ([CPU_PROVIDER, CPU_PROVIDER], "twice"),
])
def test_bad_providers_fields_are_refused(value, match):
    data = hand_made().to_dict()
    data["providers"] = value
    with pytest.raises(ProfileError, match=match):
        DeviceProfile.from_dict(data, where="x.json")


@needs_azure
def test_profiles_are_kept_per_provider_list(bundle, profiles_dir):
    manifest = load_manifest(bundle)
    tiny = dict(contexts=[16], sizes=[1, 2], repeats=1, drafters=False)
    on_azure = measure_profile(manifest, threads=1, providers=["azure"], **tiny)
    assert on_azure.providers == [AZURE, CPU_PROVIDER] and "-1t-azure-" in on_azure.name
    on_azure.save(default_profile_path(on_azure))
    assert find_profile(manifest, 1, providers=["azure"]).name == on_azure.name
    assert find_profile(manifest, 1) is None  # a CPU session plans from CPU costs only
    on_cpu = measure_profile(manifest, threads=1, **tiny)
    on_cpu.save(default_profile_path(on_cpu))
    assert on_cpu.providers == [CPU_PROVIDER] and "azure" not in on_cpu.name
    assert find_profile(manifest, 1).name == on_cpu.name
    assert len(list(profiles_dir.glob("*.json"))) == 2
    # auto finds the backend's own profile; a named profile of another backend warns
    assert resolve_device("auto", manifest, 1, providers=["azure"]).name == on_azure.name
    with pytest.warns(ProfileWarning, match="measured on Azure\\+CPU, this session runs on CPU"):
        resolve_device(on_azure.name, manifest, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileWarning)
        resolve_device(on_cpu.name, manifest, 1)


# ------------------------------------------------------------------------------------------------ command line
def test_cli_provider_is_bounded(bundle, capsys):
    args = ["generate", "hi", "--bundle", str(bundle), "--drafter", "none", "--device", "none", "--max-new-tokens",
            "2"]
    for extra, message in ((["--provider", "cpu"] * (MAX_PROVIDERS + 1), f"at most {MAX_PROVIDERS} values"),
                           (["--provider", "x" * 65], "must have 1 to 64 characters")):
        with pytest.raises(SystemExit) as info:
            main(args + extra)
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert main(args + ["--provider", "cpu"] * MAX_PROVIDERS) == 2  # at the limit: parsed, then the repeat refused
    assert "listed twice" in capsys.readouterr().err


@pytest.mark.skipif(XNNPACK in AVAILABLE, reason="this onnxruntime build has XNNPACK")
def test_cli_missing_provider_is_one_clear_line(bundle, capsys):
    code = main(["generate", "hi", "--bundle", str(bundle), "--drafter", "none", "--device", "none",
                 "--max-new-tokens", "2", "--provider", "xnnpack"])
    err = capsys.readouterr().err
    assert code == 2 and "XnnpackExecutionProvider is not in this onnxruntime build" in err
    assert "Traceback" not in err


@needs_azure
def test_cli_profile_records_the_provider(bundle, tmp_path):
    out = tmp_path / "azure.json"
    assert main(["profile", "--bundle", str(bundle), "--threads", "1", "--contexts", "16", "--sizes", "1,2",
                 "--repeats", "1", "--no-drafters", "--provider", "azure", "--output", str(out)]) == 0
    assert load_profile(out).providers == [AZURE, CPU_PROVIDER]
