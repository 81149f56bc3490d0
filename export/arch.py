"""Architecture descriptions: one `ArchSpec` per model, read from GGUF metadata or a Hugging Face config.

The spec holds every number the graph builder needs; nothing else in the exporter reads raw metadata.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..runtimes.checks import short_repr

SUPPORTED_ARCHITECTURES = ("qwen2", "llama", "gemma3")

# Hugging Face `model_type` -> our architecture name.
_HF_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}


class UnsupportedArchitecture(ValueError):
    """Raised for a model whose architecture the exporter cannot build."""


@dataclass(frozen=True)
class ArchSpec:
    """Everything the graph builder needs to know about one decoder-only transformer."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope_local_theta: float | None = None  # Gemma 3 sliding-window layers
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default=())  # "full" or "sliding" per layer
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # RMS norm over each head of q and k (Gemma 3)
    sandwich_norm: bool = False  # post-attention and post-MLP norms (Gemma 3)
    embedding_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    activation: str = "silu"  # "silu" or "gelu_tanh"
    attention_scale: float = 0.0  # 0 -> 1/sqrt(head_dim)
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"architecture {self.architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError("layer_types must have one entry per layer")

    @property
    def scale(self) -> float:
        """Attention logit scale."""
        return self.attention_scale or 1.0 / math.sqrt(self.head_dim)

    @property
    def has_sliding_layers(self) -> bool:
        """True when some layers use a sliding attention window."""
        return "sliding" in self.layer_types

    def to_dict(self) -> dict:
        """Plain-JSON form for the manifest."""
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's default layout: every `pattern`-th layer is global, the rest use the sliding window."""
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))


# Bounds of the numbers read from GGUF metadata: far above any real model, so that a corrupt or hostile file fails
# here with a clear message instead of sizing graphs, buffers or loops from them.
GGUF_LIMITS = {"embedding_length": 1 << 18, "attention.head_count": 1 << 12, "attention.head_count_kv": 1 << 12,
               "attention.key_length": 1 << 12, "block_count": 1024, "feed_forward_length": 1 << 20,
               "context_length": 1 << 24, "vocab_size": 1 << 24, "attention.sliding_window": 1 << 24}


def spec_from_gguf_fields(fields: dict, tensor_names: set[str]) -> ArchSpec:
    """Build an ArchSpec from GGUF key/value metadata (already decoded to Python values).

    Every number is checked (type, sign, bounds in `GGUF_LIMITS`, consistency of heads): a bad value raises
    ValueError naming the key."""
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"GGUF architecture {short_repr(arch)} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    def count(key, default=None) -> int:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= GGUF_LIMITS[key]:
            raise ValueError(f"GGUF metadata {arch}.{key} must be an integer in 1..{GGUF_LIMITS[key]}, "
                             f"got {short_repr(value, 60)}")
        return value

    def positive(key, default=None) -> float:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"GGUF metadata {arch}.{key} must be a finite positive number, got {short_repr(value, 60)}")
        return float(value)

    hidden = count("embedding_length")
    heads = count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads)
    if heads % kv_heads:
        raise ValueError(f"GGUF metadata: {heads} attention heads are not a multiple of {kv_heads} kv heads")
    head_dim = count("attention.key_length", max(1, hidden // heads))
    layers = count("block_count")
    vocab = fields.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens", ())
        vocab = len(tokens) if isinstance(tokens, list) else 0
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= GGUF_LIMITS["vocab_size"]:
        raise ValueError(f"GGUF metadata gives no usable vocabulary size ({arch}.vocab_size or the length of "
                         f"tokenizer.ggml.tokens), got {short_repr(vocab, 60)}")
    common = dict(
        architecture=arch,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=count("feed_forward_length"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        context_length=count("context_length"),
        rms_norm_eps=positive("attention.layer_norm_rms_epsilon"),
        rope_theta=positive("rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensor_names,
    )
    if arch == "qwen2":
        return ArchSpec(**common, attention_bias=True)
    if arch == "llama":
        return ArchSpec(**common, attention_bias="blk.0.attn_q.bias" in tensor_names)
    # gemma3
    return ArchSpec(
        **common,
        rope_local_theta=10000.0,
        sliding_window=count("attention.sliding_window"),
        layer_types=gemma3_layer_types(layers),
        qk_norm=True,
        sandwich_norm=True,
        embedding_scale=math.sqrt(hidden),
        activation="gelu_tanh",
        attention_scale=float(head_dim) ** -0.5,
    )


def spec_from_hf_config(config: dict) -> ArchSpec:
    """Build an ArchSpec from a Hugging Face `config.json` dictionary."""
    model_type = config.get("model_type")
    if model_type == "gemma3" and "text_config" in config:
        config = {**config["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    arch = _HF_MODEL_TYPES.get(model_type)
    if arch is None:
        raise UnsupportedArchitecture(
            f"Hugging Face model_type {model_type!r} is not supported; supported: {', '.join(sorted(_HF_MODEL_TYPES))}"
        )
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    layers = int(config["num_hidden_layers"])
    rope_theta = config.get("rope_theta")
    rope_params = config.get("rope_parameters") or {}
    if rope_theta is None:
        # transformers 5 keeps rope settings in rope_parameters (per layer type for Gemma 3)
        full = rope_params.get("full_attention", rope_params)
        rope_theta = full.get("rope_theta", 10000.0)
    common = dict(
        architecture=arch,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab_size=int(config["vocab_size"]),
        context_length=int(config.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    scaling = rope_params.get("full_attention", rope_params).get("rope_type", "default") if rope_params else None
    if (config.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None) or scaling not in (
        None,
        "default",
    ):
        raise UnsupportedArchitecture("RoPE scaling is not supported yet")
    if arch == "qwen2":
        return ArchSpec(**common, attention_bias=True)
    if arch == "llama":
        return ArchSpec(**common, attention_bias=bool(config.get("attention_bias", False)))
    layer_types = config.get("layer_types")
    if layer_types:
        layer_types = tuple("sliding" if t == "sliding_attention" else "full" for t in layer_types)
    else:
        layer_types = gemma3_layer_types(layers, int(config.get("sliding_window_pattern", 6)))
    local = rope_params.get("sliding_attention", {}).get("rope_theta") or config.get("rope_local_base_freq", 10000.0)
    return ArchSpec(
        **common,
        rope_local_theta=float(local),
        sliding_window=int(config.get("sliding_window", 512)),
        layer_types=layer_types,
        qk_norm=True,
        sandwich_norm=True,
        embedding_scale=math.sqrt(hidden),
        activation="gelu_tanh",
        attention_scale=float(config.get("query_pre_attn_scalar", head_dim)) ** -0.5,
    )
