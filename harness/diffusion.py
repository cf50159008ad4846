"""Gaussian diffusion as DiT trains and samples it (ADM / improved-DDPM semantics).

    diffusion = GaussianDiffusion.create(learn_sigma=True)      # 1000 steps, linear betas
    loss = diffusion.training_losses(model_fn, x0, t, noise)["loss"].mean()
    sampler = diffusion.respaced(250)                            # DiT's 250 DDPM steps
    x = sampler.p_sample_loop(model_fn, shape, generator=g)      # or ddim_sample_loop(eta=0)

Written from the equations of Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM:
learned variance interpolation, hybrid loss, respacing) and Song et al. 2021 (DDIM), following
the conventions of openai/guided-diffusion ``gaussian_diffusion.py`` / ``respace.py`` that DiT
uses unchanged (``create_diffusion(timestep_respacing="")``):

- epsilon prediction, MSE loss on epsilon;
- ``learn_sigma``: the model outputs 2C channels, the second C interpolate the log variance
  between the posterior variance (beta tilde) and beta; the loss adds the VLB term computed
  with the mean detached (stop-gradient), so the variance learns only from the VLB;
- without ``learn_sigma`` the sampler uses the fixed "large" variance (beta), DiT's choice;
- respacing keeps a subset of the 1000 steps and recomputes betas so that alphas_cumprod at the
  kept steps are unchanged; the model still sees the original timestep indices.

A ``model_fn(x, t) -> output`` is any callable (bind labels / guidance with a lambda, e.g.
``lambda x, t: model.forward_with_cfg(x, t, y, 1.5)``).  Every random draw takes the
``generator`` passed in, so a seed fixes the samples.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------ schedules

def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas of a named schedule; 'linear' is DDPM's 1e-4..0.02, rescaled (ADM) so that other
    step counts keep the same total noise as 1000 steps."""
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "cosine":  # improved DDPM, s = 0.008, betas clipped at 0.999
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        n = num_diffusion_timesteps
        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
                         for i in range(n)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; valid: linear, cosine")


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> set[int]:
    """The timesteps kept when respacing ``num_timesteps`` (guided-diffusion ``respace.py``).

    ``section_counts`` is a count (``250``), a comma list of counts per equal section
    (``"10,15,20"``), or ``"ddimN"`` (a fixed integer stride as in the DDIM paper).  Inside a
    section the kept steps are evenly spaced and include both its ends.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride "
                             f"out of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count or count < 1:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


# ------------------------------------------------------------------ helpers

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved (reproducible)."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev).to(device)


# ------------------------------------------------------------------ diffusion

class GaussianDiffusion:
    """Forward process q, the learned reverse process p, its loss and its samplers."""

    def __init__(self, betas: np.ndarray, *, learn_sigma: bool = False, sigma_small: bool = False,
                 timestep_map: Sequence[int] | None = None, original_num_steps: int | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small  # fixed variance: posterior (True) or beta (False, DiT)
        self.num_timesteps = n = len(betas)
        # model timestep index of each (respaced) step: the model always sees original indices
        self.timestep_map = np.arange(n) if timestep_map is None else np.asarray(timestep_map)
        self.original_num_steps = original_num_steps or n

        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)
        self.alphas_cumprod_prev = acp = np.append(1.0, ac[:-1])
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = pv = betas * (1.0 - acp) / (1.0 - ac)
        # log clipped: the posterior variance is 0 at t = 0
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if n > 1 \
            else np.log(np.maximum(pv, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)
        self._device_cache: dict = {}

    @classmethod
    def create(cls, steps: int = 1000, schedule: str = "linear", *, learn_sigma: bool = False,
               sigma_small: bool = False, respacing: int | str | None = None) -> "GaussianDiffusion":
        """DiT's ``create_diffusion``: ``steps`` training steps, optionally respaced."""
        base = cls(get_named_beta_schedule(schedule, steps), learn_sigma=learn_sigma,
                   sigma_small=sigma_small)
        return base.respaced(respacing) if respacing not in (None, "", steps) else base

    def respaced(self, section_counts: int | str | Sequence[int]) -> "GaussianDiffusion":
        """A diffusion over a subset of the steps with the same alphas_cumprod there."""
        use = space_timesteps(self.num_timesteps, section_counts)
        last, new_betas, tmap = 1.0, [], []
        for i, a in enumerate(self.alphas_cumprod):
            if i in use:
                new_betas.append(1 - a / last)
                last = a
                tmap.append(int(self.timestep_map[i]))
        return GaussianDiffusion(np.array(new_betas), learn_sigma=self.learn_sigma,
                                 sigma_small=self.sigma_small, timestep_map=tmap,
                                 original_num_steps=self.original_num_steps)

    # -------------------------------------------------------------- tensors
    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """arr[t] as float32 of shape (N, 1, ..., 1); arrays cached once per device."""
        key = (name, t.device)
        if key not in self._device_cache:
            arr = getattr(self, name) if name != "timestep_map" else self.timestep_map
            self._device_cache[key] = torch.as_tensor(np.asarray(arr), device=t.device)
        out = self._device_cache[key][t]
        if name == "timestep_map":
            return out
        return out.float().reshape(-1, *([1] * (ndim - 1)))

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The original (1000-step) timestep index the model is conditioned on."""
        return self._extract("timestep_map", t, 1)

    # -------------------------------------------------------------- forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        n = x_start.ndim
        return (self._extract("sqrt_alphas_cumprod", t, n) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, n) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = (self._extract("posterior_mean_coef1", t, n) * x_start
                + self._extract("posterior_mean_coef2", t, n) * x_t)
        return (mean, self._extract("posterior_variance", t, n),
                self._extract("posterior_log_variance_clipped", t, n))

    def predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.ndim
        return (self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, n) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        n = x_t.ndim
        return ((self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, n))

    # -------------------------------------------------------------- reverse process
    def split_output(self, model_output: torch.Tensor, channels: int):
        """(eps, variance values in [-1, 1] or None) from the model's output."""
        if self.learn_sigma:
            assert model_output.shape[1] == 2 * channels, \
                f"learn_sigma needs 2C={2 * channels} output channels, got {model_output.shape[1]}"
            return model_output[:, :channels], model_output[:, channels:]
        assert model_output.shape[1] == channels, \
            f"expected C={channels} output channels, got {model_output.shape[1]}"
        return model_output, None

    def model_log_variance(self, var_values: torch.Tensor | None, t: torch.Tensor, ndim: int):
        if var_values is not None:  # learned range: interpolate log(beta tilde) .. log(beta)
            min_log = self._extract("posterior_log_variance_clipped", t, ndim)
            max_log = self._extract("log_betas", t, ndim)
            frac = (var_values.float() + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        if self.sigma_small:
            return self._extract("posterior_log_variance_clipped", t, ndim)
        return self._extract("log_betas_large", t, ndim)

    @property
    def log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    @property
    def log_betas_large(self) -> np.ndarray:
        # fixed "large" variance: beta_t, with the posterior variance at t = 0 (ADM)
        return np.log(np.append(self.posterior_variance[1], self.betas[1:])) \
            if self.num_timesteps > 1 else np.log(self.betas)

    def p_mean_variance(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, *,
                        clip_denoised: bool = True, model_output: torch.Tensor | None = None):
        """p(x_{t-1} | x_t): mean, log variance and the predicted x_0."""
        if model_output is None:
            model_output = model_fn(x, self._model_t(t))
        eps, var_values = self.split_output(model_output.float(), x.shape[1])
        log_var = self.model_log_variance(var_values, t, x.ndim)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

    # -------------------------------------------------------------- loss
    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """The VLB term L_t in bits per dimension (decoder NLL at t = 0)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=False, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample losses: ``mse`` on epsilon (+ ``vb`` when learning sigma) -> ``loss``."""
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, self._model_t(t)).float()
        eps, var_values = self.split_output(model_output, x_start.shape[1])
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if var_values is not None:
            # hybrid loss: the VLB trains only the variance (stop-gradient on the mean)
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            # scaled by T/1000 as ADM's RESCALED_MSE does; DiT (plain MSE) adds it unscaled,
            # which is the same thing at DiT's T = 1000
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t) * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def sample_t(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """Uniform training timesteps."""
        gdev = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gdev)
        return t.to(device)

    # -------------------------------------------------------------- samplers
    def _loop_start(self, shape, noise, generator, device):
        return noise.to(device) if noise is not None else _randn(shape, generator, device)

    @torch.no_grad()
    def p_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], *,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      clip_denoised: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
        """Ancestral (DDPM) sampling over this diffusion's (possibly respaced) steps."""
        x = self._loop_start(shape, noise, generator, device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
            if i > 0:
                noise = _randn(x.shape, generator, x.device)
                x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise
            else:
                x = out["mean"]
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], *, eta: float = 0.0,
                         noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                         clip_denoised: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
        """DDIM sampling (eta = 0: deterministic given the starting noise)."""
        x = self._loop_start(shape, noise, generator, device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
            eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
            a_bar = self._extract("alphas_cumprod", t, x.ndim)
            a_bar_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
            sigma = (eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar))
                     * torch.sqrt(1 - a_bar / a_bar_prev))
            x = (out["pred_xstart"] * torch.sqrt(a_bar_prev)
                 + torch.sqrt(1 - a_bar_prev - sigma ** 2) * eps)
            if i > 0 and eta > 0:
                x = x + sigma * _randn(x.shape, generator, x.device)
        return x

    def sample(self, model_fn: ModelFn, shape: Sequence[int], *,
               sampler: Literal["ddpm", "ddim"] = "ddpm", steps: int | None = None,
               eta: float = 0.0, generator: torch.Generator | None = None,
               clip_denoised: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
        """Sample with ``steps`` evenly respaced steps (all of them when None)."""
        diff = self if steps in (None, self.num_timesteps) else self.respaced(steps)
        if sampler == "ddpm":
            return diff.p_sample_loop(model_fn, shape, generator=generator,
                                      clip_denoised=clip_denoised, device=device)
        if sampler == "ddim":
            return diff.ddim_sample_loop(model_fn, shape, eta=eta, generator=generator,
                                         clip_denoised=clip_denoised, device=device)
        raise ValueError(f"unknown sampler {sampler!r}; valid: ddpm, ddim")


def guided_model_fn(model, y: torch.Tensor, cfg_scale: float) -> ModelFn:
    """``model_fn`` for a class-conditional DiT: plain conditional at scale 1, else CFG
    (``model.forward_with_cfg``: eps_uncond + s * (eps_cond - eps_uncond))."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale)


__all__: Iterable[str] = ("GaussianDiffusion", "get_named_beta_schedule", "space_timesteps",
                          "normal_kl", "discretized_gaussian_log_likelihood", "guided_model_fn",
                          "mean_flat")
