"""The torch reference: transformers loads the same GGUF (dequantized to fp32) or HF folder.

Used at export time for tokenizer conversion and parity figures (teacher-forced top-1 agreement, perplexity), and by
tests for greedy-output equality. Only the exporter and tests import this module.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import numpy as np

# Fixed text for export-time accuracy figures: prose plus code, like the workloads we serve.
REFERENCE_TEXT = """The history of computing is a story of abstraction. Early machines were programmed by rewiring \
panels; later, stored programs let the same hardware run many tasks. Compilers turned human-readable languages into \
machine code, and operating systems shared one processor among many users. Today a phone carries more memory than \
the computers that guided spacecraft to the Moon, and language models run on laptops.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]

Speculative decoding makes generation faster without changing its output: a small model drafts several tokens, the \
large model checks them all in one pass, and every token it agrees with is kept. Berlin is the capital of Germany, \
Paris is the capital of France, and Rome is the capital of Italy."""


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_reference_model(kind: str, path: str | Path, progress: Callable[[int, int, str], None] | None = None):
    """A transformers causal LM in float32 from a GGUF file (dequantized) or a Hugging Face folder.

    `progress(done, total, "reference load")` (optional) counts the GGUF tensors filled in; a Hugging Face folder
    is loaded by transformers in one call and reports nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if kind == "gguf":
        return load_gguf_reference(path, progress)
    # safetensors only: a folder's pytorch_model.bin would be unpickled by torch.load (the exporter reads
    # *.safetensors weights alone too; see docs/hardening.md)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).eval()


def _chunked_head(data, qtype, rows_per_chunk: int = 8192):
    """An LM head computing x @ W^T with W dequantized from GGUF blocks a slice of rows at a time (fp32 math).

    Holds the quantized bytes only; used for untied heads of big vocabularies (Qwen: 152k x 1536 = 933 MB fp32)."""
    import mmap

    import torch
    from gguf import dequantize

    class ChunkedHead(torch.nn.Module):
        def forward(self, x):
            pieces = []
            for start in range(0, len(data), rows_per_chunk):
                w = torch.from_numpy(np.ascontiguousarray(dequantize(data[start:start + rows_per_chunk], qtype),
                                                          dtype=np.float32))
                pieces.append(torch.nn.functional.linear(x, w))
            base = getattr(data, "_mmap", None) or getattr(getattr(data, "base", None), "_mmap", None)
            if base is not None:
                base.madvise(mmap.MADV_DONTNEED)
            return torch.cat(pieces, dim=-1)

    return ChunkedHead()


def load_gguf_reference(path: Path, progress: Callable[[int, int, str], None] | None = None):
    """transformers' model for a GGUF file, filled one tensor at a time (`progress(done, total, "reference load")`
    after each, when given).

    The same steps as `from_pretrained(gguf_file=...)` (gguf-py's dequantizer, transformers' own GGUF tensor
    processor and name map), but streamed: the fp32 model is the only full copy in memory, and the file's pages are
    released after each tensor. transformers' loader holds every dequantized tensor at once (9 GB peak for
    Qwen2.5-Coder-1.5B); this peaks at the model's size plus one tensor.
    """
    import mmap

    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint)

    parsed = {"config": load_gguf_checkpoint(str(path), return_tensors=False)["config"], "tensors": {}}
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    gc.collect()  # the parsed vocabulary (Python lists, ~0.4 GB for Qwen) is not needed for the weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(model, processor)
    untied = not config.tie_word_embeddings
    if untied:  # the head stays quantized and is dequantized in row slices at forward time
        out = next(t for t in reader.tensors if t.name == "output.weight")
        model.lm_head = _chunked_head(out.data, out.tensor_type)
    params = dict(model.named_parameters())
    loaded = set()
    raw_map = getattr(reader.data, "_mmap", None)
    wanted = [t for t in reader.tensors if not (untied and t.name == "output.weight")]
    for count, tensor in enumerate(wanted):
        if progress is not None:
            progress(count, len(wanted), "reference load")
        data = tensor.data
        chunked = data.ndim == 2 and data.nbytes > (32 << 20) and "attn_q" not in tensor.name and \
            "attn_k" not in tensor.name  # q/k may be permuted whole; big matrices are processed row-wise
        step = max(1, (2 << 20) // max(1, data.shape[-1])) if chunked else len(data)
        for start in range(0, len(data), step):
            rows = dequantize(data[start:start + step], tensor.tensor_type)
            result = processor.process(weights=rows, name=tensor.name, tensor_key_mapping=mapping,
                                       parsed_parameters=parsed)
            hf_name = mapping.get(result.name)
            if hf_name not in params:
                break
            value = np.ascontiguousarray(result.weights, dtype=np.float32)
            value = torch.from_numpy(value if value.flags.writeable else value.copy())
            with torch.no_grad():
                if chunked:
                    params[hf_name][start:start + len(value)].copy_(value)
                else:
                    params[hf_name].copy_(value.reshape(params[hf_name].shape))
            loaded.add(hf_name)
        if raw_map is not None:
            raw_map.madvise(mmap.MADV_DONTNEED)
        if chunked or len(loaded) % 16 == 0:
            release_memory()  # dequantization temporaries would otherwise pile up in malloc arenas
    if progress is not None:
        progress(len(wanted), len(wanted), "reference load")
    if config.tie_word_embeddings:
        model.tie_weights()
        loaded |= {n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight}
    missing = [n for n in params if n not in loaded and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"GGUF reference for {path.name}: no weights for {missing[:5]}")
    return model.eval()


def save_tokenizer_json(kind: str, path: str | Path, out_file: str | Path, gguf_fields: dict | None = None) -> None:
    """Write a `tokenizers` tokenizer.json for the model: a Hugging Face folder's own file is copied; a GGUF's
    byte-level BPE vocabulary is built directly from its metadata (`gguf_fields`, the decoded fields of
    `GGUFWeights`, read from the file when not given; see export/gguf_tokenizer.py: no transformers, no torch);
    anything else is converted by transformers (an ImportError naming the `export` extra when it is missing)."""
    from ..runtimes.files import write_bytes_atomic

    path = Path(path)
    if kind == "hf" and (path / "tokenizer.json").is_file():
        write_bytes_atomic(out_file, (path / "tokenizer.json").read_bytes())
        return
    if kind == "gguf":
        from .gguf_tokenizer import UnsupportedTokenizer, byte_level_bpe_from_gguf

        if gguf_fields is None:
            from .weights import GGUFWeights

            gguf_fields = GGUFWeights(path).fields
        try:
            write_bytes_atomic(out_file, byte_level_bpe_from_gguf(gguf_fields).to_str().encode("utf-8"))
            return
        except UnsupportedTokenizer as exc:
            why = f"{path.name}: {exc} is converted by transformers"
    else:
        why = f"{path} has no tokenizer.json; its tokenizer is converted by transformers"
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"{why}, which is not installed: pip install 'edgespec[export]' (transformers and "
                          f"torch)", name=exc.name) from exc
    if kind == "gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    write_bytes_atomic(out_file, tok.backend_tokenizer.to_str().encode("utf-8"))


def hf_chat_template(path: str | Path) -> str | None:
    """The chat template of a Hugging Face folder (tokenizer_config.json or chat_template.jinja), if any."""
    import json

    path = Path(path)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def teacher_forced_stats(logits: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For logits [N, V] over ids [N]: the argmax at each position and the NLL of the next token ([N-1] each)."""
    logits = np.asarray(logits[:-1], dtype=np.float64)
    nxt = np.asarray(ids[1:])
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(shifted).sum(axis=-1))
    nll = logz - shifted[np.arange(len(nxt)), nxt]
    return logits.argmax(axis=-1), nll


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    """Full-sequence logits [N, V] of the torch model."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, dtype=np.int64)[None])).logits[0].float().numpy()


def reference_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy continuation by the torch model (no EOS stopping), for parity tests."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens,
            eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def free(model) -> None:
    """Drop a torch model and return its memory."""
    del model
    release_memory()
