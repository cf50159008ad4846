"""Class-conditional diffusion training and evaluation, as DiT does it.

One trial: AdamW + EMA training of the epsilon (and variance) prediction for ``budget.steps``
steps; then the EMA model samples ``num_samples`` images (balanced over classes) with
classifier-free guidance, and the samples are judged by a Fréchet distance (``fid_digits_cnn``
with the cached digits classifier; ``fid`` with the standard Inception weights) and by
``cond_acc`` (the fraction the classifier assigns to the class they were conditioned on).

Data: images in [-1, 1] (``value_range: symmetric``) or latents (``value_range: latent``).
Data in [0, 1] (``unit``) is refused rather than silently rescaled: the noise schedule and the
clipping of x0 assume [-1, 1], so the study file must say ``value_range: symmetric``.

Intermediate values (``ctx.report``, used for pruning) are the mean training loss over the
last ``budget.report_every`` steps: lower is better (``intermediate_direction = "minimize"``,
the direction of ``fid_*``; the engine flips the sign when the objective is maximised, e.g.
``cond_acc``).  The diffusion loss is a noisy proxy of sample quality: ablations should use
``pruner: none``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
import torch
from torch import nn

from ..diffusion import GaussianDiffusion, guided_model_fn
from ..errors import ConfigError, DivergedError
from ..metrics.fid import FrechetEvaluator, check_inception, metric_name, subset_indices
from .base import Task, TrialContext, check_finite, register_task


@dataclass
class DiffusionOptions:
    lr: float = 5e-4                  # AdamW; paper 1e-4 (batch 256, 400K steps); short runs: higher
    weight_decay: float = 0.0         # paper: 0
    batch_size: int = 64              # paper: 256
    grad_clip: float = 1.0            # max grad norm, 0 = off (paper: off; guards short high-lr runs)
    ema_decay: float = 0.999          # paper 0.9999 over 400K steps; 0.999 ~ last 1000 steps
    ema_warmup: bool = True           # decay_n = min(ema_decay, (1+n)/(10+n)); paper: fixed decay
    diffusion_steps: int = 1000       # training timesteps T (paper: 1000)
    noise_schedule: Literal["linear", "cosine"] = "linear"  # paper: linear 1e-4 .. 0.02
    sampler: Literal["ddpm", "ddim"] = "ddpm"   # paper: ddpm
    sample_steps: int = 50            # respaced sampling steps (paper: 250)
    ddim_eta: float = 0.0             # DDIM noise (0: deterministic given the start noise)
    cfg_scale: float = 1.5            # classifier-free guidance (paper FID: 1.5; 1 = none)
    num_samples: int = 500            # generated for evaluation, balanced over classes (paper 50K)
    sample_batch_size: int = 250
    clip_denoised: bool | None = None  # clip predicted x0 to [-1, 1]; None: images yes, latents no
    feature_net: Literal["digits_cnn", "inception"] = "digits_cnn"  # FID features (see metrics/fid.py)
    inception_weights: str | None = None  # local path of torch-fidelity's Inception weights
    max_real: int = 10_000            # real images for the reference statistics (train split)
    log_every: int = 25               # train_loss to the tracker every N steps
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    grid_per_class: int = 10          # samples per class in the saved grid (0: no grid)

    def validate(self) -> None:
        for k in ("lr", "batch_size", "diffusion_steps", "sample_steps", "sample_batch_size",
                  "log_every", "max_real"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"task.options.{k} must be > 0, got {getattr(self, k)}")
        for k in ("weight_decay", "grad_clip", "ddim_eta", "cfg_scale", "grid_per_class"):
            if getattr(self, k) < 0:
                raise ConfigError(f"task.options.{k} must be >= 0, got {getattr(self, k)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"task.options.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sample_steps > self.diffusion_steps:
            raise ConfigError(f"task.options.sample_steps={self.sample_steps} exceeds "
                              f"diffusion_steps={self.diffusion_steps}")
        if self.num_samples < 2:
            raise ConfigError(f"task.options.num_samples must be >= 2 (a covariance needs two), "
                              f"got {self.num_samples}")
        if self.feature_net == "inception" and not self.inception_weights:
            raise ConfigError("task.options.feature_net='inception' needs task.options."
                              "inception_weights: the local path of torch-fidelity's "
                              "weights-inception-2015-12-05-6726825d.pth; or use "
                              "feature_net='digits_cnn'")


REQUIRED_MODEL_FIELDS = ("num_classes", "in_channels", "input_size", "learn_sigma",
                         "class_dropout_prob")


def _info(data: Any) -> dict:
    if data is None:
        return {}
    return dict(data) if isinstance(data, dict) else dict(getattr(data, "info", {}) or {})


def _batches(ds, batch_size: int, generator: torch.Generator) -> Iterator:
    """Endless shuffled epochs of full batches."""
    from ..data.folders import index_batch
    n = len(ds)
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - bs + 1, bs):
            yield index_batch(ds, perm[i:i + bs])


def _generator(device: torch.device, seed: int) -> torch.Generator:
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # a backend without device generators
        return torch.Generator().manual_seed(seed)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_grid(images: torch.Tensor, path: Path, rows: int, value_range: str) -> Path:
    """(N, C, H, W) -> one PNG with ``rows`` rows (pixels: [-1, 1]; latents: per-image min-max
    of the first channel), upscaled to at least 32 px per image, a grey line between images."""
    from PIL import Image
    x = images.detach().float().cpu()
    if value_range == "latent" or x.shape[1] not in (1, 3):
        x = x[:, :1]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-8)
    else:
        x = (x.clamp(-1, 1) + 1) / 2
    k = max(1, math.ceil(32 / x.shape[-2]))  # upscale factor
    x = torch.nn.functional.pad(x, (0, 1, 0, 1), value=0.5)  # a grey line between images
    n, c, h, w = x.shape
    cols = math.ceil(n / rows)
    fill = torch.full((rows * cols - n, c, h, w), 0.5)
    x = torch.cat([x, fill]).reshape(rows, cols, c, h, w)
    grid = x.permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)  # (rows*H, cols*W, C)
    a = (grid.numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(a[..., 0] if c == 1 else a)
    im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


@register_task
class DiffusionTask(Task):
    name: ClassVar[str] = "diffusion"
    Options: ClassVar[type] = DiffusionOptions
    metrics: ClassVar[tuple[str, ...]] = (
        "fid_digits_cnn", "fid", "cond_acc", "train_loss", "fid_digits_cnn_real_test",
        "fid_real_test", "feature_net_test_acc", "train_steps", "train_time_s",
        "train_step_ms", "sample_time_s", "sample_nfe", "eval_time_s")
    metric_patterns: ClassVar[tuple[str, ...]] = ("fid_*", "fid", "cond_acc", "train_loss")
    intermediate_direction: ClassVar[str] = "minimize"  # ctx.report gets the mean train loss

    # ------------------------------------------------------------------ checks
    def check(self, options: DiffusionOptions, model_cfg: Any, data: Any) -> None:
        missing = [f for f in REQUIRED_MODEL_FIELDS if not hasattr(model_cfg, f)]
        if missing:
            raise ConfigError(
                f"task 'diffusion' needs a class-conditional diffusion model with config fields "
                f"{', '.join(REQUIRED_MODEL_FIELDS)} (a DiT variant, e.g. dit-s/2); "
                f"{type(model_cfg).__name__} lacks {', '.join(missing)}")
        if options.cfg_scale != 1.0 and model_cfg.class_dropout_prob <= 0:
            raise ConfigError(
                f"task.options.cfg_scale={options.cfg_scale} needs a model trained with the null "
                f"class: model.config.class_dropout_prob must be > 0 (paper: 0.1), got "
                f"{model_cfg.class_dropout_prob}; or set cfg_scale: 1.0")
        info = _info(data)
        vr = info.get("value_range")
        if vr not in ("symmetric", "latent"):
            raise ConfigError(
                f"task 'diffusion' needs data in [-1, 1]: set data.options.value_range: symmetric "
                f"(got value_range={vr!r}); valid: symmetric (images), latent (latents dataset)")
        for key in ("in_channels", "input_size"):
            if key in info and getattr(model_cfg, key) != info[key]:
                raise ConfigError(f"model.config.{key}={getattr(model_cfg, key)} but the data has "
                                  f"{key}={info[key]}; remove it from model.config (the data fills it)")
        if "num_classes" in info and model_cfg.num_classes < info["num_classes"]:
            raise ConfigError(f"model.config.num_classes={model_cfg.num_classes} < the data's "
                              f"{info['num_classes']} classes")
        if options.feature_net == "inception":
            if vr == "latent":
                raise ConfigError("task.options.feature_net='inception' needs images, but the data "
                                  "are latents (no VAE decoder here); use feature_net='digits_cnn' "
                                  "(a Fréchet distance in a latent classifier's features)")
            if info.get("in_channels", 3) not in (1, 3):
                raise ConfigError(f"feature_net='inception' needs 1 or 3 channels, the data has "
                                  f"{info['in_channels']}")
            check_inception(options.inception_weights, "task.options.inception_weights")

    # ------------------------------------------------------------------ run
    def run(self, ctx: TrialContext) -> dict[str, float]:
        o: DiffusionOptions = ctx.options
        dev = torch.device(ctx.device)
        cfg = ctx.model_cfg
        info = _info(ctx.data)
        value_range = info.get("value_range", "symmetric")
        clip = o.clip_denoised if o.clip_denoised is not None else value_range != "latent"
        model = ctx.model.to(dev)
        diffusion = GaussianDiffusion.create(o.diffusion_steps, o.noise_schedule,
                                             learn_sigma=cfg.learn_sigma)
        train_metrics = self.train(ctx, model, diffusion)
        ema = train_metrics.pop("_ema")

        # ---- sample with the EMA model, balanced labels, CFG
        num_classes = int(info.get("num_classes", cfg.num_classes))
        labels = torch.arange(o.num_samples) % num_classes
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        g = _generator(dev, ctx.seed + 2)
        _sync(dev)
        t0 = time.perf_counter()
        samples = []
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=o.amp and dev.type == "cuda"):
            for i in range(0, o.num_samples, o.sample_batch_size):
                y = labels[i:i + o.sample_batch_size].to(dev)
                samples.append(diffusion.sample(
                    guided_model_fn(ema, y, o.cfg_scale), (len(y), *shape), sampler=o.sampler,
                    steps=o.sample_steps, eta=o.ddim_eta, generator=g, clip_denoised=clip,
                    device=dev).float().cpu())
        _sync(dev)
        sample_time = time.perf_counter() - t0
        samples = torch.cat(samples)
        if not torch.isfinite(samples).all():
            raise DivergedError("the EMA model's samples contain NaN or inf")
        if value_range != "latent":
            samples = samples.clamp(-1, 1)

        # ---- judge them
        t0 = time.perf_counter()
        ev = FrechetEvaluator.build(o.feature_net, ctx.data, cache_dir=ctx.cache_dir, device=dev,
                                    inception_weights=o.inception_weights, max_real=o.max_real)
        out = ev.evaluate(samples, labels)
        fid = metric_name(o.feature_net)
        if len(ctx.data.test) >= 2:  # the floor: real held-out images at about this sample size
            from ..data.folders import index_batch
            xt, _ = index_batch(ctx.data.test, subset_indices(len(ctx.data.test), o.max_real))
            out[f"{fid}_real_test"] = ev.distance(xt)
        if ev.info.get("test_acc") is not None:
            out["feature_net_test_acc"] = float(ev.info["test_acc"])
        eval_time = time.perf_counter() - t0
        ctx.set_tags({"fid_feature_net": o.feature_net if o.feature_net == "inception" else
                      "digits_cnn: penultimate layer of a CNN trained on this data (not Inception)",
                      "sampler": f"{o.sampler} {o.sample_steps} steps, cfg {o.cfg_scale}"})

        if o.grid_per_class:
            per = min(o.grid_per_class, max(1, o.num_samples // num_classes))
            rows = min(num_classes, o.num_samples, 16)  # at most 16 classes in the grid
            idx = torch.cat([torch.nonzero(labels == c).flatten()[:per] for c in range(rows)])
            path = save_grid(samples[idx], Path(ctx.workdir) / "samples.png", rows, value_range)
            ctx.log_artifact(path)

        nfe = o.sample_steps * (1 if o.cfg_scale == 1.0 else 2)
        return {**out, **train_metrics, "sample_time_s": sample_time, "sample_nfe": float(nfe),
                "eval_time_s": eval_time}

    def train(self, ctx: TrialContext, model: nn.Module, diffusion: GaussianDiffusion) -> dict:
        """The training loop; returns its metrics and the EMA model (under ``_ema``)."""
        o: DiffusionOptions = ctx.options
        dev = torch.device(ctx.device)
        budget = ctx.budget
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        data_g = ctx.generator or torch.Generator().manual_seed(ctx.seed)
        noise_g = _generator(dev, ctx.seed + 1)   # timesteps, noise and label drops
        p_drop = float(getattr(ctx.model_cfg, "class_dropout_prob", 0.0))
        batches = _batches(ctx.data.train, o.batch_size, data_g)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=o.amp and dev.type == "cuda")
        model.train()
        history, window, recent, steps_done = [], [], [], 0
        t_start = time.perf_counter()
        for step in range(1, budget.steps + 1):
            x, y = next(batches)
            x, y = x.to(dev, non_blocking=True).float(), y.to(dev, non_blocking=True)
            n = x.shape[0]
            t = diffusion.sample_t(n, noise_g, dev)
            noise = torch.randn(x.shape, generator=noise_g, device=noise_g.device).to(dev)
            drop = (torch.rand(n, generator=noise_g, device=noise_g.device) < p_drop).long().to(dev)
            with autocast:
                terms = diffusion.training_losses(
                    lambda xt, tt: model(xt, tt, y, force_drop_ids=drop), x, t, noise)
            loss = terms["loss"].mean()
            value = check_finite(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            decay = min(o.ema_decay, (1 + step) / (10 + step)) if o.ema_warmup else o.ema_decay
            update_ema(ema, model, decay)
            steps_done = step
            history.append(value)
            window.append(value)
            recent.append(value)
            if step % o.log_every == 0:
                ctx.log_metrics({"train_loss": float(np.mean(recent))}, step)
                recent = []
            if step % budget.report_every == 0:
                ctx.report(float(np.mean(window)), step)
                window = []
            if budget.max_time_s is not None and time.perf_counter() - t_start > budget.max_time_s:
                break
        _sync(dev)
        train_time = time.perf_counter() - t_start
        final = float(np.mean(history[-budget.report_every:]))  # the last report window
        model.eval()
        return {"_ema": ema, "train_loss": final, "train_steps": float(steps_done),
                "train_time_s": train_time, "train_step_ms": 1000 * train_time / max(1, steps_done)}
