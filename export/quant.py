"""GGUF block quantization mapped onto ONNX Runtime's ``com.microsoft.MatMulNBits`` without a second rounding.

A GGUF weight is stored as blocks of small integer codes plus per-block float16 scales (and, for the
"affine" types, per-block minimums). ``MatMulNBits`` stores a weight ``W [N, K]`` as codes ``c`` in blocks of
``block_size`` along K, a float scale ``s`` per block and a zero point ``z`` per block, and computes
``Y = A @ W^T`` with ``W = s * (c - z)``. Every GGUF type below is re-encoded (codes re-packed, scales and
zero points re-derived) so that ``W`` is *exactly* the GGUF weight; nothing is re-quantized.

How ONNX Runtime 1.31 (CPU) evaluates the weight (measured, and relied on by :meth:`BlockQuantized.dequantize`):

* no zero point (default 8 / 128) or ``uint8`` zero points: ``w = (c - z) * s``;
* float zero points (4-bit only on CPU): ``w = c * s + (-(z * s))``.

For the GGUF types every product ``c * s`` is exact in float32 (fp16 mantissa x at most 13 bits of integers),
so the only rounding left is the final add, which is the same add llama.cpp / gguf-py perform when the zero
point is chosen with ``fl(z * s) == dmin * m`` (see :func:`_solve_zero_points`). That equation has no float32
solution for ~10% of blocks (real Q4_K/Q4_1 files): there the weight is off by 1 ulp of ``dmin * m``.

Exact mappings (``from_gguf``):

======  =====  =====  ===============================================================
type    bits   block  zero point
======  =====  =====  ===============================================================
Q4_0    4      32     default (8)
Q4_1    4      32     float  (z = -m / d)
Q8_0    8      32     default (128), codes = q + 128
Q5_0    8      32     default (128), codes = q + 112
Q6_K    8      16     default (128), codes = q + 96, s = d * sc
Q3_K    4      16     default (8),   codes = q + 8,  s = d * sc
Q4_K    4      32     float  (z = dmin * m / (d * sc))
Q2_K    4      16     float  (z = dmin * m / (d * sc))
Q5_1    8      32     float  -- ORT CPU has no 8-bit float-zero-point kernel: float32 unless ``ort_runnable=False``
Q5_K    8      32     float  -- same as Q5_1
======  =====  =====  ===============================================================

Speed (ORT 1.31 CPU): only 4-bit weights with no / ``uint8`` zero points reach the fast MLAS kernel at
``accuracy_level`` 0. 4-bit float zero points and *all* 8-bit weights at level 0 dequantize the whole matrix
on every call (10-20x slower than a float32 MatMul). :func:`to_fast_4bit` rewrites any
:class:`BlockQuantized` into an equivalent fast form (4-bit, integer zero points, plus an optional
per-block additive offset and a doubled K for 8-bit codes); see :class:`FastNBits`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BlockQuantized",
    "FastNBits",
    "from_gguf",
    "quantize_rtn",
    "to_fast_4bit",
    "matmul_nbits_initializers",
    "EXACT_TYPES",
    "ORT_RUNNABLE_TYPES",
]

QK_K = 256
# GGUF types with an exact BlockQuantized form; the second set also runs as one MatMulNBits node on ORT CPU.
EXACT_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
ORT_RUNNABLE_TYPES = EXACT_TYPES - {"Q5_1", "Q5_K"}
_FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
# (elements per block, bytes per block), as in ggml
_BLOCK_BYTES = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
_CHUNK_ELEMS = 1 << 22  # rows are converted in chunks of about this many weights (bounds temporaries)


# ----------------------------------------------------------------------------------------------------------
# the container
# ----------------------------------------------------------------------------------------------------------
@dataclass
class BlockQuantized:
    """A weight ``W [n, k]`` in MatMulNBits layout: ``W[r, b*bs + i] = s[r, b] * (code[r, b, i] - z[r, b])``.

    Fields: ``bits`` (4 or 8); ``block_size`` (16 or 32 for GGUF, any power of two >= 16 for RTN);
    ``n`` (output features, rows); ``k`` (input features, columns); ``packed`` uint8
    ``[n, ceil(k / block_size), block_size * bits // 8]`` (4-bit: two codes per byte, low nibble = even element);
    ``scales`` float32 ``[n, k_blocks]``; ``zero_points`` float32 ``[n, k_blocks]`` or ``None`` for the
    operator default (8 for 4-bit, 128 for 8-bit); ``source_type`` (e.g. ``"Q4_K"`` or ``"rtn"``).
    Integer-valued zero points are written as ``uint8`` (fast kernel), others as float.
    """

    bits: int
    block_size: int
    n: int
    k: int
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    source_type: str

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        kb = self.k_blocks
        want = (self.n, kb, self.block_size * self.bits // 8)
        if self.packed.dtype != np.uint8 or self.packed.shape != want:
            raise ValueError(f"packed must be uint8 {want}, got {self.packed.dtype} {self.packed.shape}")
        if self.scales.dtype != np.float32 or self.scales.shape != (self.n, kb):
            raise ValueError(f"scales must be float32 {(self.n, kb)}, got {self.scales.dtype} {self.scales.shape}")
        zp = self.zero_points
        if zp is not None and (zp.dtype != np.float32 or zp.shape != (self.n, kb)):
            raise ValueError(f"zero_points must be float32 {(self.n, kb)} or None, got {zp.dtype} {zp.shape}")

    @property
    def k_blocks(self) -> int:
        """Number of blocks along K (``ceil(k / block_size)``)."""
        return -(-self.k // self.block_size)

    @property
    def default_zero_point(self) -> int:
        """The operator's zero point when none is given: ``2 ** (bits - 1)``."""
        return 1 << (self.bits - 1)

    @property
    def integer_zero_points(self) -> bool:
        """True when the zero points are absent or all integers in ``[0, 2**bits)`` (emitted as uint8)."""
        zp = self.zero_points
        if zp is None:
            return True
        return bool(np.all((zp == np.round(zp)) & (zp >= 0) & (zp <= (1 << self.bits) - 1)))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes, scales and zero points as they are written to ONNX."""
        zb = 0
        if self.zero_points is not None:
            zb = self.n * (-(-self.k_blocks * self.bits // 8)) if self.integer_zero_points else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zb

    def codes(self, ids: np.ndarray | slice | None = None) -> np.ndarray:
        """Unpacked integer codes ``uint8 [rows, k_blocks, block_size]`` of all rows or of rows ``ids``."""
        p = self.packed if ids is None else self.packed[ids]
        if self.bits == 8:
            return p
        out = np.empty(p.shape[:-1] + (self.block_size,), np.uint8)
        out[..., 0::2] = p & 0x0F
        out[..., 1::2] = p >> 4
        return out

    def _dequantize_rows(self, ids) -> np.ndarray:
        c = self.codes(ids)
        s = self.scales[ids] if ids is not None else self.scales
        if self.zero_points is None:
            w = (c.astype(np.int16) - self.default_zero_point).astype(np.float32) * s[..., None]
        elif self.integer_zero_points:
            z = (self.zero_points[ids] if ids is not None else self.zero_points).astype(np.int16)
            w = (c.astype(np.int16) - z[..., None]).astype(np.float32) * s[..., None]
        else:  # ORT's float-zero-point formula: c * s + (-(z * s))
            z = self.zero_points[ids] if ids is not None else self.zero_points
            w = c.astype(np.float32) * s[..., None]
            w += -(z * s)[..., None]
        return w.reshape(w.shape[0], -1)[:, : self.k]

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``[n, k]`` exactly as MatMulNBits (ORT CPU) evaluates it."""
        out = np.empty((self.n, self.k), np.float32)
        step = max(1, _CHUNK_ELEMS // max(self.k, 1))
        for r0 in range(0, self.n, step):
            out[r0 : r0 + step] = self._dequantize_rows(slice(r0, r0 + step))
        return out

    def rows(self, ids) -> np.ndarray:
        """Dequantize only rows ``ids`` (e.g. embedding lookups): float32 ``[len(ids), k]``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._dequantize_rows(ids)


@dataclass
class FastNBits:
    """A weight rewritten for ORT's fast 4-bit kernel; mathematically equal to the source ``BlockQuantized``.

    ``weight`` is 4-bit with integer (uint8) or default zero points and ``weight.k == repeat * k``;
    ``block_offsets`` (float32 ``[n, k // block_size]`` or None) adds ``block_offsets[r, j]`` to every weight of
    block ``j`` of row ``r``. The caller's graph (``A [..., k]``, accuracy_level 0 for exactness)::

        A2 = Concat([A] * repeat, axis=-1)                        # only when repeat == 2
        Y  = MatMulNBits(A2, *inputs)                             # matmul_nbits_initializers(weight, ...)
        Y += MatMul(ReduceSum(Reshape(A, [..., k // bs, bs]), axes=[-1]), block_offsets.T)  # if offsets

    8-bit codes ``c = lo + 16 * hi`` become two 4-bit halves along a doubled K (``scales`` ``s`` then ``16 s``);
    non-integer zero points become zero point 0 plus the offset ``-(z * s)`` (llama.cpp's own
    ``d * sum(q x) - m * sum(x)`` split). The result equals ``x @ W^T`` to float32 accumulation precision.
    """

    weight: BlockQuantized
    repeat: int
    block_offsets: np.ndarray | None
    k: int

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``[n, k]`` this form computes (halves folded, offsets added)."""
        w = self.weight.dequantize()
        if self.repeat == 2:
            w = w[:, : self.k] + w[:, self.k :]
        if self.block_offsets is not None:
            w = w + np.repeat(self.block_offsets, self.weight.block_size, axis=1)[:, : self.k]
        return w


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def _qtype_name(qtype) -> str:
    name = getattr(qtype, "name", None)
    if name is not None:
        return str(name)
    if isinstance(qtype, str):
        return qtype.upper()
    import gguf  # int code

    return gguf.GGMLQuantizationType(int(qtype)).name


def _f16(b: np.ndarray, off: int) -> np.ndarray:
    """float16 at byte offset ``off`` of every block, as float32 ``[rows, blocks]``."""
    return np.ascontiguousarray(b[..., off : off + 2]).view(np.float16)[..., 0].astype(np.float32)


def _pack4(codes: np.ndarray) -> np.ndarray:
    """4-bit codes ``[..., m]`` -> MatMulNBits bytes ``[..., m // 2]`` (low nibble = even element)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _pack_split_nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml nibble layout (element j = low nibble of byte j, element m + j = its high nibble) of ``qs [..., m]``
    -> MatMulNBits bytes ``[..., m]`` for the same 2m elements in order."""
    a, b = qs[..., 0::2], qs[..., 1::2]
    return np.concatenate([(a & 0x0F) | (b << 4), (a >> 4) | (b & 0xF0)], axis=-1)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml nibble layout ``[..., m]`` -> codes ``[..., 2m]`` in element order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _scale_min_k4(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte 6-bit scale/min field of Q4_K/Q5_K: ``[..., 12]`` -> (sc, m) uint8 ``[..., 8]``."""
    lo, mid, hi = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


def _solve_zero_points(s: np.ndarray, m: np.ndarray) -> np.ndarray:
    """float32 zero points ``z`` with ``fl(z * s) == m`` where one exists (else the nearest), for ``s != 0``.

    ORT computes ``c * s + (-(z * s))``; with ``fl(z * s) == m`` that is ``fl(c * s - m)``, gguf's own result.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        z0 = (m.astype(np.float64) / s.astype(np.float64)).astype(np.float32)
    best = z0.copy()
    done = (z0 * s) == m
    up = dn = z0
    for _ in range(4):
        up = np.nextafter(up, np.float32(np.inf))
        dn = np.nextafter(dn, np.float32(-np.inf))
        for cand in (up, dn):
            hit = ~done & ((cand * s) == m)
            best[hit] = cand[hit]
            done |= hit
        if done.all():
            break
    return best


def _affine(bits: int, s: np.ndarray, m: np.ndarray, packed: np.ndarray):
    """Encode ``w = s * q - m`` blocks: returns (packed, scales, zero_points) with ``z = m / s`` (solved exactly).

    Blocks with ``s == 0`` are the constant ``-m``: they are re-encoded as codes 1, scale ``-m``, zero point 0.
    """
    zero = s == 0
    z = np.zeros_like(s)
    nz = ~zero
    z[nz] = _solve_zero_points(s[nz], m[nz])
    if zero.any():
        s = s.copy()
        s[zero] = -m[zero]
        packed[zero] = 0x11 if bits == 4 else 1
    return packed, s, z


# ----------------------------------------------------------------------------------------------------------
# per-type decoders: blocks uint8 [rows, nblk, type_size] -> (packed [rows, kb, blob], scales [rows, kb], zp)
# ----------------------------------------------------------------------------------------------------------
def _dec_q4_0(b):
    return _pack_split_nibbles(b[..., 2:18]), _f16(b, 0), None


def _dec_q4_1(b):
    d, mn = _f16(b, 0), _f16(b, 2)  # w = d q + mn
    return _affine(4, d, -mn, _pack_split_nibbles(b[..., 4:20]))


def _q5_codes(qh4: np.ndarray, qs16: np.ndarray) -> np.ndarray:
    hbit = np.unpackbits(qh4, axis=-1, bitorder="little")  # element j <- bit j of the little-endian uint32
    return _split_nibbles(qs16) | (hbit << 4)


def _dec_q5_0(b):
    return _q5_codes(b[..., 2:6], b[..., 6:22]) + np.uint8(112), _f16(b, 0), None  # q - 16 + 128


def _dec_q5_1(b):
    d, mn = _f16(b, 0), _f16(b, 2)
    return _affine(8, d, -mn, _q5_codes(b[..., 4:8], b[..., 8:24]))


def _dec_q8_0(b):
    return b[..., 2:34] ^ np.uint8(0x80), _f16(b, 0), None  # int8 q -> q + 128


def _dec_q2_k(b):
    r, nb = b.shape[:2]
    sc = b[..., 0:16]
    qs = b[..., 16:80].reshape(r, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    q = (qs & 3).reshape(r, nb * 16, 16)
    s = (_f16(b, 80)[..., None] * (sc & 0x0F).astype(np.float32)).reshape(r, -1)
    m = (_f16(b, 82)[..., None] * (sc >> 4).astype(np.float32)).reshape(r, -1)
    return _affine(4, s, m, _pack4(q))


def _dec_q3_k(b):
    r, nb = b.shape[:2]
    hmask, qs, sc = b[..., 0:32], b[..., 32:96], b[..., 96:108]
    ql = (qs.reshape(r, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    hb = (hmask.reshape(r, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    codes = ql.reshape(r, nb, 256) + (hb.reshape(r, nb, 256) << 2) + np.uint8(4)  # q + 8, q = ql - 4 (1 - hb)
    lsc = np.concatenate([sc[..., 0:8] & 0x0F, sc[..., 0:8] >> 4], axis=-1)
    hsc = (sc[..., 8:12].reshape(r, nb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    scale = (lsc | (hsc.reshape(r, nb, 16) << 4)).astype(np.float32) - 32.0
    s = (_f16(b, 108)[..., None] * scale).reshape(r, -1)
    return _pack4(codes.reshape(r, nb * 16, 16)), s, None


def _k4_scales(b):
    r, nb = b.shape[:2]
    sc, mn = _scale_min_k4(b[..., 4:16])
    s = (_f16(b, 0)[..., None] * sc.astype(np.float32)).reshape(r, nb * 8)
    m = (_f16(b, 2)[..., None] * mn.astype(np.float32)).reshape(r, nb * 8)
    return s, m


def _dec_q4_k(b):
    r, nb = b.shape[:2]
    s, m = _k4_scales(b)
    packed = _pack_split_nibbles(b[..., 16:144].reshape(r, nb, 4, 32)).reshape(r, nb * 8, 16)
    return _affine(4, s, m, packed)


def _dec_q5_k(b):
    r, nb = b.shape[:2]
    s, m = _k4_scales(b)
    ql = _split_nibbles(b[..., 48:176].reshape(r, nb, 4, 32)).reshape(r, nb, 8, 32)
    hb = (b[..., 16:48].reshape(r, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    codes = (ql | (hb << 4)).reshape(r, nb * 8, 32)
    return _affine(8, s, m, codes)


def _dec_q6_k(b):
    r, nb = b.shape[:2]
    ql = b[..., 0:128].reshape(r, nb, 2, 1, 2, 32)  # [half, ., chunk, l]
    qh = b[..., 128:192].reshape(r, nb, 2, 1, 32)  # [half, ., l]
    lo = np.concatenate([ql & 0x0F, ql >> 4], axis=3)  # element = half*128 + nib*64 + chunk*32 + l
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3  # element = half*128 + j*32 + l
    codes = lo.reshape(r, nb, 256) | (hi.reshape(r, nb, 256) << 4)
    codes += np.uint8(96)  # q - 32 + 128
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    s = (_f16(b, 208)[..., None] * sc).reshape(r, nb * 16)
    return codes.reshape(r, nb * 16, 16), s, None


_DECODERS = {  # name -> (decoder, bits, block_size)
    "Q4_0": (_dec_q4_0, 4, 32), "Q4_1": (_dec_q4_1, 4, 32), "Q5_0": (_dec_q5_0, 8, 32),
    "Q5_1": (_dec_q5_1, 8, 32), "Q8_0": (_dec_q8_0, 8, 32), "Q2_K": (_dec_q2_k, 4, 16),
    "Q3_K": (_dec_q3_k, 4, 16), "Q4_K": (_dec_q4_k, 4, 32), "Q5_K": (_dec_q5_k, 8, 32),
    "Q6_K": (_dec_q6_k, 8, 16),
}


def _float_tensor(raw: np.ndarray, name: str, n: int, k: int) -> np.ndarray:
    if raw.dtype == np.float32 and name == "F32":
        return np.ascontiguousarray(raw).reshape(n, k)
    by = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if name == "F32":
        out = by.view(np.float32)
    elif name == "F16":
        out = by.view(np.float16).astype(np.float32)
    elif name == "BF16":
        out = (by.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:  # F64
        out = by.view(np.float64).astype(np.float32)
    return out.reshape(n, k)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def from_gguf(raw: np.ndarray, qtype, shape_nk: tuple[int, int], *, ort_runnable: bool = True):
    """Map one GGUF tensor onto MatMulNBits exactly.

    ``raw``: the tensor's data as gguf.GGUFReader gives it (raw block bytes, any shape/dtype; only the bytes
    count); ``qtype``: a ``gguf.GGMLQuantizationType``, its int value or its name; ``shape_nk``: ``(n, k)`` =
    (rows, inner dim), i.e. GGUF ``tensor.shape`` reversed. Returns a :class:`BlockQuantized` whose
    ``dequantize()`` equals ``gguf.quants.dequantize`` (bit-exact for the default-zero-point types; for the
    affine ones ~90% of weights are bit-exact, the rest 1 ulp of the block minimum off, where no float32 zero
    point reproduces ``dmin * m``), or a float32 ``[n, k]`` ndarray for F32/F16/BF16/F64 and for types without an
    exact form (dequantized by gguf-py, with a ``UserWarning``). The return type tells the caller which.
    Q5_1/Q5_K have an exact form only with 8-bit float zero points, which ORT CPU cannot run as one node: they
    come back as float32 unless ``ort_runnable=False`` (then use :func:`to_fast_4bit` before export).
    """
    name = _qtype_name(qtype)
    n, k = int(shape_nk[0]), int(shape_nk[1])
    if name in _FLOAT_TYPES:
        return _float_tensor(raw, name, n, k)
    if name not in _DECODERS or (ort_runnable and name not in ORT_RUNNABLE_TYPES):
        import gguf

        why = "has no exact MatMulNBits form" if name not in _DECODERS else (
            "needs 8-bit float zero points, which ORT CPU MatMulNBits does not run "
            "(pass ort_runnable=False and use to_fast_4bit for an exact quantized form)")
        warnings.warn(f"GGUF type {name} {why}; dequantized to float32 [{n}, {k}]", UserWarning, stacklevel=2)
        qt = gguf.GGMLQuantizationType[name]
        return np.ascontiguousarray(gguf.quants.dequantize(np.ascontiguousarray(raw).view(np.uint8), qt),
                                    dtype=np.float32).reshape(n, k)
    decode, bits, bs = _DECODERS[name]
    qk, tsize = _BLOCK_BYTES[name]
    if k % qk:
        raise ValueError(f"{name}: k={k} is not a multiple of its block of {qk}")
    nblk = k // qk
    by = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if by.size != n * nblk * tsize:
        raise ValueError(f"{name} [{n}, {k}] needs {n * nblk * tsize} bytes, got {by.size}")
    blocks = by.reshape(n, nblk, tsize)
    kb = k // bs
    packed = np.empty((n, kb, bs * bits // 8), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = None
    step = max(1, _CHUNK_ELEMS // k)
    for r0 in range(0, n, step):
        p, s, z = decode(blocks[r0 : r0 + step])
        rr = p.shape[0]
        packed[r0 : r0 + rr] = p.reshape(rr, kb, -1)
        scales[r0 : r0 + rr] = s.reshape(rr, kb)
        if z is not None:
            if zps is None:
                zps = np.empty((n, kb), np.float32)
            zps[r0 : r0 + rr] = z.reshape(rr, kb)
    return BlockQuantized(bits, bs, n, k, packed, scales, zps, name)


def quantize_rtn(w: np.ndarray, bits: int, block_size: int = 32) -> BlockQuantized:
    """Round-to-nearest asymmetric blockwise quantization of a float weight ``w [n, k]`` (``x @ w.T``).

    Per block of ``block_size`` along k: range ``[min(lo, 0), max(hi, 0)]``, ``s = range / (2**bits - 1)``,
    integer zero point ``z = round(-lo / s)``, codes ``clip(round(w / s) + z)``: error <= s / 2 per weight.
    Zero points are integers (written as uint8: the fast kernel). ``k`` need not be a multiple of
    ``block_size`` (the last block is zero-padded).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    kb = -(-k // block_size)
    qmax = (1 << bits) - 1
    packed = np.empty((n, kb, block_size * bits // 8), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.float32)
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for r0 in range(0, n, step):
        x = w[r0 : r0 + step]
        if k != kb * block_size:
            x = np.pad(x, ((0, 0), (0, kb * block_size - k)))
        x = x.reshape(x.shape[0], kb, block_size)
        lo = np.minimum(x.min(axis=-1), 0.0)
        hi = np.maximum(x.max(axis=-1), 0.0)
        s = ((hi - lo) / np.float32(qmax)).astype(np.float32)
        inv = np.where(s > 0, np.float32(1.0) / np.where(s > 0, s, 1), 0).astype(np.float32)
        z = np.clip(np.round(-lo * inv), 0, qmax)
        c = np.clip(np.round(x * inv[..., None]) + z[..., None], 0, qmax).astype(np.uint8)
        rr = x.shape[0]
        packed[r0 : r0 + rr] = _pack4(c) if bits == 4 else c
        scales[r0 : r0 + rr] = s
        zps[r0 : r0 + rr] = z
    return BlockQuantized(bits, block_size, n, k, packed, scales, zps, "rtn")


def to_fast_4bit(q: BlockQuantized) -> FastNBits:
    """Rewrite ``q`` for ORT CPU's fast kernel (4-bit, integer zero points); exact up to fp32 accumulation.

    4-bit with integer zero points: unchanged. Non-integer zero points: zero point 0 plus per-block offsets
    ``-(z * s)``. 8-bit: codes split into low/high nibbles along a doubled K (``repeat = 2``), scales
    ``[s, 16 s]``, integer zero points ``z = zl + 16 zh`` split the same way. See :class:`FastNBits` for the graph.
    """
    n, k, bs = q.n, q.k, q.block_size
    integral = q.integer_zero_points
    offsets = None
    if not integral:
        if k % bs:
            raise ValueError("block offsets need k to be a multiple of block_size")
        offsets = -(q.zero_points * q.scales)
    if q.bits == 4:
        if integral:
            return FastNBits(q, 1, None, k)
        w4 = BlockQuantized(4, bs, n, k, q.packed, q.scales, np.zeros_like(q.scales), q.source_type)
        return FastNBits(w4, 1, offsets, k)
    if k % bs:
        raise ValueError("splitting 8-bit codes needs k to be a multiple of block_size")
    c = q.packed
    packed = np.concatenate([_pack4(c & 0x0F), _pack4(c >> 4)], axis=1)
    scales = np.concatenate([q.scales, q.scales * np.float32(16)], axis=1)
    if integral:
        z = (np.full_like(q.scales, q.default_zero_point) if q.zero_points is None else q.zero_points).astype(np.int32)
        zps = np.concatenate([z & 0x0F, z >> 4], axis=1).astype(np.float32)
    else:
        zps = np.zeros((n, 2 * q.k_blocks), np.float32)
    w4 = BlockQuantized(4, bs, n, 2 * k, packed, scales, zps, q.source_type)
    return FastNBits(w4, 2, offsets, k)


def matmul_nbits_initializers(q: BlockQuantized, prefix: str, *, bias: np.ndarray | None = None):
    """ONNX pieces of one ``com.microsoft.MatMulNBits`` node for ``q``.

    Returns ``(initializers, inputs, attrs)``: TensorProtos ``{prefix}.qweight`` (uint8 ``[N, k_blocks, blob]``),
    ``{prefix}.scales`` (float32 ``[N * k_blocks]``), ``{prefix}.qzeros`` when zero points are given (uint8
    ``[N * ceil(k_blocks * bits / 8)]`` if integral, else float32 ``[N * k_blocks]``) and ``{prefix}.bias``
    (float32 ``[N]``) when ``bias`` is given; ``inputs`` = the node's inputs after the activation ``A`` (``""`` for
    skipped optional inputs, trailing ones omitted); ``attrs`` = ``{K, N, bits, block_size}``. The caller adds
    ``accuracy_level`` (0 = float32 math; 4 quantizes A to int8 per block: ~5e-3 relative error).
    Raises ValueError for 8-bit non-integer zero points (ORT CPU cannot run them; use :func:`to_fast_4bit`).
    """
    from onnx import numpy_helper

    inits = [numpy_helper.from_array(np.ascontiguousarray(q.packed), f"{prefix}.qweight"),
             numpy_helper.from_array(np.ascontiguousarray(q.scales.reshape(-1)), f"{prefix}.scales")]
    inputs = [f"{prefix}.qweight", f"{prefix}.scales"]
    if q.zero_points is not None:
        if q.integer_zero_points:
            z = q.zero_points.astype(np.uint8)
            if q.bits == 4:
                if z.shape[1] % 2:
                    z = np.concatenate([z, np.zeros((q.n, 1), np.uint8)], axis=1)
                z = _pack4(z)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(z.reshape(-1)), f"{prefix}.qzeros"))
        elif q.bits == 8:
            raise ValueError(f"{q.source_type}: 8-bit float zero points do not run in ORT CPU MatMulNBits; "
                             "use to_fast_4bit()")
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(q.zero_points.reshape(-1)), f"{prefix}.qzeros"))
        inputs.append(f"{prefix}.qzeros")
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if bias.shape != (q.n,):
            raise ValueError(f"bias must have {q.n} values, got {bias.shape}")
        inits.append(numpy_helper.from_array(bias, f"{prefix}.bias"))
        inputs += [""] * (4 - len(inputs)) + [f"{prefix}.bias"]
    attrs = {"K": q.k, "N": q.n, "bits": q.bits, "block_size": q.block_size}
    return inits, inputs, attrs
