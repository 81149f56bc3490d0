"""Build the tree-capable decoder graph (see docs/contracts.md, "Graph I/O") for qwen2 / llama / gemma3.

Weights come from a `WeightSource`: `get(name)` returns a float32 ndarray or a `BlockQuantized` (GGUF blocks kept
as they are, for MatMulNBits). Names follow GGUF (`token_embd.weight`, `blk.3.attn_q.weight`, ...); linear weights are
[out, in]. Initializers are streamed into one external data file as the graph is built, so memory stays low.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .arch import ArchSpec
from .quant import BlockQuantized, matmul_nbits_initializers, to_fast_4bit

OPSET = 21
MS_DOMAIN = "com.microsoft"
MASK_VALUE = -1e30  # additive bias for hidden positions (finite: never produces NaN from -inf - -inf)


class WeightSource(Protocol):
    """Where the builder reads weights from."""

    def get(self, name: str) -> np.ndarray | BlockQuantized: ...

    def has(self, name: str) -> bool: ...


@dataclass
class BuildOptions:
    """Knobs for graph construction."""

    accuracy_level: int = 0  # MatMulNBits: 0 = fp32 math on exact dequantized weights, 4 = int8 activations
    # 8-bit GGUF blocks (Q6_K, Q5_0, Q8_0): "fp32" = exact dense weights (fast, 4x memory), "split" = exact 4-bit
    # nibble halves over a doubled K (compact, slower for T > 1), "nbits" = one 8-bit MatMulNBits (exact but slow at
    # accuracy_level 0; fast and approximate at 4)
    eight_bit: str = "fp32"
    # ORT contrib fused operators (SimplifiedLayerNormalization, FusedMatMul with transB, FastGelu) instead of the
    # same math in standard ONNX operators; kept switchable so their benefit can be measured
    fused_ops: bool = True
    # Self-speculative drafting: an input `layer_gates` (bool [num_layers]) and one `If` per decoder layer; a gated-off
    # layer passes the hidden state through and emits zero K/V. Every branch reads the outer graph's initializers,
    # so the weights are stored (and loaded) once.
    layer_gates: bool = False
    # With layer_gates: sorted token ids (int64) of a reduced LM head. Adds an input `draft_head` (bool scalar); when
    # it is true the logits are [1, K, R] for these ids only (a second, smaller head weight holding their rows).
    draft_head_tokens: np.ndarray | None = None
    # Projections that read the same input (Q/K/V, gate/up) and share a GGUF block type run as one MatMulNBits over
    # their stacked rows, split afterwards (fewer, larger kernel calls; the same dot product per output column)
    fuse_projections: bool = True


class ExternalData:
    """Appends initializers to one external data file and returns TensorProtos that reference it."""

    ALIGN = 64

    def __init__(self, path: str):
        self.path = path
        self.location = os.path.basename(path)
        self._file = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        """Write `array` and return an external-data TensorProto named `name`."""
        array = np.ascontiguousarray(array)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        pad = (-self.offset) % self.ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        data = array.tobytes()
        self._file.write(data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(data)
        return tensor

    def close(self):
        """Flush and close the data file."""
        self._file.close()


class _Graph:
    """Minimal node/initializer bookkeeping with unique names."""

    def __init__(self, data: ExternalData):
        self.nodes: list = []
        self.initializers: list = []
        self.data = data
        self._count = 0
        self._consts: set[str] = set()
        self._block_sums: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None, **attrs):
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_to(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(op_type), domain=domain, **attrs))

    def const(self, name: str, array) -> str:
        """A named constant, written once however often it is asked for."""
        if name in self._consts:
            return name
        self._consts.add(name)
        array = np.asarray(array)
        if array.size > 16:
            self.initializers.append(self.data.add(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def block_sums(self, x: str, k_blocks: int, block_size: int) -> str:
        """Sums of `x` over blocks of `block_size` along its last axis ([1, T, k_blocks]); built once per input (the
        Q4_K offset terms of every projection that reads `x` share it)."""
        key = (x, k_blocks, block_size)
        if key not in self._block_sums:
            shape = self.const(f"blocks_{k_blocks}x{block_size}", np.array([1, -1, k_blocks, block_size], np.int64))
            self._block_sums[key] = self.op("ReduceSum", [self.op("Reshape", [x, shape]),
                                                          self.const("axis_last", np.array([-1], np.int64))],
                                            keepdims=0)
        return self._block_sums[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, array))
        return name

    @contextmanager
    def branch(self):
        """Collect the nodes built inside the block into a fresh list (an `If` branch body).

        Initializers (weights and constants) still go to the outer graph and its data file: a subgraph reads them by
        outer-scope name, so nothing is duplicated. Value names stay unique across the model (one counter).
        """
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = outer

    def if_node(self, cond: str, then_nodes: list, then_outputs: list[str], else_nodes: list, else_outputs: list[str],
                outputs: list[str], hint: str) -> None:
        """An `If` on `cond` whose branches are the given node lists (outputs typed float, shapes left symbolic)."""

        def body(nodes, outs, tag):
            return helper.make_graph(nodes, f"{hint}_{tag}", [], [
                helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])

        self.nodes.append(helper.make_node("If", [cond], outputs, name=self.name(f"If_{hint}"),
                                           then_branch=body(then_nodes, then_outputs, "then"),
                                           else_branch=body(else_nodes, else_outputs, "else")))


def _nbits(g: _Graph, x: str, q: BlockQuantized, name: str, accuracy_level: int) -> str:
    """One MatMulNBits node for `q` (initializers streamed to the data file)."""
    tensors, inputs, attrs = matmul_nbits_initializers(q, name)
    for t in tensors:
        g.initializers.append(g.data.add(t.name, numpy_helper.to_array(t)) if len(t.raw_data) > 64 else t)
    return g.op("MatMulNBits", [x, *inputs], domain=MS_DOMAIN, accuracy_level=accuracy_level, **attrs)


def _linear(g: _Graph, x: str, weight, name: str, opts: BuildOptions, bias: np.ndarray | None = None) -> str:
    """y = x @ W^T (+ b) for a float32 [out, in] weight or GGUF blocks, in the fastest exact form we know.

    4-bit blocks with integer zero points run MatMulNBits as they are; non-integer zero points (Q4_K, Q4_1) become
    zero point 0 plus a per-block offset term `blocksum(x) @ offsets^T` (llama.cpp's own d*sum(qx) - m*sum(x)
    split), which keeps ORT on its fast kernel. 8-bit blocks follow `opts.eight_bit`.
    """
    if isinstance(weight, BlockQuantized) and weight.bits == 8 and opts.eight_bit == "fp32":
        weight = weight.dequantize()
    if isinstance(weight, BlockQuantized) and weight.bits == 8 and opts.eight_bit == "nbits" and \
            weight.integer_zero_points:
        y = _nbits(g, x, weight, name, opts.accuracy_level)
    elif isinstance(weight, BlockQuantized):
        fast = to_fast_4bit(weight)
        a = g.op("Concat", [x, x], axis=-1) if fast.repeat == 2 else x
        y = _nbits(g, a, fast.weight, name, opts.accuracy_level)
        if fast.block_offsets is not None:
            kb = fast.block_offsets.shape[1]
            sums = g.block_sums(x, kb, weight.block_size)
            y = g.op("Add", [y, g.op("MatMul", [sums, g.weight(name + ".offsets", fast.block_offsets.T.copy())])])
    else:
        w = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)
        y = g.op("MatMul", [x, g.weight(name + ".wT", w)])
    if bias is not None:
        y = g.op("Add", [y, g.const(name + ".bias", np.asarray(bias, dtype=np.float32))])
    return y


def _fusable(weights: list) -> bool:
    """True when the weights can be stacked into one MatMulNBits: GGUF blocks of one type and layout."""
    first = weights[0]
    if not all(isinstance(w, BlockQuantized) for w in weights):
        return False
    key = lambda w: (w.bits, w.block_size, w.k, w.source_type, w.zero_points is None)  # noqa: E731
    return all(key(w) == key(first) for w in weights)


def _stack_rows(weights: list[BlockQuantized]) -> BlockQuantized:
    """One BlockQuantized whose output rows are those of `weights` in order."""
    first = weights[0]
    zp = None if first.zero_points is None else np.concatenate([w.zero_points for w in weights])
    return BlockQuantized(first.bits, first.block_size, sum(w.n for w in weights), first.k,
                          np.concatenate([w.packed for w in weights]), np.concatenate([w.scales for w in weights]),
                          zp, first.source_type)


def _linears(g: _Graph, x: str, weights: list, names: list[str], opts: BuildOptions,
             biases: list | None = None) -> list[str]:
    """`_linear` for several weights reading the same input. With `opts.fuse_projections`, weights of the same GGUF
    block type run as one MatMulNBits over their stacked rows (one kernel call and one offset product instead of
    several), split afterwards; each output column is the same dot product either way."""
    biases = biases or [None] * len(weights)
    groups: list[list[int]] = []
    for i, w in enumerate(weights):
        for group in groups:
            if opts.fuse_projections and _fusable([weights[group[0]], w]):
                group.append(i)
                break
        else:
            groups.append([i])
    outs: list[str | None] = [None] * len(weights)
    for group in groups:
        if len(group) == 1:
            i = group[0]
            outs[i] = _linear(g, x, weights[i], names[i], opts, biases[i])
            continue
        stacked = _stack_rows([weights[i] for i in group])
        bias = None
        if any(biases[i] is not None for i in group):
            bias = np.concatenate([np.zeros(weights[i].n, np.float32) if biases[i] is None
                                   else np.asarray(biases[i], np.float32) for i in group])
        y = _linear(g, x, stacked, "+".join(names[i] for i in group), opts, bias)
        sizes = g.const("split_" + "_".join(str(weights[i].n) for i in group),
                        np.array([weights[i].n for i in group], np.int64))
        parts = g.op("Split", [y, sizes], n_out=len(group), axis=-1)
        for i, part in zip(group, parts):
            outs[i] = part
    return outs


def _embedding(g: _Graph, ids: str, table, name: str) -> str:
    """Rows of the embedding table for `ids` ([1, T] -> [1, T, H]), dequantizing only the gathered rows."""
    if not isinstance(table, BlockQuantized):
        return g.op("Gather", [g.weight(name, np.asarray(table, dtype=np.float32)), ids], axis=0)
    q = table
    packed = g.weight(name + ".qweight", q.packed)  # [V, nb, blob]
    rows = g.op("Gather", [packed, ids], axis=0)  # [1, T, nb, blob] uint8
    if q.bits == 8:
        codes = g.op("Cast", [rows], to=TensorProto.FLOAT)
    else:
        low = g.op("BitwiseAnd", [rows, g.const(name + ".mask", np.array(15, dtype=np.uint8))])
        high = g.op("BitShift", [rows, g.const(name + ".shift", np.array(4, dtype=np.uint8))], direction="RIGHT")
        axis = g.const(name + ".ax", np.array([-1], dtype=np.int64))
        pair = g.op("Concat", [g.op("Unsqueeze", [low, axis]), g.op("Unsqueeze", [high, axis])], axis=-1)
        shape4 = g.const(name + ".shape4", np.array([1, -1, q.packed.shape[1], q.block_size], dtype=np.int64))
        codes = g.op("Cast", [g.op("Reshape", [pair, shape4])], to=TensorProto.FLOAT)
    codes = g.op("Reshape", [codes, g.const(name + ".s4", np.array([1, -1, q.packed.shape[1], q.block_size], np.int64))])
    axis_last = g.const(name + ".axl", np.array([-1], dtype=np.int64))
    scales = g.op("Unsqueeze", [g.op("Gather", [g.weight(name + ".scales", q.scales), ids], axis=0), axis_last])
    if q.zero_points is not None:
        zp = g.op("Unsqueeze", [g.op("Gather", [g.weight(name + ".zp", q.zero_points), ids], axis=0), axis_last])
    else:
        zp = g.const(name + ".zp_default", np.array(8.0 if q.bits == 4 else 128.0, dtype=np.float32))
    values = g.op("Mul", [g.op("Sub", [codes, zp]), scales])
    return g.op("Reshape", [values, g.const(name + ".s3", np.array([1, -1, q.k], dtype=np.int64))])


def _rms_norm(g: _Graph, x: str, weight: np.ndarray, name: str, eps: float, fused: bool = True) -> str:
    """RMS norm over the last axis (fused SimplifiedLayerNormalization, or standard operators)."""
    w = g.const(name, np.asarray(weight, dtype=np.float32))
    if fused:
        return g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=float(eps), stash_type=1)
    ms = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const("axis_last", np.array([-1], np.int64))], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(f"eps_{eps}", np.array(eps, np.float32))])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), w])


def _rope_tables(g: _Graph, positions: str, head_dim: int, theta: float, tag: str) -> tuple[str, str]:
    """cos/sin of shape [1, T, 1, head_dim] for NEOX-style rotary embedding at the given positions."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    pos = g.op("Cast", [positions], to=TensorProto.FLOAT)  # [1, T]
    pos = g.op("Unsqueeze", [pos, g.const(f"rope_{tag}.ax", np.array([-1], dtype=np.int64))])  # [1, T, 1]
    freqs = g.op("Mul", [pos, g.const(f"rope_{tag}.inv_freq", inv_freq.astype(np.float32).reshape(1, 1, -1))])
    emb = g.op("Concat", [freqs, freqs], axis=-1)  # [1, T, hd]
    emb = g.op("Unsqueeze", [emb, g.const(f"rope_{tag}.ax2", np.array([2], dtype=np.int64))])  # [1, T, 1, hd]
    return g.op("Cos", [emb], hint=f"cos_{tag}"), g.op("Sin", [emb], hint=f"sin_{tag}")


def _apply_rope(g: _Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x * cos + rotate_half(x) * sin for x of shape [1, T, heads, head_dim]."""
    half = head_dim // 2
    x1, x2 = g.op("Split", [x, g.const(f"rope_split_{half}", np.array([half, half], dtype=np.int64))], n_out=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def _attention(g: _Graph, spec: ArchSpec, weights: WeightSource, i: int, x: str, rope, bias: str, opts,
               new_key: str | None = None, new_value: str | None = None) -> str:
    """Self-attention of the T new tokens over the past KV (graph input) plus themselves; emits new K/V (named
    `new_key` / `new_value`, by default the graph outputs `new_key_{i}` / `new_value_{i}`)."""
    p = f"blk.{i}"
    new_key = new_key or f"new_key_{i}"
    new_value = new_value or f"new_value_{i}"
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group = nh // nkv

    kinds = ("q", "k", "v")
    biases = [weights.get(f"{p}.attn_{kind}.bias") if weights.has(f"{p}.attn_{kind}.bias") else None
              for kind in kinds]
    projected = _linears(g, x, [weights.get(f"{p}.attn_{kind}.weight") for kind in kinds],
                         [f"{p}.attn_{kind}" for kind in kinds], opts, biases)

    def heads(t: str, n: int) -> str:
        return g.op("Reshape", [t, g.const(f"shape_heads_{n}", np.array([1, -1, n, hd], dtype=np.int64))])

    q, k, v = heads(projected[0], nh), heads(projected[1], nkv), heads(projected[2], nkv)  # [1, T, n, hd]
    if spec.qk_norm:
        q = _rms_norm(g, q, weights.get(f"{p}.attn_q_norm.weight"), f"{p}.attn_q_norm", spec.rms_norm_eps,
                      opts.fused_ops)
        k = _rms_norm(g, k, weights.get(f"{p}.attn_k_norm.weight"), f"{p}.attn_k_norm", spec.rms_norm_eps,
                      opts.fused_ops)
    cos, sin = rope
    q = _apply_rope(g, q, cos, sin, hd)
    k = _apply_rope(g, k, cos, sin, hd)
    q = g.op("Transpose", [q], perm=[0, 2, 1, 3])  # [1, nh, T, hd]
    g.op_to("Transpose", [k], [new_key], perm=[0, 2, 1, 3])  # [1, nkv, T, hd]
    g.op_to("Transpose", [v], [new_value], perm=[0, 2, 1, 3])
    # Query heads that share a KV head are stacked along the sequence axis: [1, nkv, group*T, hd].
    qg = g.op("Reshape", [q, g.const("shape_qgroup", np.array([1, nkv, -1, hd], dtype=np.int64))])
    # One product over [past | new] in slot order: a token's key and value sit at the same index (its cache slot)
    # whichever forward computed it, so every attention sum runs over the same terms in the same order whether a
    # token was decoded alone or scored inside a T-token chain (T-invariance: speculation stays bitwise exact).
    # The runner passes the past sliced to its committed length; masked trailing slots add exact zeros.
    keys = g.op("Concat", [f"past_key_{i}", new_key], axis=2)  # [1, nkv, P+T, hd]
    values = g.op("Concat", [f"past_value_{i}", new_value], axis=2)
    if opts.fused_ops:
        scores = g.op("FusedMatMul", [qg, keys], domain=MS_DOMAIN, transB=1, alpha=spec.scale)
    else:
        scale = g.const(f"attn_scale_{spec.scale}", np.array(spec.scale, np.float32))
        scores = g.op("MatMul", [g.op("Mul", [qg, scale]), g.op("Transpose", [keys], perm=[0, 1, 3, 2])])
    total = g.op("Shape", [scores], start=3)  # [P+T]
    t_len = g.op("Shape", [q], start=2, end=3)  # [T]
    per_head = g.op("Concat", [g.const("one_nh", np.array([1, nh], dtype=np.int64)), t_len, total], axis=0)
    scores = g.op("Add", [g.op("Reshape", [scores, per_head]), bias])  # [1, nh, T, P+T]
    probs = g.op("Softmax", [scores], axis=-1)
    grouped = g.op("Concat", [g.const("one_nkv", np.array([1, nkv, -1], dtype=np.int64)), total], axis=0)
    out = g.op("MatMul", [g.op("Reshape", [probs, grouped]), values])
    out = g.op("Reshape", [out, g.const("shape_heads_back", np.array([1, nh, -1, hd], dtype=np.int64))])
    out = g.op("Transpose", [out], perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.const("shape_merge", np.array([1, -1, nh * hd], dtype=np.int64))])
    return _linear(g, out, weights.get(f"{p}.attn_output.weight"), f"{p}.attn_output", opts)


def _mlp(g: _Graph, spec: ArchSpec, weights: WeightSource, i: int, x: str, opts) -> str:
    p = f"blk.{i}"
    gate, up = _linears(g, x, [weights.get(f"{p}.ffn_gate.weight"), weights.get(f"{p}.ffn_up.weight")],
                        [f"{p}.ffn_gate", f"{p}.ffn_up"], opts)
    if spec.activation == "silu":
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    elif opts.fused_ops:
        act = g.op("FastGelu", [gate], domain=MS_DOMAIN)
    else:
        act = g.op("Gelu", [gate], approximate="tanh")
    return _linear(g, g.op("Mul", [act, up]), weights.get(f"{p}.ffn_down.weight"), f"{p}.ffn_down", opts)


def _decoder_layer(g: _Graph, spec: ArchSpec, weights: WeightSource, i: int, h: str, rope, opts: BuildOptions,
                   new_key: str | None = None, new_value: str | None = None) -> str:
    """One pre-norm decoder layer on the hidden state `h`; returns the new hidden state."""
    p = f"blk.{i}"
    eps = spec.rms_norm_eps
    sliding = spec.layer_types[i] == "sliding"
    rope_full, rope_local = rope
    bias = "attention_bias_local" if sliding else "attention_bias"
    a = _rms_norm(g, h, weights.get(f"{p}.attn_norm.weight"), f"{p}.attn_norm", eps, opts.fused_ops)
    a = _attention(g, spec, weights, i, a, rope_local if sliding else rope_full, bias, opts, new_key, new_value)
    if spec.sandwich_norm:
        a = _rms_norm(g, a, weights.get(f"{p}.post_attention_norm.weight"), f"{p}.post_attention_norm", eps,
                      opts.fused_ops)
    h = g.op("Add", [h, a])
    m = _rms_norm(g, h, weights.get(f"{p}.ffn_norm.weight"), f"{p}.ffn_norm", eps, opts.fused_ops)
    m = _mlp(g, spec, weights, i, m, opts)
    if spec.sandwich_norm:
        m = _rms_norm(g, m, weights.get(f"{p}.post_ffw_norm.weight"), f"{p}.post_ffw_norm", eps, opts.fused_ops)
    return g.op("Add", [h, m])


def _gated_layer(g: _Graph, spec: ArchSpec, weights: WeightSource, i: int, h: str, rope, opts: BuildOptions,
                 kv_shape: str) -> str:
    """Layer `i` inside `If(layer_gates[i])`: then = the layer (its K/V become the outputs new_key_i/new_value_i),
    else = the hidden state unchanged and zero K/V of shape `kv_shape` ([1, nkv, T, hd])."""
    cond = g.op("Gather", ["layer_gates", g.const(f"layer_index_{i}", np.array(i, np.int64))], axis=0,
                hint=f"gate_{i}")
    with g.branch() as on:
        key, value = g.name(f"layer_{i}_key"), g.name(f"layer_{i}_value")
        h_on = _decoder_layer(g, spec, weights, i, h, rope, opts, key, value)
    with g.branch() as off:
        h_off = g.op("Identity", [h], hint=f"skip_{i}")
        zero = helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])
        k0 = g.op("ConstantOfShape", [kv_shape], value=zero, hint=f"zero_key_{i}")
        v0 = g.op("ConstantOfShape", [kv_shape], value=zero, hint=f"zero_value_{i}")
    h_out = g.name(f"hidden_{i}")
    g.if_node(cond, on, [h_on, key, value], off, [h_off, k0, v0], [h_out, f"new_key_{i}", f"new_value_{i}"],
              hint=f"layer_{i}")
    return h_out


def _head_rows(head, ids: np.ndarray):
    """Rows `ids` of an LM head weight [vocab, hidden]: whole rows of GGUF blocks stay blocks, floats stay floats."""
    if isinstance(head, BlockQuantized):
        zp = None if head.zero_points is None else np.ascontiguousarray(head.zero_points[ids])
        return BlockQuantized(head.bits, head.block_size, len(ids), head.k, np.ascontiguousarray(head.packed[ids]),
                              np.ascontiguousarray(head.scales[ids]), zp, head.source_type)
    return np.ascontiguousarray(np.asarray(head, dtype=np.float32)[ids])


def _check_draft_tokens(ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError("draft_head_tokens must be a non-empty 1-D array of integer token ids")
    ids = ids.astype(np.int64)
    if ids[0] < 0 or ids[-1] >= vocab_size or np.any(np.diff(ids) <= 0):
        raise ValueError(f"draft_head_tokens must be strictly increasing token ids in [0, {vocab_size})")
    return ids


def build_decoder(spec: ArchSpec, weights: WeightSource, out_dir: str, opts: BuildOptions | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> str:
    """Write `model.onnx` + `model.onnx.data` for `spec` into `out_dir`; returns the graph path.

    `progress(done, total, label)` (optional) is called with label "build graph" as each decoder layer is built
    (done layers of `spec.num_layers`; the embedding and the LM head count with the first and the last layer),
    then once with "save" before the graph file is written."""
    opts = opts or BuildOptions()
    report = progress or (lambda done, total, label: None)
    draft_ids = None
    if opts.draft_head_tokens is not None:
        if not opts.layer_gates:
            raise ValueError("draft_head_tokens needs layer_gates=True (the draft head is part of self-speculation)")
        draft_ids = _check_draft_tokens(opts.draft_head_tokens, spec.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    data = ExternalData(os.path.join(out_dir, "model.onnx.data"))
    g = _Graph(data)
    nkv, hd = spec.num_kv_heads, spec.head_dim
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "T"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "T"]),
        helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT, [1, 1, "T", "PT"]),
    ]
    if spec.has_sliding_layers:
        inputs.append(helper.make_tensor_value_info("attention_bias_local", TensorProto.FLOAT, [1, 1, "T", "PT"]))
    inputs.append(helper.make_tensor_value_info("logit_positions", TensorProto.INT64, ["K"]))
    if opts.layer_gates:
        inputs.append(helper.make_tensor_value_info("layer_gates", TensorProto.BOOL, [spec.num_layers]))
    if draft_ids is not None:
        inputs.append(helper.make_tensor_value_info("draft_head", TensorProto.BOOL, []))
    # with a draft head the last dimension is the vocabulary or R, chosen at run time
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             [1, "K", spec.vocab_size if draft_ids is None else "V"])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, [1, nkv, "P", hd]))
            outputs.append(helper.make_tensor_value_info(f"new_{kind}_{i}", TensorProto.FLOAT, [1, nkv, "T", hd]))

    embed_table = weights.get("token_embd.weight")
    h = _embedding(g, "input_ids", embed_table, "token_embd")
    if spec.embedding_scale != 1.0:
        h = g.op("Mul", [h, g.const("embed_scale", np.array(spec.embedding_scale, dtype=np.float32))])
    rope_full = _rope_tables(g, "position_ids", hd, spec.rope_theta, "full")
    rope_local = _rope_tables(g, "position_ids", hd, spec.rope_local_theta, "local") if spec.has_sliding_layers else None
    rope = (rope_full, rope_local)
    eps = spec.rms_norm_eps
    kv_shape = None
    if opts.layer_gates:  # [1, nkv, T, hd]: the zero K/V a gated-off layer emits
        t_len = g.op("Shape", ["input_ids"], start=1, end=2)
        kv_shape = g.op("Concat", [g.const("kv_shape_head", np.array([1, nkv], np.int64)), t_len,
                                   g.const("kv_shape_tail", np.array([hd], np.int64))], axis=0, hint="kv_shape")
    report(0, spec.num_layers, "build graph")
    for i in range(spec.num_layers):
        if opts.layer_gates:
            h = _gated_layer(g, spec, weights, i, h, rope, opts, kv_shape)
        else:
            h = _decoder_layer(g, spec, weights, i, h, rope, opts)
        if i + 1 < spec.num_layers:  # the last layer counts once the LM head is built too
            report(i + 1, spec.num_layers, "build graph")
    h = g.op("Gather", [h, "logit_positions"], axis=1)  # only the requested positions reach the LM head
    h = _rms_norm(g, h, weights.get("output_norm.weight"), "output_norm", eps, opts.fused_ops)
    head = embed_table if spec.tie_embeddings else weights.get("output.weight")
    if draft_ids is None:
        logits = _linear(g, h, head, "output", opts)
        g.op_to("Identity", [logits], ["logits"])
    else:
        with g.branch() as full:
            full_logits = _linear(g, h, head, "output", opts)
        with g.branch() as draft:  # the same representation as the full head, restricted to rows draft_ids
            draft_logits = _linear(g, h, _head_rows(head, draft_ids), "output_draft", opts)
        g.if_node("draft_head", draft, [draft_logits], full, [full_logits], ["logits"], hint="draft_head")
    data.close()
    report(spec.num_layers, spec.num_layers, "build graph")
    report(0, 0, "save")

    graph = helper.make_graph(g.nodes, "edgespec_decoder", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="edgespec",
        ir_version=10,
    )
    path = os.path.join(out_dir, "model.onnx")
    onnx.save_model(model, path)
    return path
