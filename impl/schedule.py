"""Noise-schedule math shared by the samplers in impl/samplers.py. NumPy only: torch need not be installed.

A schedule is read from the fields of a diffusers `scheduler_config.json` dict. Everything the
samplers derive from it (betas, alphas_cumprod, sigmas) is computed in float32 with the same float32
operations, in the same order, as the reference computes it with torch, so float32 steps stay
bit-identical. Two torch primitives compute something other than their NumPy namesakes and are
re-implemented here:

- `linspace32` is torch's CPU float32 `linspace`: step = (end - start) / (steps - 1) in float32, the
  first steps // 2 elements start + step * i, the rest end - step * (steps - 1 - i), each a fused
  multiply-add (one rounding), as torch's kernel is compiled for x86-64 CPUs with AVX2 or AVX-512.
- `cumprod32` is torch's CPU float32 `cumprod`: the running product is kept in float64 and each
  prefix product rounded to float32 (a float32 running product, numpy's cumprod, differs in ~90% of
  the entries of SD's schedule).

Per-step coefficients are float32 NumPy scalars (`scalar`) combined with IEEE float32 + - * /, which
NumPy and torch round identically, and with square roots, logs and exps taken from a float32 "math"
(`NUMPY_F32` here): NumPy's are correctly rounded, while the reference's float32 torch.sqrt (what
`x ** 0.5` runs), torch.log and torch.exp on CPU are Intel MKL's and are not always (off by one ulp for
~0.6% of sqrt, ~1% of exp and ~0.1% of log arguments). impl/samplers.py explains what that costs.

Zero terminal SNR (`rescale_betas_zero_snr`, Lin et al. 2024, Algorithm 1) takes a square root of the
whole alphas_cumprod vector, so a rescaled schedule depends on that math too: `Schedule.alphas(math)`.

What the model predicts (`prediction_type`) is converted to the clean-sample estimate in one place,
`Parameterization` (k-diffusion's denoiser wrappers, CompVisDenoiser / CompVisVDenoiser): the samplers
only ever ask it for x0 or eps, never look at the prediction type themselves.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from .errors import ModelInputError

F32 = np.float32

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")

# Fields that other scheduler classes write into their configs, whose non-default values would change
# the math in ways not implemented here: refuse them rather than silently sample something else.
_ONLY_DEFAULT = {
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


# --- float32 primitives ------------------------------------------------------------------------------

def scalar(value) -> np.float32:
    """A float32 scalar: per-step coefficients are computed in float32, as the reference does."""
    return F32(value)


def fma32(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once (IEEE fusedMultiplyAdd), elementwise, in NumPy.

    The product of two float32 values is exact in float64 and TwoSum gives the float64 sum's exact
    error, so the only way rounding the float64 sum to float32 can go wrong is a sum that lands exactly
    halfway between two float32 values while the exact value does not: the error's sign decides it.
    """
    a, b, c = (np.asarray(v, dtype=F32) for v in (a, b, c))
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c64
        v = s - p
        err = (p - (s - v)) + (c64 - v)
        r = s.astype(F32)
        r64 = r.astype(np.float64)
        other = np.nextafter(r, np.where(s > r64, F32(np.inf), F32(-np.inf)))
        halfway = (s != r64) & ((r64 + other.astype(np.float64)) * 0.5 == s)
        return np.where(halfway & (err * (s - r64) > 0), other, r)


def linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float32) on CPU, bit for bit (see the module doc).

    torch's serial kernel computes start + step * i and end - step * (steps - 1 - i) in float32;
    GCC contracts them to fused multiply-adds in the AVX2 and AVX-512 builds torch dispatches to on
    x86-64 (its build for CPUs without AVX2, ATEN_CPU_CAPABILITY=default, rounds the product first).
    """
    if steps < 1:
        return np.zeros(0, dtype=F32)
    s, e = F32(start), F32(end)
    if steps == 1:
        return np.array([s], dtype=F32)
    if steps >= 1 << 24:
        raise ValueError("linspace32: steps must be < 2**24 (the step count must be exact in float32)")
    step = (e - s) / F32(steps - 1)
    index = np.arange(steps)
    half = steps // 2
    low = fma32(step, index[:half].astype(F32), s)
    high = fma32(-step, (steps - 1 - index[half:]).astype(F32), e)
    return np.concatenate([low, high])


def cumprod32(values) -> np.ndarray:
    """torch.cumprod of a float32 vector on CPU: a float64 running product, each prefix rounded to float32."""
    with np.errstate(over="ignore"):  # overflows to inf, as torch's does
        return np.cumprod(np.asarray(values, dtype=F32).astype(np.float64)).astype(F32)


class NumpyF32:
    """float32 sqrt, log and exp, correctly rounded, in NumPy alone. `sqrt` takes scalars or arrays;
    `log` and `exp` take scalars (all the samplers need)."""

    name = "numpy"

    @staticmethod
    def sqrt(x):
        return np.sqrt(np.asarray(x, dtype=F32))[()]

    @staticmethod
    def log(x) -> np.float32:
        return log32(x)

    @staticmethod
    def exp(x) -> np.float32:
        return exp32(x)


def log32(x) -> np.float32:
    """float32 natural log of a float32 scalar, log(0) = -inf: the float64 log rounded to float32, which
    is the correctly rounded result unless the float64 one lies within an ulp of a float32 halfway point."""
    x = float(x)
    if x > 0:
        return F32(math.log(x))
    return F32(-math.inf) if x == 0 else F32(math.nan)


def exp32(x) -> np.float32:
    """float32 exp of a float32 scalar, exp(-inf) = 0, rounded from float64 as log32 is."""
    x = float(x)
    if x != x or x >= 89.0:
        return F32(x if x != x else math.inf)
    with np.errstate(over="ignore"):
        return F32(math.exp(x))


NUMPY_F32 = NumpyF32()


# --- what the model predicts ------------------------------------------------------------------------------

class Parameterization:
    """The model output read as the reference reads it, in the two frames the samplers work in:

    - VP (variance preserving): x = alpha x0 + sigma eps with alpha = sqrt(alpha_cumprod), sigma =
      sqrt(1 - alpha_cumprod) (DDIM, DDPM, PNDM, DPM-Solver);
    - VE (variance exploding): x = x0 + s eps with s = sigma / alpha (Euler, Euler ancestral, LMS).

    Coefficients are float32 scalars; the arrays are combined in the reference's order of operations, so
    each sampler's step stays bit-identical to its diffusers class. One subclass per prediction_type."""

    name = ""

    def vp_x0(self, output, x, alpha: np.float32, sigma: np.float32):
        raise NotImplementedError

    def vp_eps(self, output, x, alpha: np.float32, sigma: np.float32):
        raise NotImplementedError

    def ve_x0(self, output, x, s: np.float32, math):
        raise NotImplementedError


class EpsilonPrediction(Parameterization):
    """The model predicts the noise eps (DDPM's parameterization; SD 1.x, SD 2.x base, SDXL)."""

    name = "epsilon"

    def vp_x0(self, output, x, alpha, sigma):
        return (x - float(sigma) * output) / float(alpha)

    def vp_eps(self, output, x, alpha, sigma):
        return output

    def ve_x0(self, output, x, s, math):
        return x - float(s) * output


class VPrediction(Parameterization):
    """The model predicts v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 2.4; the 768 px SD 2.x models)."""

    name = "v_prediction"

    def vp_x0(self, output, x, alpha, sigma):
        return float(alpha) * x - float(sigma) * output

    def vp_eps(self, output, x, alpha, sigma):
        return float(alpha) * output + float(sigma) * x

    def ve_x0(self, output, x, s, math):
        # c_out = -s / sqrt(s^2 + 1), c_skip = 1 / (s^2 + 1), the latter applied as a division, as diffusers does
        return output * float(-s / math.sqrt(s * s + 1)) + x / float(s * s + 1)


PARAMETERIZATIONS = {p.name: p for p in (EpsilonPrediction(), VPrediction())}
PREDICTION_TYPES = tuple(PARAMETERIZATIONS)


# --- the schedule -----------------------------------------------------------------------------------------

def rescale_zero_terminal_snr(betas: np.ndarray, math=NUMPY_F32) -> np.ndarray:
    """Betas whose last alpha_cumprod is exactly zero, with the first one kept ("Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1), in the reference's float32 operations."""
    root = math.sqrt(cumprod32(F32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root * root
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return F32(1.0) - alphas

def _cosine_betas(n: int) -> np.ndarray:
    # Improved DDPM's squared-cosine alpha_bar, discretised and capped at 0.999. math.cos, not np.cos:
    # numpy's SIMD cos may differ in the last bit, which float32 rounding occasionally keeps.
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=F32)


def _betas(config: Mapping, n: int) -> tuple[np.ndarray, str]:
    trained = config.get("trained_betas")
    schedule = read_field(config, "beta_schedule", "linear", allowed=BETA_SCHEDULES)
    if trained is not None:
        if (not isinstance(trained, (list, tuple)) or len(trained) != n
                or not all(isinstance(b, Real) and not isinstance(b, bool) and 0 < b < 1 for b in trained)):
            raise ModelInputError(f"scheduler config field trained_betas must be null or a list of "
                                  f"num_train_timesteps={n} numbers in (0, 1)")
        return np.array([float(b) for b in trained], dtype=F32), schedule
    start = read_field(config, "beta_start", 0.0001, kind=Real)
    end = read_field(config, "beta_end", 0.02, kind=Real)
    if not 0 <= start <= end < 1:
        raise ModelInputError(f"scheduler config fields beta_start={start}, beta_end={end} must satisfy "
                              f"0 <= beta_start <= beta_end < 1")
    if schedule == "linear":
        return linspace32(start, end, n), schedule
    if schedule == "scaled_linear":
        root = linspace32(start**0.5, end**0.5, n)
        return root * root, schedule  # torch's x ** 2 is x * x
    return _cosine_betas(n), schedule


@dataclass
class Schedule:
    """The training noise schedule plus how inference timesteps are spaced over it."""

    num_train_timesteps: int
    betas: np.ndarray  # float32, before any zero-SNR rescaling
    timestep_spacing: str
    steps_offset: int
    prediction: Parameterization
    beta_schedule: str
    zero_snr: bool  # rescale_betas_zero_snr
    terminal_alpha: float | None  # alpha_cumprod put at the last timestep under zero SNR (None: keep 0)
    _alphas: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: Mapping, *, default_spacing: str, terminal_alpha: float | None = None) -> "Schedule":
        """`default_spacing` is the timestep_spacing the matching diffusers class assumes when the field is
        absent; `terminal_alpha` what that class puts at the last alpha_cumprod of a zero-SNR schedule."""
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
        betas.flags.writeable = False
        prediction = read_field(config, "prediction_type", "epsilon", allowed=PREDICTION_TYPES)
        return cls(
            num_train_timesteps=n,
            betas=betas,
            timestep_spacing=read_field(config, "timestep_spacing", default_spacing, allowed=SPACINGS),
            steps_offset=offset,
            prediction=PARAMETERIZATIONS[prediction],
            beta_schedule=beta_schedule,
            zero_snr=read_field(config, "rescale_betas_zero_snr", False, kind=bool),
            terminal_alpha=terminal_alpha,
        )

    @property
    def prediction_type(self) -> str:
        return self.prediction.name

    def alphas(self, math=NUMPY_F32) -> np.ndarray:
        """float32 alphas_cumprod, index = training timestep; a zero-SNR schedule's depend on `math`'s sqrt."""
        cache = self._alphas
        key = math.name if self.zero_snr else ""
        if key not in cache:
            betas = rescale_zero_terminal_snr(self.betas, math) if self.zero_snr else self.betas
            alphas_cumprod = cumprod32(F32(1.0) - betas)
            if self.zero_snr and self.terminal_alpha is not None:
                alphas_cumprod[-1] = F32(self.terminal_alpha)
            alphas_cumprod.flags.writeable = False
            cache[key] = alphas_cumprod
        return cache[key]

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return self.alphas(NUMPY_F32)

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

    def train_sigmas(self, math=NUMPY_F32) -> np.ndarray:
        """float32 sigma(t) = sqrt((1 - alphas_cumprod) / alphas_cumprod) for every training timestep,
        with the square root of `math`."""
        ac = self.alphas(math)
        return math.sqrt((F32(1.0) - ac) / ac)


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
