"""Metrics for one tensor pair, against values worked out by hand or with plain numpy."""
import math

import ml_dtypes
import numpy as np
import pytest

from sd_parity.judging import metrics
from sd_parity.judging.metrics import (ExactMetrics, FloatMetrics, _Tail, _TopK, exact_metrics, float_metrics, oracle_error,
                            p99_rank_count, tensor_metrics, ulp_distance)

BF16 = ml_dtypes.bfloat16


def test_small_float32_by_hand():
    r = np.array([1.0, 2.0, -3.0, 0.0], np.float32)
    c = np.array([1.0, 2.5, -2.0, 0.0], np.float32)
    m = tensor_metrics(r, c, rtol=0.1, atol=0.1)
    assert isinstance(m, FloatMetrics)
    assert m.max_abs == 1.0
    assert m.mean_abs == pytest.approx(1.5 / 4)
    # relative errors 0, 0.25, 1/3, 0/0 -> 0: the worst is element 2
    assert m.max_rel == pytest.approx(1 / 3, rel=1e-6)
    assert (m.worst_index, m.worst_multi_index, m.worst_ref, m.worst_cand) == (2, [2], -3.0, -2.0)
    assert m.rel_l2 == pytest.approx(math.sqrt(1.25 / 14), rel=1e-7)
    assert m.cosine_similarity == pytest.approx(12 / math.sqrt(14 * 11.25), rel=1e-7)
    assert m.cosine_distance == pytest.approx(1 - 12 / math.sqrt(14 * 11.25), rel=1e-6)
    assert m.sqnr_db == pytest.approx(10 * math.log10(14 / 1.25), rel=1e-7)
    # fp32 ULP: 2 -> 2.5 is 0.5 / 2^-22 = 2^21 apart, -3 -> -2 is 1 / 2^-22 = 2^22
    assert m.ulp_max == 2 ** 22
    assert m.ulp_mean == pytest.approx((2 ** 21 + 2 ** 22) / 4)
    assert m.ulp_p99 == 2 ** 22
    # |d| > 0.1 + 0.1 |r|: 0.5 > 0.3 and 1 > 0.4
    assert m.allclose_violations == 2
    assert (m.ref_nan, m.cand_nan, m.ref_inf, m.cand_inf, m.nonfinite_mismatch) == (0, 0, 0, 0, 0)
    assert m.ref_abs_max == 3.0 and m.finite == 4


def test_float64_path_gives_the_same_errors_and_fp64_ulps():
    r = np.array([1.0, 2.0, -3.0, 0.0])
    c = np.array([1.0, 2.5, -2.0, 0.0])
    m = tensor_metrics(r, c, rtol=0.1, atol=0.1)
    assert m.max_abs == 1.0 and m.max_rel == pytest.approx(1 / 3) and m.worst_index == 2
    assert m.rel_l2 == pytest.approx(math.sqrt(1.25 / 14))
    assert m.allclose_violations == 2
    assert m.ulp_dtype == "float64"
    assert m.ulp_max == 2 ** 51  # 1 / 2^-51 in [2, 4)
    assert m.ulp_p99 == 2 ** 51


def test_worst_element_multi_index_and_first_of_ties():
    r = np.ones((2, 3), np.float32)
    c = r.copy()
    c[1, 1] = 1.5
    c[1, 2] = 1.5
    m = tensor_metrics(r, c)
    assert m.worst_index == 4 and m.worst_multi_index == [1, 1]
    assert m.max_rel == 0.5 and m.worst_ref == 1.0 and m.worst_cand == 1.5


def test_relative_error_against_zero_is_infinite():
    r = np.array([0.0, 1.0], np.float32)
    c = np.array([1e-3, 1.0], np.float32)
    m = tensor_metrics(r, c)
    assert m.max_rel == math.inf and m.worst_index == 0


def test_nan_inf_counts_and_mismatch():
    nan, inf = np.nan, np.inf
    r = np.array([1.0, nan, inf, 2.0, -inf, 5.0], np.float32)
    c = np.array([1.0, nan, inf, nan, 1.0, 5.5], np.float32)
    m = tensor_metrics(r, c, rtol=0.0, atol=0.1)
    assert (m.ref_nan, m.cand_nan, m.ref_inf, m.cand_inf) == (1, 2, 2, 1)
    assert m.nonfinite_mismatch == 2  # 2 vs nan and -inf vs 1; nan/nan and inf/inf agree
    assert m.finite == 2  # statistics over positions 0 and 5 only
    assert m.max_abs == 0.5 and m.mean_abs == 0.25
    assert m.allclose_violations == 1
    assert m.worst_index == 5


def test_fp16_overflow_and_ulps_in_the_candidate_dtype():
    r = np.array([70000.0, -65505.0, 65504.0, 1.0], np.float32)
    c = np.array([65504.0, -65504.0, 65504.0, 1.0], np.float16)
    m = tensor_metrics(r, c)
    assert m.ref_fp16_overflow == 2  # 70000 and 65505 exceed the fp16 maximum 65504
    assert m.ulp_dtype == "float16"
    # 70000 rounds to +inf in fp16, one ULP above 65504; -65505 rounds to -65504
    assert m.ulp_max == 1 and m.ulp_mean == 0.25


def test_ulp_distance_across_zero_and_signed_zeros():
    tiny = np.float32(1.4e-45)  # smallest subnormal
    r = np.array([0.0, -0.0, tiny, -tiny, 1.0, 1.0], np.float32)
    c = np.array([-0.0, 0.0, -tiny, tiny, np.nextafter(np.float32(1), np.float32(2)),
                  np.nextafter(np.float32(1), np.float32(0))], np.float32)
    assert list(ulp_distance(r, c, "float32")) == [0, 0, 2, 2, 1, 1]
    m = tensor_metrics(r, c)
    assert m.ulp_max == 2 and m.ulp_mean == pytest.approx(6 / 6)


def test_bfloat16_candidate_uses_bf16_ulps():
    r = np.array([1.0, 3.14159, -2.5], np.float32)
    c = np.array([1.0078125, 3.14159, -2.5], BF16)  # 1 + 2^-7 is the next bf16 after 1
    m = tensor_metrics(r, c)
    assert m.cand_dtype == "bfloat16" and m.ulp_dtype == "bfloat16"
    assert list(ulp_distance(r, c, "bfloat16")) == [1, 0, 0]
    assert m.ulp_max == 1
    assert m.max_abs == 0.0078125  # element 0; element 1 only differs by bf16 rounding (< 2^-7 * 2 / 2)
    assert m.mean_abs == pytest.approx((0.0078125 + abs(float(c[1]) - float(r[1]))) / 3, rel=1e-6)


def test_bfloat16_vs_bfloat16():
    r = np.array([1.0, 2.0, 4.0], BF16)
    c = np.array([1.0, 2.015625, 4.0], BF16)  # one bf16 ULP above 2 is 2^-6
    m = tensor_metrics(r, c)
    assert m.ulp_max == 1 and m.max_abs == 0.015625 and m.ref_dtype == "bfloat16"


def test_float64_ulp():
    r = np.array([1.0, -1.0])
    c = np.array([1.0 + 2 ** -52, -1.0])
    assert tensor_metrics(r, c).ulp_max == 1


def test_zero_norm_reference():
    zeros = np.zeros(5, np.float32)
    both = tensor_metrics(zeros, zeros)
    assert both.rel_l2 == 0.0 and both.cosine_similarity == 1.0 and both.sqnr_db == math.inf
    one = tensor_metrics(zeros, np.array([0, 0, 1e-3, 0, 0], np.float32))
    assert one.rel_l2 == math.inf and one.sqnr_db == -math.inf and one.cosine_similarity == 0.0


def test_cosine_distance_keeps_precision_near_one():
    rng = np.random.default_rng(3)
    r = rng.standard_normal(10_000).astype(np.float32)
    c = (r * (1 + 1e-6 * rng.standard_normal(r.size))).astype(np.float32)
    m = tensor_metrics(r, c)
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    d = c64 - r64
    nr, nc = np.linalg.norm(r64), np.linalg.norm(c64)
    exact = (np.dot(d, d) - (nc - nr) ** 2) / (2 * nr * nc)  # 1 - cos without cancellation
    assert 0 < exact < 1e-11
    assert m.cosine_distance == pytest.approx(exact, rel=1e-3)


def _naive_ulps_positive_fp32(r, c):
    return np.abs(r.view(np.int32).astype(np.int64) - c.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("n, threads", [(1, 1), (99, 1), (100, 1), (101, 1), (5_000, 1), (1 << 20, 1),
                                        (1 << 20, 2)])
def test_p99_is_the_exact_inverted_cdf_percentile(n, threads):
    rng = np.random.default_rng(n)
    r = rng.uniform(1, 2, n).astype(np.float32)
    c = (r + rng.standard_exponential(n).astype(np.float32) * 1e-6).astype(np.float32)
    naive = _naive_ulps_positive_fp32(r, c)
    m = float_metrics(r, c, threads=threads)
    assert m.ulp_p99 == int(np.percentile(naive, 99, method="inverted_cdf"))
    assert m.ulp_max == naive.max()
    assert m.ulp_mean == pytest.approx(naive.mean(), rel=1e-12)


def test_tail_falls_back_when_the_guess_is_too_high():
    values = np.arange(1000, dtype=np.int64)
    k = p99_rank_count(values.size)
    tail = _Tail(k, guess=995)  # the true 99th percentile is 989
    tail.add(values)
    assert tail.kth_largest(k) is None  # the caller must make the exact pass
    top = _TopK(k)
    for part in np.array_split(values, 7):
        top.add(part)
    assert top.kth_largest(k) == int(np.percentile(values, 99, method="inverted_cdf")) == 989


def test_p99_exact_pass_when_sample_guess_misses(monkeypatch):
    rng = np.random.default_rng(0)
    n = 1 << 20
    r = np.ones(n, np.float32)
    c = r.copy()
    c[rng.choice(n, n // 50, replace=False)] = np.nextafter(np.float32(1), np.float32(2))
    monkeypatch.setattr(metrics, "_p99_guess", lambda *a: 10 ** 6)  # far above the truth
    m = float_metrics(r, c)
    assert m.ulp_p99 == 1  # 2% of elements are 1 ULP off: the 99th percentile is 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64])
def test_chunking_and_threads_do_not_change_results(dtype):
    rng = np.random.default_rng(1)
    r = rng.standard_normal(50_000).astype(dtype)
    c = (r.astype(np.float64) + rng.standard_normal(r.size) * 1e-3).astype(dtype)
    c[17] = -r[17]
    r[30] = 0
    one = float_metrics(r, c, rtol=1e-3, atol=1e-5, threads=1)
    many = float_metrics(r, c, rtol=1e-3, atol=1e-5, threads=2, chunk=777)
    for field in ("max_abs", "max_rel", "worst_index", "ulp_max", "ulp_p99", "allclose_violations", "finite",
                  "ref_fp16_overflow"):
        assert getattr(one, field) == getattr(many, field), field
    for field in ("mean_abs", "rel_l2", "cosine_similarity", "ulp_mean"):
        assert getattr(one, field) == pytest.approx(getattr(many, field), rel=1e-5), field


def test_metrics_match_plain_numpy_on_random_data():
    rng = np.random.default_rng(7)
    r = (rng.standard_normal(200_000) * 10).astype(np.float32)
    c = (r + rng.standard_normal(r.size).astype(np.float32) * 1e-3).astype(np.float32)
    m = tensor_metrics(r, c, rtol=1e-4, atol=1e-4)
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    d = np.abs(c64 - r64)
    assert m.max_abs == pytest.approx(d.max(), rel=1e-6)
    assert m.mean_abs == pytest.approx(d.mean(), rel=1e-5)
    assert m.rel_l2 == pytest.approx(np.linalg.norm(c64 - r64) / np.linalg.norm(r64), rel=1e-5)
    with np.errstate(divide="ignore"):
        rel = d / np.abs(r64)
    assert m.max_rel == pytest.approx(rel.max(), rel=1e-5)
    assert m.worst_index == int(np.argmax(rel))
    expected = int(np.count_nonzero(d > 1e-4 + 1e-4 * np.abs(r64)))
    assert abs(m.allclose_violations - expected) <= 2  # float32 vs float64 rounding at the boundary
    cos = np.dot(r64, c64) / (np.linalg.norm(r64) * np.linalg.norm(c64))
    assert m.cosine_similarity == pytest.approx(cos, rel=1e-9)


def test_exact_metrics_for_integers_and_bools():
    ids = np.array([[49406, 320, 1000, 49407]], np.int64)
    other = np.array([[49406, 320, 1003, 49407]], np.int64)
    m = tensor_metrics(ids, other)
    assert isinstance(m, ExactMetrics)
    assert (m.mismatches, m.max_abs, m.first_mismatch_index, m.first_mismatch_multi_index) == (1, 3.0, 2, [0, 2])
    assert (m.first_mismatch_ref, m.first_mismatch_cand) == (1000, 1003)
    image = np.arange(6, dtype=np.uint8).reshape(2, 3)
    changed = image.copy()
    changed[1, 2] = 255
    assert exact_metrics(image, changed).max_abs == 250  # no uint8 wrap-around
    flags = exact_metrics(np.array([True, False]), np.array([True, True]))
    assert flags.mismatches == 1 and flags.max_abs == 1
    assert exact_metrics(ids, ids).mismatches == 0


def test_oracle_error():
    o = np.array([1.0, 2.0, np.inf, 4.0])
    x = np.array([1.5, 2.0, np.inf, np.nan], np.float32)
    e = oracle_error(x, o)
    assert e.nonfinite == 1  # the NaN where the oracle is 4
    assert e.rel_l2 == pytest.approx(0.5 / math.sqrt(1 + 4))  # over positions 0 and 1
    assert e.max_abs == 0.5 and e.oracle_abs_max == 2.0
    assert e.rms == pytest.approx(math.sqrt(0.25 / 2))
    zero = oracle_error(np.zeros(3), np.zeros(3))
    assert zero.rel_l2 == 0.0 and zero.oracle_l2 == 0.0
