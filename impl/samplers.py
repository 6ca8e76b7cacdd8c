"""Diffusion samplers: DDIM, PNDM/PLMS, DDPM, Euler, Euler ancestral, LMS and DPM-Solver++ 2M.

Each is written from its paper over the shared schedule in impl/schedule.py, in the style of
k-diffusion's sampling.py, and matches diffusers' scheduler of the same name step for step. The
pipeline drives every sampler the same way:

    sampler = make_sampler("euler", scheduler_config, 20)
    x = initial_noise * sampler.init_noise_sigma
    for i in range(sampler.img2img_start(strength) if img2img else 0, len(sampler.timesteps)):
        eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i])
        x = sampler.step(eps, i, x, noise=next_recorded_noise() if sampler.needs_noise(i) else None)

img2img noises its init latents with `sampler.add_noise(latents, noise, start)` first. Samplers never
draw random numbers: a stochastic step takes `noise` (standard normal, shaped like the sample) from
the caller, exactly when the reference draws it, so recorded noise can be replayed one-to-one.

`sample`/`model_output` may be numpy arrays or torch tensors. Per-step coefficients are computed as
float32 scalars exactly as the reference computes them (impl.schedule.scalar) and applied with plain
arithmetic in the reference's order of operations, so float32 steps are bit-identical on both backends.
"""
from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
import torch

from impl.errors import ModelInputError
from impl.schedule import Schedule, karras_sigmas, read_field, scalar, sigma_to_t


class Sampler:
    """Shared bookkeeping: validation, step order, recorded noise and img2img start."""

    name = ""
    default_spacing = "leading"  # what the matching diffusers class assumes when timestep_spacing is absent
    supports_karras = False
    supports_eta = False
    timesteps: np.ndarray  # the UNet timestep of each step index: diffusers' scheduler.timesteps
    init_noise_sigma: float  # the initial latent is standard normal noise times this

    def __init__(self, config: Mapping, num_inference_steps: int, *, eta: float = 0.0, karras: bool | None = None):
        self.schedule = Schedule.from_config(config, default_spacing=self.default_spacing)
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
            raise ModelInputError(f"karras=True is not supported by sampler {self.name!r}; "
                                  f"it is supported by euler, lms and dpmpp_2m")
        self.karras = karras
        if not self.supports_eta and eta != 0:
            raise ModelInputError(f"eta={eta!r} is only supported by sampler 'ddim'; use eta=0.0 for {self.name!r}")
        self.num_inference_steps = int(num_inference_steps)
        self.alphas_cumprod = self.schedule.alphas_cumprod.numpy()
        self.init_noise_sigma = 1.0
        self.reset()

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
        a = self.schedule.alphas_cumprod[int(self.timesteps[step_index])]
        return (a**0.5).item() * original + ((1 - a) ** 0.5).item() * noise

    def _read_clip(self, config: Mapping) -> None:
        """clip_sample (on unless the config says otherwise, as in DDIM and DDPM) bounds |x0|."""
        if read_field(config, "clip_sample", True, kind=bool):
            self.clip_range = read_field(config, "clip_sample_range", 1.0, kind=Real)

    def _alpha_prev(self, t: int, final: torch.Tensor) -> torch.Tensor:
        # Past t = 0 there is no training timestep; `final` stands for alpha_cumprod there.
        return self.schedule.alphas_cumprod[t] if t >= 0 else final

    def _x0_eps(self, model_output, sample, a_t: torch.Tensor):
        """Predicted clean sample (clipped if configured) and noise at alpha_cumprod `a_t` (DDPM eq. 15)."""
        b_t = 1 - a_t
        if self.schedule.prediction_type == "epsilon":
            x0, eps = (sample - (b_t**0.5).item() * model_output) / (a_t**0.5).item(), model_output
        else:
            sa, sb = (a_t**0.5).item(), (b_t**0.5).item()  # v = sqrt(a) eps - sqrt(1 - a) x0
            x0, eps = sa * sample - sb * model_output, sa * model_output + sb * sample
        return (x0 if self.clip_range is None else x0.clip(-self.clip_range, self.clip_range)), eps


class DDIM(_AlphaSampler):
    """Song et al. (2021), eq. 12; eta interpolates between deterministic DDIM (0) and DDPM (1)."""

    name = "ddim"
    supports_eta = True

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        if not isinstance(eta, Real) or isinstance(eta, bool) or not 0 <= eta <= 1:
            raise ModelInputError(f"eta={eta!r} must be a number in [0, 1]")
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        self.eta = float(eta)
        self._read_clip(config)
        one = read_field(config, "set_alpha_to_one", True, kind=bool)
        self.final_alpha = scalar(1.0) if one else self.schedule.alphas_cumprod[0]

    def needs_noise(self, step_index):
        super().needs_noise(step_index)
        return self.eta > 0

    def _step(self, model_output, i, sample, noise):
        t = int(self.timesteps[i])
        # The previous timestep is t - T // steps whatever the spacing: the reference's convention.
        a_t = self.schedule.alphas_cumprod[t]
        a_prev = self._alpha_prev(t - self.schedule.num_train_timesteps // self.num_inference_steps, self.final_alpha)
        x0, eps = self._x0_eps(model_output, sample, a_t)
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)  # sigma_t^2 / eta^2, eq. 16
        std = self.eta * variance**0.5
        prev = (a_prev**0.5).item() * x0 + ((1 - a_prev - std**2) ** 0.5).item() * eps
        return prev + std.item() * noise if self.eta > 0 else prev


class DDPM(_AlphaSampler):
    """Ho et al. (2020): the posterior mean q(x_{t-1} | x_t, x0) (eq. 7) plus fixed-small variance noise."""

    name = "ddpm"

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        self._read_clip(config)

    def needs_noise(self, step_index):
        super().needs_noise(step_index)
        return int(self.timesteps[step_index]) > 0  # the last step onto t = 0 is the mean alone

    def _step(self, model_output, i, sample, noise):
        t = int(self.timesteps[i])
        a_t = self.schedule.alphas_cumprod[t]
        a_prev = self._alpha_prev(int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1, scalar(1.0))
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev  # of this (possibly strided) step
        x0, _ = self._x0_eps(model_output, sample, a_t)
        prev = ((a_prev**0.5 * beta) / b_t).item() * x0 + (alpha**0.5 * b_prev / b_t).item() * sample
        if noise is None:
            return prev
        variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta, min=1e-20)
        return prev + (variance**0.5).item() * noise


class PNDM(_AlphaSampler):
    """Liu et al. (2022), pseudo numerical methods: the transfer phi (eq. 11) driven by a linear multistep
    (PLMS, eq. 12) on the noise predictions, warmed up by pseudo Runge-Kutta (PRK, 12 model calls over the
    first 3 steps) or, with skip_prk_steps (SD's default), by one pseudo-Heun step: the second timestep
    appears twice, once to predict and once to correct, so `timesteps` has steps + 1 entries."""

    name = "pndm"

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
        a_t, a_prev = self.schedule.alphas_cumprod[t], self._alpha_prev(t_prev, self.final_alpha)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.schedule.prediction_type == "v_prediction":
            eps = (a_t**0.5).item() * eps + (b_t**0.5).item() * sample
        denominator = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return ((a_prev / a_t) ** 0.5).item() * sample - (a_prev - a_t).item() * eps / denominator.item()

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

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        timesteps = self.schedule.spaced(self.num_inference_steps).astype(np.float32)
        train = self.schedule.train_sigmas()
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        if self.karras:
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], self.num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
        self.timesteps = timesteps
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        self._sigma = torch.from_numpy(self.sigmas)
        top = self._sigma.max()
        # "leading" never reaches the last training timestep, so the reference starts from unit-variance x_VP.
        self.init_noise_sigma = (top if self.schedule.timestep_spacing != "leading" else (top**2 + 1) ** 0.5).item()

    def scale_model_input(self, sample, step_index):
        super().scale_model_input(sample, step_index)
        return sample / ((self._sigma[step_index] ** 2 + 1) ** 0.5).item()

    def add_noise(self, original, noise, step_index):
        self._check_index(step_index)
        return original + noise * self.sigmas[step_index].item()

    def _denoised(self, model_output, i, sample):
        s = self._sigma[i]
        if self.schedule.prediction_type == "epsilon":
            return sample - s.item() * model_output
        return model_output * (-s / (s**2 + 1) ** 0.5).item() + sample / (s**2 + 1).item()

    def _derivative(self, model_output, i, sample):
        return (sample - self._denoised(model_output, i, sample)) / self.sigmas[i].item()


class Euler(_SigmaSampler):
    """Karras et al. (2022) Algorithm 2 without churn: one Euler step of the probability-flow ODE."""

    name = "euler"
    supports_karras = True

    def _step(self, model_output, i, sample, noise):
        d = self._derivative(model_output, i, sample)
        return sample + d * (self._sigma[i + 1] - self._sigma[i]).item()


class EulerAncestral(_SigmaSampler):
    """k-diffusion's sample_euler_ancestral: an Euler step down to sigma_down, then fresh noise of sigma_up,
    so that sigma_down^2 + sigma_up^2 = sigma_next^2 (the DDPM ancestral split)."""

    name = "euler_ancestral"

    def needs_noise(self, step_index):
        super().needs_noise(step_index)
        return True  # every step, the last included (where sigma_up = 0), as the reference draws it

    def _step(self, model_output, i, sample, noise):
        s, s_next = self._sigma[i], self._sigma[i + 1]
        s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        s_down = (s_next**2 - s_up**2) ** 0.5
        d = self._derivative(model_output, i, sample)
        return sample + d * (s_down - s).item() + noise * s_up.item()


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
    supports_karras = True
    max_order = 4

    def _coefficient(self, order: int, i: int, j: int) -> float:
        s = self.sigmas

        def basis(tau):
            tau = tau.astype(np.float32)
            value = np.ones_like(tau)
            for k in range(order):
                if k != j:
                    value = value * ((tau - s[i - k]) / (s[i - j] - s[i - k]))
            return value

        return gauss_kronrod21(basis, float(s[i]), float(s[i + 1]))

    def _step(self, model_output, i, sample, noise):
        self._history = self._history[-(self.max_order - 1):] + [self._derivative(model_output, i, sample)]
        # The order follows the absolute step index, not the history length, as the reference does: an
        # img2img run's first steps then use a higher-order weight on fewer derivatives.
        order = min(i + 1, self.max_order)
        weights = [self._coefficient(order, i, j) for j in range(order)]
        return sample + sum(w * d for w, d in zip(weights, reversed(self._history)))


class DPMSolverPP2M(Sampler):
    """Lu et al. (2022b), DPM-Solver++(2M), Algorithm 2 with the midpoint D1: multistep in
    lambda = log(alpha_t / sigma_t) on the data prediction; first order on the first and last steps."""

    name = "dpmpp_2m"
    default_spacing = "linspace"
    supports_karras = True

    def __init__(self, config, num_inference_steps, *, eta=0.0, karras=None):
        super().__init__(config, num_inference_steps, eta=eta, karras=karras)
        n = self.num_inference_steps
        # Spaced over steps + 1 points with the last (t ~ 0) dropped: the final step goes to sigma = 0.
        trailing = self.schedule.timestep_spacing == "trailing"
        timesteps = (self.schedule.spaced(n) if trailing else self.schedule.spaced(n + 1)[:-1]).round()
        train = self.schedule.train_sigmas()
        if self.karras:
            sigmas = karras_sigmas(train[0], train[-1], n)
            timesteps = sigma_to_t(sigmas, np.log(train))
            if self.schedule.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        self.timesteps = timesteps.astype(np.int64)
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        self._sigma = torch.from_numpy(self.sigmas)

    def _alpha_sigma(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VP alpha_t, sigma_t for the VE sigma of step i."""
        alpha = 1 / (self._sigma[i] ** 2 + 1) ** 0.5
        return alpha, self._sigma[i] * alpha

    def _lambda(self, i: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(i)
        return torch.log(alpha) - torch.log(sigma)  # +inf at the final sigma = 0, where exp(-h) = 0

    def add_noise(self, original, noise, step_index):
        self._check_index(step_index)
        alpha, sigma = self._alpha_sigma(step_index)
        return alpha.item() * original + sigma.item() * noise

    def _step(self, model_output, i, sample, noise):
        alpha_s, sigma_s = self._alpha_sigma(i)
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        if self.schedule.prediction_type == "epsilon":
            x0 = (sample - sigma_s.item() * model_output) / alpha_s.item()
        else:
            x0 = alpha_s.item() * sample - sigma_s.item() * model_output
        h = self._lambda(i + 1) - self._lambda(i)
        c = alpha_t * (torch.exp(-h) - 1.0)
        prev = (sigma_t / sigma_s).item() * sample - c.item() * x0
        if self._history and i + 1 < len(self.timesteps):
            r = (self._lambda(i) - self._lambda(i - 1)) / h
            prev = prev - (0.5 * c).item() * ((1.0 / r).item() * (x0 - self._history[-1]))
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
