"""Images in and out of the pipelines: PIL <-> the [-1, 1] NCHW float arrays the VAE works on."""
from __future__ import annotations

import numpy as np

from .errors import ModelInputError


def image_to_array(image, height: int, width: int) -> np.ndarray:
    """An RGB PIL image as float32 (1, 3, H, W) in [-1, 1]: bytes / 255, then 2x - 1.

    The result is a channels-last view (pixels stay interleaved in memory), as the reference's image
    processor hands it to the VAE: convolution kernels pick their algorithm by memory layout, so a
    contiguous copy would change the encoder's rounding."""
    if image.mode != "RGB":
        raise ModelInputError(f"the init image is {image.mode}, not RGB; convert it to RGB first")
    _check_size(image, height, width, "init image")
    pixels = np.asarray(image).astype(np.float32) / 255.0
    return (2.0 * pixels - 1.0)[None].transpose(0, 3, 1, 2)


def mask_to_array(mask, height: int, width: int) -> np.ndarray:
    """A mask image as float32 (1, 1, H, W) of 0 (keep) and 1 (repaint), thresholded at one half."""
    _check_size(mask, height, width, "mask")
    values = np.asarray(mask.convert("L")).astype(np.float32) / 255.0
    return (values >= 0.5).astype(np.float32)[None, None]


def to_pixels(image) -> np.ndarray:
    """The decoder's (B, 3, H, W) output in [-1, 1] as float32 (B, H, W, 3) in [0, 1]."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(0, 2, 3, 1))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return (pixels * 255).round().astype(np.uint8)


def _check_size(image, height: int, width: int, what: str) -> None:
    if (image.width, image.height) != (width, height):
        raise ModelInputError(f"the {what} is {image.width}x{image.height} but the run is {width}x{height}; "
                              "resize it or run at its size")
