"""The op layer the clean-room networks are written against, with a NumPy and a torch backend.

The CLIP, UNet and VAE code in impl/ is written once and only ever touches tensors through an `Ops`
object: `get_ops("numpy" | "torch", "fp32" | "fp64" | "fp16" | "bf16")`. Each backend keeps tensors
in its own array type (numpy.ndarray / torch.Tensor) at the *storage dtype* and implements every op
listed on `Ops` below. What each backend computes in, and where it rounds, is in docs/precision.md.

Layout conventions (the same as the PyTorch reference, so taps mirror it without transposes):
images are NCHW, sequences (batch, tokens, channels), attention operands (batch, heads, tokens, dim).
"""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import ModelInputError

DTYPES = ("fp32", "fp64", "fp16", "bf16")
BACKENDS = ("numpy", "torch")


class Ops:
    """What a backend provides. Arrays in and out are the backend's own type at `self.dtype`
    unless an op says otherwise (integer ids stay int64; `timestep_embedding` returns float32)."""

    backend: str = ""
    dtype: str = "fp32"  # storage dtype name: fp32, fp64, fp16 or bf16

    # --- conversion --------------------------------------------------------------------------
    def asarray(self, value: Any, dtype: str | None = None) -> Any:
        """A backend array for a NumPy array, torch tensor or Python number: floating point values
        converted to `dtype` (default: the storage dtype), integers to int64."""
        raise NotImplementedError

    def weight(self, array) -> Any:
        """A backend array for a (possibly memory-mapped, read-only) NumPy weight, at the storage
        dtype; shares the memory when no conversion is needed."""
        raise NotImplementedError

    def to_numpy(self, value) -> Any:
        raise NotImplementedError

    def is_array(self, value) -> bool:
        raise NotImplementedError

    def inference(self):
        """A context manager wrapped around every model call (torch: inference_mode)."""
        raise NotImplementedError

    # --- layers ------------------------------------------------------------------------------
    def linear(self, x, w, b=None): raise NotImplementedError
    def conv2d(self, x, w, b=None, stride: int = 1, padding: int = 0): raise NotImplementedError
    def group_norm(self, x, groups: int, w, b, eps: float): raise NotImplementedError
    def layer_norm(self, x, w, b, eps: float): raise NotImplementedError
    def embedding(self, ids, w): raise NotImplementedError

    def attention(self, q, k, v, scale: float | None = None, causal: bool = False):
        """softmax(q k^T * scale [+ causal mask]) v on (batch, heads, tokens, dim) operands;
        scale defaults to dim ** -0.5."""
        raise NotImplementedError

    # --- activations ---------------------------------------------------------------------------
    def silu(self, x): raise NotImplementedError
    def gelu(self, x): raise NotImplementedError  # exact (erf) GELU
    def quick_gelu(self, x): raise NotImplementedError  # x * sigmoid(1.702 x)

    # --- elementwise ---------------------------------------------------------------------------
    def add(self, a, b): raise NotImplementedError
    def mul(self, a, b): raise NotImplementedError
    def div(self, a, scalar: float): raise NotImplementedError
    def exp(self, x): raise NotImplementedError
    def clamp(self, x, low: float, high: float): raise NotImplementedError
    def scale_shift(self, x, scale: float, shift: float): raise NotImplementedError  # x * scale + shift

    # --- shapes --------------------------------------------------------------------------------
    def reshape(self, x, shape: Sequence[int]): raise NotImplementedError
    def transpose(self, x, dim0: int, dim1: int): raise NotImplementedError
    def permute(self, x, dims: Sequence[int]): raise NotImplementedError
    def contiguous(self, x): raise NotImplementedError
    def cat(self, xs: Sequence, axis: int): raise NotImplementedError
    def chunk(self, x, chunks: int, axis: int): raise NotImplementedError
    def pad2d(self, x, left: int, right: int, top: int, bottom: int): raise NotImplementedError
    def upsample_nearest(self, x, size: Sequence[int] | None = None): raise NotImplementedError  # 2x, or to size
    def expand_batch(self, x, batch: int): raise NotImplementedError  # 0-d or (1,) -> (batch,)
    def take_tokens(self, x, index): raise NotImplementedError  # x[arange(B), index] on (B, T, C)
    def argmax(self, x, axis: int): raise NotImplementedError  # int64

    # --- reductions ------------------------------------------------------------------------------
    def std(self, x, axes: Sequence[int]):
        """Unbiased standard deviation over `axes`, kept as size-1 axes (torch.std(dim=axes, keepdim=True))."""
        raise NotImplementedError

    # --- model specific primitives --------------------------------------------------------------
    def timestep_embedding(self, timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                           scale: float = 1.0, max_period: int = 10000):
        """Sinusoidal embedding of a 1-D timestep array, ALWAYS float32 (as the reference computes it)."""
        raise NotImplementedError

    def cast(self, x, dtype: str | None = None):
        """`x` converted to dtype (default: the storage dtype)."""
        raise NotImplementedError


def get_ops(backend: str = "numpy", dtype: str = "fp32", **options) -> Ops:
    """The op set of `backend` at storage dtype `dtype`.

    Options: torch `device` ("cpu", "cuda", ...); NumPy `threads` (worker threads, default:
    OMP_NUM_THREADS, else the usable CPUs), `chunk_bytes` (im2col buffer budget, 64 MiB) and
    `attention_block_bytes` (scores per attention block, 512 KiB). A NumPy ops object keeps scratch buffers: one model call at a time."""
    if dtype not in DTYPES:
        raise ModelInputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if backend == "numpy":
        from .numpy_ops import NumpyOps

        return NumpyOps(dtype, **options)
    if backend == "torch":
        from .torch_ops import TorchOps

        return TorchOps(dtype, **options)
    raise ModelInputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def at_dtype(ops: Ops, dtype: str) -> Ops:
    """An op set of `ops`'s backend and options (device, threads, buffer sizes) at storage dtype `dtype`:
    `ops` itself when it already is."""
    if dtype == ops.dtype:
        return ops
    if ops.backend == "torch":
        return get_ops("torch", dtype, device=str(ops.device))
    return get_ops("numpy", dtype, threads=ops.threads, chunk_bytes=ops.chunk_bytes,
                   attention_block_bytes=ops.attention_block_bytes)


__all__ = ["BACKENDS", "DTYPES", "Ops", "at_dtype", "get_ops"]
