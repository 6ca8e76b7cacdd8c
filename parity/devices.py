"""Where a torch run computes (--device cpu | cuda[:N] | mps), checked before any model is loaded.

The syntax is checked without torch (RunConfig); availability where torch runs (the reference and the
torch backend), as bad input with what to do instead. On CUDA, the settings that let cuBLAS/cuDNN trade
fp32 precision for speed (TF32 tensor cores, reduced-precision fp16/bf16 reductions) are turned off, so
that an fp32 run computes in fp32 on every device (docs/tolerances.md, "Cross-device pairs").
"""
from __future__ import annotations

import re

from sd_parity.errors import BadInput

KINDS = ("cpu", "cuda", "mps")
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


def check_syntax(device: str) -> None:
    if not _DEVICE_RE.match(device or ""):
        raise BadInput(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps")


def kind(device: str | None) -> str:
    """cpu, cuda or mps (the device without its index); cpu when not recorded."""
    return (device or "cpu").split(":")[0]


def require(device: str) -> None:
    """Raise BadInput unless this machine's torch can compute on `device`."""
    import torch

    check_syntax(device)
    wanted = kind(device)
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"--device {device}: torch {torch.__version__} sees no CUDA GPU "
                           "(torch.cuda.is_available() is False); use --device cpu, or install a CUDA build of torch")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BadInput(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif wanted == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"--device {device}: torch {torch.__version__} has no MPS backend here "
                       "(torch.backends.mps.is_available() is False); use --device cpu")


def pin_numerics(device: str) -> None:
    """fp32 means fp32 on `device`: no TF32 convolutions or matmuls, no reduced-precision half reductions."""
    if kind(device) != "cuda":
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing: another order each run
    torch.backends.cudnn.deterministic = True


def prepare(device: str) -> None:
    """Check `device` and pin its numerics; call before loading a torch model onto it."""
    require(device)
    pin_numerics(device)


__all__ = ["KINDS", "check_syntax", "kind", "pin_numerics", "prepare", "require"]
