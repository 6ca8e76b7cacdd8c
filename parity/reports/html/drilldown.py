"""Drill-down data: what the tensors themselves show about a divergence, beyond their metrics.

`add_drilldowns(summary)` opens the run files named in summary["runs"], reads only the tensors it
drills into (one at a time) and stores small arrays in summary["drilldowns"] (docs/report.md), so
`parity report summary.json` re-renders the page without the run files. Drilled into: the first
divergence, the worst `top_n` tensors of the free-running comparison and each culprit block's worst
tensor in isolation; plus the decoded images and per-step latent previews.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from sd_parity.runs.hdf5 import RunFileError, RunReader
from sd_parity.runs.open import open_run
from .pictures import amplified_difference, image_uint8, latent_preview, latent_rgb, level_difference, png_data_uri
from .values import rounded, sort_key

TOP_N = 8
MAP_SIDE = 64  # spatial maps are max-pooled to at most this many cells a side
HISTOGRAM_BINS = 50
WORST_ELEMENTS = 20
CHANNEL_BARS = 512  # wider channel axes are max-pooled to this many bars
LATENT_STEPS = 12  # latent previews of at most this many steps, evenly spread
IMAGE_KEYS = ("pipeline/main/image_uint8", "pipeline/main/image")
# docs/run-format.md: tensors are NCHW except the decoded image, which is NHWC as diffusers returns it
NHWC = {("pipeline", "image"), ("pipeline", "image_uint8")}


def add_drilldowns(summary: dict[str, Any], top_n: int = TOP_N) -> dict[str, Any]:
    """Store summary["drilldowns"] (see docs/report.md) and return the summary."""
    runs = summary["runs"]
    drill: dict[str, Any] = {"top_n": top_n, "tensors": [], "images": None, "latents": [], "unavailable": []}
    with _Readers(drill["unavailable"]) as readers:
        for source, row, why in _targets(summary, top_n):
            candidate = runs["candidate"] if source == "free" else runs["isolated"]
            ref = readers.read(runs["reference"], row["key"])
            cand = readers.read(candidate, row["cand_key"] or row["key"])
            if ref is None or cand is None or ref.size != cand.size or not ref.size:
                continue
            drill["tensors"].append({"source": source, "index": row["index"], "key": row["key"], "why": why,
                                     **tensor_detail(ref, cand.reshape(ref.shape), _layout(row, ref.ndim))})
        drill["images"] = _images(readers, runs)
        drill["latents"] = _latents(readers, runs, summary["tensors"])
    summary["drilldowns"] = drill
    return summary


def _targets(summary: dict[str, Any], top_n: int) -> list[tuple[str, dict, str]]:
    """(source, row, why) for each tensor to drill into, without repeats."""
    chosen: dict[tuple[str, int], list] = {}

    def add(source: str, row: dict, why: str) -> None:
        if _drillable(row):
            chosen.setdefault((source, row["index"]), [source, row, []])[2].append(why)

    rows = summary["tensors"]
    if summary["first_divergence"] is not None:
        add("free", rows[summary["first_divergence"]["index"]], "first divergence")
    ranked = sorted((r for r in rows if _drillable(r)),
                    key=lambda r: (r["status"] != "fail", -sort_key(r["ratio"]), r["index"]))[:top_n]
    for rank, row in enumerate(ranked, 1):
        add("free", row, f"worst #{rank}" if row["status"] == "fail" else f"closest to its threshold #{rank}")
    for culprit in summary["culprits"][:top_n]:
        add("isolated", culprit["worst"], f"worst of culprit {culprit['block']} in isolation")
    return [(source, row, ", ".join(whys)) for source, row, whys in chosen.values()]


def _drillable(row: dict) -> bool:
    return row["status"] in ("pass", "fail") and row["metrics"] is not None


def _layout(row: dict, ndim: int) -> str | None:
    if ndim != 4:
        return None
    return "NHWC" if (row["component"], row["name"]) in NHWC else "NCHW"


# ---------------------------------------------------------------------------------------------------
# one tensor


def tensor_detail(ref: np.ndarray, cand: np.ndarray, layout: str | None) -> dict[str, Any]:
    """Spatial map, per-channel error, histogram and worst elements of |cand − ref|."""
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    score = _scores(r, c)
    detail: dict[str, Any] = {"shape": list(r.shape), "layout": layout, "spatial": None, "channels": None,
                              "histogram": _histogram(score), "worst": _worst(r, c, score)}
    if layout is not None:
        nchw = (lambda a: a.transpose(0, 3, 1, 2)) if layout == "NHWC" else (lambda a: a)
        detail["spatial"] = _spatial(nchw(score))
        detail["channels"] = _channels(nchw(score), nchw(r), axis=1, label="channel")
    elif r.ndim >= 2:
        detail["channels"] = _channels(score, r, axis=r.ndim - 1, label="feature (last axis)")
    return detail


def _scores(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """|c − r| per element; a NaN/Inf that both sides share counts 0, one only one side has counts inf."""
    with np.errstate(invalid="ignore"):
        score = np.abs(c - r)
    odd = ~np.isfinite(score)
    if odd.any():
        same = (r == c) | (np.isnan(r) & np.isnan(c))
        score[odd] = np.where(same[odd], 0.0, np.inf)
    return score


def _spatial(score: np.ndarray) -> dict[str, Any]:
    """Mean |d| over channels of the batch item with the largest error, max-pooled to ≤ MAP_SIDE a side
    (max pooling keeps a one-pixel seam or border visible)."""
    batch = int(np.argmax(score.reshape(score.shape[0], -1).max(axis=1))) if score.size else 0
    plane = score[batch].mean(axis=0)
    height, width = plane.shape
    pool_h, pool_w = math.ceil(height / MAP_SIDE), math.ceil(width / MAP_SIDE)
    rows, cols = math.ceil(height / pool_h), math.ceil(width / pool_w)
    padded = np.zeros((rows * pool_h, cols * pool_w))
    padded[:height, :width] = plane
    pooled = padded.reshape(rows, pool_h, cols, pool_w).max(axis=(1, 3))
    return {"batch": batch, "height": height, "width": width, "pool": [pool_h, pool_w], "rows": rows,
            "cols": cols, "values": [rounded(v) for v in pooled.ravel()]}


def _channels(score: np.ndarray, r: np.ndarray, axis: int, label: str) -> dict[str, Any]:
    """Per channel: mean |d| and rel-L2 (‖d_c‖ / ‖r_c‖); wide axes max-pooled to CHANNEL_BARS bars."""
    moved = np.moveaxis(score, axis, 0).reshape(score.shape[axis], -1)
    ref = np.moveaxis(r, axis, 0).reshape(r.shape[axis], -1)
    mean = moved.mean(axis=1)
    finite_d = np.where(np.isfinite(moved), moved, 0.0)
    finite_r = np.where(np.isfinite(ref), ref, 0.0)
    diff_norm, ref_norm = np.sqrt((finite_d ** 2).sum(axis=1)), np.sqrt((finite_r ** 2).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ref_norm > 0, diff_norm / ref_norm, np.where(diff_norm > 0, np.inf, 0.0))
    count = moved.shape[0]
    per_bar = math.ceil(count / CHANNEL_BARS)
    return {"label": label, "count": count, "per_bar": per_bar,
            "mean_abs": [rounded(v) for v in _pool(mean, per_bar)],
            "rel_l2": [rounded(v) for v in _pool(rel, per_bar)]}


def _pool(values: np.ndarray, size: int) -> np.ndarray:
    if size == 1:
        return values
    padded = np.zeros(math.ceil(len(values) / size) * size)
    padded[:len(values)] = values
    return padded.reshape(-1, size).max(axis=1)


def _histogram(score: np.ndarray) -> dict[str, Any]:
    """Counts of log10 |d| over the nonzero finite elements, plus the zero and non-finite counts."""
    finite = score[np.isfinite(score)]
    nonzero = finite[finite > 0]
    result = {"bins": HISTOGRAM_BINS, "log10_low": None, "log10_high": None, "counts": [],
              "zeros": int(finite.size - nonzero.size), "nonfinite": int(score.size - finite.size),
              "total": int(score.size)}
    if nonzero.size:
        logs = np.log10(nonzero)
        low, high = float(logs.min()), float(logs.max())
        if high == low:
            low, high = low - 0.5, high + 0.5
        counts, _ = np.histogram(logs, bins=HISTOGRAM_BINS, range=(low, high))
        result.update(log10_low=rounded(low), log10_high=rounded(high), counts=counts.tolist())
    return result


def _worst(r: np.ndarray, c: np.ndarray, score: np.ndarray) -> list[dict[str, Any]]:
    """The WORST_ELEMENTS largest |d|: multi-index, both values (full precision), |d| and |d|/|r|."""
    flat = score.ravel()
    count = min(WORST_ELEMENTS, flat.size)
    if count == 0:
        return []
    top = np.argpartition(-flat, count - 1)[:count]
    top = top[np.lexsort((top, -flat[top]))]
    worst = []
    for position in top:
        ref, cand, diff = float(r.flat[position]), float(c.flat[position]), float(flat[position])
        relative = diff / abs(ref) if ref != 0 else (0.0 if diff == 0 else math.inf)
        worst.append({"index": [int(i) for i in np.unravel_index(position, r.shape)], "ref": ref, "cand": cand,
                      "abs_diff": diff, "rel_diff": rounded(relative)})
    return worst


# ---------------------------------------------------------------------------------------------------
# images and latents


def _images(readers: "_Readers", runs: dict[str, Any]) -> dict[str, Any] | None:
    """The first decoded image of both runs and their difference (amplified and true-scale) as PNG data
    URIs, and how many pixels differ by each number of levels."""
    for key in IMAGE_KEYS:
        ref, cand = readers.read(runs["reference"], key), readers.read(runs["candidate"], key)
        if ref is not None and cand is not None and ref.ndim == 4 and ref.shape == cand.shape:
            break
    else:
        return None
    ref8, cand8 = image_uint8(ref), image_uint8(cand)
    diff, largest, factor = amplified_difference(ref8, cand8)
    levels = level_difference(ref8, cand8)
    return {"key": key, "batch": int(ref.shape[0]), "height": int(ref8.shape[0]), "width": int(ref8.shape[1]),
            "reference": png_data_uri(ref8), "candidate": png_data_uri(cand8), "difference": png_data_uri(diff),
            "difference_true": png_data_uri(levels), "level_counts": np.bincount(levels.ravel()).tolist(),
            "max_levels": int(largest), "amplification": rounded(factor),
            "differing_pixels": int(np.count_nonzero(diff)), "pixels": int(diff.size)}


def _latents(readers: "_Readers", runs: dict[str, Any], rows: list[dict]) -> list[dict[str, Any]]:
    """Previews of pipeline/step_NNN/latents (first 3 channels of the first item) for ≤ LATENT_STEPS steps."""
    compared = [r for r in rows if r["component"] == "pipeline" and r["name"] == "latents"
                and r["step"] is not None and r["status"] in ("pass", "fail")]
    if not compared:
        return []
    picks = sorted({round(i) for i in np.linspace(0, len(compared) - 1, min(len(compared), LATENT_STEPS))})
    previews = []
    for row in (compared[i] for i in picks):
        ref = readers.read(runs["reference"], row["key"])
        cand = readers.read(runs["candidate"], row["cand_key"] or row["key"])
        if ref is None or cand is None or ref.ndim != 4 or ref.shape != cand.shape:
            continue
        ref_rgb, cand_rgb = latent_rgb(ref[0]), latent_rgb(cand[0])
        low, high = ref_rgb.min(axis=(1, 2)), ref_rgb.max(axis=(1, 2))
        diff, largest, _ = amplified_difference(ref[0].transpose(1, 2, 0), cand[0].transpose(1, 2, 0))
        previews.append({"step": row["step"], "index": row["index"], "status": row["status"],
                         "rel_l2": rounded((row["metrics"] or {}).get("rel_l2")), "max_abs": rounded(largest),
                         "reference": png_data_uri(latent_preview(ref_rgb, low, high)),
                         "candidate": png_data_uri(latent_preview(cand_rgb, low, high)),
                         "difference": png_data_uri(diff)})
    return previews


class _Readers:
    """Run files opened on first use and kept open; each one that cannot be read is reported once."""

    def __init__(self, unavailable: list[str]):
        self._unavailable = unavailable
        self._open: dict[str, RunReader | None] = {}

    def read(self, run: dict[str, Any] | None, key: str) -> np.ndarray | None:
        if run is None:
            return None
        reader = self._reader(run["path"])
        if reader is None or key not in reader:
            return None
        return reader.read(key)

    def _reader(self, path: str) -> RunReader | None:
        if path not in self._open:
            try:
                self._open[path] = open_run(path)
            except (RunFileError, OSError) as exc:
                self._open[path] = None
                self._unavailable.append(str(exc))
        return self._open[path]

    def __enter__(self) -> "_Readers":
        return self

    def __exit__(self, *exc) -> None:
        for reader in self._open.values():
            if reader is not None:
                reader.close()
