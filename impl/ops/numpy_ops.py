"""The NumPy backend: BLAS for every contraction, bounded memory for convolutions and attention.

Storage dtype (what arrays between ops hold) and compute dtype (what each op computes in):
    fp32 -> float32 / float32      fp64 -> float64 / float64
    fp16 -> float16 / float32      bf16 -> ml_dtypes.bfloat16 / float32
Each op converts its operands to the compute dtype, computes, and rounds its result once to the
storage dtype (round to nearest even). docs/precision.md has the details and measured errors.

Convolutions are im2col + GEMM in bands of output rows, so the column buffer never exceeds
`chunk_bytes`; attention runs per (batch, head) in blocks of query rows whose scores fit in
`attention_block_bytes`. Work is spread over `threads` worker threads (NumPy's kernels and BLAS
release the GIL); during a model call (`inference()`) BLAS itself is held to one thread so the two
levels of threading do not fight over the cores. Scratch buffers are reused between calls, so one
NumpyOps serves one model call at a time.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from . import Ops

_STORAGE = {"fp32": np.dtype(np.float32), "fp64": np.dtype(np.float64), "fp16": np.dtype(np.float16)}
_SQRT_HALF = math.sqrt(0.5)
_LOG2_E = 1.0 / math.log(2.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_GRAIN = 1 << 15  # elements (or multiply-adds / 16) below which an op is not worth splitting

# erfc(z) ~ t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0: the Chebyshev fit of Numerical Recipes
# ("erfcc"), relative error < 1.2e-7 for all z >= 0 (measured 1.04e-7 against math.erfc). Used for
# float32 GELU as x * Phi(x) with Phi from erfc, which stays accurate in the negative tail too.
_ERFC_P = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
           1.48851587, -0.82215223, 0.17087277)


def default_threads() -> int:
    """OMP_NUM_THREADS when set (the count every other pool in the process obeys), else the CPUs this
    process may run on (its affinity mask, not the machine's count)."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def storage_dtype(name: str) -> np.dtype:
    return _bfloat16() if name == "bf16" else _STORAGE[name]


def _gelu_f32(x: np.ndarray, out: np.ndarray) -> None:
    """out = x * Phi(x) for float32 x, Phi(x) = erfc(-x / sqrt 2) / 2 from _ERFC_P: abs error
    <= 1.3e-7 * max(1, |gelu(x)|), relative 1.4e-6 where |gelu(x)| > 1e-3 (measured on [-12, 12])."""
    one = np.float32(1.0)
    z = np.abs(x)
    z *= np.float32(_SQRT_HALF)
    t = np.multiply(z, np.float32(0.5))
    t += one
    np.divide(one, t, out=t)
    p = np.multiply(t, np.float32(_ERFC_P[-1]))
    p += np.float32(_ERFC_P[-2])
    for c in _ERFC_P[-3::-1]:
        p *= t
        p += np.float32(c)
    np.square(z, out=z)
    p -= z
    np.exp(p, out=p)
    p *= t
    p *= np.float32(0.5)  # p = erfc(|x| / sqrt 2) / 2 = Phi(-|x|), in [0, 1/2]
    # Phi(x) = Phi(-|x|) for x < 0, 1 - Phi(-|x|) otherwise, as (1 + w) / 2 - w p with w = sign(x):
    # exact for x < 0 (0 + p), one rounding for x >= 0. (Masked selection - np.where, `where=` -
    # runs ~20x slower than these five passes on random signs.)
    w = np.copysign(one, x, out=t)
    p *= w
    w += one
    w *= np.float32(0.5)
    np.subtract(w, p, out=p)
    np.multiply(x, p, out=out)


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


@functools.lru_cache(maxsize=None)
def _blas_libraries():
    """threadpoolctl's handle on the BLAS libraries loaded in this process (NumPy's among them)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


class NumpyOps(Ops):
    backend = "numpy"

    def __init__(self, dtype: str = "fp32", chunk_bytes: int = 64 << 20, attention_block_bytes: int = 512 << 10,
                 threads: int | None = None):
        self.dtype = dtype
        self.storage = storage_dtype(dtype)
        self.compute = np.dtype(np.float64) if dtype == "fp64" else np.dtype(np.float32)
        self.chunk_bytes = int(chunk_bytes)
        self.attention_block_bytes = int(attention_block_bytes)
        self.threads = max(1, int(threads if threads is not None else default_threads()))
        self._exact = self.storage == self.compute
        self._pool: ThreadPoolExecutor | None = None
        self._buffers: dict[str, np.ndarray] = {}
        self._depth = 0

    def __repr__(self) -> str:
        return f"NumpyOps({self.dtype!r}, threads={self.threads})"

    # --- helpers -------------------------------------------------------------------------------
    def _c(self, x: np.ndarray) -> np.ndarray:
        """x in the compute dtype (no copy when it already is)."""
        return x if x.dtype == self.compute else x.astype(self.compute)

    def _s(self, y: np.ndarray) -> np.ndarray:
        """y rounded to the storage dtype (no copy when it already is)."""
        return y if y.dtype == self.storage else y.astype(self.storage)

    def _parallel(self, fn: Callable[[int, int, int], None], count: int, work: int | None = None) -> None:
        """fn(worker, first, last) over [0, count) in contiguous ranges, one per worker thread;
        run inline when `work` (elements touched) is too small to be worth splitting."""
        workers = min(self.threads, count)
        if work is not None:
            workers = min(workers, max(1, work // _GRAIN))
        if workers <= 1:
            fn(0, 0, count)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="impl-numpy")
        bounds = [count * w // workers for w in range(workers + 1)]
        futures = [self._pool.submit(fn, w, bounds[w], bounds[w + 1]) for w in range(1, workers)]
        try:
            fn(0, bounds[0], bounds[1])
        finally:
            for future in futures:
                future.result()

    def _workspace(self, name: str, size: int) -> np.ndarray:
        """A reusable flat scratch buffer of `size` compute-dtype elements (grown when needed), so big
        temporaries (im2col columns, attention scores) are not freshly page-faulted on every call."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = np.empty(size, self.compute)
            self._buffers[name] = buf
        return buf[:size]

    def _rows(self, x2d: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], None], out_cols: int | None = None):
        """out[r0:r1] = fn(x2d[r0:r1]) over row ranges in the worker threads (fn writes into `out`)."""
        rows, cols = x2d.shape
        out = np.empty((rows, cols if out_cols is None else out_cols), self.compute)

        def run(worker, first, last):
            if first < last:
                fn(x2d[first:last], out[first:last])

        self._parallel(run, rows, rows * cols)
        return out

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

    @contextlib.contextmanager
    def inference(self):
        """Floating point warnings off (exp overflow in silu of large negatives is expected); BLAS
        held to one thread while the worker threads split the work (outermost call only): OpenBLAS's
        own threads busy-wait between the many small GEMMs of a UNet and lose badly on shared cores."""
        self._depth += 1
        try:
            with np.errstate(over="ignore", under="ignore"):
                if self._depth == 1:
                    with _blas_libraries().limit(limits=1):
                        yield
                else:
                    yield
        finally:
            self._depth -= 1

    # --- layers ------------------------------------------------------------------------------
    def linear(self, x, w, b=None):
        xc = self._c(x)
        lead, k = xc.shape[:-1], xc.shape[-1]
        x2d = xc.reshape(-1, k)
        wt = self._c(w).T
        bias = None if b is None else self._c(b)

        def rows(xr, out):
            np.matmul(xr, wt, out=out)
            if bias is not None:
                out += bias

        y = self._rows(x2d, rows, out_cols=wt.shape[1]) if x2d.shape[0] * k * wt.shape[1] >= 16 * _GRAIN \
            else self._linear_inline(x2d, wt, bias)
        return self._s(y.reshape(*lead, y.shape[-1]))

    @staticmethod
    def _linear_inline(x2d, wt, bias):
        y = np.matmul(x2d, wt)
        if bias is not None:
            y += bias
        return y

    def conv2d(self, x, w, b=None, stride: int = 1, padding: int = 0):
        xc = self._c(x)
        wc = self._c(w)
        n, c, h, width = xc.shape
        out_c, in_c, kh, kw = wc.shape
        bias = None if b is None else self._c(b)[:, None]
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
        depth = in_c * kh * kw
        w2 = wc.reshape(out_c, depth)
        y = np.empty((n, out_c, ho, wo), self.compute)
        pointwise = kh == kw == 1 and stride == 1
        if not pointwise:
            sn, sc, sh, sw = xp.strides
            windows = np.lib.stride_tricks.as_strided(
                xp, shape=(n, c, kh, kw, ho, wo), strides=(sn, sc, sh, sw, sh * stride, sw * stride), writeable=False)
        # tasks: (image, band of output rows); a band's columns stay under chunk_bytes / threads
        row_bytes = depth * wo * self.compute.itemsize
        band = max(1, min(ho, self.chunk_bytes // max(self.threads * row_bytes, 1)))
        if n * -(-ho // band) < self.threads and ho > 1:  # too few tasks to keep the workers busy
            band = max(1, -(-ho // -(-self.threads // n)))
        bands = -(-ho // band)

        def run(worker, first, last):
            for task in range(first, last):
                image, r0 = divmod(task, bands)
                r0 *= band
                rows = min(ho, r0 + band) - r0
                if pointwise:
                    cols = xp[image, :, r0:r0 + rows, :].reshape(depth, rows * wo)
                else:
                    buf = self._workspace(f"cols{worker}", depth * band * wo)
                    cols = buf[:depth * rows * wo].reshape(c, kh, kw, rows, wo)
                    np.copyto(cols, windows[image, :, :, :, r0:r0 + rows, :])  # im2col
                    cols = cols.reshape(depth, rows * wo)
                # output rows r0..r0+rows of each channel are contiguous: a flat (out_c, rows*wo) view
                target = np.lib.stride_tricks.as_strided(
                    y[image, :, r0:r0 + rows, :], shape=(out_c, rows * wo), strides=(y.strides[1], y.strides[3]))
                np.matmul(w2, cols, out=target)
                if bias is not None:
                    target += bias

        self._parallel(run, n * bands, n * out_c * ho * wo * depth // 16)
        return self._s(y)

    def group_norm(self, x, groups, w, b, eps):
        xc = self._c(x)
        n, c = xc.shape[:2]
        per = c // groups
        grouped = xc.reshape(n * groups, -1)  # one row per (image, group)
        wg = self._c(w).reshape(groups, per)
        bg = self._c(b).reshape(groups, per)

        out = np.empty_like(grouped, dtype=self.compute)

        def run(worker, first, last):
            if first >= last:
                return
            xr = grouped[first:last]
            o = out[first:last]
            np.subtract(xr, xr.mean(axis=-1, keepdims=True), out=o)
            squares = self._workspace(f"squares{worker}", o.size).reshape(o.shape)  # no fresh pages per call
            var = np.square(o, out=squares).mean(axis=-1)
            rstd = 1.0 / np.sqrt(var + eps)
            g = np.arange(first, last) % groups
            scale = (rstd[:, None] * wg[g]).astype(self.compute, copy=False)  # (rows, per)
            o3 = o.reshape(last - first, per, -1)
            o3 *= scale[:, :, None]
            o3 += bg[g][:, :, None]

        self._parallel(run, n * groups, grouped.size)
        return self._s(out.reshape(xc.shape))

    def layer_norm(self, x, w, b, eps):
        xc = self._c(x)
        wc, bc = self._c(w), self._c(b)

        def rows(xr, out):
            np.subtract(xr, xr.mean(axis=-1, keepdims=True), out=out)
            var = np.square(out).mean(axis=-1, keepdims=True)
            out *= (1.0 / np.sqrt(var + eps)).astype(self.compute, copy=False)
            out *= wc
            out += bc

        return self._s(self._rows(xc.reshape(-1, xc.shape[-1]), rows).reshape(xc.shape))

    def embedding(self, ids, w):
        return self._s(np.asarray(w)[np.asarray(ids)])

    def attention(self, q, k, v, scale=None, causal=False):
        """Per (batch, head), in blocks of query rows whose scores fit in `attention_block_bytes`
        (the scores of a whole head are never materialised), heads spread over the worker threads.
        The usual max subtraction is skipped when a Cauchy-Schwarz bound proves that no score can
        overflow exp(); the softmax normalisation is applied to the (rows x dim) output."""
        batch, heads, nq, dim = q.shape
        nk = k.shape[2]
        scale = dim ** -0.5 if scale is None else scale
        # scores in base 2: exp2 is ~1.8x faster than exp in NumPy (float32), and softmax is the same
        qs = np.multiply(self._c(q), self.compute.type(scale * _LOG2_E)).reshape(batch * heads, nq, dim)
        kt = np.ascontiguousarray(self._c(k).swapaxes(-1, -2)).reshape(batch * heads, dim, nk)  # BLAS-friendly
        vc = np.ascontiguousarray(self._c(v)).reshape(batch * heads, nk, -1)
        out = np.empty((batch * heads, nq, vc.shape[-1]), self.compute)
        # |q_i . k_j| <= |q_i| |k_j|: below the limit exp2() cannot overflow (nor leave the normal range)
        limit = 86.0 if self.compute == np.float32 else 860.0  # 2^86 ~ e^60, 2^860 ~ e^596
        bound = float(np.sqrt(np.square(qs).sum(-1).max(initial=0.0)) * np.sqrt(np.square(kt).sum(-2).max(initial=0.0)))
        shift = not bound < limit
        rows_per_block = max(1, min(nq, self.attention_block_bytes // max(nk * self.compute.itemsize, 1)))
        mask = np.triu(np.full((nq, nk), -np.inf, self.compute), 1) if causal else None
        ones = np.ones(nk, self.compute)

        def run(worker, first, last):
            scores_buf = self._workspace(f"scores{worker}", rows_per_block * nk)
            for i in range(first, last):
                for q0 in range(0, nq, rows_per_block):
                    rows = min(nq, q0 + rows_per_block) - q0
                    scores = scores_buf[:rows * nk].reshape(rows, nk)
                    np.matmul(qs[i, q0:q0 + rows], kt[i], out=scores)
                    if mask is not None:
                        scores += mask[q0:q0 + rows]
                    if shift:
                        scores -= scores.max(axis=-1, keepdims=True)
                    np.exp2(scores, out=scores)
                    total = np.matmul(scores, ones)[:, None]  # row sums as a BLAS matvec
                    o = out[i, q0:q0 + rows]
                    np.matmul(scores, vc[i], out=o)
                    o /= total

        self._parallel(run, batch * heads, batch * heads * nq * nk)
        return self._s(out.reshape(batch, heads, nq, -1))

    # --- activations ---------------------------------------------------------------------------
    def _elementwise(self, x, fn: Callable[[np.ndarray, np.ndarray], None]):
        xc = self._c(x)
        flat = np.ascontiguousarray(xc).reshape(-1)
        out = np.empty(flat.shape, self.compute)
        # fn makes several passes (GELU ~20): over cache-sized chunks they stay in L2 instead of
        # streaming the whole tensor through memory each time (4x faster GELU, same bits)
        step = _GRAIN

        def run(worker, first, last):
            for chunk in range(first, last):
                lo, hi = chunk * step, min(flat.size, (chunk + 1) * step)
                fn(flat[lo:hi], out[lo:hi])

        self._parallel(run, -(-flat.size // step))
        return self._s(out.reshape(xc.shape))

    @staticmethod
    def _sigmoid_times(x, z, out):
        """out = x * sigmoid(z) = x / (1 + exp(-z)), in place in `out`."""
        np.negative(z, out=out)
        np.exp(out, out=out)
        out += 1.0
        np.divide(x, out, out=out)

    def silu(self, x):
        return self._elementwise(x, lambda xs, out: self._sigmoid_times(xs, xs, out))

    def quick_gelu(self, x):
        factor = self.compute.type(1.702)
        return self._elementwise(x, lambda xs, out: self._sigmoid_times(xs, xs * factor, out))

    def gelu(self, x):
        if self.compute == np.float32:
            return self._elementwise(x, _gelu_f32)

        def fn(xs, out):  # float64: 0.5 x (1 + erf(x / sqrt 2)), the reference's formula
            e = _erf_f64(xs * _SQRT_HALF)
            e += 1.0
            e *= xs
            np.multiply(e, 0.5, out=out)

        return self._elementwise(x, fn)

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

    def std(self, x, axes):
        return self._s(np.std(self._c(x), axis=tuple(axes), ddof=1, keepdims=True))

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
