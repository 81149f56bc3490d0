"""Prepare the optimum bench peer's model: what an optimum user would run, on the same weights as the bundle.

Run with the optimum virtual environment's Python (tools/optimum_peer/setup.sh does), never with the project's:
optimum-onnx pins transformers below 4.58 while edgespec's exporter needs 5.x.

    python prepare.py SOURCE --out DIR

1. dequantize: a GGUF file is loaded by transformers (`gguf_file=`, float32) and saved as a Hugging Face folder
   (a Hugging Face folder SOURCE is used as it is);
2. export: optimum-onnx's `main_export`, task `text-generation-with-past` (float32, KV cache inputs/outputs);
3. quantize: ONNX Runtime's own `MatMulNBitsQuantizer`, int4, block 32, symmetric (its command line's defaults),
   accuracy level 4 (int8 activations in MLAS, as edgespec's bundles use), MatMul weights only.

DIR/int4 then holds model.onnx (+ its external data), config.json, generation_config.json and the tokenizer, and
last of all `edgespec-optimum.json` (the source, the settings, the versions): the peer runs only a folder that has
it. The work happens in DIR/int4.partial and DIR/work and is renamed into place at the end, so an interrupted run
leaves no folder the peer would take for finished. The intermediate float32 folders are removed unless
--keep-intermediate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

MARKER = "edgespec-optimum.json"  # the peer's edgespec/bench/peers/optimum.py reads the same name
ROOT = Path(__file__).resolve().parents[2]
TASK = "text-generation-with-past"
CONFIG_SUFFIXES = (".json", ".txt", ".jinja", ".model")  # the files besides the weights that go with the model
MAX_BLOCK_SIZE = 256  # MatMulNBits supports power-of-two blocks from 16 to 256


def _files_module():
    """edgespec's atomic writer (runtimes/files.py, standard library only), loaded by path: edgespec itself is not
    installed in the optimum environment."""
    spec = importlib.util.spec_from_file_location("edgespec_files", ROOT / "runtimes" / "files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[optimum prepare] {message}", file=sys.stderr, flush=True)


def block_size(text: str) -> int:
    """--block-size: a power of two from 16 to MAX_BLOCK_SIZE."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be an integer, not {text!r}") from None
    if value < 16 or value > MAX_BLOCK_SIZE or value & (value - 1):
        raise argparse.ArgumentTypeError(f"block size must be a power of two from 16 to {MAX_BLOCK_SIZE}, not {value}")
    return value


def accuracy_level(text: str) -> int:
    """--accuracy-level: 0 (unset), 1 (float32), 2 (float16), 3 (bfloat16) or 4 (int8), as MatMulNBits defines."""
    if text not in ("0", "1", "2", "3", "4"):
        raise argparse.ArgumentTypeError(f"accuracy level must be 0 to 4, not {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="GGUF file or Hugging Face folder (float weights)")
    p.add_argument("--out", type=Path, required=True, help="artifact folder (the int4 model goes to OUT/int4)")
    p.add_argument("--block-size", type=block_size, default=32, help="int4 block size (default 32)")
    p.add_argument("--accuracy-level", type=accuracy_level, default=4, help="MatMulNBits accuracy level (default 4)")
    p.add_argument("--keep-intermediate", action="store_true",
                   help="keep OUT/work (the float32 Hugging Face folder and ONNX export)")
    p.add_argument("--force", action="store_true", help="redo the work even when OUT/int4 is finished")
    args = p.parse_args(argv)
    if not args.source.exists():
        p.error(f"source {args.source} not found")
    if args.source.is_file() and args.source.suffix.lower() != ".gguf":
        p.error(f"source {args.source} is a file but not a .gguf file")
    if args.source.is_dir() and not (args.source / "config.json").is_file():
        p.error(f"source folder {args.source} has no config.json (not a Hugging Face model folder)")
    return args


def dequantize(source: Path, hf_dir: Path) -> Path:
    """A Hugging Face float32 folder of `source`: a GGUF file dequantized by transformers and saved to `hf_dir`, a
    folder as it is."""
    if source.is_dir():
        return source
    if (hf_dir / "config.json").is_file() and any(hf_dir.glob("*.safetensors")):
        log(f"dequantized folder {hf_dir} already there")
        return hf_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {source} (transformers, float32)")
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    partial = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    del model
    shutil.rmtree(hf_dir, ignore_errors=True)
    partial.rename(hf_dir)
    return hf_dir


def export(hf_dir: Path, onnx_dir: Path) -> Path:
    """optimum-onnx's export of `hf_dir` (task text-generation-with-past, float32) into `onnx_dir`."""
    if (onnx_dir / "model.onnx").is_file():
        log(f"ONNX export {onnx_dir} already there")
        return onnx_dir
    from optimum.exporters.onnx import main_export

    log(f"exporting {hf_dir} with optimum-onnx ({TASK})")
    partial = onnx_dir.with_name(onnx_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    main_export(str(hf_dir), output=str(partial), task=TASK, device="cpu", do_validation=False)
    shutil.rmtree(onnx_dir, ignore_errors=True)
    partial.rename(onnx_dir)
    return onnx_dir


def quantize(onnx_dir: Path, int4_dir: Path, block: int, level: int) -> dict:
    """ONNX Runtime's MatMulNBitsQuantizer over `onnx_dir`/model.onnx into `int4_dir` (the other files copied):
    the settings used."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    settings = {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "bits": 4,
                "block_size": block, "is_symmetric": True, "accuracy_level": level, "quant_format": "QOperator",
                "op_types_to_quantize": ["MatMul"]}
    log(f"quantizing to int4 (block {block}, accuracy level {level})")
    int4_dir.mkdir(parents=True)
    for item in onnx_dir.iterdir():  # config, generation config, tokenizer, chat template: not the weights
        if item.is_file() and item.suffix in CONFIG_SUFFIXES:
            shutil.copy2(item, int4_dir / item.name)
    model = onnx.load(str(onnx_dir / "model.onnx"))
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=level,
                                          quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True, accuracy_level=level,
                                     algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(int4_dir / "model.onnx"), use_external_data_format=True)
    graph = quantizer.model.model.graph
    weights = {init.name for init in graph.initializer}
    settings["matmulnbits_nodes"] = sum(n.op_type == "MatMulNBits" for n in graph.node)
    settings["float_weight_matmuls_left"] = sum(n.op_type == "MatMul" and any(i in weights for i in n.input)
                                                for n in graph.node)
    return settings


def source_identity(source: Path) -> dict:
    """What identifies the source weights cheaply (the peer compares it to refuse a stale export)."""
    info = source.stat()
    return {"path": str(source.resolve()), "size": info.st_size if source.is_file() else None,
            "mtime_ns": info.st_mtime_ns}


def versions() -> dict:
    """The versions of everything in the pipeline."""
    from importlib import metadata

    return {name: metadata.version(name) for name in ("optimum", "optimum-onnx", "transformers", "torch",
                                                      "onnxruntime", "onnx")}


def main(argv=None) -> int:
    """Run the three steps (skipping those already done) and write the marker last."""
    args = parse_args(argv)
    out = args.out
    int4_dir = out / "int4"
    if (int4_dir / MARKER).is_file() and not args.force:
        log(f"{int4_dir} is already prepared (pass --force to redo it)")
        return 0
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    hf_dir = dequantize(args.source, work / "hf")
    onnx_dir = export(hf_dir, work / "onnx")
    partial = out / "int4.partial"
    shutil.rmtree(partial, ignore_errors=True)
    settings = quantize(onnx_dir, partial, args.block_size, args.accuracy_level)
    marker = {"format": "edgespec-optimum-peer", "version": 1, "source": source_identity(args.source),
              "task": TASK, "export": "optimum.exporters.onnx.main_export (float32)", "quantization": settings,
              "versions": versions(), "prepare_seconds": round(time.perf_counter() - started, 1),
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _files_module().write_json_atomic(partial / MARKER, marker)
    shutil.rmtree(int4_dir, ignore_errors=True)
    partial.rename(int4_dir)
    if not args.keep_intermediate:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in int4_dir.iterdir()) / 2**30
    log(f"done: {int4_dir} ({size:.2f} GiB, {marker['prepare_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
