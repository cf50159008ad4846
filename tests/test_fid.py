"""Fréchet distance and its feature networks (harness/metrics/fid.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from harness import registry
from harness.data.base import build_dataset, get_dataset
from harness.errors import ConfigError
from harness.metrics.fid import (FrechetEvaluator, check_inception, classifier_cache_path,
                                 conditional_accuracy, frechet_distance, load_or_train_classifier,
                                 metric_name, train_classifier)


class Identity(nn.Module):
    """Features = the input rows themselves."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


def closed_form(mu1, s1, mu2, s2) -> float:
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def random_gaussian(d: int, rng: np.random.Generator):
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    (mu1, s1), (mu2, s2) = random_gaussian(d, rng), random_gaussian(d, rng)
    x1 = rng.multivariate_normal(mu1, s1, size=20000)
    x2 = rng.multivariate_normal(mu2, s2, size=20000)
    got = frechet_distance(Identity(d), torch.from_numpy(x1), torch.from_numpy(x2))
    # exact on the samples' own statistics ...
    sample_cf = closed_form(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert got == pytest.approx(sample_cf, rel=1e-6)
    # ... and close to the population value of the two known Gaussians
    assert got == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=0.05)
    # identical sets: zero; a shifted set: |shift|^2
    same = frechet_distance(Identity(d), torch.from_numpy(x1), torch.from_numpy(x1))
    assert same == pytest.approx(0, abs=1e-6)
    shift = np.arange(d, dtype=np.float64)
    assert frechet_distance(Identity(d), torch.from_numpy(x1), torch.from_numpy(x1 + shift)) == \
        pytest.approx(float(shift @ shift), rel=1e-6)


@pytest.fixture(scope="module")
def digits16():
    spec = get_dataset("digits")
    return build_dataset("digits", registry.make_config(
        spec.options_cls, {"image_size": 16, "value_range": "symmetric"}))


@pytest.fixture(scope="module")
def cached_classifier(digits16, tmp_path_factory):
    # one cache per test session (tests/test_diffusion.py reads the same folder): trained once
    cache = tmp_path_factory.getbasetemp() / "fid_cache"
    model, info = load_or_train_classifier(digits16, cache)
    return cache, model, info


def test_digits_classifier_reaches_95_percent_and_is_cached(digits16, cached_classifier):
    cache, model, info = cached_classifier
    assert info["test_acc"] >= 0.95, info
    if not info["cached"]:   # trained here (not by an earlier test of this session)
        assert info["train_time_s"] > 0
    path = classifier_cache_path(cache, digits16)
    assert path.exists() and str(path) == info["path"] and digits16.fingerprint in path.name
    mtime = path.stat().st_mtime_ns
    model2, info2 = load_or_train_classifier(digits16, cache)   # second call: no retraining
    assert info2["cached"] is True and info2["train_time_s"] == 0.0
    assert info2["test_acc"] == info["test_acc"] and path.stat().st_mtime_ns == mtime
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    # cond_acc on real test images with their true labels is the test accuracy; wrong labels fail
    xt, yt = digits16.test.tensors
    assert conditional_accuracy(model2, xt, yt) == pytest.approx(info["test_acc"])
    assert conditional_accuracy(model2, xt, (yt + 1) % 10) < 0.1
    assert not any(p.name.endswith(f".tmp{os.getpid()}") for p in path.parent.iterdir())


def test_classifier_training_is_deterministic_by_seed(digits16):
    a, _ = train_classifier(digits16, max_steps=15)
    b, _ = train_classifier(digits16, max_steps=15)
    c, _ = train_classifier(digits16, max_steps=15, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_evaluator_orders_real_and_degraded_images(digits16, cached_classifier):
    cache, _, _ = cached_classifier
    ev = FrechetEvaluator.build("digits_cnn", digits16, cache_dir=cache)
    assert ev.info["cached"] is True and ev.name == "fid_digits_cnn"
    xt, yt = digits16.test.tensors
    g = torch.Generator().manual_seed(0)
    real = ev.evaluate(xt, yt)
    noisy = ev.evaluate((xt + 0.5 * torch.randn(xt.shape, generator=g)).clamp(-1, 1), yt)
    blank = ev.evaluate(-torch.ones_like(xt), yt)
    assert set(real) == {"fid_digits_cnn", "cond_acc"}
    assert 0 <= real["fid_digits_cnn"] < noisy["fid_digits_cnn"] < blank["fid_digits_cnn"]
    assert real["cond_acc"] > noisy["cond_acc"] and blank["cond_acc"] <= 0.2
    # the real statistics survive evaluation (the same set scores the same twice)
    assert ev.evaluate(xt, yt)["fid_digits_cnn"] == pytest.approx(real["fid_digits_cnn"], rel=1e-6)


def test_inception_is_refused_honestly_without_torch_fidelity_or_weights(tmp_path):
    assert metric_name("inception") == "fid" and metric_name("digits_cnn") == "fid_digits_cnn"
    try:
        import torch_fidelity  # noqa: F401
        have_fidelity = True
    except ImportError:
        have_fidelity = False
    if not have_fidelity:
        with pytest.raises(ConfigError, match="pip install torch-fidelity") as e:
            check_inception(str(tmp_path / "w.pth"))
        assert "weights-inception-2015-12-05-6726825d.pth" in str(e.value)
    else:
        with pytest.raises(ConfigError, match="no such file"):
            check_inception(str(tmp_path / "w.pth"))
    with pytest.raises(ConfigError):
        check_inception(None)
    with pytest.raises(ConfigError, match="feature_net"):
        FrechetEvaluator.build("lpips", None, cache_dir=tmp_path)
