"""The torch reference: transformers loads the same GGUF (dequantized to fp32) or HF folder.

Used at export time for tokenizer conversion and parity figures (teacher-forced top-1 agreement, perplexity), and by
tests for greedy-output equality. Only the exporter and tests import this module.
"""

from __future__ import annotations

import gc
from pathlib import Path

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


def load_reference_model(kind: str, path: str | Path):
    """A transformers causal LM in float32 from a GGUF file (dequantized) or a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def save_tokenizer_json(kind: str, path: str | Path, out_file: str | Path) -> None:
    """Write a `tokenizers` tokenizer.json for the model (converted from GGUF metadata by transformers)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if kind == "hf" and (path / "tokenizer.json").is_file():
        import shutil

        shutil.copyfile(path / "tokenizer.json", out_file)
        return
    if kind == "gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    tok.backend_tokenizer.save(str(out_file))


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
    gc.collect()
