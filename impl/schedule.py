"""Noise-schedule math shared by the samplers in impl/samplers.py.

A schedule is read from the fields of a diffusers `scheduler_config.json` dict. Everything the
samplers derive from it (betas, alphas_cumprod, sigmas) is computed in float32 with the same torch
primitives and in the same order as the reference: torch.linspace's float32 algorithm is not
numpy.linspace's, and torch's CPU cumprod accumulates float32 in double, so a numpy re-derivation
would be off by an ulp here and there and float32 steps could no longer be bit-identical.
Per-step scalar coefficients are computed the same way, as 0-dim float32 tensors (`scalar`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

from impl.errors import ModelInputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Fields that other scheduler classes write into their configs, whose non-default values would change
# the math in ways not implemented here: refuse them rather than silently sample something else.
_ONLY_DEFAULT = {
    "rescale_betas_zero_snr": (False,),
    "thresholding": (False,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "lambda_min_clipped": (-math.inf,),
    "variance_type": (None, "fixed_small"),
}


def read_field(config: Mapping, name: str, default, *, allowed=None, kind=None):
    """config[name], or `default` when absent; checked against the `allowed` values or the type `kind`."""
    value = config.get(name, default)
    if allowed is not None:
        if value not in allowed:
            raise ModelInputError(f"scheduler config field {name}={value!r} is not supported; allowed: "
                                  f"{', '.join(map(repr, allowed))}")
    elif not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelInputError(f"scheduler config field {name}={value!r} must be a {kind.__name__}")
    return value


def scalar(value) -> torch.Tensor:
    """A float32 0-dim tensor: per-step coefficients are computed in float32, as the reference does."""
    return torch.tensor(value, dtype=torch.float32)


def _cosine_betas(n: int) -> torch.Tensor:
    # Improved DDPM's squared-cosine alpha_bar, discretised and capped at 0.999. math.cos, not np.cos:
    # numpy's SIMD cos may differ in the last bit, which float32 rounding occasionally keeps.
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=torch.float32)


def _betas(config: Mapping, n: int) -> tuple[torch.Tensor, str]:
    trained = config.get("trained_betas")
    schedule = read_field(config, "beta_schedule", "linear", allowed=BETA_SCHEDULES)
    if trained is not None:
        if (not isinstance(trained, (list, tuple)) or len(trained) != n
                or not all(isinstance(b, Real) and not isinstance(b, bool) and 0 < b < 1 for b in trained)):
            raise ModelInputError(f"scheduler config field trained_betas must be null or a list of "
                                  f"num_train_timesteps={n} numbers in (0, 1)")
        return torch.tensor(trained, dtype=torch.float32), schedule
    start = read_field(config, "beta_start", 0.0001, kind=Real)
    end = read_field(config, "beta_end", 0.02, kind=Real)
    if not 0 <= start <= end < 1:
        raise ModelInputError(f"scheduler config fields beta_start={start}, beta_end={end} must satisfy "
                              f"0 <= beta_start <= beta_end < 1")
    if schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32), schedule
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2, schedule
    return _cosine_betas(n), schedule


@dataclass(frozen=True)
class Schedule:
    """The training noise schedule plus how inference timesteps are spaced over it."""

    num_train_timesteps: int
    alphas_cumprod: torch.Tensor  # float32, index = training timestep
    timestep_spacing: str
    steps_offset: int
    prediction_type: str
    beta_schedule: str

    @classmethod
    def from_config(cls, config: Mapping, *, default_spacing: str) -> "Schedule":
        """`default_spacing` is the timestep_spacing the matching diffusers class assumes when the field is absent."""
        if not isinstance(config, Mapping):
            raise ModelInputError(f"scheduler config must be a dict (scheduler_config.json), "
                                  f"got {type(config).__name__}")
        for name, allowed in _ONLY_DEFAULT.items():
            if name in config:
                read_field(config, name, None, allowed=allowed)
        n = read_field(config, "num_train_timesteps", 1000, kind=Integral)
        if n < 2:
            raise ModelInputError(f"scheduler config field num_train_timesteps={n} must be >= 2")
        offset = read_field(config, "steps_offset", 0, kind=Integral)
        if not 0 <= offset < n:
            raise ModelInputError(f"scheduler config field steps_offset={offset} must be in [0, num_train_timesteps)")
        betas, beta_schedule = _betas(config, n)
        return cls(
            num_train_timesteps=n,
            alphas_cumprod=torch.cumprod(1.0 - betas, dim=0),
            timestep_spacing=read_field(config, "timestep_spacing", default_spacing, allowed=SPACINGS),
            steps_offset=offset,
            prediction_type=read_field(config, "prediction_type", "epsilon", allowed=PREDICTION_TYPES),
            beta_schedule=beta_schedule,
        )

    def spaced(self, steps: int) -> np.ndarray:
        """`steps` descending float64 timesteps per timestep_spacing, before any rounding (Table 2 of
        "Common Diffusion Noise Schedules and Sample Steps are Flawed"). "trailing" can give one extra
        entry where float arange overshoots; that is kept, as the reference keeps it."""
        n = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, steps)[::-1].copy()
        if self.timestep_spacing == "leading":
            return (np.arange(steps) * (n // steps))[::-1] + float(self.steps_offset)
        return np.round(np.arange(n, 0, -n / steps)) - 1

    def train_sigmas(self) -> np.ndarray:
        """float32 sigma(t) = sqrt((1 - alphas_cumprod) / alphas_cumprod) for every training timestep."""
        ac = self.alphas_cumprod
        return (((1 - ac) / ac) ** 0.5).numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: `steps` sigmas evenly spaced in sigma^(1/rho), descending, float64."""
    ramp = np.linspace(0, 1, steps)
    min_inv, max_inv = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps for `sigmas`: linear interpolation in log sigma, clamped to the range."""
    log_sigmas = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train_sigmas, log_sigmas, side="right") - 1, 0, len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigmas) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)
