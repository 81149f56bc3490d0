"""GGUF block quantization -> MatMulNBits: exact layouts, ORT parity, RTN quantization."""

import pathlib
import sys

import numpy as np
import pytest

try:
    from edgespec.export import quant
except ImportError:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from export import quant

gguf = pytest.importorskip("gguf")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

MODELS = pathlib.Path("/work/dl/models")
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # gguf-py can quantize these
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # random bytes + sane float16 scales
ALL = LEGACY + KQUANTS
DEFAULT_ZP = {"Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K"}  # bit-exact by construction
F16_OFFSETS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
# (n, k) per family: k not a multiple of 256 where the block allows, n not a multiple of 8
SHAPES = {"legacy": [(13, 96), (37, 160)], "k": [(13, 256), (37, 768)]}


def make_raw(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid GGUF bytes [n, row_bytes] of type ``name``."""
    rng = np.random.default_rng(seed)
    if name in LEGACY:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        w[:, :32] += 0.3  # a block with a large offset (exercises the affine zero point)
        return gguf.quants.quantize(w, T[name])
    qk, ts = GGML_QUANT_SIZES[T[name]]
    b = rng.integers(0, 256, (n, k // qk, ts), dtype=np.uint8)
    for off in F16_OFFSETS[name]:
        v = (rng.random((n, k // qk)) * 0.01 + 1e-3).astype(np.float16)
        b[..., off : off + 2] = v.view(np.uint8).reshape(n, k // qk, 2)
    return b.reshape(n, -1)


def ref_weight(raw, name, n, k):
    return gguf.quants.dequantize(raw, T[name]).reshape(n, k).astype(np.float32)


def _session(nodes, inits, k, n):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    onnx.checker.check_model(m)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def nbits_session(q, accuracy_level=0, bias=None):
    inits, inputs, attrs = quant.matmul_nbits_initializers(q, "w", bias=bias)
    node = helper.make_node("MatMulNBits", ["A", *inputs], ["Y"], domain="com.microsoft",
                            accuracy_level=accuracy_level, **attrs)
    return _session([node], inits, q.k, q.n)


def fast_session(f):
    """The FastNBits graph: Concat(A, A) -> MatMulNBits (+ block sums @ offsets)."""
    q = f.weight
    inits, inputs, attrs = quant.matmul_nbits_initializers(q, "w")
    nodes, a = [], "A"
    if f.repeat == 2:
        nodes.append(helper.make_node("Concat", ["A", "A"], ["A2"], axis=-1))
        a = "A2"
    y = "Y" if f.block_offsets is None else "Yq"
    nodes.append(helper.make_node("MatMulNBits", [a, *inputs], [y], domain="com.microsoft", accuracy_level=0,
                                  **attrs))
    if f.block_offsets is not None:
        kb = f.block_offsets.shape[1]
        inits += [numpy_helper.from_array(np.array([0, kb, q.block_size], np.int64), "blk_shape"),
                  numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
                  numpy_helper.from_array(np.ascontiguousarray(f.block_offsets.T), "w.offsets")]
        nodes += [helper.make_node("Reshape", ["A", "blk_shape"], ["Ab"]),
                  helper.make_node("ReduceSum", ["Ab", "last_axis"], ["Asum"], keepdims=0),
                  helper.make_node("MatMul", ["Asum", "w.offsets"], ["Yo"]),
                  helper.make_node("Add", ["Yq", "Yo"], ["Y"])]
    return _session(nodes, inits, f.k, q.n)


def assert_close_matmul(y, x, w_ref, tol=1e-4):
    ref = x.astype(np.float64) @ w_ref.astype(np.float64).T
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err < tol, f"relative error {err:.3g}"


def shapes_for(name):
    return SHAPES["k" if name.endswith("_K") else "legacy"]


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_dequantize_matches_gguf(name):
    for n, k in shapes_for(name):
        raw = make_raw(name, n, k)
        ref = ref_weight(raw, name, n, k)
        q = quant.from_gguf(raw, T[name], (n, k), ort_runnable=False)
        assert isinstance(q, quant.BlockQuantized) and q.source_type == name and (q.n, q.k) == (n, k)
        w = q.dequantize()
        if name in DEFAULT_ZP:
            np.testing.assert_array_equal(w, ref)
        else:  # fl(z * s) == dmin * m is solvable for most blocks; else 1 ulp of the block minimum
            assert np.abs(w - ref).max() <= 1e-6 * np.abs(ref).max()
            assert np.mean(w == ref) > 0.8
        np.testing.assert_array_equal(q.rows([2, 0, 2]), w[[2, 0, 2]])
        # the fast rewrite computes the same weight
        f = quant.to_fast_4bit(q)
        assert f.weight.bits == 4 and f.weight.integer_zero_points
        assert np.abs(f.dequantize() - ref).max() <= 1e-6 * np.abs(ref).max()


def test_qtype_forms():
    expect = {"Q4_0": (4, 32, None), "Q4_1": (4, 32, "f"), "Q5_0": (8, 32, None), "Q8_0": (8, 32, None),
              "Q2_K": (4, 16, "f"), "Q3_K": (4, 16, None), "Q4_K": (4, 32, "f"), "Q6_K": (8, 16, None),
              "Q5_1": (8, 32, "f"), "Q5_K": (8, 32, "f")}
    for name, (bits, bs, zp) in expect.items():
        n, k = shapes_for(name)[0]
        for qtype in (T[name], int(T[name]), name):
            q = quant.from_gguf(make_raw(name, n, k), qtype, (n, k), ort_runnable=False)
            assert (q.bits, q.block_size, q.zero_points is None) == (bits, bs, zp is None), name
            assert q.packed.shape == (n, k // bs, bs * bits // 8)


@pytest.mark.parametrize("name", sorted(quant.ORT_RUNNABLE_TYPES))
def test_matmul_nbits_matches_reference(name):
    rng = np.random.default_rng(1)
    for n, k in shapes_for(name):
        raw = make_raw(name, n, k, seed=n)
        ref = ref_weight(raw, name, n, k)
        q = quant.from_gguf(raw, T[name], (n, k))
        sess = nbits_session(q, accuracy_level=0)
        x = rng.standard_normal((3, k)).astype(np.float32)
        assert_close_matmul(sess.run(None, {"A": x})[0], x, ref)
        # one-hot activations read the weight back as ORT evaluates it: identical to dequantize()
        w_ort = sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
        np.testing.assert_array_equal(w_ort, q.dequantize())


@pytest.mark.parametrize("name", ALL)
def test_fast_form_matches_reference(name):
    rng = np.random.default_rng(2)
    n, k = shapes_for(name)[-1]
    raw = make_raw(name, n, k, seed=3)
    ref = ref_weight(raw, name, n, k)
    f = quant.to_fast_4bit(quant.from_gguf(raw, T[name], (n, k), ort_runnable=False))
    assert f.repeat == (2 if name in ("Q5_0", "Q5_1", "Q8_0", "Q5_K", "Q6_K") else 1)
    x = rng.standard_normal((4, k)).astype(np.float32)
    assert_close_matmul(fast_session(f).run(None, {"A": x})[0], x, ref)


@pytest.mark.parametrize("name", ["Q5_1", "Q5_K"])
def test_affine_8bit_not_single_node(name):
    n, k = shapes_for(name)[0]
    raw = make_raw(name, n, k)
    q = quant.from_gguf(raw, T[name], (n, k), ort_runnable=False)
    with pytest.raises(ValueError, match="to_fast_4bit"):
        quant.matmul_nbits_initializers(q, "w")
    with pytest.warns(UserWarning, match=name):
        w = quant.from_gguf(raw, T[name], (n, k))
    assert isinstance(w, np.ndarray) and w.dtype == np.float32
    np.testing.assert_array_equal(w, ref_weight(raw, name, n, k))


def test_q4k_zero_scale_subblocks_exact():
    n, k = 9, 512
    raw = make_raw("Q4_K", n, k, seed=5).reshape(n, k // 256, 144).copy()
    raw[0, 0, 4:6] &= 0xC0  # sub-blocks 0, 1: sc = 0 ...
    raw[0, 0, 8:10] |= 0x05  # ... with a nonzero min
    raw[1, 1, 0:2] = 0  # a whole super-block with d = 0 (all eight sub-blocks constant)
    raw[2, 0, 0:2] = 0
    raw[2, 0, 2:4] = 0  # d = dmin = 0: all zeros
    raw = raw.reshape(n, -1)
    ref = ref_weight(raw, "Q4_K", n, k)
    blocks = ref[0, :64].reshape(2, 32)
    assert np.all(blocks == blocks[:, :1]) and np.all(blocks != 0) and np.all(ref[1, 256:] <= 0)
    q = quant.from_gguf(raw, T["Q4_K"], (n, k))
    w = q.dequantize()
    np.testing.assert_array_equal(w[0, :64], ref[0, :64])
    np.testing.assert_array_equal(w[1, 256:], ref[1, 256:])
    np.testing.assert_array_equal(w[2, :256], 0)
    w_ort = nbits_session(q).run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
    np.testing.assert_array_equal(w_ort, w)
    np.testing.assert_array_equal(quant.to_fast_4bit(q).dequantize()[:3, :64], ref[:3, :64])


def test_bias_input():
    rng = np.random.default_rng(4)
    n, k = 13, 256
    raw = make_raw("Q4_K", n, k)
    q = quant.from_gguf(raw, T["Q4_K"], (n, k))
    bias = rng.standard_normal(n).astype(np.float32)
    inits, inputs, _ = quant.matmul_nbits_initializers(q, "w", bias=bias)
    assert inputs == ["w.qweight", "w.scales", "w.qzeros", "", "w.bias"]
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = nbits_session(q, bias=bias).run(None, {"A": x})[0]
    assert_close_matmul(y - bias, x, ref_weight(raw, "Q4_K", n, k))


def test_initializer_layout():
    q = quant.from_gguf(make_raw("Q6_K", 13, 256), T["Q6_K"], (13, 256))
    inits, inputs, attrs = quant.matmul_nbits_initializers(q, "layers.0.mlp.down")
    assert inputs == ["layers.0.mlp.down.qweight", "layers.0.mlp.down.scales"]
    assert attrs == {"K": 256, "N": 13, "bits": 8, "block_size": 16}
    assert [tuple(t.dims) for t in inits] == [(13, 16, 16), (13 * 16,)]
    q = quant.quantize_rtn(np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32), 4)
    inits, inputs, attrs = quant.matmul_nbits_initializers(q, "p")
    assert inputs[2] == "p.qzeros" and inits[2].data_type == TensorProto.UINT8 and tuple(inits[2].dims) == (5 * 2,)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types(name):
    w = np.random.default_rng(0).standard_normal((7, 24)).astype(np.float32)
    if name == "F16":
        raw, want = w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    elif name == "BF16":
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(7, -1)
        want = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        raw, want = w, w
    out = quant.from_gguf(raw, T[name], (7, 24))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, want)


def test_unsupported_type_falls_back():
    n, k = 5, 64
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, k // 32, 18), dtype=np.uint8)
    b[..., 0:2] = np.full((n, k // 32), 0.01, np.float16).view(np.uint8).reshape(n, k // 32, 2)
    raw = b.reshape(n, -1)
    with pytest.warns(UserWarning, match="IQ4_NL"):
        w = quant.from_gguf(raw, T.IQ4_NL, (n, k))
    assert isinstance(w, np.ndarray) and w.shape == (n, k)
    np.testing.assert_array_equal(w, ref_weight(raw, "IQ4_NL", n, k))


# ----------------------------------------------------------------------------------------------------------
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_tensor(path: pathlib.Path, tensor: str):
    """(raw bytes, GGML type, n, k) of one tensor, reading only the header (gguf.GGUFReader parses every
    metadata array, ~15 s on a Qwen vocabulary)."""
    import struct

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    pos = 4

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, mv, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        ln = take("Q")
        pos += ln
        return bytes(mv[pos - ln : pos]).decode()

    def skip(vtype):
        nonlocal pos
        if vtype == 8:
            ln = take("Q")  # (not `pos += take(...)`: that would add to the old pos)
            pos += ln
        elif vtype == 9:
            et, cnt = take("I"), take("Q")
            if et in _GGUF_SCALAR:
                pos += _GGUF_SCALAR[et] * cnt
            else:
                for _ in range(cnt):
                    skip(et)
        else:
            pos += _GGUF_SCALAR[vtype]

    assert bytes(mv[:4]) == b"GGUF" and take("I") >= 2
    n_tensors, n_kv = take("Q"), take("Q")
    alignment = 32
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key == "general.alignment":
            alignment = take("I")
        else:
            skip(vtype)
    found = None
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        ttype, offset = take("I"), take("Q")
        if name == tensor:
            found = (dims, T(ttype), offset)
    dims, ttype, offset = found
    start = -(-pos // alignment) * alignment + offset
    k, n = dims[0], int(np.prod(dims[1:]))
    qk, ts = GGML_QUANT_SIZES[ttype]
    return np.asarray(buf[start : start + n * (k // qk) * ts]).reshape(n, -1), ttype, n, k


def _real_tensor(model, tensor):
    path = MODELS / f"{model}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return _gguf_tensor(path, tensor)


@pytest.mark.parametrize("model,tensor,qtype", [
    ("smollm2-135m", "blk.0.ffn_gate.weight", "Q4_1"),
    ("qwen2.5-coder-0.5b", "blk.0.ffn_down.weight", "Q6_K"),
    ("qwen2.5-coder-0.5b", "blk.0.attn_q.weight", "Q5_0"),
    ("qwen2.5-coder-1.5b", "blk.0.attn_q.weight", "Q4_K"),
])
def test_real_gguf_tensor(model, tensor, qtype):
    raw, tt, n, k = _real_tensor(model, tensor)
    assert tt.name == qtype
    ref = ref_weight(raw, qtype, n, k)
    q = quant.from_gguf(raw, tt, (n, k))
    w = q.dequantize()
    if qtype in DEFAULT_ZP:
        np.testing.assert_array_equal(w, ref)
    else:
        assert np.abs(w - ref).max() <= 1e-6 * np.abs(ref).max()
        assert np.mean(w == ref) > 0.8
    x = np.random.default_rng(0).standard_normal((2, k)).astype(np.float32)
    assert_close_matmul(nbits_session(q).run(None, {"A": x})[0], x, ref)
    assert_close_matmul(fast_session(quant.to_fast_4bit(q)).run(None, {"A": x})[0], x, ref)


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.07)])
def test_quantize_rtn(bits, tol):
    rng = np.random.default_rng(7)
    for n, k in [(13, 100), (24, 256)]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        w[:, :32] += 2.0  # a one-sided block
        q = quant.quantize_rtn(w, bits)
        assert q.integer_zero_points and q.packed.shape == (n, -(-k // 32), 32 * bits // 8)
        wq = q.dequantize()
        err = np.abs(wq - w)
        assert err.max() / np.abs(w).max() < tol
        blk_range = np.repeat(q.scales, 32, axis=1)[:, :k]  # error <= s / 2 per weight
        assert np.all(err <= blk_range * 0.5 + 1e-6)
        x = rng.standard_normal((3, k)).astype(np.float32)
        sess = nbits_session(q)
        assert_close_matmul(sess.run(None, {"A": x})[0], x, wq)
        w_ort = sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
        np.testing.assert_allclose(w_ort, wq, rtol=1e-6, atol=1e-7)
        if k % 32 == 0:
            assert_close_matmul(fast_session(quant.to_fast_4bit(q)).run(None, {"A": x})[0], x, wq)


def test_quantize_rtn_zero_rows():
    w = np.zeros((3, 64), np.float32)
    w[1] = 1.5
    q = quant.quantize_rtn(w, 4, block_size=16)
    np.testing.assert_allclose(q.dequantize(), w, atol=1e-6)
