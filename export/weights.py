"""Weight sources for the graph builder: GGUF files (blocks kept as they are) and Hugging Face folders.

Both hand out tensors under GGUF names (`blk.{i}.attn_q.weight`, linear weights [out, in]) in the form the chosen
quantization mode asks for: `gguf` keeps GGUF blocks exactly (MatMulNBits), `fp32` dequantizes, `int8` / `int4`
quantize float weights round-to-nearest in blocks of 32 (for Hugging Face sources; lossy, and labelled so).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .arch import ArchSpec, UnsupportedArchitecture, spec_from_gguf_fields, spec_from_hf_config
from .quant import BlockQuantized, from_gguf, quantize_rtn
from .sources import SourceError, scan_gguf

QUANT_MODES = ("gguf", "fp32", "int8", "int4")

# Tensors that stay float32 in every mode (norms, biases).
_FLOAT_ONLY = ("norm.weight", ".bias")


def _is_matrix(name: str) -> bool:
    return name.endswith(".weight") and not any(name.endswith(s) for s in _FLOAT_ONLY)


def _llama_unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (interleaved rotary -> NEOX halves)."""
    head_dim = n_rows // n_heads
    idx = np.arange(n_rows).reshape(n_heads, head_dim // 2, 2)
    return idx.transpose(0, 2, 1).reshape(-1)


def _take_rows(w, rows: np.ndarray):
    if isinstance(w, BlockQuantized):
        zp = None if w.zero_points is None else w.zero_points[rows]
        return dataclasses.replace(w, packed=w.packed[rows], scales=w.scales[rows], zero_points=zp)
    return w[rows]


class GGUFWeights:
    """Weights and metadata of a GGUF file (memory-mapped; tensors converted one at a time on request)."""

    def __init__(self, path: str | Path, mode: str = "gguf"):
        import gguf

        if mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization mode {mode!r}; choose one of {QUANT_MODES}")
        self.path = Path(path)
        self.mode = mode
        try:  # bounds-checked walk first: the reader trusts every count and length field it reads
            scan_gguf(self.path)
        except SourceError as exc:
            raise ValueError(f"{self.path} is not a readable GGUF file ({exc})") from None
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # truncated or foreign files fail in many ways inside the reader
            raise ValueError(f"{self.path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.fields = {}
        for key, field in self.reader.fields.items():
            try:
                self.fields[key] = field.contents()
            except Exception:  # a value that does not decode (bad UTF-8): as if the key were absent
                continue
        self.tensors = {t.name: t for t in self.reader.tensors}
        try:
            self.spec: ArchSpec = spec_from_gguf_fields(self.fields, set(self.tensors))
        except ValueError as exc:  # UnsupportedArchitecture or a missing / bad metadata value
            cls = type(exc) if type(exc) in (ValueError, UnsupportedArchitecture) else ValueError
            raise cls(f"{self.path}: {exc}") from None
        self.tensor_types: dict[str, int] = {}
        for t in self.reader.tensors:
            self.tensor_types[t.tensor_type.name] = self.tensor_types.get(t.tensor_type.name, 0) + 1

    def has(self, name: str) -> bool:
        """True when the file holds `name`."""
        return name in self.tensors

    def get(self, name: str):
        """Tensor `name` as float32 ndarray or BlockQuantized (see module docstring for the mode)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path.name} has no tensor {name!r}")
        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 (inner) first
        if not 1 <= len(shape) <= 2:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {list(shape)}; weights are vectors or matrices")
        if len(shape) == 1:
            shape_nk = (1, shape[0])
        else:
            shape_nk = shape
        try:
            value = from_gguf(np.asarray(t.data), t.tensor_type, shape_nk, ort_runnable=False)
        except (ValueError, NotImplementedError) as exc:  # a block/shape mismatch; a type gguf-py cannot read
            raise ValueError(f"{self.path}: tensor {name!r} ({t.tensor_type.name}): {exc}") from None
        if isinstance(value, BlockQuantized) and (len(shape) == 1 or not _is_matrix(name)):
            value = value.dequantize()  # a quantized vector (norm, bias): float32 like the F32 ones
        if len(shape) == 1:
            value = np.asarray(value, dtype=np.float32).reshape(-1)
        elif not _is_matrix(name):
            value = np.asarray(value, dtype=np.float32)
        elif self.mode != "gguf":
            dense = value.dequantize() if isinstance(value, BlockQuantized) else np.asarray(value, np.float32)
            value = dense if self.mode == "fp32" else quantize_rtn(dense, 8 if self.mode == "int8" else 4, 32)
        if self.spec.architecture == "llama" and (name.endswith("attn_q.weight") or name.endswith("attn_k.weight")):
            heads = self.spec.num_heads if "attn_q" in name else self.spec.num_kv_heads
            rows = self.spec.head_dim * heads
            if shape_nk[0] != rows or self.spec.head_dim % 2:
                raise ValueError(f"{self.path}: tensor {name!r} has {shape_nk[0]} rows; the metadata says {heads} "
                                 f"heads of {self.spec.head_dim} (an even head size) = {rows}")
            value = _take_rows(value, _llama_unpermute_rows(rows, heads))
        return value


# Hugging Face tensor names -> GGUF names (per layer suffixes).
_HF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_LAYER_PLAIN = {"post_attention_layernorm": "ffn_norm"}
_HF_LAYER_GEMMA = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def hf_to_gguf_name(name: str, architecture: str) -> str | None:
    """Map one Hugging Face parameter name to its GGUF name (None for tensors the graph does not use)."""
    name = name.removeprefix("model.language_model.").removeprefix("model.")
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    if not name.startswith("layers."):
        return None
    _, index, rest = name.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    table = {**_HF_LAYER, **(_HF_LAYER_GEMMA if architecture == "gemma3" else _HF_LAYER_PLAIN)}
    if module not in table:
        return None
    return f"blk.{index}.{table[module]}.{kind}"


class HFWeights:
    """Weights of a Hugging Face model folder (safetensors), or of an in-memory state dict for tests."""

    def __init__(self, tensors: dict[str, np.ndarray], config: dict, mode: str = "fp32"):
        if mode not in ("fp32", "int8", "int4"):
            raise ValueError(f"quantization {mode!r} is not available for Hugging Face sources; use fp32, int8 or int4")
        self.mode = mode
        self.config = config
        self.spec: ArchSpec = spec_from_hf_config(config)
        self.tensors: dict[str, np.ndarray] = {}
        for name, value in tensors.items():
            gguf_name = hf_to_gguf_name(name, self.spec.architecture)
            if gguf_name is not None:
                self.tensors[gguf_name] = value
        self.tensor_types = {mode.upper(): len(self.tensors)}

    @classmethod
    def from_folder(cls, folder: str | Path, mode: str = "fp32") -> "HFWeights":
        """Read config.json and every *.safetensors file of a Hugging Face folder (float32 copies)."""
        from safetensors import safe_open

        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
        config = json.loads(config_path.read_text())
        spec_from_hf_config(config)  # unsupported architectures fail here, before looking for weights
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} has no *.safetensors weights")
        tensors = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key).float().numpy()
        return cls(tensors, config, mode)

    def has(self, name: str) -> bool:
        """True when the source holds `name`."""
        return name in self.tensors

    def get(self, name: str):
        """Tensor `name` (GGUF naming) as float32 ndarray or BlockQuantized."""
        if name not in self.tensors:
            raise KeyError(f"Hugging Face weights have no tensor for {name!r}")
        value = np.asarray(self.tensors[name], dtype=np.float32)
        if self.spec.architecture == "gemma3" and name.endswith("norm.weight"):
            value = value + 1.0  # Gemma's RMSNorm scales by (1 + weight); GGUF stores the sum, so do we
        if self.mode != "fp32" and _is_matrix(name) and value.ndim == 2:
            bits = 8 if self.mode == "int8" else 4
            block = 32 if value.shape[1] % 32 == 0 else 16
            if value.shape[1] % block == 0:
                return quantize_rtn(value, bits, block)
        return value
