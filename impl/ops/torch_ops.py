"""The torch backend: every op is the torch.nn.functional call the PyTorch reference makes, on the
same operand layouts and in the same order, so that on the same device and dtype the results are
bit-identical to the reference (docs/precision.md lists the measured exceptions, if any).
No nn.Module is used: weights are plain tensors (views of the memory-mapped weight files when the
file dtype is the storage dtype)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from . import Ops

TORCH_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
# MKL picks its code path, and so its summation order, by the operands' alignment: a matrix-vector
# product on data 8 bytes past a 64-byte boundary differs in the last bit from the same product on
# 64-byte aligned data (docs/precision.md, "What decides reduction order"). The reference's activations
# are torch allocations (64-byte aligned), so inputs handed in from NumPy memory are aligned the same
# way. Weights are not: diffusers' safetensors weights are views of the memory-mapped file, with the
# file's alignment, and so are ours (same file, same offsets).
ALIGNMENT = 64


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied (same strides) when it lies in CPU memory that is not ALIGNMENT-byte aligned."""
    if tensor.device.type != "cpu" or tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    return tensor.clone(memory_format=torch.preserve_format)


def _numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, also for ml_dtypes.bfloat16 and read-only (memory-mapped) arrays.

    The strides are kept: an NCHW view of NHWC memory (what the reference's image processor makes of
    an image) becomes a channels_last tensor, and torch's convolutions round differently on the two
    memory formats, so bit-identity needs the same one."""
    if array.dtype.name == "bfloat16":
        array = array.view(np.int16)
        bf16 = True
    else:
        bf16 = False
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory maps: the tensor is never written to
        if array.ndim == 4 and not array.flags.c_contiguous and array.transpose(0, 2, 3, 1).flags.c_contiguous:
            # channels-last memory: rebuilt with torch's canonical strides (a size-1 batch of a
            # `[None]` view has stride 0, which torch's convolutions do not take for channels_last)
            n, c, h, w = array.shape
            flat = torch.from_numpy(array.transpose(0, 2, 3, 1).reshape(-1))
            tensor = flat.view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            try:
                tensor = torch.from_numpy(array)
            except ValueError:  # negative strides
                tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if bf16 else tensor


class TorchOps(Ops):
    backend = "torch"

    def __init__(self, dtype: str = "fp32", device: str = "cpu"):
        self.dtype = dtype
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return f"TorchOps({self.dtype!r}, device={str(self.device)!r})"

    # --- conversion ----------------------------------------------------------------------------
    def asarray(self, value, dtype=None):
        if isinstance(value, torch.Tensor):
            tensor = value
        elif isinstance(value, np.ndarray) or np.isscalar(value) or isinstance(value, np.generic):
            tensor = _numpy_to_torch(np.asarray(value))
        else:
            tensor = torch.as_tensor(value)
        if tensor.is_floating_point():
            tensor = tensor.to(self.device, TORCH_DTYPES[dtype] if dtype else self.torch_dtype)
        else:
            tensor = tensor.to(self.device, torch.int64)
        return _aligned(tensor)

    def weight(self, array):
        """Weights flagged requires_grad, as the reference's nn.Parameters are: torch picks kernels by it
        (at::matmul folds a non-contiguous batch of rows into one mm when the other operand requires
        grad, else runs bmm: a linear layer on a permuted view, such as SD 2.x's linear proj_in, rounds
        differently at fp64/fp16/bf16). Every model call runs under inference_mode: no graph is recorded."""
        tensor = _numpy_to_torch(array) if isinstance(array, np.ndarray) else array
        if tensor.dtype != self.torch_dtype or tensor.device != self.device:
            tensor = tensor.to(self.device, self.torch_dtype)
        return tensor.requires_grad_(True) if tensor.is_floating_point() else tensor

    def to_numpy(self, value):
        tensor = value.detach()
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            return tensor.cpu().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.cpu().contiguous().numpy()

    def is_array(self, value) -> bool:
        return isinstance(value, torch.Tensor)

    def inference(self):
        return torch.inference_mode()

    # --- layers ------------------------------------------------------------------------------
    def linear(self, x, w, b=None):
        return F.linear(x, w, b)

    def conv2d(self, x, w, b=None, stride: int = 1, padding: int = 0):
        return F.conv2d(x, w, b, stride, padding)

    def group_norm(self, x, groups, w, b, eps):
        return F.group_norm(x, groups, w, b, eps)

    def layer_norm(self, x, w, b, eps):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def embedding(self, ids, w):
        return F.embedding(ids, w)

    def attention(self, q, k, v, scale=None, causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=causal, scale=scale)

    # --- activations ---------------------------------------------------------------------------
    def silu(self, x):
        return F.silu(x)

    def gelu(self, x):
        return F.gelu(x)

    def quick_gelu(self, x):
        return x * torch.sigmoid(1.702 * x)

    # --- elementwise ---------------------------------------------------------------------------
    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def div(self, a, scalar):
        return a / scalar

    def exp(self, x):
        return torch.exp(x)

    def clamp(self, x, low, high):
        return torch.clamp(x, low, high)

    def scale_shift(self, x, scale, shift):
        return x * scale + shift

    # --- shapes --------------------------------------------------------------------------------
    def reshape(self, x, shape):
        return x.reshape(*shape)

    def transpose(self, x, dim0, dim1):
        return x.transpose(dim0, dim1)

    def permute(self, x, dims):
        return x.permute(*dims)

    def contiguous(self, x):
        return x.contiguous()

    def cat(self, xs, axis):
        return torch.cat(list(xs), dim=axis)

    def chunk(self, x, chunks, axis):
        return x.chunk(chunks, dim=axis)

    def pad2d(self, x, left, right, top, bottom):
        return F.pad(x, (left, right, top, bottom), mode="constant", value=0)

    def upsample_nearest(self, x, size=None):
        if size is None:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.interpolate(x, size=tuple(int(s) for s in size), mode="nearest")

    def expand_batch(self, x, batch):
        if x.ndim == 0:
            x = x[None]
        return x.expand(batch)

    def take_tokens(self, x, index):
        index = torch.as_tensor(np.asarray(index), device=x.device)
        return x[torch.arange(x.shape[0], device=x.device), index]

    def argmax(self, x, axis):
        return x.argmax(dim=axis)

    def std(self, x, axes):
        return x.std(dim=list(axes), keepdim=True)

    # --- model specific ------------------------------------------------------------------------
    def timestep_embedding(self, timesteps, dim, flip_sin_to_cos, freq_shift, scale=1.0, max_period=10000):
        half = dim // 2
        freqs = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device)
        freqs = freqs / (half - freq_shift)
        freqs = torch.exp(freqs)
        angles = timesteps[:, None].float() * freqs[None, :]
        angles = scale * angles
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        if flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if dim % 2 == 1:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb

    def cast(self, x, dtype=None):
        return x.to(TORCH_DTYPES[dtype] if dtype else self.torch_dtype)


__all__ = ["TorchOps", "TORCH_DTYPES"]
