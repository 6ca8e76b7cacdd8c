"""impl.samplers against diffusers' own scheduler classes, built with from_config(tiny-sd1's scheduler config).

impl.samplers and impl.schedule need NumPy alone (test_numpy_alone_suffices runs every sampler with torch,
scipy and diffusers made unimportable). The reference's float32 sqrt (`x ** 0.5`), log and exp are torch's
CPU kernels (Intel MKL), which are not always correctly rounded; impl uses NumPy's correctly rounded ones
on numpy arrays and torch's own on torch tensors (impl.samplers.TorchF32). Floors:

- torch tensors: every step and 20 free-running steps bit-identical (max |d| == 0); the constants the
  torch path uses (timesteps, sigmas) equal, as do alphas_cumprod and the bit-exact linspace/cumprod.
- numpy arrays: bit-identical (max |d| == 0) whenever none of the sqrt/log/exp the step (or, for
  multistep samplers, any earlier step) used is rounded differently by MKL, which the test detects by
  evaluating both (WatchedNumpyF32); otherwise within the project's floors (1e-6 relative L2 per step,
  1e-4 after 20 free-running steps). The same numpy-array code with torch's sqrt/log/exp substituted is
  bit-identical in every case, so nothing but those roundings differs.

Stochastic samplers get the same noise on both sides: diffusers' randn_tensor is patched to hand out the
tensors our sampler is given, in order. diffusers' LMSDiscreteScheduler integrates with the real
scipy.integrate.quad.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from scipy import integrate

from sd_parity.impl.errors import ModelInputError
from sd_parity.impl.samplers import SAMPLERS, TorchF32, gauss_kronrod21, make_sampler
from sd_parity.impl.schedule import NUMPY_F32, Schedule, cumprod32, exp32, fma32, linspace32, log32

REPO = Path(__file__).resolve().parents[1]
# each sampler's diffusers class and config overrides, as the sampler declares them (Sampler.reference)
REFERENCE = {name: (getattr(diffusers, cls.reference[0]), cls.reference[1]) for name, cls in SAMPLERS.items()}
NOISE_MODULES = sorted({cls.__module__ for cls, _ in REFERENCE.values()})
KARRAS = tuple(name for name, cls in SAMPLERS.items() if cls.supports_karras)
MULTISTEP = tuple(name for name, cls in SAMPLERS.items() if cls.multistep)
ZERO_SNR = tuple(name for name, cls in SAMPLERS.items() if cls.supports_zero_snr)
SPACINGS = ("leading", "trailing", "linspace")
SHAPE = (2, 4, 8, 8)
TORCH_F32 = TorchF32(torch)


@pytest.fixture(scope="module")
def sd_config(tiny_model):
    return json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())


def same_bits(a, b) -> bool:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


class WatchedNumpyF32:
    """NumPy's float32 math, exactly what impl uses on numpy arrays, noting whether torch's kernels (the
    reference's) would have rounded any result differently."""

    name = NUMPY_F32.name

    def __init__(self):
        self.disagreed = False

    def _watch(self, op, x):
        ours = getattr(NUMPY_F32, op)(x)
        self.disagreed |= not same_bits(ours, getattr(TORCH_F32, op)(x))
        return ours

    def sqrt(self, x):
        return self._watch("sqrt", x)

    def log(self, x):
        return self._watch("log", x)

    def exp(self, x):
        return self._watch("exp", x)


def constants_disagree(sampler) -> bool:
    """Whether NumPy's and torch's square roots give the sampler different sigmas, or (zero terminal SNR
    rescales the schedule through a square root) different alphas_cumprod."""
    alphas = not same_bits(sampler.schedule.alphas(NUMPY_F32), sampler.schedule.alphas(TORCH_F32))
    return alphas or hasattr(sampler, "sigmas") and not same_bits(sampler._sigmas_for(NUMPY_F32),
                                                                  sampler._sigmas_for(TORCH_F32))


def timesteps_disagree(sampler) -> bool:
    """Whether NumPy's and torch's square roots give the sampler different timesteps (Karras timesteps
    interpolate in log training sigma)."""
    return sampler.karras and not same_bits(sampler.schedule.train_sigmas(NUMPY_F32),
                                            sampler.schedule.train_sigmas(TORCH_F32))


def watch_numpy_math(sampler) -> WatchedNumpyF32:
    watched = WatchedNumpyF32()
    sampler._math = lambda sample: TORCH_F32 if isinstance(sample, torch.Tensor) else watched
    return watched


def force_torch_math(sampler) -> None:
    """Test-only: the reference's sqrt/log/exp on numpy arrays too (impl itself never does this)."""
    sampler._math = lambda sample: TORCH_F32


@pytest.fixture
def noise_queue(monkeypatch):
    """A list diffusers' randn_tensor pops its noise from, in order."""
    queue: list[torch.Tensor] = []

    def randn_tensor(shape, **_):
        assert queue, "diffusers drew more noise than our sampler was given"
        noise = queue.pop(0)
        assert tuple(noise.shape) == tuple(shape)
        return noise

    for module in NOISE_MODULES:
        if hasattr(sys.modules[module], "randn_tensor"):
            monkeypatch.setattr(sys.modules[module], "randn_tensor", randn_tensor)
    return queue


def build(name, config, steps, overrides=None, *, karras=False, eta=0.0):
    overrides = dict(overrides or {})
    cls, extra = REFERENCE[name]
    ref = cls.from_config(config, **extra, **overrides, **({"use_karras_sigmas": True} if karras else {}))
    ref.set_timesteps(steps)
    return ref, make_sampler(name, {**config, **overrides}, steps, eta=eta, karras=karras)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)), initial=0.0))


def as_torch(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


# --- constants -----------------------------------------------------------------------------------------

CONSTANT_CASES = [(name, steps, {"timestep_spacing": spacing}, False)
                  for name in SAMPLERS for steps in (1, 2, 4, 20, 50) for spacing in SPACINGS]
CONSTANT_CASES += [(name, steps, {"timestep_spacing": spacing}, True)
                   for name in KARRAS for steps in (1, 2, 4, 20, 50) for spacing in SPACINGS]
CONSTANT_CASES += [
    (name, steps, overrides, karras)
    for name in SAMPLERS for steps in (4, 20)
    for overrides in ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                      {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
                      {"prediction_type": "v_prediction", "set_alpha_to_one": True, "steps_offset": 0})
    for karras in ((False, True) if name in KARRAS else (False,))
]
CONSTANT_CASES += [("pndm", steps, {"skip_prk_steps": False, "timestep_spacing": spacing}, False)
                   for steps in (4, 20, 50) for spacing in SPACINGS]
CONSTANT_CASES += [(name, steps, {"rescale_betas_zero_snr": True, "timestep_spacing": spacing,
                                  "prediction_type": "v_prediction"}, False)
                   for name in ZERO_SNR for steps in (1, 4, 20) for spacing in SPACINGS]


@pytest.mark.parametrize("name,steps,overrides,karras", CONSTANT_CASES,
                         ids=lambda v: v if isinstance(v, str) else str(v))
def test_constants_match_diffusers(sd_config, name, steps, overrides, karras):
    """The torch path's timesteps and sigmas, and alphas_cumprod, bit for bit. The public (NumPy) ones
    too, unless one of the training sigmas they come from is rounded differently by torch's sqrt (within
    an ulp then), or the zero-SNR rescaling's square root is (within 1e-5 relative then)."""
    ref, ours = build(name, sd_config, steps, overrides, karras=karras)
    rescaled = ours.schedule.zero_snr and not same_bits(ours.schedule.alphas(NUMPY_F32),
                                                        ours.schedule.alphas(TORCH_F32))
    expected_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == expected_t.dtype
    assert ours.alphas_cumprod.dtype == np.float32
    assert max_abs(ours.schedule.alphas(TORCH_F32), ref.alphas_cumprod.double()) == 0
    if not rescaled:
        assert max_abs(ours.alphas_cumprod, ref.alphas_cumprod.double()) == 0
    else:  # zero terminal SNR through NumPy's (correctly rounded) square root; the shift to zero cancels
        # most digits of the last entries, so an ulp of the root is a few 1e-6 of them
        expected = ref.alphas_cumprod.double().numpy()
        assert np.all(np.abs(ours.alphas_cumprod.astype(np.float64) - expected) <= 1e-5 * expected)
    top = ref.sigmas.max() if hasattr(ours, "sigmas") else None
    if hasattr(ours, "sigmas"):
        timesteps, sigmas = ours._derive(TORCH_F32)
        assert np.array_equal(timesteps, expected_t) and timesteps.dtype == expected_t.dtype
        assert sigmas.shape == ours.sigmas.shape == tuple(ref.sigmas.shape)
        assert max_abs(sigmas, ref.sigmas.double()) == 0
        top = sigmas.max()
    if not hasattr(ours, "sigmas"):
        pass
    elif not constants_disagree(ours):
        assert max_abs(ours.sigmas, ref.sigmas.double()) == 0
    else:  # within an ulp of the reference's (1e-5 relative for a rescaled schedule)
        bound = 1e-5 * ref.sigmas.double().numpy() if rescaled else np.spacing(np.abs(ref.sigmas.numpy()))
        assert np.all(np.abs(ours.sigmas.astype(np.float64) - ref.sigmas.double().numpy()) <= bound)
    if not timesteps_disagree(ours) or expected_t.dtype == np.int64:
        assert np.array_equal(ours.timesteps, expected_t)
    else:  # fractional Karras timesteps interpolate in log sigma: a few float32 ulps
        assert max_abs(ours.timesteps, expected_t) <= 1e-4
    init = float(ref.init_noise_sigma)
    sqrt_agrees = top is None or same_bits(NUMPY_F32.sqrt(top * top + 1), TORCH_F32.sqrt(top * top + 1))
    if not constants_disagree(ours) and sqrt_agrees:
        assert float(ours.init_noise_sigma) == init
    else:
        bound = 1e-5 * init if rescaled else float(np.spacing(np.float32(init)))
        assert abs(float(ours.init_noise_sigma) - init) <= bound


def test_trained_betas_match_diffusers(sd_config):
    betas = np.linspace(0.0001, 0.02, 1000).tolist()
    for name in SAMPLERS:
        ref, ours = build(name, sd_config, 20, {"trained_betas": betas})
        assert max_abs(ours.alphas_cumprod, ref.alphas_cumprod.double()) == 0


# --- the float32 primitives impl.schedule rebuilds in NumPy -----------------------------------------

LINSPACE_CASES = [(0.00085**0.5, 0.012**0.5, 1000), (0.0001, 0.02, 1000), (0.00085, 0.012, 1000),
                  (0.0001**0.5, 0.02**0.5, 1000), (0.00085**0.5, 0.012**0.5, 4000), (0.0001, 0.02, 500),
                  (0.0, 1.0, 2), (0.0, 1.0, 3), (0.1, 0.1, 7), (-3.0, 7.5, 999), (5.0, -5.0, 1001), (0.3, 0.7, 1)]
LINSPACE_CASES += [(float(a), float(b), int(n)) for a, b, n in zip(
    np.random.default_rng(0).uniform(0, 0.2, 150), np.random.default_rng(1).uniform(0, 1, 150),
    np.random.default_rng(2).integers(2, 3000, 150))]


def test_linspace32_is_torch_linspace():
    """Bit for bit, the SD endpoints (scaled_linear's square roots, linear) and 150 random ranges."""
    for start, end, n in LINSPACE_CASES:
        expected = torch.linspace(start, end, n, dtype=torch.float32).numpy()
        assert same_bits(linspace32(start, end, n), expected), (start, end, n)


def test_cumprod32_is_torch_cumprod():
    rng = np.random.default_rng(3)
    for start, end, n in LINSPACE_CASES[:40]:
        alphas = 1.0 - torch.linspace(start, end, n, dtype=torch.float32) ** 2
        assert same_bits(cumprod32(alphas.numpy()), torch.cumprod(alphas, dim=0).numpy())
        values = torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32))
        assert same_bits(cumprod32(values.numpy()), torch.cumprod(values, dim=0).numpy())


def test_schedules_are_torch_schedules():
    """betas (all three schedules) and alphas_cumprod as diffusers computes them with torch."""
    for config in ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                   {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                   {"beta_schedule": "squaredcos_cap_v2"}, {"num_train_timesteps": 4000}):
        ref = DDIMScheduler.from_config(config)
        assert same_bits(Schedule.from_config(config, default_spacing="leading").alphas_cumprod,
                         ref.alphas_cumprod.numpy())


def exact_fma(a, b, c) -> np.float32:
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    near = np.float32(float(exact))
    candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.int32)) & 1))


def test_fma32_rounds_once():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 3000)).astype(np.float32)
    c = (rng.standard_normal(3000) * 10.0 ** rng.integers(-12, 3, 3000)).astype(np.float32)
    c[:1000] = -(a[:1000] * b[:1000])  # exact cancellation of the rounded product
    c[1000:1100] = np.float32(1.0)  # sums on the float32 grid's halfway points
    a[1000:1100], b[1000:1100] = np.float32(1 + 2**-12), np.float32(2**-12)
    # exact sums a hair off a halfway point that float64 rounds onto it (1 + 2^-23 + 2^-24 -+ 2^-60):
    # rounding the float64 sum to float32 would then round to even, the wrong way
    a[1100:1104] = np.float32(1 + 2**-18)
    b[1100:1104] = np.float32((1 - 2**-18) * 2**-24) * np.array([1, 1, -1, -1], dtype=np.float32)
    c[1100:1104] = np.array([1 + 2**-23, 1 + 3 * 2**-23, -(1 + 2**-23), -(1 + 3 * 2**-23)], dtype=np.float32)
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    got = fma32(a, b, c)
    assert all(same_bits(g, exact_fma(x, y, z)) for g, x, y, z in zip(got, a, b, c))
    assert not same_bits(naive[1100:1104], got[1100:1104])  # the cases above do test the correction


def test_numpy_math_is_correctly_rounded():
    rng = np.random.default_rng(5)
    x = rng.uniform(1e-6, 40, 20000).astype(np.float32)
    assert same_bits(NUMPY_F32.sqrt(x), np.sqrt(x.astype(np.float64)).astype(np.float32))
    for v in x[:2000]:
        assert same_bits(log32(v), np.float32(math.log(float(v))))
        assert same_bits(exp32(-v / 8), np.float32(math.exp(-float(v) / 8)))
    assert log32(0.0) == -np.inf and exp32(-np.inf) == 0 and exp32(100.0) == np.inf


def test_torch_math_is_torch():
    """TorchF32 is what torch computes on 0-dim float32 tensors (the reference's scalars) and vectors."""
    x = np.random.default_rng(6).uniform(1e-3, 20, 300).astype(np.float32)
    for op in ("sqrt", "log", "exp"):
        assert same_bits(getattr(TORCH_F32, op)(x), getattr(torch, op)(torch.from_numpy(x)).numpy())
        for v in x[:50]:
            scalar = getattr(TORCH_F32, op)(v)
            assert isinstance(scalar, np.float32) and same_bits(scalar, getattr(torch, op)(torch.tensor(v)).item())
    for v in x[:50]:
        assert same_bits(TORCH_F32.sqrt(v), (torch.tensor(v) ** 0.5).item())


# --- steps -----------------------------------------------------------------------------------------------

VARIANTS = [(name, {"timestep_spacing": spacing, "prediction_type": prediction}, {})
            for name in SAMPLERS for spacing in SPACINGS for prediction in ("epsilon", "v_prediction")]
VARIANTS += [(name, {}, {"karras": True}) for name in KARRAS]
VARIANTS += [
    ("dpmpp_2m", {"beta_schedule": "linear", "timestep_spacing": "leading"}, {"karras": True}),
    ("ddim", {}, {"eta": 1.0}),
    ("ddim", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, {"eta": 0.5}),
    ("ddim", {"beta_schedule": "linear", "clip_sample": True, "set_alpha_to_one": True}, {}),
    ("ddpm", {"beta_schedule": "linear", "clip_sample": True, "clip_sample_range": 0.5}, {}),
    ("pndm", {"skip_prk_steps": False}, {}),
    ("pndm", {"skip_prk_steps": False, "timestep_spacing": "linspace", "prediction_type": "v_prediction"}, {}),
]
# zero terminal SNR, with v-prediction as it needs (an epsilon model cannot denoise pure noise)
VARIANTS += [(name, {"rescale_betas_zero_snr": True, "timestep_spacing": spacing, "prediction_type": "v_prediction"}, {})
             for name in ZERO_SNR for spacing in ("trailing", "linspace")]
VARIANTS += [("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
              {"eta": 0.5})]
VARIANT_IDS = [f"{name}-{'-'.join(map(str, overrides.values()))}-{'-'.join(f'{k}{v}' for k, v in kwargs.items())}"
               for name, overrides, kwargs in VARIANTS]


def reference_step(ref, name, model_output, t, sample, eta):
    return ref.step(model_output, t, sample, **({"eta": eta} if name == "ddim" else {})).prev_sample


@pytest.mark.parametrize("backend", ["numpy", "numpy-torch-math", "torch"])
@pytest.mark.parametrize("name,overrides,kwargs", VARIANTS, ids=VARIANT_IDS)
def test_each_step_bit_identical(sd_config, noise_queue, name, overrides, kwargs, backend):
    """Fresh random float32 sample and model output at every step, history included. On numpy arrays
    bit-identical unless a sqrt/log/exp of this step (or an earlier one, for multistep samplers) or a
    sigma is rounded differently by the reference's torch kernels; then within 1e-6 relative L2."""
    ref, ours = build(name, sd_config, 10, overrides, **kwargs)
    to_ours = (lambda v: v) if backend == "torch" else (lambda v: v.numpy())
    if backend == "numpy-torch-math":
        force_torch_math(ours)
    watched = watch_numpy_math(ours) if backend == "numpy" else WatchedNumpyF32()
    tainted = backend == "numpy" and constants_disagree(ours)
    gen = torch.Generator().manual_seed(1)
    for i, t in enumerate(ref.timesteps):
        sample, model_output = torch.randn(SHAPE, generator=gen) * 3, torch.randn(SHAPE, generator=gen)
        noise = torch.randn(SHAPE, generator=gen) if ours.needs_noise(i) else None
        noise_queue.extend([] if noise is None else [noise])
        ref.scale_model_input(sample, t)
        expected = reference_step(ref, name, model_output, t, sample, getattr(ours, "eta", 0.0))
        if name not in MULTISTEP:
            watched.disagreed = False
        got = ours.step(to_ours(model_output), i, to_ours(sample), None if noise is None else to_ours(noise))
        assert type(got) is type(to_ours(sample)) and got.dtype == to_ours(sample).dtype
        worst = max_abs(as_torch(got), expected)
        rel = float((as_torch(got) - expected).norm() / expected.norm())
        assert rel <= 1e-6, f"step {i}: relative L2 {rel}"
        if not (tainted or watched.disagreed):
            assert worst == 0, f"step {i}: max|d|={worst}"
    assert not noise_queue


def free_run(ref, ours, name, backend, noise_queue, start=0, x=None):
    """Both sides from the same x over steps start.., model output = 0.9 * UNet input + 0.1 * fixed."""
    gen = torch.Generator().manual_seed(2)
    fixed = torch.randn(SHAPE, generator=gen)
    x_ref = torch.randn(SHAPE, generator=gen) * ref.init_noise_sigma if x is None else x
    if backend == "numpy-torch-math":
        force_torch_math(ours)
    to_ours = (lambda v: v) if backend == "torch" else (lambda v: v.numpy())
    x_ours = to_ours(x_ref.clone())
    eta = getattr(ours, "eta", 0.0)
    worst = 0.0
    for i in range(start, len(ours.timesteps)):
        t = ref.timesteps[i]
        noise = torch.randn(SHAPE, generator=gen) if ours.needs_noise(i) else None
        noise_queue.extend([] if noise is None else [noise])
        x_ref = reference_step(ref, name, 0.9 * ref.scale_model_input(x_ref, t) + 0.1 * fixed, t, x_ref, eta)
        model_output = 0.9 * ours.scale_model_input(x_ours, i) + 0.1 * to_ours(fixed)
        x_ours = ours.step(model_output, i, x_ours, None if noise is None else to_ours(noise))
        assert type(x_ours) is type(to_ours(fixed)) and x_ours.dtype == to_ours(fixed).dtype
        worst = max(worst, max_abs(as_torch(x_ours), x_ref))
    assert not noise_queue
    rel = float((as_torch(x_ours) - x_ref).norm() / x_ref.norm())
    return worst, rel


@pytest.mark.parametrize("backend", ["torch", "numpy", "numpy-torch-math"])
@pytest.mark.parametrize("name,overrides,kwargs", VARIANTS, ids=VARIANT_IDS)
def test_free_running_20_steps_bit_identical(sd_config, noise_queue, name, overrides, kwargs, backend):
    """Bit-identical on torch; on numpy too unless some sqrt/log/exp or sigma of the run is rounded
    differently by the reference's torch kernels (then within 1e-4 relative L2)."""
    ref, ours = build(name, sd_config, 20, overrides, **kwargs)
    watched = watch_numpy_math(ours) if backend == "numpy" else WatchedNumpyF32()
    tainted = backend == "numpy" and constants_disagree(ours)
    worst, rel = free_run(ref, ours, name, backend, noise_queue)
    assert rel <= 1e-4
    if not (tainted or watched.disagreed):
        assert worst == 0


@pytest.mark.parametrize("strength,steps", [(0.6, 20), (0.35, 10), (1.0, 8)])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_matches_diffusers(sd_config, noise_queue, name, strength, steps):
    ref, ours = build(name, sd_config, steps)
    pipe = SimpleNamespace(scheduler=ref)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    start = ours.img2img_start(strength)
    assert np.array_equal(ours.timesteps[start:], timesteps.numpy())
    gen = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    noised = ref.add_noise(latents, noise, timesteps[:1])
    assert max_abs(ours.add_noise(latents, noise, start), noised) == 0
    watched = watch_numpy_math(ours)
    on_numpy = ours.add_noise(latents.numpy(), noise.numpy(), start)
    if watched.disagreed or constants_disagree(ours):
        assert max_abs(on_numpy, noised) <= 1e-6 * float(noised.abs().max())
    else:
        assert max_abs(on_numpy, noised) == 0
    worst, _ = free_run(ref, ours, name, "torch", noise_queue, start=start, x=noised)
    assert worst == 0


# --- the quadrature LMS uses -----------------------------------------------------------------------------

def test_gauss_kronrod21_exact_for_polynomials():
    rng = np.random.default_rng(0)
    for degree in range(32):
        coefficients = rng.standard_normal(degree + 1)
        poly = np.polynomial.Polynomial(coefficients)
        a, b = rng.uniform(-3, 3, 2)
        exact = poly.integ()(b) - poly.integ()(a)
        assert abs(gauss_kronrod21(poly, a, b) - exact) <= 1e-12 * max(1.0, abs(exact))


def test_gauss_kronrod21_is_scipy_quad():
    sigmas = np.sort(np.random.default_rng(1).uniform(0.03, 15, 12).astype(np.float32))[::-1]
    for i in range(3, 11):
        for order in range(1, 5):
            for j in range(order):
                def f(tau):
                    value = np.float32(1.0)
                    for k in (k for k in range(order) if k != j):
                        value = value * ((np.float32(tau) - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]))
                    return float(value)

                expected = integrate.quad(f, float(sigmas[i]), float(sigmas[i + 1]), epsrel=1e-4)[0]
                assert gauss_kronrod21(lambda x: [f(v) for v in x], float(sigmas[i]), float(sigmas[i + 1])) == expected


# --- NumPy alone ----------------------------------------------------------------------------------------

NUMPY_ALONE = r"""
import json, sys
for blocked in ("torch", "scipy", "diffusers", "transformers"):
    sys.modules[blocked] = None  # `import torch` and the rest now raise ImportError
try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError("torch is still importable")
import numpy as np
from sd_parity.impl.samplers import SAMPLERS, make_sampler

config = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
runs = 0
for name in SAMPLERS:
    options = [{}, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}]
    options += [{"karras": True}] if name in ("euler", "lms", "dpmpp_2m") else []
    options += [{"eta": 0.5}] if name == "ddim" else []
    options += [{"skip_prk_steps": False}] if name == "pndm" else []
    options += [{"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}] \
        if SAMPLERS[name].supports_zero_snr else []
    for option in options:
        kwargs = {k: option.pop(k) for k in ("karras", "eta") if k in option}
        sampler = make_sampler(name, {**config, **option}, 6, **kwargs)
        shape = (1, 4, 4, 4)
        x = rng.standard_normal(shape).astype(np.float32) * sampler.init_noise_sigma
        start = sampler.img2img_start(0.5)
        noised = sampler.add_noise(x, rng.standard_normal(shape).astype(np.float32), start)
        assert noised.dtype == np.float32
        for i in range(len(sampler.timesteps)):
            eps = 0.9 * sampler.scale_model_input(x, i) + 0.1
            noise = rng.standard_normal(shape).astype(np.float32) if sampler.needs_noise(i) else None
            x = sampler.step(eps, i, x, noise=noise)
        assert type(x) is np.ndarray and x.dtype == np.float32 and np.isfinite(x).all(), name
        runs += 1
assert sys.modules["torch"] is None and not [m for m in sys.modules if m.startswith(("torch.", "scipy."))]
print("numpy alone:", runs, "runs")
"""


def test_numpy_alone_suffices(sd_config):
    """Every sampler (and option, zero terminal SNR included) runs on numpy arrays in a process where
    torch, scipy and diffusers cannot be imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", NUMPY_ALONE, json.dumps(sd_config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "numpy alone: 24 runs" in result.stdout


# --- interface and bad input -----------------------------------------------------------------------------

def test_noise_schedule_per_sampler(sd_config):
    def noisy_steps(name, config=sd_config, **kwargs):
        sampler = make_sampler(name, config, 10, **kwargs)
        return [i for i in range(len(sampler.timesteps)) if sampler.needs_noise(i)]

    assert noisy_steps("ddim") == [] and noisy_steps("ddim", eta=0.5) == list(range(10))
    assert noisy_steps("ddpm") == list(range(10))  # leading + steps_offset=1: the last timestep is 1, not 0
    assert noisy_steps("ddpm", {**sd_config, "timestep_spacing": "linspace"}) == list(range(9))
    assert noisy_steps("euler_ancestral") == list(range(10))
    for name in ("pndm", "euler", "lms", "dpmpp_2m"):
        assert noisy_steps(name) == []


def test_pndm_timesteps_repeat_the_second(sd_config):
    sampler = make_sampler("pndm", sd_config, 4)
    assert sampler.timesteps.tolist() == [751, 501, 501, 251, 1]
    assert make_sampler("pndm", sd_config, 1).timesteps.tolist() == [1]


def test_karras_from_config(sd_config):
    config = {**sd_config, "use_karras_sigmas": True}
    assert np.array_equal(make_sampler("euler", config, 10).sigmas,
                          make_sampler("euler", sd_config, 10, karras=True).sigmas)
    assert not np.array_equal(make_sampler("euler", config, 10, karras=False).sigmas,
                              make_sampler("euler", config, 10).sigmas)
    make_sampler("ddim", config, 10)  # samplers without Karras sigmas ignore the field, as diffusers does


def test_reset_reruns_identically(sd_config):
    sampler = make_sampler("dpmpp_2m", sd_config, 5)
    x = np.ones(SHAPE, dtype=np.float32)

    def run():
        y = x
        for i in range(len(sampler.timesteps)):
            y = sampler.step(0.5 * y, i, y)
        return y

    first = run()
    sampler.reset()
    assert np.array_equal(run(), first)


@pytest.mark.parametrize("call,field", [
    (lambda c: make_sampler("heun", c, 10), "heun"),
    (lambda c: make_sampler("euler", [c], 10), "scheduler config"),
    (lambda c: make_sampler("euler", c, 10, karras="yes"), "karras"),
    (lambda c: make_sampler("euler", {**c, "use_karras_sigmas": "yes"}, 10), "use_karras_sigmas"),
    (lambda c: make_sampler("ddim", {**c, "beta_schedule": "sigmoid"}, 10), "beta_schedule"),
    (lambda c: make_sampler("ddim", {**c, "timestep_spacing": "even"}, 10), "timestep_spacing"),
    (lambda c: make_sampler("euler", {**c, "prediction_type": "sample"}, 10), "prediction_type"),
    (lambda c: make_sampler("pndm", {**c, "rescale_betas_zero_snr": True}, 10), "rescale_betas_zero_snr"),
    (lambda c: make_sampler("lms", {**c, "rescale_betas_zero_snr": True}, 10), "rescale_betas_zero_snr"),
    (lambda c: make_sampler("ddim", {**c, "rescale_betas_zero_snr": "yes"}, 10), "rescale_betas_zero_snr"),
    (lambda c: make_sampler("ddim", {**c, "trained_betas": [0.01] * 10}, 10), "trained_betas"),
    (lambda c: make_sampler("ddim", {**c, "num_train_timesteps": "1000"}, 10), "num_train_timesteps"),
    (lambda c: make_sampler("ddim", {**c, "clip_sample": "yes"}, 10), "clip_sample"),
    (lambda c: make_sampler("ddim", c, 0), "num_inference_steps"),
    (lambda c: make_sampler("ddim", c, 1001), "num_inference_steps"),
    (lambda c: make_sampler("ddim", c, True), "num_inference_steps"),
    (lambda c: make_sampler("ddim", c, 10, karras=True), "karras"),
    (lambda c: make_sampler("euler", c, 10, eta=0.5), "eta"),
    (lambda c: make_sampler("ddim", c, 10, eta=1.5), "eta"),
    (lambda c: make_sampler("pndm", {**c, "skip_prk_steps": False}, 3), "num_inference_steps"),
    (lambda c: make_sampler("ddim", c, 10).img2img_start(1.2), "strength"),
    (lambda c: make_sampler("ddim", c, 10).img2img_start(0.05), "strength"),
    (lambda c: make_sampler("ddim", c, 10).scale_model_input(np.zeros(SHAPE), 10), "step_index"),
])
def test_bad_input_raises_model_input_error(sd_config, call, field):
    with pytest.raises(ModelInputError, match=field):
        call(sd_config)


def test_step_misuse_raises_model_input_error(sd_config):
    x = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ModelInputError, match="needs"):
        make_sampler("euler_ancestral", sd_config, 10).step(x, 0, x)
    with pytest.raises(ModelInputError, match="takes no"):
        make_sampler("euler", sd_config, 10).step(x, 0, x, noise=x)
    with pytest.raises(ModelInputError, match="shape"):
        make_sampler("euler", sd_config, 10).step(x[:1], 0, x)
    sampler = make_sampler("lms", sd_config, 10)
    sampler.step(x, 0, x)
    with pytest.raises(ModelInputError, match="out of order"):
        sampler.step(x, 2, x)
