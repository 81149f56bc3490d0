#!/usr/bin/env bash
# The optimum bench peer (`edgespec bench --peers optimum`): what an optimum user runs, on the bundle's weights.
#
#   tools/optimum_peer/setup.sh [MODEL.gguf | HF_FOLDER ...]
#
# 1. creates its own virtual environment ($EDGESPEC_OPTIMUM_VENV, default ~/.cache/edgespec/optimum-venv) with
#    optimum-onnx, transformers < 4.58 (optimum-onnx's pin; edgespec's exporter needs 5.x, hence a separate venv),
#    torch 2.13.0 CPU, ONNX Runtime (the version of the project's venv when there is one, so both sides run the same
#    kernels), accelerate + gguf (transformers' GGUF loading) and onnx-ir (ONNX Runtime's int4 quantizer needs it);
# 2. for each model given, runs tools/optimum_peer/prepare.py in that venv: GGUF dequantized to a Hugging Face
#    folder, exported by optimum-onnx (text-generation-with-past), int4 through ONNX Runtime's MatMulNBitsQuantizer
#    (block 32, accuracy level 4), into $EDGESPEC_OPTIMUM_MODELS/<name>/int4 (default ~/.cache/edgespec/peers/optimum,
#    <name> = the GGUF file's name without .gguf, or the folder's name). For a 1.5B model: about 14 GB of disk
#    while it works (float32 copies, removed at the end), 1.8 GB when done; about 10 minutes on 2 cores.
#
# Extra arguments for prepare.py go after `--`: setup.sh MODEL.gguf -- --keep-intermediate
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${EDGESPEC_OPTIMUM_VENV:-$HOME/.cache/edgespec/optimum-venv}"
MODELS="${EDGESPEC_OPTIMUM_MODELS:-$HOME/.cache/edgespec/peers/optimum}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

sources=()
extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  sources+=("$1"); shift
done

ort_version=""
if [ -x "$ROOT/.venv/bin/python" ]; then
  ort_version="$("$ROOT/.venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || true)"
fi
ort_spec="onnxruntime${ort_version:+==$ort_version}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import optimum.onnxruntime, accelerate, gguf, onnx_ir' 2>/dev/null; then
  echo "[optimum setup] creating $VENV ($ort_spec)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "optimum-onnx[onnxruntime]==0.1.0" "transformers>=4.45,<4.58" "$ort_spec" \
    "accelerate>=0.26" "gguf>=0.17" "onnx-ir>=0.1"
fi
"$VENV/bin/python" -c 'from importlib import metadata as m; print("[optimum setup] " + ", ".join(f"{n} {m.version(n)}" for n in ("optimum-onnx", "optimum", "transformers", "torch", "onnxruntime")))' >&2

for source in "${sources[@]}"; do
  name="$(basename "$source")"
  name="${name%.gguf}"
  # -I: the script's folder is not put on sys.path, and no user site or PYTHON* variables leak in
  "$VENV/bin/python" -I "$HERE/prepare.py" "$source" --out "$MODELS/$name" "${extra[@]}"
done
