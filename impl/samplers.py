"""Diffusion samplers: DDIM, PNDM/PLMS, DDPM, Euler, Euler ancestral, LMS and DPM-Solver++ 2M.

Each is written from its paper over the shared schedule in impl/schedule.py, in the style of
k-diffusion's sampling.py, and matches diffusers' scheduler of the same name (its `reference`) step for
step. What the model predicts (epsilon or v) is read once, by the schedule's Parameterization (as
k-diffusion's denoiser wrappers do): a sampler asks it for x0 or eps and never branches on the
prediction type. Zero terminal SNR (rescale_betas_zero_snr) is the schedule's too; a sampler whose
diffusers class does not implement it refuses it. Adding a sampler is one class here, listed in
SAMPLERS (the harness reads the sampler names and reference classes from there). The pipeline drives
every sampler the same way:

    sampler = make_sampler("euler", scheduler_config, 20)
    x = sampler.initial_latents(initial_noise)      # initial_noise * init_noise_sigma
    for i in range(sampler.img2img_start(strength) if img2img else 0, len(sampler.timesteps)):
        eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i])
        x = sampler.step(eps, i, x, noise=next_recorded_noise() if sampler.needs_noise(i) else None)

img2img noises its init latents with `sampler.add_noise(latents, noise, start)` first. Samplers never
draw random numbers: a stochastic step takes `noise` (standard normal, shaped like the sample) from
the caller, exactly when the reference draws it, so recorded noise can be replayed one-to-one.

`sample`/`model_output` may be numpy arrays or torch tensors; this module needs NumPy alone and never
imports torch. Per-step coefficients are float32 NumPy scalars computed with the reference's float32
operations in its order (impl.schedule) and applied to the arrays as Python floats, which numpy (NEP 50)
and torch both treat as weakly typed float32 scalars; the array expressions keep the reference's order
of operations too, so float32 steps match the reference bit for bit, except where its arithmetic is not
IEEE: the reference's float32 sqrt (`x ** 0.5`), log and exp are torch's CPU kernels, Intel MKL, which
are not always correctly rounded. Square roots, logs and exps therefore come from a "math" chosen by the
sample's type (`Sampler._math`):

- numpy arrays: `impl.schedule.NUMPY_F32`, correctly rounded. Where MKL's result differs by an ulp
  (~0.6% of sqrt, ~1% of exp, ~0.1% of log arguments) a coefficient, and so the step, differs from the
  reference's by ~1e-7 relative; everywhere else the result is bit-identical.
- torch tensors: `TorchF32`, torch's own kernels, through the torch module the caller has already
  imported (looked up in sys.modules): bit-identical to the reference.

The public constants (`timesteps`, `sigmas`, `init_noise_sigma`) are the NumPy ones; the torch path
derives its own copy of the sigmas on first use (they differ only where a training sigma does), and
`initial_latents` scales the initial noise by the init_noise_sigma of the noise's own math.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np

from .errors import ModelInputError
from .schedule import F32, NUMPY_F32, Schedule, karras_sigmas, read_field, scalar, sigma_to_t


def _torch_module(x):
    """The torch module when `x` is a torch tensor, else None. Never imports torch: a torch tensor can
    only exist once torch has been imported, so it is looked up in sys.modules."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


class TorchF32:
    """float32 sqrt, log and exp computed by torch's CPU kernels, as the reference computes them (on x86
    builds, Intel MKL's vector math, elementwise and the same for 0-dim tensors as for vectors), for
    scalars or arrays. Built only from a torch module the caller has imported: see _torch_module."""

    name = "torch"

    def __init__(self, torch):
        self._torch = torch

    def _apply(self, op, x):
        a = np.asarray(x, dtype=F32)
        out = op(self._torch.from_numpy(a.reshape(-1).copy())).numpy().reshape(a.shape)
        return out if a.ndim else F32(out[()])

    def sqrt(self, x):
        return self._apply(self._torch.sqrt, x)

    def log(self, x):
        return self._apply(self._torch.log, x)

    def exp(self, x):
        return self._apply(self._torch.exp, x)


class Sampler:
    """Shared bookkeeping: validation, step order, recorded noise and img2img start."""

    name = ""
    reference: tuple[str, dict] = ("", {})  # the diffusers scheduler class it matches, and its config overrides
    default_spacing = "leading"  # what the matching diffusers class assumes when timestep_spacing is absent
    supports_karras = False
    supports_eta = False
    supports_zero_snr = True  # whether the reference implements rescale_betas_zero_snr
    terminal_alpha: float | None = None  # the last alpha_cumprod of a zero-SNR schedule (None: exactly 0)
    multistep = False  # whether a step uses earlier steps' model outputs
    timesteps: np.ndarray  # the UNet timestep of each step index: diffusers' scheduler.timesteps
    init_noise_sigma: float  # the initial latent is standard normal noise times this

    def __init__(self, config: Mapping, num_inference_steps: int, *, eta: float = 0.0, karras: bool | None = None):
        self.schedule = Schedule.from_config(config, default_spacing=self.default_spacing,
                                             terminal_alpha=self.terminal_alpha)
        if self.schedule.zero_snr and not self.supports_zero_snr:
            raise ModelInputError(f"rescale_betas_zero_snr=true is not supported by sampler {self.name!r} (its "
                                  f"reference, diffusers' {self.reference[0]}, ignores it); use one of "
                                  f"{', '.join(n for n, c in SAMPLERS.items() if c.supports_zero_snr)}")
        self.prediction = self.schedule.prediction
        n = self.schedule.num_train_timesteps
        if not isinstance(num_inference_steps, Integral) or isinstance(num_inference_steps, bool) \
                or not 1 <= num_inference_steps <= n:
            raise ModelInputError(f"num_inference_steps={num_inference_steps!r} must be an integer in "
                                  f"[1, num_train_timesteps={n}]")
        if karras is None:  # as diffusers: the config's use_karras_sigmas, ignored by samplers without them
            karras = self.supports_karras and read_field(config, "use_karras_sigmas", False, kind=bool)
        elif not isinstance(karras, bool):
            raise ModelInputError(f"karras={karras!r} must be True, False or None")
        if karras and not self.supports_karras:
            raise ModelInputError(f"karras=True is not supported by sampler {self.name!r}; it is supported by "
                                  f"{', '.join(n for n, c in SAMPLERS.items() if c.supports_karras)}")
        self.karras = karras
        if not self.supports_eta and eta != 0:
            raise ModelInputError(f"eta={eta!r} is only supported by sampler 'ddim'; use eta=0.0 for {self.name!r}")
        self.num_inference_steps = int(num_inference_steps)
        self.alphas_cumprod = self.schedule.alphas_cumprod.copy()
        self.init_noise_sigma = 1.0
        self._sigmas_by_math: dict[str, np.ndarray] = {}
        self.reset()

    def initial_latents(self, noise):
        """The first latents of a run from standard normal `noise`: noise * init_noise_sigma, that sigma
        computed with the noise's math (on torch tensors torch's, as the reference's)."""
        return noise * float(self._init_noise_sigma(self._math(noise)))

    def _init_noise_sigma(self, math) -> float:
        return self.init_noise_sigma

    def _math(self, sample):
        """The float32 sqrt/log/exp for steps on `sample`: torch's own on torch tensors, NumPy's otherwise."""
        torch = _torch_module(sample)
        return NUMPY_F32 if torch is None else TorchF32(torch)

    def _derive(self, math) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, float32 sigmas) computed with `math` (samplers with sigmas)."""
        raise NotImplementedError

    def _sigmas_for(self, math) -> np.ndarray:
        """The sigmas as derived with `math`: the public `sigmas` for NumPy's, a cached copy for torch's."""
        if math.name not in self._sigmas_by_math:
            self._sigmas_by_math[math.name] = self._derive(math)[1]
        return self._sigmas_by_math[math.name]

    def reset(self) -> None:
        """Forget multistep history so the sampler can run again (from any start index)."""
        self._next_index: int | None = None
        self._taken = 0
        self._history: list = []

    def scale_model_input(self, sample, step_index: int):
        """The UNet input for step `step_index`."""
        self._check_index(step_index)
        return sample

    def needs_noise(self, step_index: int) -> bool:
        """Whether step `step_index` takes a standard-normal `noise` shaped like the sample."""
        self._check_index(step_index)
        return False

    def step(self, model_output, step_index: int, sample, noise=None):
        """The sample for the next timestep. Steps must be taken consecutively: multistep history lives here."""
        self._check_index(step_index)
        if self._next_index is not None and step_index != self._next_index:
            raise ModelInputError(f"step_index={step_index} out of order: expected {self._next_index}; "
                                  f"steps run consecutively (call reset() to start over)")
        if tuple(model_output.shape) != tuple(sample.shape):
            raise ModelInputError(f"model_output shape {tuple(model_output.shape)} must equal sample shape "
                                  f"{tuple(sample.shape)}")
        if self.needs_noise(step_index) != (noise is not None):
            raise ModelInputError(f"step {step_index} of {self.name} {'needs' if noise is None else 'takes no'} "
                                  f"noise (ask needs_noise(step_index)); got noise="
                                  f"{'None' if noise is None else 'a tensor'}")
        if noise is not None and tuple(noise.shape) != tuple(sample.shape):
            raise ModelInputError(f"noise shape {tuple(noise.shape)} must equal sample shape {tuple(sample.shape)}")
        prev = self._step(model_output, step_index, sample, noise)
        self._next_index, self._taken = step_index + 1, self._taken + 1
        return prev

    def add_noise(self, original, noise, step_index: int):
        """`original` diffused to the noise level the run at `step_index` starts from (img2img)."""
        raise NotImplementedError

    def img2img_start(self, strength: float) -> int:
        """Index of the first step an img2img run at `strength` takes: int(steps * strength) steps are kept
        (diffusers' StableDiffusionImg2ImgPipeline.get_timesteps); it is also the euler-type begin index."""
        if not isinstance(strength, Real) or isinstance(strength, bool) or not 0 <= strength <= 1:
            raise ModelInputError(f"strength={strength!r} must be a number in [0, 1]")
        n = self.num_inference_steps
        kept = min(int(n * strength), n)
        if kept == 0:
            raise ModelInputError(f"strength={strength} with {n} steps leaves no denoising step; "
                                  f"use strength >= {1 / n:.4g}")
        return n - kept

    def _check_index(self, step_index: int) -> None:
        if not isinstance(step_index, Integral) or isinstance(step_index, bool) \
                or not 0 <= step_index < len(self.timesteps):
            raise ModelInputError(f"step_index={step_index!r} must be an integer in [0, {len(self.timesteps)})")

    def _step(self, model_output, i: int, sample, noise):
        raise NotImplementedError


class _AlphaSampler(Sampler):
    """Samplers of the discrete chain x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, a = alpha_cumprod, over
    integer training timesteps."""

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        self.timesteps = self.schedule.spaced(self.num_inference_steps).round().astype(np.int64)
        self.clip_range = None

    def add_noise(self, original, noise, step_index):
        self._check_index(step_index)
        math = self._math(original)
        a = self.schedule.alphas(math)[int(self.timesteps[step_index])]
        return float(math.sqrt(a)) * original + float(math.sqrt(1 - a)) * noise

    def _read_clip(self, config: Mapping) -> None:
        """clip_sample (on unless the config says otherwise, as in DDIM and DDPM) bounds |x0|."""
        if read_field(config, "clip_sample", True, kind=bool):
            self.clip_range = read_field(config, "clip_sample_range", 1.0, kind=Real)

    def _alpha_prev(self, t: int, final: np.float32, math) -> np.float32:
        # Past t = 0 there is no training timestep; `final` stands for alpha_cumprod there.
        return self.schedule.alphas(math)[t] if t >= 0 else final

    def _x0(self, model_output, sample, a_t: np.float32, sqrt):
        """Predicted clean sample at alpha_cumprod `a_t` (DDPM eq. 15), clipped if configured."""
        x0 = self.prediction.vp_x0(model_output, sample, sqrt(a_t), sqrt(1 - a_t))
        return x0 if self.clip_range is None else x0.clip(-self.clip_range, self.clip_range)


class DDIM(_AlphaSampler):
    """Song et al. (2021), eq. 12; eta interpolates between deterministic DDIM (0) and DDPM (1)."""

    name = "ddim"
    reference = ("DDIMScheduler", {})
    supports_eta = True

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        if not isinstance(eta, Real) or isinstance(eta, bool) or not 0 <= eta <= 1:
            raise ModelInputError(f"eta={eta!r} must be a number in [0, 1]")
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        self.eta = float(eta)
        self._read_clip(config)
        self.alpha_to_one = read_field(config, "set_alpha_to_one", True, kind=bool)

    def needs_noise(self, step_index):
        super().needs_noise(step_index)
        return self.eta > 0

    def _step(self, model_output, i, sample, noise):
        math = self._math(sample)
        sqrt = math.sqrt
        t = int(self.timesteps[i])
        # The previous timestep is t - T // steps whatever the spacing: the reference's convention.
        alphas = self.schedule.alphas(math)
        a_t = alphas[t]
        final = scalar(1.0) if self.alpha_to_one else alphas[0]
        a_prev = self._alpha_prev(t - self.schedule.num_train_timesteps // self.num_inference_steps, final, math)
        x0 = self._x0(model_output, sample, a_t, sqrt)
        eps = self.prediction.vp_eps(model_output, sample, sqrt(a_t), sqrt(1 - a_t))
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)  # sigma_t^2 / eta^2, eq. 16
        std = self.eta * sqrt(variance)
        prev = float(sqrt(a_prev)) * x0 + float(sqrt(1 - a_prev - std * std)) * eps
        return prev + float(std) * noise if self.eta > 0 else prev


class DDPM(_AlphaSampler):
    """Ho et al. (2020): the posterior mean q(x_{t-1} | x_t, x0) (eq. 7) plus fixed-small variance noise."""

    name = "ddpm"
    reference = ("DDPMScheduler", {})

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        self._read_clip(config)

    def needs_noise(self, step_index):
        super().needs_noise(step_index)
        return int(self.timesteps[step_index]) > 0  # the last step onto t = 0 is the mean alone

    def _step(self, model_output, i, sample, noise):
        math = self._math(sample)
        sqrt = math.sqrt
        t = int(self.timesteps[i])
        a_t = self.schedule.alphas(math)[t]
        a_prev = self._alpha_prev(int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1, scalar(1.0), math)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev  # of this (possibly strided) step
        x0 = self._x0(model_output, sample, a_t, sqrt)
        prev = float((sqrt(a_prev) * beta) / b_t) * x0 + float(sqrt(alpha) * b_prev / b_t) * sample
        if noise is None:
            return prev
        variance = np.maximum((1 - a_prev) / (1 - a_t) * beta, F32(1e-20))
        return prev + float(sqrt(variance)) * noise


class PNDM(_AlphaSampler):
    """Liu et al. (2022), pseudo numerical methods: the transfer phi (eq. 11) driven by a linear multistep
    (PLMS, eq. 12) on the noise predictions, warmed up by pseudo Runge-Kutta (PRK, 12 model calls over the
    first 3 steps) or, with skip_prk_steps (SD's default), by one pseudo-Heun step: the second timestep
    appears twice, once to predict and once to correct, so `timesteps` has steps + 1 entries."""

    name = "pndm"
    reference = ("PNDMScheduler", {})
    supports_zero_snr = False
    multistep = True

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        one = read_field(config, "set_alpha_to_one", False, kind=bool)
        self.final_alpha = scalar(1.0) if one else self.schedule.alphas_cumprod[0]
        self.stride = self.schedule.num_train_timesteps // self.num_inference_steps
        t = self.timesteps
        if read_field(config, "skip_prk_steps", False, kind=bool):
            self.prk_steps = 0
            self.timesteps = np.concatenate([t[:1], t[1:2], t[1:]])
        else:
            if self.num_inference_steps < 4:
                raise ModelInputError(f"num_inference_steps={num_inference_steps} is too few for PNDM's Runge-Kutta "
                                      f"warm-up (skip_prk_steps=false): use >= 4 or skip_prk_steps=true")
            half = self.stride // 2
            prk = np.array([[t[k], t[k + 1] + half, t[k + 1] + half, t[k + 1]] for k in range(3)]).ravel()
            self.prk_steps = len(prk)
            self.timesteps = np.concatenate([prk, t[3:]]).astype(np.int64)

    def reset(self):
        super().reset()
        self._rk_sum = None  # running RK4 combination of the noise predictions
        self._rk_sample = None  # the sample a multi-call step started from

    def _transfer(self, sample, t: int, t_prev: int, eps):
        """phi(x_t, eps, t -> t_prev), eq. 11."""
        math = self._math(sample)
        sqrt = math.sqrt
        a_t, a_prev = self.schedule.alphas(math)[t], self._alpha_prev(t_prev, self.final_alpha, math)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        eps = self.prediction.vp_eps(eps, sample, sqrt(a_t), sqrt(b_t))
        denominator = a_t * sqrt(b_prev) + sqrt(a_t * b_t * a_prev)
        return float(sqrt(a_prev / a_t)) * sample - float(a_prev - a_t) * eps / float(denominator)

    def _step(self, model_output, i, sample, noise):
        k, t = self._taken, int(self.timesteps[i])
        return self._prk(model_output, k, t, sample) if k < self.prk_steps else self._plms(model_output, k, t, sample)

    def _prk(self, eps, k, t, sample):
        # Call k % 4 of RK step k // 4: evaluations at t, the midpoint twice, then the end (RK4 weights).
        t_prev = t - (0 if k % 2 else self.stride // 2)
        if k % 4 == 0:
            self._rk_sum, self._rk_sample = (1 / 6) * eps, sample
            self._history.append(eps)
        elif k % 4 < 3:
            self._rk_sum = self._rk_sum + (1 / 3) * eps
        else:
            eps = self._rk_sum + (1 / 6) * eps
        return self._transfer(self._rk_sample, int(self.timesteps[k // 4 * 4]), t_prev, eps)

    def _plms(self, eps, k, t, sample):
        t_prev = t - self.stride
        if k == 1 and self.prk_steps == 0:
            # The repeated timestep: redo step 0 from its start sample with the mean of both predictions.
            t, t_prev = t + self.stride, t
            return self._transfer(self._rk_sample, t, t_prev, (eps + self._history[-1]) / 2)
        self._history = self._history[-3:] + [eps]
        e = self._history[::-1]
        if len(e) == 1:
            self._rk_sample = sample
            combined = eps
        elif len(e) == 2:
            combined = (3 * e[0] - e[1]) / 2
        elif len(e) == 3:
            combined = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
        else:
            combined = (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
        return self._transfer(sample, t, t_prev, combined)


class _SigmaSampler(Sampler):
    """Samplers of the variance-exploding ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022),
    with x = x_VP / sqrt(alpha_cumprod): the UNet sees x / sqrt(sigma^2 + 1)."""

    default_spacing = "linspace"
    terminal_alpha = 2.0 ** -24  # "close to 0 without being 0 so first sigma is not inf" (diffusers)

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        self.timesteps, self.sigmas = self._derive(NUMPY_F32)
        self._sigmas_by_math[NUMPY_F32.name] = self.sigmas
        self.init_noise_sigma = self._init_noise_sigma(NUMPY_F32)

    def _init_noise_sigma(self, math) -> float:
        top = self._sigmas_for(math).max()
        # "leading" never reaches the last training timestep, so the reference starts from unit-variance x_VP.
        return float(top if self.schedule.timestep_spacing != "leading" else math.sqrt(top * top + 1))

    def _derive(self, math):
        timesteps = self.schedule.spaced(self.num_inference_steps).astype(np.float32)
        train = self.schedule.train_sigmas(math)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        if self.karras:
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], self.num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
        return timesteps, np.append(sigmas, 0.0).astype(np.float32)

    def scale_model_input(self, sample, step_index):
        super().scale_model_input(sample, step_index)
        math = self._math(sample)
        s = self._sigmas_for(math)[step_index]
        return sample / float(math.sqrt(s * s + 1))

    def add_noise(self, original, noise, step_index):
        self._check_index(step_index)
        return original + noise * float(self._sigmas_for(self._math(original))[step_index])

    def _derivative(self, model_output, sigmas, i, sample, math):
        denoised = self.prediction.ve_x0(model_output, sample, sigmas[i], math)
        return (sample - denoised) / float(sigmas[i])


class Euler(_SigmaSampler):
    """Karras et al. (2022) Algorithm 2 without churn: one Euler step of the probability-flow ODE."""

    name = "euler"
    reference = ("EulerDiscreteScheduler", {})
    supports_karras = True

    def _step(self, model_output, i, sample, noise):
        math = self._math(sample)
        sigmas = self._sigmas_for(math)
        d = self._derivative(model_output, sigmas, i, sample, math)
        return sample + d * float(sigmas[i + 1] - sigmas[i])


class EulerAncestral(_SigmaSampler):
    """k-diffusion's sample_euler_ancestral: an Euler step down to sigma_down, then fresh noise of sigma_up,
    so that sigma_down^2 + sigma_up^2 = sigma_next^2 (the DDPM ancestral split)."""

    name = "euler_ancestral"
    reference = ("EulerAncestralDiscreteScheduler", {})

    def needs_noise(self, step_index):
        super().needs_noise(step_index)
        return True  # every step, the last included (where sigma_up = 0), as the reference draws it

    def _step(self, model_output, i, sample, noise):
        math = self._math(sample)
        sigmas = self._sigmas_for(math)
        s, s_next = sigmas[i], sigmas[i + 1]
        s_up = math.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
        s_down = math.sqrt(s_next * s_next - s_up * s_up)
        d = self._derivative(model_output, sigmas, i, sample, math)
        return sample + d * float(s_down - s) + noise * float(s_up)


# QUADPACK's 21-point Gauss-Kronrod rule (Piessens et al. 1983, qk21): the positive nodes, the Kronrod
# weights of +-node, and the weight of the centre node 0.
_GK21_NODES = (0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
               0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
               0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
               0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
               0.294392862701460198131126603103866, 0.148874338981631210884826001129720)
_GK21_WEIGHTS = (0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
                 0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
                 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
                 0.123491976262065851077958109831074, 0.134709217311473325928054001771707,
                 0.142775938577060080797094273138717, 0.147739104901338491374841515972068)
_GK21_CENTRE_WEIGHT = 0.149445554002916905664936468389821
_GK21_SUM_ORDER = (1, 3, 5, 7, 9, 0, 2, 4, 6, 8)  # the Gauss nodes first, as qk21 accumulates


def gauss_kronrod21(f, a: float, b: float) -> float:
    """The integral of f from a to b by qk21, accumulated in qk21's order; f maps an array of nodes to values.

    This is scipy.integrate.quad's first pass, and its result whenever the error estimate already meets
    the tolerance, as it does for the low-degree polynomials LMS integrates (the rule is exact to degree 31).
    """
    lo, hi = min(a, b), max(a, b)
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    offsets = half * np.array(_GK21_NODES)
    values = np.asarray(f(np.concatenate([[centre], centre - offsets, centre + offsets])), dtype=np.float64)
    total = _GK21_CENTRE_WEIGHT * values[0]
    for k in _GK21_SUM_ORDER:
        total += _GK21_WEIGHTS[k] * (values[1 + k] + values[11 + k])
    return float(total * half if b >= a else -(total * half))


class LMS(_SigmaSampler):
    """k-diffusion's sample_lms: the linear multistep method of order up to 4 on dx/dsigma, whose weights
    integrate the Lagrange basis polynomials through the last sigmas over [sigma_i, sigma_{i+1}].

    The weights are integrated numerically with qk21 on a float32 evaluation of the basis polynomial, as
    the reference does (scipy.integrate.quad on torch float32 scalars): the exact integral differs from
    that by float32 noise, which changes ~40% of the weights in the last bit once rounded to float32.
    """

    name = "lms"
    reference = ("LMSDiscreteScheduler", {})
    supports_zero_snr = False
    multistep = True
    supports_karras = True
    max_order = 4

    def _coefficient(self, s: np.ndarray, order: int, i: int, j: int) -> float:
        def basis(tau):
            tau = tau.astype(np.float32)
            value = np.ones_like(tau)
            for k in range(order):
                if k != j:
                    value = value * ((tau - s[i - k]) / (s[i - j] - s[i - k]))
            return value

        return gauss_kronrod21(basis, float(s[i]), float(s[i + 1]))

    def _step(self, model_output, i, sample, noise):
        math = self._math(sample)
        sigmas = self._sigmas_for(math)
        derivative = self._derivative(model_output, sigmas, i, sample, math)
        self._history = self._history[-(self.max_order - 1):] + [derivative]
        # The order follows the absolute step index, not the history length, as the reference does: an
        # img2img run's first steps then use a higher-order weight on fewer derivatives.
        order = min(i + 1, self.max_order)
        weights = [self._coefficient(sigmas, order, i, j) for j in range(order)]
        return sample + sum(w * d for w, d in zip(weights, reversed(self._history)))


class DPMSolverPP2M(Sampler):
    """Lu et al. (2022b), DPM-Solver++(2M), Algorithm 2 with the midpoint D1: multistep in
    lambda = log(alpha_t / sigma_t) on the data prediction; first order on the first and last steps."""

    name = "dpmpp_2m"
    reference = ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2})
    terminal_alpha = 2.0 ** -24
    multistep = True
    default_spacing = "linspace"
    supports_karras = True

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        self.timesteps, self.sigmas = self._derive(NUMPY_F32)
        self._sigmas_by_math[NUMPY_F32.name] = self.sigmas

    def _derive(self, math):
        n = self.num_inference_steps
        # Spaced over steps + 1 points with the last (t ~ 0) dropped: the final step goes to sigma = 0.
        trailing = self.schedule.timestep_spacing == "trailing"
        timesteps = (self.schedule.spaced(n) if trailing else self.schedule.spaced(n + 1)[:-1]).round()
        train = self.schedule.train_sigmas(math)
        if self.karras:
            sigmas = karras_sigmas(train[0], train[-1], n)
            timesteps = sigma_to_t(sigmas, np.log(train))
            if self.schedule.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        return timesteps.astype(np.int64), np.append(sigmas, 0.0).astype(np.float32)

    @staticmethod
    def _alpha_sigma(s: np.float32, math) -> tuple[np.float32, np.float32]:
        """VP alpha_t, sigma_t for the VE sigma `s`."""
        alpha = 1 / math.sqrt(s * s + 1)
        return alpha, s * alpha

    def _lambda(self, s: np.float32, math) -> np.float32:
        alpha, sigma = self._alpha_sigma(s, math)
        return math.log(alpha) - math.log(sigma)  # +inf at the final sigma = 0, where exp(-h) = 0

    def add_noise(self, original, noise, step_index):
        self._check_index(step_index)
        math = self._math(original)
        alpha, sigma = self._alpha_sigma(self._sigmas_for(math)[step_index], math)
        return float(alpha) * original + float(sigma) * noise

    def _step(self, model_output, i, sample, noise):
        math = self._math(sample)
        sigmas = self._sigmas_for(math)
        alpha_s, sigma_s = self._alpha_sigma(sigmas[i], math)
        alpha_t, sigma_t = self._alpha_sigma(sigmas[i + 1], math)
        x0 = self.prediction.vp_x0(model_output, sample, alpha_s, sigma_s)
        lambda_s = self._lambda(sigmas[i], math)
        h = self._lambda(sigmas[i + 1], math) - lambda_s
        c = alpha_t * (math.exp(-h) - 1)
        prev = float(sigma_t / sigma_s) * sample - float(c) * x0
        if self._history and i + 1 < len(self.timesteps):
            r = (lambda_s - self._lambda(sigmas[i - 1], math)) / h
            prev = prev - float(F32(0.5) * c) * (float(1 / r) * (x0 - self._history[-1]))
        self._history = [x0]
        return prev


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDIM, PNDM, DDPM, Euler, EulerAncestral, LMS, DPMSolverPP2M)
}


def make_sampler(name: str, scheduler_config: Mapping, num_inference_steps: int, *,
                 eta: float = 0.0, karras: bool | None = None) -> Sampler:
    """The sampler `name` over the schedule in `scheduler_config` (a diffusers scheduler_config.json dict,
    whatever class it names). `karras=None` takes the config's use_karras_sigmas where the sampler supports it."""
    if name not in SAMPLERS:
        raise ModelInputError(f"sampler {name!r} is not known; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](scheduler_config, num_inference_steps, eta=eta, karras=karras)
