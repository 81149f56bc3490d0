"""The runtime works without the exporter's dependencies: torch, transformers, gguf and onnx are made unimportable
in a fresh interpreter, which then loads a bundle, generates, and runs the CLI's `generate` subcommand."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "transformers", "gguf", "onnx", "onnx_ir", "onnxscript", "safetensors", "accelerate")

SCRIPT = textwrap.dedent("""
    import sys

    BLOCKED = set(sys.argv[2].split(","))

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test (runtime must not need it)")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):  # nothing may be pre-imported either
        assert name.split(".")[0] not in BLOCKED, name

    bundle = sys.argv[1]

    import edgespec
    import edgespec.engine
    import edgespec.runtimes.manifest, edgespec.runtimes.runner, edgespec.runtimes.kvcache
    import edgespec.text, edgespec.sampling, edgespec.chat, edgespec.cli

    engine = edgespec.engine.load(bundle, threads=1)
    result = engine.generate("The quick brown fox", max_new_tokens=8, ignore_eos=True)
    assert len(result.token_ids) == 8, result
    assert result.text == engine.tokenizer.decode(result.token_ids)
    assert "".join(engine.stream("The quick brown fox", max_new_tokens=8, ignore_eos=True)) == result.text
    chat = engine.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4, ignore_eos=True)
    assert len(chat.token_ids) == 4
    print("GENERATED", result.token_ids)

    rc = edgespec.cli.main(["generate", "The quick brown fox", "--bundle", bundle, "--max-new-tokens", "8",
                            "--threads", "1", "--json-stats"])
    assert rc == 0, rc
    rc = edgespec.cli.main(["generate", "Hi", "--bundle", bundle, "--chat", "--max-new-tokens", "4",
                            "--threads", "1"])
    assert rc == 0, rc
    rc = edgespec.cli.main(["info", bundle])
    assert rc == 0, rc

    leaked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("RUNTIME_OK")
""")


def run_blocked(bundle, blocked=BLOCKED) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), ",".join(blocked)],
                          capture_output=True, text=True, timeout=120)


def test_runtime_needs_no_exporter_dependencies(tiny_bundles):
    for arch in ("qwen2", "gemma3"):
        proc = run_blocked(tiny_bundles[arch])
        assert proc.returncode == 0, f"{arch}:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert "RUNTIME_OK" in proc.stdout
        lines = proc.stdout.splitlines()
        generated = next(line for line in lines if line.startswith("GENERATED"))
        # the CLI printed the completion and then its stats as JSON
        stats = [line for line in lines if line.startswith("{") and '"new_tokens": 8' in line]
        assert stats, proc.stdout
        assert generated


def test_the_blocker_really_blocks(tiny_bundles):
    """Sanity check of the harness: code that needs a blocked module fails in the same subprocess setup."""
    for needs in ("edgespec.export.graph", "torch", "transformers", "gguf"):  # graph.py imports onnx
        script = SCRIPT.replace("import edgespec\n", f"import edgespec\nimport {needs}\n", 1)
        assert script != SCRIPT
        proc = subprocess.run([sys.executable, "-c", script, str(tiny_bundles["qwen2"]), ",".join(BLOCKED)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0, needs
        assert "is blocked in this test" in proc.stderr, needs
        assert "RUNTIME_OK" not in proc.stdout
