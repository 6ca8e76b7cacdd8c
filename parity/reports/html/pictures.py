"""Small PNG data URIs for the report: the decoded images, their difference, latent previews."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_data_uri(pixels: np.ndarray) -> str:
    """An HxW (gray) or HxWx3 uint8 array as a data:image/png URI."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_uint8(image: np.ndarray) -> np.ndarray:
    """The first image of a (B, H, W, 3) batch as uint8; a float image in [0, 1] is scaled as the pipeline does."""
    first = np.asarray(image[0])
    if first.dtype == np.uint8:
        return first
    return np.clip(np.round(first.astype(np.float64) * 255), 0, 255).astype(np.uint8)


def amplified_difference(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, float, int]:
    """|cand − ref| of two HxW or HxWxC arrays (largest over channels), scaled so the largest
    difference is white: (gray uint8 image, the largest difference, the factor it was scaled by)."""
    diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
    if diff.ndim == 3:
        diff = diff.max(axis=-1)
    diff = np.nan_to_num(diff, nan=0.0, posinf=0.0)
    largest = float(diff.max(initial=0.0))
    factor = 255.0 / largest if largest else 1.0
    return np.clip(np.round(diff * factor), 0, 255).astype(np.uint8), largest, factor


def level_difference(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """|cand − ref| of two HxWxC uint8 images in levels, the largest over channels, as a gray image at
    true scale (a difference of 1 level is gray level 1)."""
    return np.abs(cand.astype(np.int16) - ref.astype(np.int16)).max(axis=-1).astype(np.uint8)


def latent_rgb(latents: np.ndarray) -> np.ndarray:
    """The first 3 channels of a (C, h, w) latent (the last repeated when there are fewer), as float64."""
    rgb = latents[:3].astype(np.float64)
    return np.concatenate([rgb] + [rgb[-1:]] * (3 - rgb.shape[0])) if rgb.shape[0] < 3 else rgb


def latent_preview(rgb: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A (3, h, w) latent_rgb as an RGB image, each channel mapped from [low, high] to [0, 255]
    (the same bounds for both runs, so their previews compare)."""
    span = np.where(high > low, high - low, 1.0)[:, None, None]
    scaled = np.nan_to_num((rgb - low[:, None, None]) / span)
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
