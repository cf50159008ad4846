"""Gaussian diffusion (harness/diffusion.py) and the diffusion task (harness/tasks/diffusion.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import registry
from harness.data.base import build_dataset, get_dataset
from harness.diffusion import (GaussianDiffusion, get_named_beta_schedule, guided_model_fn,
                               normal_kl, space_timesteps)
from harness.errors import ConfigError, DivergedError
from harness.tasks.base import Budget, TrialContext
from harness.tasks.diffusion import DiffusionOptions, DiffusionTask

TINY = {"depth": 2, "input_size": 16, "in_channels": 1, "num_classes": 10, "learn_sigma": False,
        "hidden_size": 64, "num_heads": 4}


def tiny_dit(seed: int = 0, randomize: bool = True, **overrides):
    """A tiny DiT; ``randomize`` replaces the zero init (whose output is identically 0)."""
    model, cfg = registry.build("dit-s/4", {**TINY, **overrides}, seed=seed)
    if randomize:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), cfg


def digits16():
    spec = get_dataset("digits")
    return build_dataset("digits", registry.make_config(
        spec.options_cls, {"image_size": 16, "value_range": "symmetric"}))


# ------------------------------------------------------------------ schedule and q


def test_linear_schedule_is_ddpm_and_rescales_with_steps():
    b = get_named_beta_schedule("linear", 1000)
    assert len(b) == 1000 and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.all(np.diff(b) > 0)
    b250 = get_named_beta_schedule("linear", 250)  # ADM: betas scaled by 1000 / T
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08)
    d = GaussianDiffusion(b)
    assert np.all(np.diff(d.alphas_cumprod) < 0) and d.alphas_cumprod[-1] < 1e-4
    # posterior variance: beta_t (1 - abar_{t-1}) / (1 - abar_t), zero at t = 0
    t = 500
    expect = b[t] * (1 - d.alphas_cumprod[t - 1]) / (1 - d.alphas_cumprod[t])
    assert d.posterior_variance[t] == pytest.approx(expect) and d.posterior_variance[0] == 0


def test_q_sample_and_loss_shapes():
    d = GaussianDiffusion.create(1000)
    x0 = torch.rand(5, 1, 16, 16) * 2 - 1
    t = torch.tensor([0, 1, 10, 500, 999])
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    assert xt.shape == x0.shape
    ab = torch.tensor(d.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    # a perfect epsilon predictor has zero loss; a zero predictor has loss = mean(noise^2)
    perfect = d.training_losses(lambda x, tt: noise, x0, t, noise)
    assert perfect["loss"].shape == (5,) and torch.all(perfect["loss"] == 0)
    zero = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise)
    torch.testing.assert_close(zero["loss"], noise.pow(2).mean(dim=(1, 2, 3)))


# ------------------------------------------------------------------ respacing


def test_space_timesteps_like_guided_diffusion():
    s = sorted(space_timesteps(1000, 50))
    assert len(s) == 50 and s[0] == 0 and s[-1] == 999
    assert sorted(space_timesteps(1000, "ddim25")) == list(range(0, 1000, 40))
    assert sorted(space_timesteps(100, "10,15,20")) == sorted(
        space_timesteps(100, [10, 15, 20]))
    assert len(space_timesteps(100, "10,15,20")) == 45
    assert sorted(space_timesteps(100, "2,2")) == [0, 49, 50, 99]
    with pytest.raises(ValueError):
        space_timesteps(100, 101)
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")   # no integer stride gives exactly 600 steps


@pytest.mark.parametrize("steps", [250, 50, 7])
def test_respaced_alphas_cumprod_equal_originals_at_kept_steps(steps):
    base = GaussianDiffusion.create(1000)
    sp = base.respaced(steps)
    kept = sorted(space_timesteps(1000, steps))
    assert sp.num_timesteps == steps and list(sp.timestep_map) == kept
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    assert sp.betas[0] == pytest.approx(base.betas[0])
    # q(x_t | x_0) at a kept step is the same process in both
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    i = steps // 2
    torch.testing.assert_close(sp.q_sample(x0, torch.tensor([i, i]), noise),
                               base.q_sample(x0, torch.tensor([kept[i]] * 2), noise))


def gaussian_oracle(base: GaussianDiffusion, mu: float, s: float):
    """The exact E[eps | x_t] for data ~ N(mu, s^2) per pixel, at original timesteps."""
    ab = torch.tensor(base.alphas_cumprod, dtype=torch.float32)

    def eps(x, t):
        a = ab[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return eps


@pytest.mark.parametrize("sampler,steps,tol", [("ddpm", 1000, 0.02), ("ddpm", 50, 0.05),
                                               ("ddim", 200, 0.03), ("ddim", 50, 0.08)])
def test_samplers_reproduce_gaussian_data_with_the_exact_epsilon(sampler, steps, tol):
    """Given the exact epsilon of Gaussian data, samples must have the data's mean and std;
    a wrong timestep map, posterior or DDIM update would not (they miss by far more)."""
    base = GaussianDiffusion.create(1000)
    x = base.sample(gaussian_oracle(base, 0.3, 0.5), (2000, 1, 2, 2), sampler=sampler,
                    steps=steps, generator=torch.Generator().manual_seed(0), clip_denoised=False)
    assert x.mean().item() == pytest.approx(0.3, abs=0.02)
    assert x.std().item() == pytest.approx(0.5, rel=tol)


def test_learned_variance_at_its_ends_is_the_fixed_variances():
    """var_values = +1 is beta (DiT's fixed 'large'), -1 the posterior variance ('small')."""
    large = GaussianDiffusion.create(1000).respaced(20)
    small = GaussianDiffusion.create(1000, sigma_small=True).respaced(20)
    learned = GaussianDiffusion.create(1000, learn_sigma=True).respaced(20)
    eps = gaussian_oracle(GaussianDiffusion.create(1000), 0.3, 0.5)
    kw = dict(clip_denoised=False)
    for fixed, v in ((large, 1.0), (small, -1.0)):
        a = fixed.p_sample_loop(eps, (8, 1, 2, 2), generator=torch.Generator().manual_seed(3), **kw)
        b = learned.p_sample_loop(lambda x, t: torch.cat([eps(x, t), torch.full_like(x, v)], 1),
                                  (8, 1, 2, 2), generator=torch.Generator().manual_seed(3), **kw)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a, b = (d.p_sample_loop(eps, (8, 1, 2, 2), generator=torch.Generator().manual_seed(3), **kw)
            for d in (large, small))
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------ determinism and CFG


def test_same_seed_same_samples_and_other_seed_differs():
    model, _ = tiny_dit()
    d = GaussianDiffusion.create(1000)
    y = torch.arange(4)
    fn = guided_model_fn(model, y, 1.5)

    def draw(seed, sampler="ddpm"):
        return d.sample(fn, (4, 1, 16, 16), sampler=sampler, steps=5,
                        generator=torch.Generator().manual_seed(seed), eta=1.0)
    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(draw(3, "ddim"), draw(3, "ddim"))


def test_ddim_eta0_is_deterministic_given_start_noise():
    model, _ = tiny_dit()
    d = GaussianDiffusion.create(1000).respaced(8)
    fn = guided_model_fn(model, torch.arange(3), 1.5)
    z = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    runs = [d.ddim_sample_loop(fn, z.shape, noise=z, eta=eta,
                               generator=torch.Generator().manual_seed(s))
            for eta, s in [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]]
    assert torch.equal(runs[0], runs[1])        # eta = 0: the generator is never used
    assert not torch.allclose(runs[2], runs[3])  # eta = 1: fresh noise each step


def test_guidance_scale_one_equals_conditional_prediction():
    model, _ = tiny_dit(learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t = torch.tensor([3, 250, 600, 999])
    y = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, y, force_drop_ids=torch.ones(4, dtype=torch.long))
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, atol=1e-5, rtol=1e-5)
        guided = model.forward_with_cfg(x, t, y, 4.0)
    assert not torch.allclose(cond, uncond, atol=1e-3)   # the label matters at all
    torch.testing.assert_close(guided[:, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided[:, 1:], cond[:, 1:], atol=1e-5, rtol=1e-5)  # variance: cond
    # through a whole sampling loop: CFG at scale 1 == the plain conditional model
    d = GaussianDiffusion.create(1000, learn_sigma=True)
    s1 = d.sample(lambda xx, tt: model.forward_with_cfg(xx, tt, y, 1.0), x.shape, steps=6,
                  generator=torch.Generator().manual_seed(1))
    s2 = d.sample(lambda xx, tt: model(xx, tt, y), x.shape, steps=6,
                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ learned sigma


def test_learn_sigma_hybrid_loss_finite_and_vb_trains_only_the_variance():
    d = GaussianDiffusion.create(1000, learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 5, 100, 500, 999])
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(6, 2, 8, 8, generator=g).mul_(0.5).requires_grad_(True)
    terms = d.training_losses(lambda x, tt: out, x0, t, noise)
    assert set(terms) == {"mse", "vb", "loss"}
    assert torch.isfinite(terms["loss"]).all() and (terms["vb"] >= 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert torch.all(out.grad[:, :1] == 0)       # stop-gradient on the mean (epsilon)
    assert out.grad[:, 1:].abs().sum() > 0       # the variance learns from the VLB
    # through a real model, the variance channels get gradient only from vb
    model, _ = tiny_dit(learn_sigma=True)
    model.train()
    y = torch.arange(6) % 10
    loss = d.training_losses(lambda x, tt: model(x, tt, y), torch.rand(6, 1, 16, 16) * 2 - 1,
                             t, torch.randn(6, 1, 16, 16))["loss"].mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_normal_kl_zero_for_equal_gaussians_and_learned_range_interpolates():
    m, lv = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(10))
    d = GaussianDiffusion.create(1000, learn_sigma=True)
    t = torch.tensor([10, 500])
    lo = d.model_log_variance(-torch.ones(2, 1, 1, 1), t, 4).flatten()
    hi = d.model_log_variance(torch.ones(2, 1, 1, 1), t, 4).flatten()
    torch.testing.assert_close(lo, torch.tensor(d.posterior_log_variance_clipped[[10, 500]]).float())
    torch.testing.assert_close(hi, torch.tensor(np.log(d.betas[[10, 500]])).float())


# ------------------------------------------------------------------ the task


def _ctx(model, cfg, opts, data, tmp: Path, steps: int, cache: Path, seed=0):
    calls = {"metrics": [], "reports": [], "artifacts": [], "tags": []}
    return TrialContext(
        model=model, variant="dit-s/4", model_cfg=cfg, options=opts, data=data,
        budget=Budget(steps=steps, eval_every=max(1, steps // 4)), seed=seed,
        device=torch.device("cpu"), workdir=tmp / "work", cache_dir=cache,
        report=lambda v, s: calls["reports"].append((s, v)),
        log_metrics=lambda m, s=None: calls["metrics"].append((s, m)),
        log_artifact=lambda p: calls["artifacts"].append(Path(p)),
        set_tags=lambda t: calls["tags"].append(t)), calls


@pytest.fixture
def fid_cache(tmp_path_factory) -> Path:
    """One feature-network cache per test session (shared with tests/test_fid.py)."""
    return tmp_path_factory.getbasetemp() / "fid_cache"


def test_task_end_to_end_lowers_loss_and_returns_metrics(tmp_path, fid_cache):
    """A short run of the whole task through a hand-built TrialContext."""
    data = digits16()
    model, cfg = tiny_dit(randomize=False)
    opts = registry.make_config(DiffusionOptions, {
        "lr": 2e-3, "batch_size": 32, "num_samples": 60, "sample_steps": 8, "log_every": 10,
        "ema_decay": 0.99})
    task = DiffusionTask()
    task.check(opts, cfg, data)
    ctx, calls = _ctx(model, cfg, opts, data, tmp_path, steps=120, cache=fid_cache)
    out = task.run(ctx)
    for k in ("fid_digits_cnn", "cond_acc", "train_loss", "sample_time_s",
              "fid_digits_cnn_real_test", "feature_net_test_acc"):
        assert k in out and np.isfinite(out[k]), k
    assert 0.0 <= out["cond_acc"] <= 1.0 and out["fid_digits_cnn"] > 0
    assert out["fid_digits_cnn_real_test"] < out["fid_digits_cnn"]   # real data beat 120 steps
    assert out["train_steps"] == 120 and out["sample_nfe"] == 16
    # the loss fell: last report window well below the first
    reports = [v for _, v in calls["reports"]]
    assert [s for s, _ in calls["reports"]] == [30, 60, 90, 120]
    assert reports[-1] < 0.6 * reports[0], reports
    assert [s for s, _ in calls["metrics"]] == list(range(10, 121, 10))
    assert all(set(m) == {"train_loss"} for _, m in calls["metrics"])
    assert out["train_loss"] == pytest.approx(reports[-1])
    png = calls["artifacts"][0]
    assert png.name == "samples.png" and png.stat().st_size > 0
    from PIL import Image
    with Image.open(png) as im:
        # 6 per class (60 samples / 10 classes) x 10 classes; 16 px + 1 px line, 2x upscaled
        assert im.size == (6 * 17 * 2, 10 * 17 * 2)
    assert out["feature_net_test_acc"] >= 0.95
    assert list((fid_cache / "fid").glob(f"digits_cnn-v*-{data.fingerprint}.pt"))  # cached
    assert calls["tags"] and "digits_cnn" in calls["tags"][0]["fid_feature_net"]


def test_task_raises_diverged_on_nan(tmp_path, fid_cache):
    data = digits16()
    model, cfg = tiny_dit(randomize=False)
    opts = registry.make_config(DiffusionOptions, {"lr": 1e-3, "batch_size": 8})
    with torch.no_grad():
        model.x_embedder.bias.fill_(float("nan"))
    ctx, _ = _ctx(model, cfg, opts, data, tmp_path, steps=4, cache=fid_cache)
    with pytest.raises(DivergedError, match="step 1"):
        DiffusionTask().run(ctx)


def test_check_refuses_impossible_combinations(tmp_path):
    task = DiffusionTask()
    data = digits16()
    _, cfg = tiny_dit(randomize=False)
    ok = DiffusionOptions()
    task.check(ok, cfg, data)  # the default combination is fine

    @dataclasses.dataclass
    class VitCfg:
        depth: int = 2
        in_channels: int = 1
        input_size: int = 16
    with pytest.raises(ConfigError, match="num_classes.*learn_sigma.*DiT"):
        task.check(ok, VitCfg(), data)
    spec = get_dataset("digits")
    unit = build_dataset("digits", registry.make_config(spec.options_cls, {"image_size": 16}))
    with pytest.raises(ConfigError, match="value_range: symmetric"):
        task.check(ok, cfg, unit)
    with pytest.raises(ConfigError, match="class_dropout_prob"):
        task.check(ok, dataclasses.replace(cfg, class_dropout_prob=0.0), data)
    task.check(dataclasses.replace(ok, cfg_scale=1.0),
               dataclasses.replace(cfg, class_dropout_prob=0.0), data)
    with pytest.raises(ConfigError, match="in_channels=3"):
        task.check(ok, dataclasses.replace(cfg, in_channels=3), data)
    with pytest.raises(ConfigError, match="inception_weights"):
        registry.make_config(DiffusionOptions, {"feature_net": "inception"})
    with pytest.raises(ConfigError, match="torch-fidelity|no such file"):
        task.check(DiffusionOptions(feature_net="inception",
                                    inception_weights=str(tmp_path / "missing.pth")), cfg, data)
    with pytest.raises(ConfigError, match="sample_steps"):
        registry.make_config(DiffusionOptions, {"sample_steps": 2000})
    with pytest.raises(ConfigError, match="valid: 'ddpm', 'ddim'|ddim"):
        registry.make_config(DiffusionOptions, {"sampler": "euler"})


def test_task_runs_on_latents(tmp_path):
    """The paper's setting in miniature: 4-channel latents from a .npz (x0 left unclipped)."""
    rng = np.random.default_rng(0)
    y = np.arange(80) % 4
    x = (rng.normal(size=(80, 4, 8, 8)) * 0.3 + y[:, None, None, None]).astype(np.float32)
    np.savez(tmp_path / "lat.npz", latents=x, labels=y)
    spec = get_dataset("latents")
    data = build_dataset("latents", registry.make_config(
        spec.options_cls, {"path": str(tmp_path / "lat.npz"), "test_fraction": 0.25}))
    model, cfg = registry.build("dit-s/4", {**TINY, "input_size": 8, "in_channels": 4,
                                            "num_classes": 4, "learn_sigma": True}, seed=0)
    opts = registry.make_config(DiffusionOptions, {"batch_size": 16, "num_samples": 12,
                                                   "sample_steps": 4, "log_every": 5})
    task = DiffusionTask()
    task.check(opts, cfg, data)
    with pytest.raises(ConfigError, match="latents"):
        task.check(dataclasses.replace(opts, feature_net="inception", inception_weights="w.pth"),
                   cfg, data)
    ctx, calls = _ctx(model, cfg, opts, data, tmp_path, steps=10, cache=tmp_path / "cache")
    out = task.run(ctx)
    assert np.isfinite(out["fid_digits_cnn"]) and 0 <= out["cond_acc"] <= 1
    assert calls["artifacts"][0].exists()
