"""The embedded default: the 1,797 handwritten 8x8 digits that scikit-learn ships.

No download: ``sklearn.datasets.load_digits`` reads a file inside the package.  The
split is a fixed-seed stratified train/test split, so every trial of every study
sees the same test set.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..errors import ConfigError
from .base import DataBundle, register_dataset


@lru_cache(maxsize=1)
def digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 in [0, 1] and (1797,) int64 labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: the same ``seed`` always gives the same indices."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size), bilinear (antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1]).clamp(0, 1)


@dataclass
class DigitsOptions:
    image_size: int = 8              # 8 (native), 16 or 32: bilinear upsampling
    split_seed: int = 0              # fixed split of train/test
    test_fraction: float = 0.25
    value_range: Literal["unit", "symmetric"] = "unit"   # [0, 1] or [-1, 1] (diffusion)

    def validate(self) -> None:
        if self.image_size < 4 or self.image_size > 256:
            raise ConfigError(f"image_size must be in [4, 256], got {self.image_size}")
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction must be in [0.05, 0.5], got {self.test_fraction}")


def digits_tensors(opts: DigitsOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_train, y_train, x_test, y_test as (N, 1, S, S) float tensors and int labels."""
    images, labels = digit_arrays()
    tr, te = split_indices(labels, opts.test_fraction, opts.split_seed)
    x = resize_images(torch.from_numpy(images).unsqueeze(1), opts.image_size)
    if opts.value_range == "symmetric":
        x = x * 2 - 1
    y = torch.from_numpy(labels)
    return x[tr], y[tr], x[te], y[te]


def fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@register_dataset("digits", DigitsOptions)
def digits(opts: DigitsOptions) -> DataBundle:
    """scikit-learn's handwritten digits: 10 classes, 1 channel, 8x8 upsampled to image_size."""
    xtr, ytr, xte, yte = digits_tensors(opts)
    return DataBundle(
        train=TensorDataset(xtr, ytr), test=TensorDataset(xte, yte),
        info={"num_classes": 10, "in_channels": 1, "input_size": opts.image_size,
              "value_range": opts.value_range},
        class_names=[str(i) for i in range(10)],
        fingerprint=fingerprint(xtr, ytr, xte, yte))
