"""Error metrics for one pair of tensors (reference, candidate), computed in chunks.

Pure numpy (+ ml_dtypes for bfloat16): no torch, no model code. `tensor_metrics` makes no full-size
temporary: both inputs are walked in chunks of `CHUNK` elements with a fixed set of per-worker scratch
buffers. Extra memory is a few MiB plus the ULP tail kept for the exact p99 (the ~1.5% largest ULP
distances as uint64, i.e. about 3% of an fp32 tensor's bytes). One pass over the data computes
everything; a second pass happens only if the sampled p99 guess was too high (see _Tail).

Float tensors (`FloatMetrics`):
  max_abs, mean_abs        over elements finite on both sides
  max_rel                  max |c - r| / |r| (0/0 counts as 0, x/0 as inf), with the worst element's
                           flat index, multi-index and both values
  rel_l2                   ||c - r|| / ||r|| (0 when both norms are 0, inf when only ||r|| is)
  cosine_similarity, cosine_distance (1 - cos, computed without cancellation), sqnr_db
  ulp_max / ulp_mean / ulp_p99
                           distance in units in the last place of the CANDIDATE's dtype, between the
                           candidate and the reference rounded to that dtype (integer reinterpretation
                           of the bits; -0 and +0 are 0 apart); p99 is exact (inverted-CDF quantile)
  ref_nan, cand_nan, ref_inf, cand_inf, ref_fp16_overflow (finite |ref| > 65504)
  nonfinite_mismatch       positions where either side is NaN/Inf and the two do not agree
                           (NaN vs NaN and +inf vs +inf agree)
  allclose_violations      elements with |c - r| > atol + rtol * |r| for the rtol/atol passed in
  ref_abs_max              max |r| over finite pairs (the scale used by the outlier guard)

Integer and bool tensors (`ExactMetrics`): mismatches and max |c - r| (exact, int64 or float64).

Accuracy: the fp32 fast path accumulates per-chunk float32 BLAS dot products into Python floats
(float64); every other path (float64 data, mixed dtypes, chunks holding NaN/Inf) computes in
float64. Reported norms are accurate to ~1e-6 relative, far below anything a verdict depends on.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import ml_dtypes
import numpy as np

CHUNK = 1 << 16
FP16_MAX = 65504.0
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
# Workers per tensor (opt-in with PARITY_THREADS=N). One by default: the per-chunk numpy calls are a
# few microseconds each, and on the 2-core development machine two workers were no faster than one
# (1.00 vs 1.00 GB/s at 32K-element chunks; slower with larger chunks) because of GIL hand-offs.
DEFAULT_THREADS = max(1, int(os.environ.get("PARITY_THREADS", 1) or 1))
_PARALLEL_MIN_CHUNKS = 8
_GUESS_MIN = 1 << 19  # below this many elements the exact top-K costs nothing worth a sample
_GUESS_SAMPLE = 1 << 16

# Bits of each float dtype: the signed integer type of the same width and its magnitude mask.
_BITS = {
    "float64": (np.int64, np.uint64, 0x7FFF_FFFF_FFFF_FFFF),
    "float32": (np.int32, np.uint32, 0x7FFF_FFFF),
    "float16": (np.int16, np.uint32, 0x7FFF),
    "bfloat16": (np.int16, np.uint32, 0x7FFF),
}
# The wide unsigned type a ULP distance is computed in (m_r + m_c must not overflow).
_ULP_WIDE = {"float64": np.uint64, "float32": np.uint64, "float16": np.uint32, "bfloat16": np.uint32}


def dtype_name(array_or_dtype: Any) -> str:
    dt = np.dtype(getattr(array_or_dtype, "dtype", array_or_dtype))
    return "bfloat16" if dt == BFLOAT16 else dt.name


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def eps(dtype: str) -> float:
    """Machine epsilon (the ULP of 1.0) of a float dtype."""
    return {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[dtype]


@dataclass
class FloatMetrics:
    numel: int
    ref_dtype: str
    cand_dtype: str
    ulp_dtype: str
    finite: int  # pairs finite on both sides; the error statistics below are over these
    max_abs: float
    mean_abs: float
    max_rel: float
    worst_index: int | None  # flat index of the max_rel element (None when no finite pair)
    worst_multi_index: list[int] | None
    worst_ref: float | None
    worst_cand: float | None
    rel_l2: float
    cosine_similarity: float
    cosine_distance: float
    sqnr_db: float
    ulp_max: int
    ulp_mean: float
    ulp_p99: int
    ref_nan: int
    cand_nan: int
    ref_inf: int
    cand_inf: int
    ref_fp16_overflow: int
    nonfinite_mismatch: int
    ref_abs_max: float
    ref_l2: float
    diff_l2: float
    rtol: float | None = None
    atol: float | None = None
    allclose_violations: int | None = None
    kind: str = field(default="float")

    def to_dict(self) -> dict[str, Any]:
        # shallow: the values are plain numbers, lists and dicts already (asdict's deep copy is slow)
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ExactMetrics:
    numel: int
    ref_dtype: str
    cand_dtype: str
    mismatches: int
    max_abs: float
    first_mismatch_index: int | None
    first_mismatch_multi_index: list[int] | None
    first_mismatch_ref: Any
    first_mismatch_cand: Any
    kind: str = field(default="exact")

    def to_dict(self) -> dict[str, Any]:
        # shallow: the values are plain numbers, lists and dicts already (asdict's deep copy is slow)
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class OracleError:
    """How far one tensor is from the fp64 oracle, over the elements where the oracle is finite."""

    rel_l2: float  # ||x - o|| / ||o|| (0 when both are 0, inf when only ||o|| is)
    rms: float  # ||x - o|| / sqrt(number of elements summed)
    max_abs: float  # max |x - o|
    oracle_l2: float
    oracle_abs_max: float
    nonfinite: int  # elements where the oracle is finite and x is not (left out of the sums above)
    numel: int

    def to_dict(self) -> dict[str, Any]:
        # shallow: the values are plain numbers, lists and dicts already (asdict's deep copy is slow)
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------------------------
# exact p99 of a stream: keep the K largest values seen so far


_INT_MAX: dict[np.dtype, int] = {}


def _int_max(dtype: np.dtype) -> int:
    top = _INT_MAX.get(dtype)
    if top is None:
        top = _INT_MAX[dtype] = int(np.iinfo(dtype).max)
    return top


class _TopK:
    """The K largest values of a stream (exactly), using a threshold so most chunks cost one compare."""

    def __init__(self, k: int):
        self.k = k
        self.parts: list[np.ndarray] = []
        self.size = 0
        self.threshold = None  # values <= threshold can no longer reach the top K

    def add(self, values: np.ndarray, mask_buffer: np.ndarray | None = None) -> None:
        """Offer non-negative integer values (any int/uint dtype); they are kept as uint64."""
        if self.k <= 0 or values.size == 0:
            return
        if self.threshold is not None:
            if self.threshold >= _int_max(values.dtype):
                return
            out = mask_buffer[: values.size] if mask_buffer is not None else None
            mask = np.greater(values, self.threshold, out=out)
            if not mask.any():
                return
            values = values[mask]
        self.parts.append(values.astype(np.uint64))  # always a copy: callers reuse their buffers
        self.size += values.size
        if self.size >= 2 * self.k:
            self._compact()

    def _compact(self) -> None:
        merged = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        if merged.size > self.k:
            merged = np.partition(merged, merged.size - self.k)[merged.size - self.k:]
            self.threshold = int(merged.min())
        self.parts = [merged]
        self.size = merged.size

    def merge(self, other: "_TopK") -> None:
        self.parts.extend(other.parts)
        self.size += other.size
        if self.size > self.k:
            self._compact()

    def kth_largest(self, k: int):
        """The k-th largest value seen (k <= the K this was built with), or None for k == 0."""
        if k <= 0 or self.size == 0:
            return None
        merged = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        k = min(k, merged.size)
        return np.partition(merged, merged.size - k)[merged.size - k]


class _Tail:
    """The exact k-th largest of a stream, starting from a guessed threshold (from a sample).

    Values at or above the guess go to a _TopK (which keeps the k largest of them). At the end, if at
    least k values reached the guess the answer is the k-th largest of those; otherwise (the guess
    was too high) `kth_largest` returns None and the caller makes a second, exact pass. The guess
    only changes the speed, never the result.
    """

    def __init__(self, k: int, guess: int | None):
        self.k = k
        self.guess = guess
        self.at_least = 0
        self.top = _TopK(k)

    def add(self, values: np.ndarray, mask_buffer: np.ndarray | None = None) -> None:
        if self.guess is None:
            self.top.add(values, mask_buffer)
            return
        if values.size == 0 or self.guess > _int_max(values.dtype):
            return
        out = mask_buffer[: values.size] if mask_buffer is not None else None
        mask = np.greater_equal(values, self.guess, out=out)
        count = int(np.count_nonzero(mask))
        if count:
            self.at_least += count
            self.top.add(values[mask])

    def merge(self, other: "_Tail") -> None:
        self.at_least += other.at_least
        self.top.merge(other.top)

    def kth_largest(self, k: int):
        if k <= 0:
            return None
        if self.guess is None or self.at_least >= k:
            return self.top.kth_largest(k)
        return None


def p99_rank_count(n: int) -> int:
    """How many of the largest values the inverted-CDF 99th percentile of n values lies among."""
    return n - math.ceil(0.99 * n) + 1 if n else 0


# ---------------------------------------------------------------------------------------------------
# ULP distance


def ulp_distance(ref: np.ndarray, cand: np.ndarray, ulp_dtype: str) -> np.ndarray:
    """Distance in ULPs of `ulp_dtype` between cand and ref rounded to that dtype (unsigned ints).

    Both are reinterpreted as sign-magnitude integers: same sign -> |m_r - m_c|, opposite signs ->
    m_r + m_c (so -0 and +0 are 0 apart and the distance across zero counts the values in between).
    """
    target = BFLOAT16 if ulp_dtype == "bfloat16" else np.dtype(ulp_dtype)
    r = ref if ref.dtype == target else ref.astype(target)
    c = cand if cand.dtype == target else cand.astype(target)
    signed, _, mask = _BITS[ulp_dtype]
    wide = _ULP_WIDE[ulp_dtype]
    rb = r.view(signed)
    cb = c.view(signed)
    m_r = (rb & mask).astype(wide)
    m_c = (cb & mask).astype(wide)
    same = (rb < 0) == (cb < 0)
    hi = np.maximum(m_r, m_c)
    lo = np.minimum(m_r, m_c)
    out = np.where(same, hi - lo, m_r + m_c)
    return out


# ---------------------------------------------------------------------------------------------------
# float metrics


class _Acc:
    """One worker's running sums over its chunks."""

    def __init__(self, k: int, guess: int | None = None):
        self.finite = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.dd = 0.0
        self.dr = 0.0
        self.rr = 0.0
        self.max_rel = -1.0
        self.worst_index: int | None = None
        self.worst_ref = None
        self.worst_cand = None
        self.ulp_sum = 0
        self.ulp_max = 0
        self.topk = _Tail(k, guess)
        self.violations = 0
        self.ref_abs_max = 0.0
        self.overflow = 0
        self.ref_nan = self.cand_nan = self.ref_inf = self.cand_inf = 0
        self.nonfinite_mismatch = 0

    def merge(self, o: "_Acc") -> None:
        self.finite += o.finite
        self.sum_abs += o.sum_abs
        self.max_abs = max(self.max_abs, o.max_abs)
        self.dd += o.dd
        self.dr += o.dr
        self.rr += o.rr
        if o.max_rel > self.max_rel or (o.max_rel == self.max_rel and o.worst_index is not None
                                         and (self.worst_index is None or o.worst_index < self.worst_index)):
            self.max_rel, self.worst_index = o.max_rel, o.worst_index
            self.worst_ref, self.worst_cand = o.worst_ref, o.worst_cand
        self.ulp_sum += o.ulp_sum
        self.ulp_max = max(self.ulp_max, o.ulp_max)
        self.topk.merge(o.topk)
        self.violations += o.violations
        self.ref_abs_max = max(self.ref_abs_max, o.ref_abs_max)
        self.overflow += o.overflow
        self.ref_nan += o.ref_nan
        self.cand_nan += o.cand_nan
        self.ref_inf += o.ref_inf
        self.cand_inf += o.cand_inf
        self.nonfinite_mismatch += o.nonfinite_mismatch

    def note_rel(self, rel_max: float, index: int, ref_value, cand_value) -> None:
        if rel_max > self.max_rel or (rel_max == self.max_rel and (self.worst_index is None
                                                                    or index < self.worst_index)):
            self.max_rel = rel_max
            self.worst_index = index
            self.worst_ref = float(ref_value)
            self.worst_cand = float(cand_value)


def _buffers(acc: _Acc, chunk: int) -> _Acc:
    if not hasattr(acc, "b_d"):  # scratch reused by every chunk: no allocation or page faults in the loop
        acc.b_d = np.empty(chunk, np.float32)
        acc.b_r = np.empty(chunk, np.float32)
        acc.b_t = np.empty(chunk, np.float32)
        acc.b_i = np.empty(chunk, np.int32)
        acc.b_m = np.empty(chunk, np.bool_)
        acc.b_one = np.ones(chunk, np.float32)
    return acc


def _fast_chunk(acc: _Acc, r: np.ndarray, c: np.ndarray, base: int, rtol: float, atol: float,
                ulp_source: tuple[np.ndarray, np.ndarray, str] | None) -> bool:
    """A float32 chunk pair (possibly widened from 16-bit); False, with nothing changed, on NaN/Inf.

    `ulp_source` is None when the ULP dtype is float32 (r and c are then the exact bits to compare),
    else (ref chunk, cand chunk, dtype) in their original dtypes.
    """
    n = r.size
    d = np.subtract(c, r, out=acc.b_d[:n])
    dd = float(np.dot(d, d))  # sdot stays single-threaded in OpenBLAS here (measured); see _dot for ddot
    dr = float(np.dot(d, r))
    rr = float(np.dot(r, r))
    if not (math.isfinite(dd) and math.isfinite(dr) and math.isfinite(rr)):
        return False  # a NaN/Inf somewhere (or float32 overflow of a square): the general path decides
    acc.dd += dd
    acc.dr += dr
    acc.rr += rr
    acc.finite += n
    ad = np.abs(d, out=d)
    ar = np.abs(r, out=acc.b_r[:n])
    mx = float(ad.max())
    acc.max_abs = max(acc.max_abs, mx)
    acc.sum_abs += float(np.dot(ad, acc.b_one[:n]))  # BLAS: faster than ad.sum(), same accuracy class
    armax = float(ar.max())
    acc.ref_abs_max = max(acc.ref_abs_max, armax)
    if armax > FP16_MAX:
        acc.overflow += int(np.count_nonzero(ar > FP16_MAX))
    t = acc.b_t[:n]
    m = acc.b_m[:n]
    if mx > atol:  # otherwise no element can violate |d| <= atol + rtol |r|
        np.greater(ad, np.float32(atol), out=m)  # only these elements can violate it
        above = int(np.count_nonzero(m))
        if above * 8 < n:
            acc.violations += int(np.count_nonzero(ad[m] > np.float32(atol) + np.float32(rtol) * ar[m]))
        else:
            np.multiply(ar, np.float32(rtol), out=t)
            t += np.float32(atol)
            np.greater(ad, t, out=m)
            acc.violations += int(np.count_nonzero(m))
    q = np.divide(ad, ar, out=t)  # 0/0 -> nan (skipped by fmax), x/0 -> inf (errstate set by caller)
    qmax = float(np.fmax.reduce(q))
    if qmax != qmax:
        qmax = 0.0  # every pair in the chunk is 0/0: exact zeros
        if acc.worst_index is None:
            acc.note_rel(0.0, base, r[0], c[0])
    elif qmax > acc.max_rel or acc.worst_index is None:
        i = int(np.argmax(np.equal(q, np.float32(qmax), out=m)))
        acc.note_rel(qmax, base + i, r[i], c[i])
    # ULP distance from the integer bits. Same-sign pairs: |bits_r - bits_c| < 2^(w-1) for w-bit floats.
    # qmax < 1 rules out opposite signs, except +-0 vs -+0, which shows up as exactly 2^(w-1); both
    # cases go through the general formula.
    if ulp_source is None:
        rb, cb, half = r.view(np.int32), c.view(np.int32), 2 ** 31
    else:
        ref_chunk, cand_chunk, ulp_dtype = ulp_source
        target = BFLOAT16 if ulp_dtype == "bfloat16" else np.dtype(ulp_dtype)
        rounded = ref_chunk if ref_chunk.dtype == target else ref_chunk.astype(target)
        rb, cb, half = rounded.view(np.int16), cand_chunk.view(np.int16), 2 ** 15
    u = np.subtract(rb, cb, out=acc.b_i[:n], dtype=np.int32)  # int32 bits wrap; 16-bit ones cannot
    np.abs(u, out=u)
    umax = int(u.view(np.uint32).max())
    if qmax < 1.0 and umax < half:
        acc.ulp_max = max(acc.ulp_max, umax)
        acc.ulp_sum += int(u.sum(dtype=np.int32 if umax * n < 2 ** 31 else np.int64))
        acc.topk.add(u, acc.b_m)
        return True
    _add_ulps(acc, ulp_distance(r, c, "float32") if ulp_source is None else ulp_distance(*ulp_source))
    return True


def _add_ulps(acc: _Acc, dist: np.ndarray) -> None:
    top = int(dist.max()) if dist.size else 0
    acc.ulp_max = max(acc.ulp_max, top)
    # exact integer sum unless float64 distances are so large that uint64 could wrap
    acc.ulp_sum += int(dist.sum()) if top < 2 ** 40 else float(dist.sum(dtype=np.float64))
    acc.topk.add(dist)


def _general_chunk(acc: _Acc, r: np.ndarray, c: np.ndarray, base: int, rtol: float, atol: float,
                   ulp_dtype: str) -> None:
    """Any float dtypes, NaN/Inf allowed: computes in float64 over the pairs finite on both sides."""
    r64 = r.astype(np.float64)
    c64 = c.astype(np.float64)
    fr = np.isfinite(r64)
    fc = np.isfinite(c64)
    both = fr & fc
    index = None
    ar_all = np.abs(r64)
    ref_inf = 0
    if not both.all():
        rn, cn = np.isnan(r64), np.isnan(c64)
        ref_inf = int((~fr & ~rn).sum())
        acc.ref_nan += int(rn.sum())
        acc.cand_nan += int(cn.sum())
        acc.ref_inf += ref_inf
        acc.cand_inf += int((~fc & ~cn).sum())
        agree = (rn & cn) | (~fr & ~fc & (r64 == c64))
        acc.nonfinite_mismatch += int((~both & ~agree).sum())
    acc.overflow += int(np.count_nonzero(ar_all > FP16_MAX)) - ref_inf  # finite |ref| > 65504
    if not both.all():
        index = np.flatnonzero(both)
        r, c, r64, c64 = r[both], c[both], r64[both], c64[both]
    n = r64.size
    if n == 0:
        return
    acc.finite += n
    d = c64 - r64
    acc.dd += _dot(d, d)
    acc.dr += _dot(d, r64)
    acc.rr += _dot(r64, r64)
    ad = np.abs(d)
    ar = np.abs(r64)
    acc.max_abs = max(acc.max_abs, float(ad.max()))
    acc.sum_abs += float(ad.sum())
    acc.ref_abs_max = max(acc.ref_abs_max, float(ar.max()))
    acc.violations += int(np.count_nonzero(ad > atol + rtol * ar))
    q = ad / ar  # (errstate set by the caller)
    q[np.isnan(q)] = 0.0  # 0/0
    i = int(np.argmax(q))
    where = base + (int(index[i]) if index is not None else i)
    acc.note_rel(float(q[i]), where, r64[i], c64[i])
    _add_ulps(acc, ulp_distance(r, c, ulp_dtype))


# OpenBLAS runs ddot on its thread pool above 10000 elements; waking those threads for every chunk cost
# milliseconds per call on a busy machine (fp64 metrics ran 6x slower). sdot measured single-threaded.
_DOT_PIECE = 8192


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product in pieces small enough for OpenBLAS to stay on the calling thread."""
    if a.size <= _DOT_PIECE:
        return float(np.dot(a, b))
    return float(sum(np.dot(a[i:i + _DOT_PIECE], b[i:i + _DOT_PIECE]) for i in range(0, a.size, _DOT_PIECE)))



def _widen(array: np.ndarray) -> np.ndarray:
    """bfloat16/float16 chunks are widened to float32 (exactly); float32 stays."""
    return array if array.dtype == np.float32 else array.astype(np.float32)


def tensor_metrics(ref: np.ndarray, cand: np.ndarray, *, rtol: float = 0.0, atol: float = 0.0,
                   threads: int | None = None, chunk: int = CHUNK) -> FloatMetrics | ExactMetrics:
    """All metrics for one pair of equal-size arrays. An integer/bool reference -> exact metrics."""
    ref_dtype, cand_dtype = dtype_name(ref), dtype_name(cand)
    if ref.size != cand.size:
        raise ValueError(f"sizes differ: {ref.shape} vs {cand.shape}")
    if not is_float(ref_dtype):
        return exact_metrics(ref, cand)
    if not is_float(cand_dtype):
        cand = cand.astype(ref.dtype)  # an integer candidate for a float reference: judged in ref's dtype
    return float_metrics(ref, cand, rtol=rtol, atol=atol, threads=threads, chunk=chunk)


def float_metrics(ref: np.ndarray, cand: np.ndarray, *, rtol: float = 0.0, atol: float = 0.0,
                  threads: int | None = None, chunk: int = CHUNK) -> FloatMetrics:
    shape = tuple(ref.shape)
    r = np.ascontiguousarray(ref).reshape(-1)
    c = np.ascontiguousarray(cand).reshape(-1)
    n = r.size
    ref_dtype, ulp_dtype = dtype_name(r), dtype_name(c)
    if ref_dtype == "float32" and ulp_dtype == "float32":
        mode = "fast"
    elif "float64" in (ref_dtype, ulp_dtype):
        mode = "general"
    else:
        mode = "widen"
    k = p99_rank_count(n)
    chunks = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    workers = threads if threads is not None else DEFAULT_THREADS
    workers = max(1, min(workers, len(chunks) // _PARALLEL_MIN_CHUNKS or 1))
    guess = _p99_guess(r, c, ulp_dtype) if n >= _GUESS_MIN else None

    def work(part: list[tuple[int, int]]) -> _Acc:
        acc = _Acc(k, guess)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for start, stop in part:
                _one(acc, start, stop)
        return acc

    def _one(acc: _Acc, start: int, stop: int) -> None:
        rs, cs = r[start:stop], c[start:stop]
        if mode == "fast":
            done = _fast_chunk(_buffers(acc, chunk), rs, cs, start, rtol, atol, None)
        elif mode == "widen":
            source = None if ulp_dtype == "float32" else (rs, cs, ulp_dtype)
            done = _fast_chunk(_buffers(acc, chunk), _widen(rs), _widen(cs), start, rtol, atol, source)
        else:
            done = False
        if not done:
            _general_chunk(acc, rs, cs, start, rtol, atol, ulp_dtype)

    if workers == 1:
        acc = work(chunks)
    else:
        parts = [chunks[w::workers] for w in range(workers)]
        futures = [_pool(workers).submit(work, part) for part in parts[1:]]
        accs = [work(parts[0])] + [f.result() for f in futures]  # this thread takes the first share
        acc = accs[0]
        for other in accs[1:]:
            acc.merge(other)
    kk = p99_rank_count(acc.finite)
    p99 = acc.topk.kth_largest(kk)
    if p99 is None and kk:  # the sampled guess was above the true p99: one exact pass more
        p99 = _p99_exact(r, c, ulp_dtype, kk, chunk * 4)
    return _finish(acc, shape, n, ref_dtype, ulp_dtype, rtol, atol, p99)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool, created once: starting threads per tensor costs more than small tensors."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers - 1:
            _POOL = ThreadPoolExecutor(max(1, workers - 1), thread_name_prefix="parity-metrics")
        return _POOL


def _finite_pairs(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.isfinite(r.astype(np.float64)) & np.isfinite(c.astype(np.float64))


def _p99_guess(r: np.ndarray, c: np.ndarray, ulp_dtype: str) -> int | None:
    """A threshold a little below the ULP p99, from a strided sample of ~64K pairs (speed only)."""
    step = max(1, r.size // _GUESS_SAMPLE)
    rs, cs = r[::step], c[::step]
    keep = _finite_pairs(rs, cs)
    dist = ulp_distance(rs[keep], cs[keep], ulp_dtype)
    if dist.size < 1000:
        return None
    return int(np.percentile(dist, 98.5, method="inverted_cdf"))  # ~1.5% of values reach it


def _p99_exact(r: np.ndarray, c: np.ndarray, ulp_dtype: str, kk: int, chunk: int) -> int:
    top = _TopK(kk)
    for start in range(0, r.size, chunk):
        rs, cs = r[start:start + chunk], c[start:start + chunk]
        keep = _finite_pairs(rs, cs)
        top.add(ulp_distance(rs[keep], cs[keep], ulp_dtype))
    value = top.kth_largest(kk)
    return int(value) if value is not None else 0


def _finish(acc: _Acc, shape, n, ref_dtype, cand_dtype, rtol, atol, p99) -> FloatMetrics:
    finite = acc.finite
    dd, rr = max(acc.dd, 0.0), max(acc.rr, 0.0)
    cc = max(rr + 2.0 * acc.dr + dd, 0.0)
    ref_l2, diff_l2, cand_l2 = math.sqrt(rr), math.sqrt(dd), math.sqrt(cc)
    if ref_l2 > 0:
        rel_l2 = diff_l2 / ref_l2
    else:
        rel_l2 = 0.0 if diff_l2 == 0 else math.inf
    if ref_l2 > 0 and cand_l2 > 0:
        # 1 - cos = (||d||^2 - (||c|| - ||r||)^2) / (2 ||r|| ||c||), with ||c|| - ||r|| from d.r and d.d
        norm_gap = (2.0 * acc.dr + dd) / (cand_l2 + ref_l2)
        cos_dist = min(2.0, max(0.0, (dd - norm_gap * norm_gap) / (2.0 * ref_l2 * cand_l2)))
        cos_sim = 1.0 - cos_dist
    elif ref_l2 == 0 and cand_l2 == 0:
        cos_sim, cos_dist = 1.0, 0.0  # two zero tensors: identical
    else:
        cos_sim, cos_dist = 0.0, 1.0  # one side is all zeros: no angle; reported as orthogonal
    if dd == 0:
        sqnr = math.inf
    elif rr == 0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(rr / dd)
    worst_multi = None
    if acc.worst_index is not None:
        worst_multi = [int(i) for i in np.unravel_index(acc.worst_index, shape)] if shape else []
    return FloatMetrics(
        numel=n, ref_dtype=ref_dtype, cand_dtype=cand_dtype, ulp_dtype=cand_dtype, finite=finite,
        max_abs=acc.max_abs, mean_abs=acc.sum_abs / finite if finite else 0.0,
        max_rel=max(acc.max_rel, 0.0) if finite else 0.0,
        worst_index=acc.worst_index, worst_multi_index=worst_multi,
        worst_ref=acc.worst_ref, worst_cand=acc.worst_cand,
        rel_l2=rel_l2, cosine_similarity=cos_sim, cosine_distance=cos_dist, sqnr_db=sqnr,
        ulp_max=int(acc.ulp_max), ulp_mean=acc.ulp_sum / finite if finite else 0.0,
        ulp_p99=int(p99) if p99 is not None else 0,
        ref_nan=acc.ref_nan, cand_nan=acc.cand_nan, ref_inf=acc.ref_inf, cand_inf=acc.cand_inf,
        ref_fp16_overflow=acc.overflow, nonfinite_mismatch=acc.nonfinite_mismatch,
        ref_abs_max=acc.ref_abs_max, ref_l2=ref_l2, diff_l2=diff_l2,
        rtol=rtol, atol=atol, allclose_violations=acc.violations,
    )


# ---------------------------------------------------------------------------------------------------
# integer / bool tensors


def exact_metrics(ref: np.ndarray, cand: np.ndarray, chunk: int = CHUNK * 4) -> ExactMetrics:
    shape = tuple(ref.shape)
    r = np.ascontiguousarray(ref).reshape(-1)
    c = np.ascontiguousarray(cand).reshape(-1)
    as_float = is_float(dtype_name(r)) or is_float(dtype_name(c))
    wide = np.float64 if as_float else np.int64
    mismatches = 0
    max_abs = 0
    first = None
    for start in range(0, r.size, chunk):
        rs = r[start:start + chunk].astype(wide)
        cs = c[start:start + chunk].astype(wide)
        differ = rs != cs
        if as_float:
            differ &= ~(np.isnan(rs) & np.isnan(cs))
        count = int(np.count_nonzero(differ))
        if count:
            mismatches += count
            with np.errstate(invalid="ignore"):
                max_abs = max(max_abs, np.abs(cs - rs)[differ].max())
            if first is None:
                first = start + int(np.argmax(differ))
    first_multi = [int(i) for i in np.unravel_index(first, shape)] if first is not None and shape else None
    return ExactMetrics(
        numel=int(r.size), ref_dtype=dtype_name(r), cand_dtype=dtype_name(c), mismatches=mismatches,
        max_abs=float(max_abs), first_mismatch_index=first, first_mismatch_multi_index=first_multi,
        first_mismatch_ref=_scalar(r[first]) if first is not None else None,
        first_mismatch_cand=_scalar(c[first]) if first is not None else None,
    )


def _scalar(value):
    """A JSON-friendly Python scalar (bool, int or float) for one array element."""
    if np.asarray(value).dtype == BFLOAT16:
        return float(value)
    return value.item() if hasattr(value, "item") else value


# ---------------------------------------------------------------------------------------------------
# error against an oracle (calibrated tolerances)


def oracle_error(x: np.ndarray, oracle: np.ndarray, chunk: int = CHUNK * 4) -> OracleError:
    """Error of x against the oracle, in float64, chunk by chunk."""
    xf = np.ascontiguousarray(x).reshape(-1)
    of = np.ascontiguousarray(oracle).reshape(-1)
    if xf.size != of.size:
        raise ValueError(f"sizes differ: {x.shape} vs {oracle.shape}")
    dd = oo = 0.0
    max_abs = o_max = 0.0
    nonfinite = kept = 0
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, xf.size, chunk):
            o = of[start:start + chunk].astype(np.float64)
            v = xf[start:start + chunk].astype(np.float64)
            d = v - o
            sd, so = _dot(d, d), _dot(o, o)
            if not (math.isfinite(sd) and math.isfinite(so)):
                fo = np.isfinite(o)
                bad = fo & ~np.isfinite(v)
                nonfinite += int(bad.sum())
                keep = fo & ~bad
                d, o = d[keep], o[keep]
                sd, so = _dot(d, d), _dot(o, o)
            if d.size:
                kept += d.size
                dd += sd
                oo += so
                max_abs = max(max_abs, float(np.abs(d).max()))
                o_max = max(o_max, float(np.abs(o).max()))
    n = int(xf.size)
    o_l2 = math.sqrt(oo)
    rel = math.sqrt(dd) / o_l2 if o_l2 > 0 else (0.0 if dd == 0 else math.inf)
    return OracleError(rel_l2=rel, rms=math.sqrt(dd / kept) if kept else 0.0, max_abs=max_abs, oracle_l2=o_l2,
                       oracle_abs_max=o_max, nonfinite=nonfinite, numel=n)
