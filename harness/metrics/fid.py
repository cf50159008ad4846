"""Fréchet distance between real and generated images, with a pluggable feature network.

    ev = FrechetEvaluator.build("digits_cnn", data, cache_dir=ctx.cache_dir, device=dev)
    ev.evaluate(samples, labels)   # {"fid_digits_cnn": ..., "cond_acc": ...}

The distance itself is torchmetrics' ``FrechetInceptionDistance`` (feature statistics in
float64, d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)); only the features differ:

- ``digits_cnn``: the penultimate layer (128-d) of a small CNN classifier trained on the same
  dataset's training split.  It is trained once per dataset (key: ``DataBundle.fingerprint`` +
  ``ARCH_VERSION``) with a fixed seed and cached under ``cache_dir``, so every trial of every
  study is judged by the same network.  The metric is named ``fid_digits_cnn``, never ``fid``:
  it is not comparable with published FIDs.  The same classifier gives ``cond_acc``, the
  fraction of samples classified as the class they were conditioned on.  It works on any
  labelled (C, H, W) tensors, latents included (there it measures a distance in the features of
  a classifier of latents).
- ``inception``: the standard FID (named ``fid``) with the Inception-v3 weights that torch-fidelity
  uses (``weights-inception-2015-12-05-6726825d.pth``).  Nothing is downloaded: the user gives
  the weights file by local path, and torch-fidelity must be installed (torchmetrics builds the
  network from it).  No conditional accuracy comes with it unless ``digits_cnn`` runs as well.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

FeatureNet = Literal["digits_cnn", "inception"]
ARCH_VERSION = 1            # bump when DigitsCNN or its training changes: invalidates caches
CLASSIFIER_SEED = 0         # the metric network is the same for every trial (not the trial seed)
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def metric_name(feature_net: str) -> str:
    """``fid`` only for the standard Inception features; ``fid_<net>`` otherwise."""
    return "fid" if feature_net == "inception" else f"fid_{feature_net}"


# ------------------------------------------------------------------ the digits classifier

class DigitsCNN(nn.Module):
    """conv16-conv32-pool-conv64-conv64-pool(4x4) -> 128 (features) -> classes.

    Any input size >= 4 and any channel count: adaptive pooling makes the head size-free.
    """

    num_features = 128

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(64 * 16, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x).flatten(1)))  # (N, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, classes)


class PenultimateFeatures(nn.Module):
    """The feature extractor torchmetrics calls: classifier features, always in eval mode."""

    def __init__(self, classifier: DigitsCNN):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> "PenultimateFeatures":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float())


def _split_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data.folders import take_tensors
    return take_tensors(ds)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 512) -> float:
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = model(x[i:i + batch_size].to(dev).float()).argmax(1).cpu()
        correct += int((pred == y[i:i + batch_size].cpu()).sum())
    return correct / max(1, len(x))


def train_classifier(data, *, seed: int = CLASSIFIER_SEED, epochs: int = 15, batch_size: int = 64,
                     lr: float = 2e-3, max_steps: int = 3000,
                     device: torch.device | str = "cpu") -> tuple[DigitsCNN, float]:
    """Train DigitsCNN on ``data.train``; returns (model, test accuracy).  Deterministic by seed;
    +-1 pixel random shifts as the only augmentation."""
    from ..data.folders import index_batch
    n = len(data.train)
    if n < 2:
        raise ConfigError(f"the feature network needs at least 2 training images, got {n}")
    x0, _ = index_batch(data.train, torch.tensor([0]))
    c = x0.shape[1]
    num_classes = int(data.info.get("num_classes", 0)) or 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN(c, num_classes).to(device)
    g = torch.Generator().manual_seed(seed)
    steps = min(max_steps, epochs * math.ceil(n / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x, y = index_batch(data.train, idx)
        x = _random_shift(x.float(), g).to(device)
        loss = F.cross_entropy(model(x), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    acc = float("nan")
    if len(data.test):
        xt, yt = _split_tensors(data.test)
        acc = classifier_accuracy(model, xt, yt)
    return model, acc


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift every image by up to ``max_shift`` pixels (edge padding), one draw per image."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])  # (N, H)
    cols = (dx[:, None] + torch.arange(w)[None])  # (N, W)
    idx_n = torch.arange(n)[:, None, None]
    return pad.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def classifier_cache_path(cache_dir: Path | str, data) -> Path:
    return Path(cache_dir) / "fid" / f"digits_cnn-v{ARCH_VERSION}-{data.fingerprint}.pt"


def load_or_train_classifier(data, cache_dir: Path | str | None,
                             device: torch.device | str = "cpu") -> tuple[DigitsCNN, dict]:
    """The cached classifier of this dataset, trained on first use.

    Returns (model in eval mode, info) with info = {cached, test_acc, train_time_s, path}.
    The file is written atomically, so workers sharing a cache never read half a file.
    Without a fingerprint (or a cache_dir) nothing is cached and the network is retrained.
    """
    path = classifier_cache_path(cache_dir, data) if cache_dir and data.fingerprint else None
    if path is not None and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsCNN(state["in_channels"], state["num_classes"])
        model.load_state_dict(state["state_dict"])
        return model.to(device).eval(), {"cached": True, "test_acc": state["test_acc"],
                                         "train_time_s": 0.0, "path": str(path)}
    t0 = time.perf_counter()
    model, acc = train_classifier(data, device=device)
    dt = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                    "in_channels": model.in_channels, "num_classes": model.num_classes,
                    "test_acc": acc, "version": ARCH_VERSION, "fingerprint": data.fingerprint}, tmp)
        os.replace(tmp, path)
    return model.eval(), {"cached": False, "test_acc": acc, "train_time_s": dt,
                          "path": str(path) if path else ""}


@torch.no_grad()
def conditional_accuracy(classifier: nn.Module, samples: torch.Tensor, labels: torch.Tensor,
                         batch_size: int = 512) -> float:
    """Fraction of generated samples classified as the class they were conditioned on."""
    return classifier_accuracy(classifier, samples, labels, batch_size)


# ------------------------------------------------------------------ inception

def check_inception(weights_path: str | None, key: str = "inception_weights") -> Path:
    """The standard FID needs torch-fidelity and a local weights file; say how to get both."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise ConfigError(
            "feature_net='inception' (standard FID) needs torch-fidelity, which torchmetrics builds "
            "Inception-v3 from: `pip install torch-fidelity`, and the weights file "
            f"{INCEPTION_WEIGHTS_FILE} given by local path as {key}=/path/to/it (nothing is "
            "downloaded at run time); or use feature_net='digits_cnn'") from None
    if not weights_path:
        raise ConfigError(f"feature_net='inception' needs {key}: the local path of "
                          f"{INCEPTION_WEIGHTS_FILE} (torch-fidelity's Inception-v3 weights); "
                          "nothing is downloaded at run time")
    from ..data.base import check_local_path
    p = check_local_path(weights_path, key)
    if not p.is_file():
        raise ConfigError(f"{key}={weights_path!r} is not a file")
    return p


class _InceptionInput(nn.Module):
    """[-1, 1] images with 1 or 3 channels -> the uint8 RGB that torchmetrics' Inception expects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ------------------------------------------------------------------ the evaluator

def subset_indices(n: int, max_n: int, seed: int = 0) -> torch.Tensor:
    """All of range(n), or a fixed random subset of max_n (files are often sorted by class)."""
    if n <= max_n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_n].sort().values


def _fid_metric(feature: nn.Module | int, weights: Path | None = None):
    from torchmetrics.image.fid import FrechetInceptionDistance
    if isinstance(feature, int):
        return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=False,
                                        feature_extractor_weights_path=str(weights))
    return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)


@dataclass
class FrechetEvaluator:
    """Real statistics computed once; ``evaluate(fake, labels)`` -> flat metric dict."""
    feature_net: str
    metric: object                                    # torchmetrics FrechetInceptionDistance
    classifier: DigitsCNN | None = None
    prepare: nn.Module = field(default_factory=nn.Identity)
    batch_size: int = 250
    info: dict = field(default_factory=dict)          # classifier: cached, test_acc, ...

    @classmethod
    def build(cls, feature_net: str, data, *, cache_dir: Path | str | None,
              device: torch.device | str = "cpu", inception_weights: str | None = None,
              max_real: int = 10_000, batch_size: int = 250) -> "FrechetEvaluator":
        if feature_net not in ("digits_cnn", "inception"):
            raise ConfigError(f"feature_net={feature_net!r} is not valid; valid: digits_cnn, inception")
        clf, info = load_or_train_classifier(data, cache_dir, device) \
            if feature_net == "digits_cnn" else (None, {})
        if feature_net == "digits_cnn":
            metric, prepare = _fid_metric(PenultimateFeatures(clf)), nn.Identity()
        else:
            metric, prepare = _fid_metric(2048, check_inception(inception_weights)), _InceptionInput()
        ev = cls(feature_net, metric.to(device), clf, prepare, batch_size, info)
        ev.add_real(data.train, max_real)
        return ev

    @property
    def device(self) -> torch.device:
        return self.metric.device

    @property
    def name(self) -> str:
        return metric_name(self.feature_net)

    @torch.no_grad()
    def _update(self, x: torch.Tensor, real: bool) -> None:
        for i in range(0, len(x), self.batch_size):
            self.metric.update(self.prepare(x[i:i + self.batch_size].to(self.device)), real=real)

    def add_real(self, ds, max_real: int) -> None:
        from ..data.folders import index_batch
        idx = subset_indices(len(ds), max_real)
        for i in range(0, len(idx), self.batch_size):
            x, _ = index_batch(ds, idx[i:i + self.batch_size])
            self._update(x, real=True)

    def distance(self, fake: torch.Tensor) -> float:
        """Fréchet distance of ``fake`` to the real statistics."""
        self.metric.reset()  # keeps the real statistics (reset_real_features=False)
        self._update(fake, real=False)
        return float(self.metric.compute())

    def evaluate(self, fake: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        out = {self.name: self.distance(fake)}
        if self.classifier is not None and labels is not None:
            out["cond_acc"] = conditional_accuracy(self.classifier, fake, labels)
        return out


@torch.no_grad()
def frechet_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     batch_size: int = 500) -> float:
    """One-shot Fréchet distance of two sets through ``feature`` (which needs ``num_features``)."""
    m = _fid_metric(feature)
    for i in range(0, len(real), batch_size):
        m.update(real[i:i + batch_size], real=True)
    for i in range(0, len(fake), batch_size):
        m.update(fake[i:i + batch_size], real=False)
    return float(m.compute())
