"""Device profiles (edgespec.devices): measuring a tiny bundle, the JSON file format and its validation,
interpolation, where profiles are found (`--device auto|NAME|path`), the memory estimate and budget check, and the
`edgespec profile` command. Profiles go to a temporary EDGESPEC_PROFILES folder, never the home folder."""

from __future__ import annotations

import json
import math

import numpy as np

import pytest

import edgespec.devices.profile as profile_module
from edgespec.cli import main
from edgespec.devices import (DeviceProfile, MemoryBudgetError, ProfileError, ProfileWarning, bundle_key,
                              check_memory, default_profile_path, estimate_memory_mb, find_profile, kv_cache_bytes,
                              list_profiles, load_profile, measure_profile, model_file_bytes, resolve_device,
                              user_profiles_dir)
from edgespec.devices.memory import MB, available_memory_mb
from edgespec.devices.profile import current_device_id, device_slug
from edgespec.export.bundle import ModelRequest, export_bundle
from edgespec.runtimes.manifest import BundleError, load_manifest

TINY = dict(contexts=[16, 64], sizes=[1, 2, 4], repeats=1, drafter_sizes=[1, 2])


@pytest.fixture(scope="module")
def bundle(tiny_models, tmp_path_factory):
    """A tiny qwen2 target with a copy of itself as drafter "copy"."""
    root = tmp_path_factory.mktemp("profile-bundle")
    return export_bundle(str(tiny_models["qwen2"]), root / "pair", name="tiny-qwen2", parity=False,
                         drafters=[ModelRequest(str(tiny_models["qwen2"]), "drafter", name="copy")],
                         log=lambda m: None).bundle


@pytest.fixture(scope="module")
def manifest(bundle):
    return load_manifest(bundle)


@pytest.fixture(scope="module")
def measured(manifest):
    return measure_profile(manifest, threads=1, **TINY)


@pytest.fixture(autouse=True)
def profiles_dir(tmp_path, monkeypatch):
    """Every test gets an empty user profile folder and no memory override."""
    folder = tmp_path / "profiles"
    monkeypatch.setenv("EDGESPEC_PROFILES", str(folder))
    monkeypatch.delenv("EDGESPEC_MEMORY_MB", raising=False)
    return folder


def hand_made(key: str = "0" * 16, threads: int = 2, device_id: str = "test-cpu-2c-8gb", name: str = "hand"):
    """A profile with known numbers: contexts 100/300, sizes 1/2/4, and drafter "d"."""
    return DeviceProfile(
        name=name, created="2025-01-01T00:00:00+00:00", device={"device_id": device_id, "cpu_count": 2},
        threads=threads, bundle={"model": "m", "quantization": {"mode": "fp32"}, "graph_bytes": 10, "key": key},
        verify_ms={"contexts": [100, 300], "sizes": [1, 2, 4], "ms": [[10.0, 12.0, 20.0], [20.0, 24.0, 40.0]]},
        drafters={"d": {"sizes": [1, 4], "ms": [2.0, 5.0], "load_s": 0.5, "memory_mb": 12.0}}, load_s=1.5,
        memory={"total_mb": 8000.0, "available_mb": 6000.0, "target_rss_mb": 100.0, "bytes_per_file_byte": 1.1})


# ------------------------------------------------------------------------------------------------ measuring
def test_measured_profile_has_the_requested_table_and_round_trips(measured, manifest, tmp_path):
    target = manifest.target_model
    assert measured.verify_ms["contexts"] == [16, 64] and measured.verify_ms["sizes"] == [1, 2, 4]
    assert len(measured.verify_ms["ms"]) == 2 and all(len(row) == 3 for row in measured.verify_ms["ms"])
    assert all(ms > 0 for row in measured.verify_ms["ms"] for ms in row)
    assert list(measured.drafters) == ["copy"] and measured.drafters["copy"]["sizes"] == [1, 2]
    assert measured.threads == 1 and measured.repeats == 1 and not measured.quick
    assert measured.device_id == current_device_id()
    assert measured.bundle["model"] == "tiny-qwen2" and measured.key == bundle_key(target) and measured.matches(target)
    assert measured.bundle["graph_bytes"] == model_file_bytes(target) > 0
    assert measured.load_s >= 0 and measured.memory["total_mb"] > 0
    assert measured.name == default_profile_path(measured).stem
    assert measured.verify_seconds(3, 40) > 0 and measured.drafter_seconds("copy", 2) > 0

    path = measured.save(tmp_path / "laptop.json")
    loaded = load_profile(path)
    assert loaded == measured and loaded.name == "laptop"
    assert loaded.to_dict() == json.loads(path.read_text())
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind


def test_contexts_are_capped_below_the_context_length(manifest):
    # tiny models hold 512 tokens: 1536 -> 512 - 64, and duplicates merge
    p = measure_profile(manifest, threads=1, contexts=[1536, 2000, 32], sizes=[1, 2], repeats=1, drafters=False)
    assert p.verify_ms["contexts"] == [32, 448] and p.drafters == {}


def test_measure_rejects_bad_arguments(manifest):
    with pytest.raises(ValueError, match="sizes"):
        measure_profile(manifest, threads=1, contexts=[16], sizes=[0, 2], repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        measure_profile(manifest, threads=1, contexts=[16], sizes=[1], repeats=0)


def test_progress_is_reported(manifest):
    calls = []
    measure_profile(manifest, threads=1, progress=lambda d, t, label: calls.append((d, t, label)), **TINY)
    assert calls[-1][0] == calls[-1][1] == 2 * 3 + 2
    assert {label for _, _, label in calls} == {"target", "drafter copy"}


# ------------------------------------------------------------------------------------------------ interpolation
def test_verify_seconds_interpolates_and_extrapolates():
    p = hand_made()
    assert p.verify_seconds(1, 100) == pytest.approx(0.010)
    assert p.verify_seconds(3, 100) == pytest.approx(0.016)  # halfway between sizes 2 and 4
    assert p.verify_seconds(8, 100) == pytest.approx(0.036)  # line through (2, 12) and (4, 20)
    assert p.verify_seconds(2, 200) == pytest.approx(0.018)  # halfway between the contexts
    assert p.verify_seconds(3, 200) == pytest.approx(0.024)
    assert p.verify_seconds(2, 10) == pytest.approx(0.012)  # clamped in context
    assert p.verify_seconds(6, 5000) == pytest.approx(0.056)  # clamped, extrapolated with slope 8 ms/token
    with pytest.raises(ValueError, match="tokens"):
        p.verify_seconds(0, 100)


def test_drafter_seconds():
    p = hand_made()
    assert p.drafter_seconds("d") == pytest.approx(0.002)
    assert p.drafter_seconds("d", 2) == pytest.approx(0.003)
    assert p.drafter_seconds("d", 7) == pytest.approx(0.008)
    assert p.drafter_seconds("unknown", 2) is None


def test_device_slug():
    assert device_slug("Intel(R) Xeon(R) Platinum 8480+", 2, 24 * 1024) == "intel-xeon-8480-2c-24gb"
    assert device_slug("AMD Ryzen 7 5800X 8-Core Processor", 16, 32000) == "amd-ryzen-7-5800x-16c-31gb"
    assert device_slug("Intel(R) Core(TM) i7-1165G7 @ 2.80GHz", 8, 16 * 1024) == "intel-core-i7-1165g7-8c-16gb"
    assert device_slug("Apple M2 Pro", 10, None) == "apple-m2-pro-10c"
    assert profile_module.SLUG.match(current_device_id())


# ------------------------------------------------------------------------------------------------ validation
def _broken(mutate):
    data = hand_made().to_dict()
    mutate(data)
    return data


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.update(format="something-else"), "format"),
    (lambda d: d["verify_ms"].update(sizes=[1, 4, 2]), "verify_ms.sizes"),
    (lambda d: d["verify_ms"].update(sizes=[1, 2, 2]), "verify_ms.sizes"),
    (lambda d: d["verify_ms"].update(contexts=[300, 100]), "verify_ms.contexts"),
    (lambda d: d["verify_ms"]["ms"][0].__setitem__(1, -3.0), "verify_ms.ms[0]"),
    (lambda d: d["verify_ms"]["ms"][1].__setitem__(0, float("nan")), "verify_ms.ms[1]"),
    (lambda d: d["verify_ms"]["ms"][1].__setitem__(0, "12"), "verify_ms.ms[1]"),
    (lambda d: d["verify_ms"]["ms"].pop(), "verify_ms.ms"),
    (lambda d: d["verify_ms"]["ms"][0].pop(), "verify_ms.ms[0]"),
    (lambda d: d["drafters"]["d"].update(ms=[2.0]), "drafters.d.ms"),
    (lambda d: d["drafters"]["d"].update(sizes=[0, 4]), "drafters.d.sizes"),
    (lambda d: d.update(threads=True), "threads"),
    (lambda d: d.pop("verify_ms"), "verify_ms"),
    (lambda d: d["device"].update(device_id="Not A Slug"), "device.device_id"),
    (lambda d: d["bundle"].pop("key"), "bundle.key"),
    (lambda d: d["memory"].update(available_mb=float("inf")), "memory.available_mb"),
])
def test_bad_fields_raise_profile_error_naming_file_and_field(tmp_path, mutate, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(mutate)))  # NaN/inf are written as JSON's NaN/Infinity literals
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and repr(field) in str(info.value)


def test_corrupt_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "edgespec-device-profile", "schema_version": 1, "ver')
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(corrupt)
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(ProfileError, match="JSON object"):
        load_profile(not_object)
    with pytest.raises(FileNotFoundError, match="edgespec profile"):
        load_profile(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------------------ lookup
def test_resolve_none():
    assert resolve_device(None, None, 2) is None
    assert resolve_device("none", None, 2) is None


def test_auto_measures_once_then_reuses_the_file(manifest, profiles_dir, monkeypatch):
    calls = []
    real = profile_module.measure_profile

    def counting(manifest_, threads=None, quick=False, progress=None, entry=None, **kw):
        calls.append(quick)
        return real(manifest_, threads=threads, contexts=[16], sizes=[1, 2], repeats=1, drafters=False, entry=entry)

    monkeypatch.setattr(profile_module, "measure_profile", counting)
    first = resolve_device("auto", manifest, 1)
    assert calls == [True]
    files = list(profiles_dir.glob("*.json"))
    assert [p.stem for p in files] == [first.name] and first.name.startswith(f"{current_device_id()}-1t-")
    second = resolve_device("auto", manifest, 1)
    assert calls == [True] and second == first  # found, not measured again
    assert find_profile(manifest, 1) == first
    assert find_profile(manifest, 3) is None  # another thread count is another profile
    resolve_device("auto", manifest, 3)
    assert len(calls) == 2 and len(list(profiles_dir.glob("*.json"))) == 2


def test_named_profile_path_and_unknown_name(manifest, profiles_dir, recwarn):
    target = manifest.target_model
    hand_made(key=bundle_key(target), threads=4, device_id="phone-8c-8gb").save(profiles_dir / "pixel.json")
    found = resolve_device("pixel", manifest, 2)  # another device and thread count: allowed, no warning
    assert found.name == "pixel" and found.threads == 4
    assert not [w for w in recwarn if issubclass(w.category, ProfileWarning)]
    assert resolve_device(str(profiles_dir / "pixel.json"), manifest, 2) == found
    with pytest.raises(ProfileError, match="pixel"):
        resolve_device("no-such-device", manifest, 2)
    with pytest.raises(FileNotFoundError):
        resolve_device(str(profiles_dir / "absent.json"), manifest, 2)


def test_profile_of_another_model_warns(manifest, profiles_dir):
    hand_made(key="f" * 16).save(profiles_dir / "other-model.json")
    with pytest.warns(ProfileWarning, match="do not describe this model"):
        profile = resolve_device("other-model", manifest, 2)
    assert profile.name == "other-model"


def test_list_profiles_skips_broken_files(profiles_dir):
    hand_made().save(profiles_dir / "good.json")
    (profiles_dir / "broken.json").write_text("{nope")
    with pytest.warns(ProfileWarning, match="broken.json"):
        listed = list_profiles()
    assert [p.name for path, p in listed if path.parent == profiles_dir] == ["good"]


def test_user_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGESPEC_PROFILES")
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    assert user_profiles_dir() == tmp_path / "cache" / "profiles"
    monkeypatch.setenv("EDGESPEC_PROFILES", str(tmp_path / "mine"))
    assert user_profiles_dir() == tmp_path / "mine"


# ------------------------------------------------------------------------------------------------ memory
def test_memory_estimate_arithmetic(manifest, tmp_path):
    target = manifest.target_model
    # tiny qwen2: 2 layers, 2 kv heads, head dim 16
    assert kv_cache_bytes(target, 100) == 2 * 2 * 2 * 16 * 100 * 4
    extra = tmp_path / "ngram.npz"
    extra.write_bytes(b"x" * (MB // 2))
    est = estimate_memory_mb(manifest, [target], 100, ratio=2.0, extra_files=[extra, tmp_path / "absent.npz"])
    model = est["models"]["tiny-qwen2"]
    assert model["weights_mb"] == pytest.approx(model_file_bytes(target) * 2.0 / MB, abs=0.05)
    assert model["kv_cache_mb"] == pytest.approx(kv_cache_bytes(target, 100) / MB, abs=0.05)
    assert model["context"] == 100 and est["extra_files_mb"] == 0.5
    assert est["total_mb"] == pytest.approx(model["total_mb"] + 0.5)
    # None = the model's context length; a larger max_context is capped at it
    assert estimate_memory_mb(manifest, [target], None)["models"]["tiny-qwen2"]["context"] == 512
    assert estimate_memory_mb(manifest, [target], 10**6)["models"]["tiny-qwen2"]["context"] == 512


def _fake_big(monkeypatch):
    """Make each tiny model's files count 100 MB and its KV cache 0.1 MB per token, so that budgets are readable."""
    import edgespec.devices.memory as memory

    monkeypatch.setattr(memory, "model_file_bytes", lambda entry: 100 * MB)
    monkeypatch.setattr(memory, "kv_cache_bytes", lambda entry, context: int(context * MB / 10))


def test_check_memory_passes_or_names_smaller_configurations(manifest, monkeypatch):
    _fake_big(monkeypatch)
    models = [manifest.target_model, manifest.models["copy"]]
    # each model: 100 x 1.15 = 115 MB + 51.2 MB of KV cache at 512 tokens -> 332.4 MB in all
    assert check_memory(manifest, models, None, available_mb=1000)["total_mb"] == pytest.approx(332.4)
    with pytest.raises(MemoryBudgetError) as info:
        check_memory(manifest, models, None, available_mb=300)  # budget 270 MB
    message = str(info.value)
    assert "332 MB" in message and "300 MB" in message and "270 MB" in message
    assert "tiny-qwen2 166 MB" in message and "copy 166 MB" in message
    assert "without drafter 'copy' (~166 MB)" in message
    # both models fit in 270 MB only below 200 tokens (no multiple of 256): the target alone is offered instead
    assert "with max_context 256 and only the target (~141 MB)" in message
    assert "with max_context 256 (~281 MB)" not in message
    assert isinstance(info.value, BundleError) and info.value.available_mb == 300
    assert info.value.suggestions[0] == ("without drafter 'copy'", pytest.approx(166.2))
    with pytest.raises(MemoryBudgetError) as info:
        check_memory(manifest, models, None, available_mb=320)  # budget 288 MB: both models fit at 256 tokens
    assert "with max_context 256 (~281 MB)" in str(info.value)
    with pytest.raises(MemoryBudgetError, match="no smaller configuration"):
        check_memory(manifest, models, None, available_mb=100)


def test_check_memory_uses_the_environment_and_profile_ratio(manifest, monkeypatch):
    _fake_big(monkeypatch)
    target = [manifest.target_model]
    monkeypatch.setenv("EDGESPEC_MEMORY_MB", "150")  # budget 135 MB; target: 115 + 25.6 at 256 tokens
    assert available_memory_mb() == 150
    with pytest.raises(MemoryBudgetError, match="150 MB are available"):
        check_memory(manifest, target, 256)
    profile = hand_made()
    profile.memory["bytes_per_file_byte"] = 1.0  # measured: 100 + 25.6 fits in 135
    assert check_memory(manifest, target, 256, profile=profile)["total_mb"] == pytest.approx(125.6)
    monkeypatch.setenv("EDGESPEC_MEMORY_MB", "lots")
    with pytest.raises(ValueError, match="EDGESPEC_MEMORY_MB"):
        check_memory(manifest, target, 256)


def test_check_memory_does_nothing_when_memory_is_unknown(manifest, monkeypatch):
    import edgespec.devices.memory as memory

    monkeypatch.setattr(memory, "available_memory_mb", lambda: None)
    assert check_memory(manifest, [manifest.target_model], None) is None


# ------------------------------------------------------------------------------------------------ command line
def test_cli_profile_quick_writes_a_loadable_file(bundle, manifest, tmp_path, profiles_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    out = tmp_path / "quick.json"
    assert main(["profile", "--bundle", str(bundle), "--quick", "--threads", "1", "--output", str(out)]) == 0
    profile = load_profile(out)
    assert profile.quick and profile.repeats == 2 and profile.verify_ms["contexts"] == [448]
    assert profile.verify_ms["sizes"] == [1, 2, 3, 4, 6, 8, 12, 16] and profile.drafters["copy"]["sizes"] == [1, 4]
    assert profile.matches(manifest.target_model)
    printed = capsys.readouterr().out
    assert "ctx 448" in printed and str(out) in printed.replace("\n", "")

    assert main(["profile", "--bundle", str(bundle), "--threads", "1", "--contexts", "16", "--sizes", "1,2",
                 "--repeats", "1", "--no-drafters"]) == 0
    written = list(profiles_dir.glob("*.json"))
    assert len(written) == 1 and load_profile(written[0]).drafters == {}
    capsys.readouterr()
    assert main(["profile", "--list"]) == 0
    listed = capsys.readouterr().out
    assert written[0].stem in listed and "tiny-qwen2" in listed
    assert main(["profile", "--contexts", "16"]) == 2  # no --bundle: a clear error, not a traceback


def test_nan_never_reaches_a_saved_profile(measured):
    data = measured.to_dict()
    assert all(math.isfinite(v) for row in data["verify_ms"]["ms"] for v in row)


def test_measured_dips_are_smoothed_to_a_nondecreasing_curve():
    from edgespec.devices.profile import nondecreasing

    assert nondecreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert nondecreasing([5.0, 1.0, 1.0]) == [7 / 3] * 3
    assert nondecreasing([1.0, 2.0]) == [1.0, 2.0]
    values = np.random.default_rng(0).uniform(1, 10, 20).tolist()
    fitted = nondecreasing(values)
    assert all(a <= b + 1e-12 for a, b in zip(fitted, fitted[1:]))
    assert sum(fitted) == pytest.approx(sum(values))  # pooling keeps the total


# ------------------------------------------------------------------------------------------------ interleaving
class _DriftingRunner:
    """A fake runner whose forwards take longer the more have run (a throttling clock): a forward of n tokens
    'costs' n units times the drift factor, read back through a fake perf_counter."""

    def __init__(self):
        self.calls, self.clock, self.rewinds = [], 0.0, []

    def forward(self, tokens):
        self.calls.append(len(tokens))
        self.clock += len(tokens) * (1.0 + 0.05 * len(self.calls))

    def rewind(self, length):
        self.rewinds.append(length)


def test_sizes_are_timed_in_interleaved_rounds(monkeypatch):
    runner = _DriftingRunner()
    monkeypatch.setattr(profile_module.time, "perf_counter", lambda: runner.clock)
    ticks = []
    ms = profile_module._interleaved_ms(runner, list(range(100)), 10, [1, 2, 4], repeats=3, warmup=True,
                                        tick=lambda: ticks.append(1))
    assert runner.calls == [1, 2, 4] + [1, 1, 2, 4] * 3  # a warm-up round, then three rounds (each opened untimed)
    assert set(runner.rewinds) == {10} and len(ticks) == 9
    # drift hits every size alike: each size's median comes from the same round, so the ratios stay near n
    assert ms[1] / ms[0] == pytest.approx(2.0, rel=0.06) and ms[2] / ms[0] == pytest.approx(4.0, rel=0.12)
    quick = _DriftingRunner()
    monkeypatch.setattr(profile_module.time, "perf_counter", lambda: quick.clock)
    profile_module._interleaved_ms(quick, list(range(100)), 0, [1, 2, 4], repeats=2, warmup=False)
    assert quick.calls == [1] + [1, 1, 2, 4] * 2  # quick: one warm-up forward, then the rounds


class _AfterLargeRunner(_DriftingRunner):
    """A forward right after a large one pays extra (what ONNX Runtime does after a 64-token forward)."""

    def forward(self, tokens):
        after_large = bool(self.calls) and self.calls[-1] >= 32
        self.calls.append(len(tokens))
        self.clock += 10.0 + len(tokens) + (60.0 if after_large else 0.0)


def test_a_forward_after_a_large_one_is_not_what_a_size_costs(monkeypatch):
    """Rounds go up to 64 tokens, then start again at one: the one-token forward after the 64-token one is slowed
    by it, so each round opens with an untimed forward and the one-token cost stays what a decode loop sees."""
    runner = _AfterLargeRunner()
    monkeypatch.setattr(profile_module.time, "perf_counter", lambda: runner.clock)
    ms = profile_module._interleaved_ms(runner, list(range(200)), 0, [1, 2, 64], repeats=3, warmup=True)
    assert ms[0] == pytest.approx(11_000.0) and ms[1] == pytest.approx(12_000.0)


def test_shipped_profiles_load_and_are_named_after_their_contents():
    from edgespec.devices.profile import default_profile_name, shipped_profiles_dir

    paths = sorted(shipped_profiles_dir().glob("*.json"))
    assert paths, "the package ships device profiles"
    for path in paths:
        p = load_profile(path)
        assert path.stem == p.name == default_profile_name(p.device_id, p.threads, p.key)
        assert not p.quick and p.repeats >= 5  # shipped ones are full measurements
        costs = [p.verify_seconds(n, 300) for n in range(1, 17)]
        assert all(b >= a for a, b in zip(costs, costs[1:])) and costs[-1] > costs[0]
