"""The NumPy backend: BLAS for every contraction, bounded memory for convolutions and attention.

Storage dtype (what arrays between ops hold) and compute dtype (what each op computes in):
    fp32 -> float32 / float32      fp64 -> float64 / float64
    fp16 -> float16 / float32      bf16 -> ml_dtypes.bfloat16 / float32
Each op converts its operands to the compute dtype, computes, and rounds its result once to the
storage dtype (round to nearest even). docs/precision.md has the details and measured errors.

Convolutions are im2col + one GEMM per image, done in bands of output rows so the column buffer
never exceeds `chunk_bytes`; attention is computed in blocks of query tokens under the same budget.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from . import Ops

_STORAGE = {"fp32": np.dtype(np.float32), "fp64": np.dtype(np.float64), "fp16": np.dtype(np.float16)}
_SQRT_HALF = math.sqrt(0.5)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)

# erf(x) ~ x * P(x^2) / Q(x^2) on [-4, 4] (clamped outside): a float32 rational approximation,
# max abs error 4.2e-7 over [-6, 6] measured against math.erf (relative 2.7e-7 for |x| < 1.5).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def storage_dtype(name: str) -> np.dtype:
    return _bfloat16() if name == "bf16" else _STORAGE[name]


def _erf_f32(x: np.ndarray) -> np.ndarray:
    """erf for float32 arrays (see _ERF_P)."""
    x = np.clip(x, -4.0, 4.0)
    x2 = x * x
    p = np.full_like(x, _ERF_P[0])
    for c in _ERF_P[1:]:
        p *= x2
        p += np.float32(c)
    q = np.full_like(x, _ERF_Q[0])
    for c in _ERF_Q[1:]:
        q *= x2
        q += np.float32(c)
    p *= x
    p /= q
    return p


def _erf_f64(x: np.ndarray) -> np.ndarray:
    """erf for float64 arrays to about 1e-15: the all-positive series
    erf(x) = 2/sqrt(pi) e^(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)) for |x| < 2.5 and the
    continued fraction of erfc for |x| >= 2.5 (40 terms each; max abs error 1.3e-15 vs math.erf)."""
    a = np.abs(x)
    out = np.empty_like(x)
    small = a < 2.5
    if small.any():
        s = a[small]
        s2 = s * s
        term = s.copy()
        total = s.copy()
        for n in range(1, 40):
            term *= 2.0 * s2 / (2 * n + 1)
            total += term
        out[small] = _TWO_OVER_SQRT_PI * np.exp(-s2) * total
    large = ~small
    if large.any():
        s = a[large]
        t = s.copy()
        for k in range(40, 0, -1):
            t = s + (k / 2.0) / t
        out[large] = 1.0 - np.exp(-s * s) / math.sqrt(math.pi) / t
    return np.copysign(out, x)


class NumpyOps(Ops):
    backend = "numpy"

    def __init__(self, dtype: str = "fp32", chunk_bytes: int = 64 << 20):
        self.dtype = dtype
        self.storage = storage_dtype(dtype)
        self.compute = np.dtype(np.float64) if dtype == "fp64" else np.dtype(np.float32)
        self.chunk_bytes = int(chunk_bytes)
        self._exact = self.storage == self.compute
        self._buffers: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"NumpyOps({self.dtype!r})"

    # --- helpers -------------------------------------------------------------------------------
    def _c(self, x: np.ndarray) -> np.ndarray:
        """x in the compute dtype (no copy when it already is)."""
        return x if x.dtype == self.compute else x.astype(self.compute)

    def _s(self, y: np.ndarray) -> np.ndarray:
        """y rounded to the storage dtype (no copy when it already is)."""
        return y if y.dtype == self.storage else y.astype(self.storage)

    # --- conversion ----------------------------------------------------------------------------
    def asarray(self, value, dtype=None):
        if type(value).__name__ == "Tensor":  # a torch tensor handed in by a caller
            from .torch_ops import TorchOps

            value = TorchOps().to_numpy(value)
        array = np.asarray(value)
        if array.dtype.kind in "iub":
            return array.astype(np.int64, copy=False)
        return array.astype(storage_dtype(dtype) if dtype else self.storage, copy=False)

    def weight(self, array):
        return array if array.dtype == self.storage else array.astype(self.storage)

    def to_numpy(self, value):
        return value

    def is_array(self, value) -> bool:
        return isinstance(value, np.ndarray)

    def inference(self):
        return np.errstate(over="ignore", under="ignore")

    # --- layers ------------------------------------------------------------------------------
    def linear(self, x, w, b=None):
        xc = self._c(x)
        lead = xc.shape[:-1]
        y = np.matmul(xc.reshape(-1, xc.shape[-1]), self._c(w).T)
        if b is not None:
            y += self._c(b)
        return self._s(y.reshape(*lead, y.shape[-1]))

    def _workspace(self, name: str, size: int) -> np.ndarray:
        """A reusable flat scratch buffer of at least `size` compute-dtype elements. Reusing it keeps
        the big temporaries (im2col columns, attention scores) from being freshly page-faulted on
        every call; the buffers never exceed `chunk_bytes` each (plus the padded input)."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = np.empty(size, self.compute)
            self._buffers[name] = buf
        return buf[:size]

    def conv2d(self, x, w, b=None, stride: int = 1, padding: int = 0):
        xc = self._c(x)
        wc = self._c(w)
        n, c, h, width = xc.shape
        out_c, in_c, kh, kw = wc.shape
        if kh == kw == 1 and stride == 1 and padding == 0:
            y = np.matmul(wc.reshape(out_c, in_c), xc.reshape(n, c, h * width)).reshape(n, out_c, h, width)
        else:
            if padding:
                p = padding
                xp = self._workspace("pad", n * c * (h + 2 * p) * (width + 2 * p)).reshape(n, c, h + 2 * p, width + 2 * p)
                xp[:, :, :p, :] = 0
                xp[:, :, h + p:, :] = 0
                xp[:, :, p:h + p, :p] = 0
                xp[:, :, p:h + p, width + p:] = 0
                xp[:, :, p:h + p, p:width + p] = xc
            else:
                xp = np.ascontiguousarray(xc)
            hp, wp = xp.shape[2:]
            ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
            sn, sc, sh, sw = xp.strides
            windows = np.lib.stride_tricks.as_strided(
                xp, shape=(n, c, kh, kw, ho, wo), strides=(sn, sc, sh, sw, sh * stride, sw * stride), writeable=False)
            depth = in_c * kh * kw
            w2 = wc.reshape(out_c, depth)
            y = np.empty((n, out_c, ho, wo), self.compute)
            row_bytes = n * depth * wo * self.compute.itemsize
            band = max(1, min(ho, self.chunk_bytes // max(row_bytes, 1)))
            cols_buf = self._workspace("cols", n * depth * band * wo)
            for r0 in range(0, ho, band):
                rows = min(ho, r0 + band) - r0
                cols = cols_buf[:n * depth * rows * wo].reshape(n, c, kh, kw, rows, wo)
                np.copyto(cols, windows[:, :, :, :, r0:r0 + rows, :])  # im2col
                # output rows r0..r0+rows of each (image, channel) are contiguous: a flat view of them
                target = np.lib.stride_tricks.as_strided(
                    y[:, :, r0:r0 + rows, :], shape=(n, out_c, rows * wo),
                    strides=(y.strides[0], y.strides[1], y.strides[3]))
                np.matmul(w2, cols.reshape(n, depth, rows * wo), out=target)
        if b is not None:
            y += self._c(b)[:, None, None]
        return self._s(y)

    def group_norm(self, x, groups, w, b, eps):
        xc = self._c(x)
        n, c = xc.shape[:2]
        grouped = xc.reshape(n, groups, -1)
        centered = grouped - grouped.mean(axis=-1, keepdims=True)
        var = np.square(centered).mean(axis=-1)
        rstd = 1.0 / np.sqrt(var + eps)  # (n, groups)
        scale = np.repeat(rstd, c // groups, axis=1) * self._c(w)[None, :]  # (n, c)
        out = centered.reshape(n, c, -1)
        out *= scale[:, :, None].astype(self.compute, copy=False)
        out += self._c(b)[None, :, None]
        return self._s(out.reshape(xc.shape))

    def layer_norm(self, x, w, b, eps):
        xc = self._c(x)
        centered = xc - xc.mean(axis=-1, keepdims=True)
        var = np.square(centered).mean(axis=-1, keepdims=True)
        centered *= (1.0 / np.sqrt(var + eps)).astype(self.compute, copy=False)
        centered *= self._c(w)
        centered += self._c(b)
        return self._s(centered)

    def embedding(self, ids, w):
        return self._s(np.asarray(w)[np.asarray(ids)])

    def attention(self, q, k, v, scale=None, causal=False):
        batch, heads, nq, dim = q.shape
        nk = k.shape[2]
        scale = dim ** -0.5 if scale is None else scale
        qs = np.multiply(self._c(q), self.compute.type(scale))  # contiguous (B, H, Nq, D)
        kt = np.ascontiguousarray(self._c(k).swapaxes(-1, -2))  # (B, H, D, Nk): BLAS is far faster on it
        vc = np.ascontiguousarray(self._c(v))
        out = np.empty((batch, heads, nq, vc.shape[-1]), self.compute)
        per_query = batch * heads * nk * self.compute.itemsize
        block = max(1, min(nq, self.chunk_bytes // max(per_query, 1)))
        scores_buf = self._workspace("scores", batch * heads * block * nk)
        mask = np.triu(np.full((nq, nk), -np.inf, self.compute), 1) if causal else None
        for q0 in range(0, nq, block):
            rows = min(nq, q0 + block) - q0
            scores = scores_buf[:batch * heads * rows * nk].reshape(batch, heads, rows, nk)
            np.matmul(qs[:, :, q0:q0 + rows], kt, out=scores)
            if mask is not None:
                scores += mask[q0:q0 + rows]
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            total = scores.sum(axis=-1, keepdims=True)
            o = out[:, :, q0:q0 + rows]
            np.matmul(scores, vc, out=o)
            o /= total  # normalise the (rows x dim) output instead of the (rows x keys) weights
        return self._s(out)

    # --- activations ---------------------------------------------------------------------------
    def _sigmoid_times(self, x, z):
        """x * sigmoid(z) = x / (1 + exp(-z)), computed in place in one buffer."""
        y = np.negative(z)
        np.exp(y, out=y)
        y += 1.0
        np.divide(x, y, out=y)
        return y

    def silu(self, x):
        xc = self._c(x)
        return self._s(self._sigmoid_times(xc, xc))

    def quick_gelu(self, x):
        xc = self._c(x)
        return self._s(self._sigmoid_times(xc, xc * self.compute.type(1.702)))

    def gelu(self, x):
        xc = self._c(x)
        z = xc * self.compute.type(_SQRT_HALF)
        e = _erf_f64(z) if self.compute == np.float64 else _erf_f32(z)
        e += 1.0
        e *= xc
        e *= 0.5
        return self._s(e)

    # --- elementwise ---------------------------------------------------------------------------
    def add(self, a, b):
        if self._exact:
            return a + b
        return self._s(np.add(self._c(a), self._c(b)))

    def mul(self, a, b):
        if self._exact:
            return a * b
        return self._s(np.multiply(self._c(a), self._c(b) if isinstance(b, np.ndarray) else b))

    def div(self, a, scalar):
        return self._s(np.divide(self._c(a), scalar))

    def exp(self, x):
        return self._s(np.exp(self._c(x)))

    def clamp(self, x, low, high):
        return self._s(np.clip(self._c(x), low, high))

    def scale_shift(self, x, scale, shift):
        y = self._c(x) * scale
        y += shift
        return self._s(y)

    # --- shapes --------------------------------------------------------------------------------
    def reshape(self, x, shape):
        return np.reshape(x, tuple(shape))

    def transpose(self, x, dim0, dim1):
        return np.swapaxes(x, dim0, dim1)

    def permute(self, x, dims):
        return np.transpose(x, tuple(dims))

    def contiguous(self, x):
        return np.ascontiguousarray(x)

    def cat(self, xs, axis):
        return np.concatenate(list(xs), axis=axis)

    def chunk(self, x, chunks, axis):
        return tuple(np.split(x, chunks, axis=axis))

    def pad2d(self, x, left, right, top, bottom):
        return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))

    def upsample_nearest(self, x, size: Sequence[int] | None = None):
        n, c, h, w = x.shape
        if size is None or (int(size[0]) == 2 * h and int(size[1]) == 2 * w):
            return np.broadcast_to(x[:, :, :, None, :, None], (n, c, h, 2, w, 2)).reshape(n, c, 2 * h, 2 * w)
        out_h, out_w = (int(s) for s in size)
        # the reference's nearest rule: src = min(floor(dst * (in / out)), in - 1), scale in float32
        rows = np.minimum(np.floor(np.arange(out_h, dtype=np.float32) * np.float32(h / out_h)).astype(np.int64), h - 1)
        cols = np.minimum(np.floor(np.arange(out_w, dtype=np.float32) * np.float32(w / out_w)).astype(np.int64), w - 1)
        return x[:, :, rows[:, None], cols[None, :]]

    def expand_batch(self, x, batch):
        return np.broadcast_to(np.reshape(x, (-1,)), (batch,))

    def take_tokens(self, x, index):
        return x[np.arange(x.shape[0]), np.asarray(index)]

    def argmax(self, x, axis):
        return np.argmax(x, axis=axis).astype(np.int64)

    # --- model specific ------------------------------------------------------------------------
    def timestep_embedding(self, timesteps, dim, flip_sin_to_cos, freq_shift, scale=1.0, max_period=10000):
        # float32 arithmetic as the reference does it; exp/sin/cos evaluated in float64 and rounded
        # (correctly rounded, which matches torch's float32 kernels in nearly every element)
        half = dim // 2
        f32, f64 = np.float32, np.float64
        freqs = f32(-math.log(max_period)) * np.arange(half, dtype=f32)
        freqs = freqs / f32(half - freq_shift)
        freqs = np.exp(freqs.astype(f64)).astype(f32)
        angles = np.asarray(timesteps).astype(f32)[:, None] * freqs[None, :]
        angles = (f32(scale) * angles).astype(f64)
        emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(f32)
        if flip_sin_to_cos:
            emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
        if dim % 2 == 1:
            emb = np.pad(emb, ((0, 0), (0, 1)))
        return emb

    def cast(self, x, dtype=None):
        return np.asarray(x).astype(storage_dtype(dtype) if dtype else self.storage, copy=False)


__all__ = ["NumpyOps", "storage_dtype"]
