"""Variable-resolution image datasets for NaViT-style models: images keep their own size.

    varres_digits        scikit-learn's digits rendered at varied sizes and aspect ratios,
                         drawn from a resolution distribution that can be skewed (many small
                         images, a few large ones, like real photo collections)
    image_folder_native  a user's own images (one class per subfolder) at native size

Samples are ``(image, label)`` with ``image`` a (C, H, W) float tensor in [0, 1] whose H and W
differ from sample to sample, so the default collate (stack) cannot work: ``collate`` returns
``(list_of_images, labels)``.  ``info["input_size"]`` is the largest side (what a
resize-everything baseline resizes to).  Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import DataBundle, check_local_path, register_dataset
from .digits import digit_arrays, split_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")


def sample_sizes(n: int, min_size: int, max_size: int, step: int, skew: float,
                 max_aspect: float, generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """``n`` (height, width) pairs, multiples of ``step`` in [min_size, max_size].

    The geometric mean side r = sqrt(h * w) is ``min + (max - min) * u ** (1 + skew)`` with u
    uniform: skew 0 spreads sizes evenly, larger skew puts most images near ``min_size`` and
    a few near ``max_size``.  The aspect ratio h / w is log-uniform in
    [1 / max_aspect, max_aspect].  Deterministic given the generator.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    a = torch.rand(n, generator=generator, dtype=torch.float64)
    r = min_size + (max_size - min_size) * u.pow(1.0 + skew)          # (n,)
    aspect = torch.exp((2 * a - 1) * math.log(max_aspect))            # (n,) h / w
    h, w = r * aspect.sqrt(), r / aspect.sqrt()

    def snap(s: torch.Tensor) -> list[int]:
        s = (s / step).round() * step
        return s.clamp(min_size, max_size).long().tolist()

    return list(zip(snap(h), snap(w)))


def collate_varres(batch: list) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[(image, label), ...] -> ([image, ...], labels (N,)); images keep their sizes."""
    images = [b[0] for b in batch]
    labels = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.long)
    return images, labels


class ImageListDataset(Dataset):
    """A list of (C, H, W) tensors of different sizes with integer labels."""

    def __init__(self, images: list[torch.Tensor], labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def _fingerprint(images: list[torch.Tensor], labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    for x in images:
        h.update(str(tuple(x.shape)).encode())
        h.update(x.contiguous().numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ varres_digits

@dataclass
class VarResDigitsOptions:
    min_size: int = 8                # smallest side in pixels
    max_size: int = 64               # largest side; info["input_size"]
    size_step: int = 8               # sides are multiples of this (make it a multiple of the patch)
    skew: float = 2.0                # 0: uniform sizes; larger: most images small, a few large
    max_aspect: float = 2.0          # aspect ratios h/w log-uniform in [1/max_aspect, max_aspect]
    renders_per_digit: int = 1       # each 8x8 digit rendered this many times (each its own size)
    size_seed: int = 0               # seed of the sizes (fixed: every trial sees the same images)
    split_seed: int = 0              # fixed stratified train/test split (by source digit)
    test_fraction: float = 0.25

    def validate(self) -> None:
        if self.size_step < 1:
            raise ConfigError(f"size_step must be >= 1, got {self.size_step}")
        if self.min_size < self.size_step or self.min_size % self.size_step:
            raise ConfigError(f"min_size={self.min_size} must be a positive multiple of "
                              f"size_step={self.size_step}")
        if self.max_size < self.min_size or self.max_size % self.size_step:
            raise ConfigError(f"max_size={self.max_size} must be a multiple of size_step="
                              f"{self.size_step} and >= min_size={self.min_size}")
        if self.max_size > 512:
            raise ConfigError(f"max_size must be <= 512, got {self.max_size}")
        if self.skew < 0:
            raise ConfigError(f"skew must be >= 0 (0 = uniform), got {self.skew}")
        if self.max_aspect < 1:
            raise ConfigError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if not 1 <= self.renders_per_digit <= 16:
            raise ConfigError(f"renders_per_digit must be in [1, 16], got {self.renders_per_digit}")
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction must be in [0.05, 0.5], got {self.test_fraction}")


def render_digit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(8, 8) digit in [0, 1] -> (1, height, width), bilinear (stretched to the aspect)."""
    x = image[None, None]  # (1, 1, 8, 8)
    shrink = height < x.shape[-2] or width < x.shape[-1]
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                      antialias=shrink)
    return x[0].clamp(0, 1)  # (1, H, W)


@register_dataset("varres_digits", VarResDigitsOptions)
def varres_digits(opts: VarResDigitsOptions) -> DataBundle:
    """scikit-learn digits at varied sizes/aspects (skewable): 10 classes, 1 channel, lists."""
    images, labels = digit_arrays()
    tr, te = split_indices(labels, opts.test_fraction, opts.split_seed)
    gen = torch.Generator().manual_seed(opts.size_seed)
    src = torch.from_numpy(images)
    k = opts.renders_per_digit
    sizes = sample_sizes(len(images) * k, opts.min_size, opts.max_size, opts.size_step,
                         opts.skew, opts.max_aspect, gen)

    def build(indices: np.ndarray) -> ImageListDataset:
        xs, ys = [], []
        for i in indices:
            for j in range(k):  # sizes are drawn per (digit, render): independent of the split
                h, w = sizes[int(i) * k + j]
                xs.append(render_digit(src[int(i)], h, w))
                ys.append(int(labels[int(i)]))
        return ImageListDataset(xs, torch.tensor(ys, dtype=torch.long))

    train, test = build(tr), build(te)
    return DataBundle(
        train=train, test=test,
        info={"num_classes": 10, "in_channels": 1, "input_size": opts.max_size},
        collate=collate_varres, class_names=[str(i) for i in range(10)],
        fingerprint=_fingerprint(train.images + test.images,
                                 torch.cat([train.labels, test.labels])))


# ------------------------------------------------------------- image_folder_native

@dataclass
class ImageFolderNativeOptions:
    root: str = ""                   # local folder: root/<class name>/<image files>
    max_side: int | None = None      # shrink (aspect kept) images whose longer side exceeds this
    channels: int = 3                # 3: RGB, 1: grey
    split_seed: int = 0              # fixed stratified train/test split
    test_fraction: float = 0.2

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("image_folder_native needs root: a local folder with one "
                              "subfolder of images per class")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"max_side must be >= 1 or null, got {self.max_side}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction must be in [0.05, 0.5], got {self.test_fraction}")


def capped_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(height, width) shrunk so that the longer side is at most ``max_side`` (aspect kept)."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class ImageFolderDataset(Dataset):
    """Reads each image on access (PIL), at native size (capped at ``max_side``)."""

    def __init__(self, files: list[Path], labels: list[int], opts: ImageFolderNativeOptions):
        self.files, self.labels, self.opts = files, torch.tensor(labels, dtype=torch.long), opts

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return load_image(self.files[i], self.opts.channels, self.opts.max_side), self.labels[i]


def load_image(path: Path, channels: int, max_side: int | None) -> torch.Tensor:
    """One image file -> (channels, H, W) float in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        h, w = capped_size(im.height, im.width, max_side)
        if (h, w) != (im.height, im.width):
            im = im.resize((w, h), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    x = x.float().div_(255.0)
    return x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1).contiguous()  # (C, H, W)


@register_dataset("image_folder_native", ImageFolderNativeOptions)
def image_folder_native(opts: ImageFolderNativeOptions) -> DataBundle:
    """Your own images, one subfolder per class, kept at native size (lists of (C,H,W))."""
    from PIL import Image, UnidentifiedImageError

    root = check_local_path(opts.root, "root")
    if not root.is_dir():
        raise ConfigError(f"root={opts.root!r} is not a folder; expected root/<class>/<images>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"root={opts.root!r} has no class subfolders; expected "
                          "root/<class name>/<image files>")
    files, labels, sizes, empty = [], [], [], []
    for c, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            empty.append(name)
        for p in found:
            try:
                with Image.open(p) as im:  # reads the header only
                    sizes.append(capped_size(im.height, im.width, opts.max_side))
            except (UnidentifiedImageError, OSError) as e:
                raise ConfigError(f"root={opts.root!r}: cannot read image {p} ({e})") from None
            files.append(p)
            labels.append(c)
    if empty:
        raise ConfigError(f"root={opts.root!r}: class folders without images "
                          f"({', '.join(IMAGE_EXTENSIONS)}): {empty}")
    if len(classes) < 2:
        raise ConfigError(f"root={opts.root!r} has one class folder ({classes[0]!r}); "
                          "classification needs at least 2")
    tr, te = split_indices(np.array(labels), opts.test_fraction, opts.split_seed)
    if len(tr) == 0 or len(te) == 0:
        raise ConfigError(f"root={opts.root!r}: {len(files)} images are too few for a "
                          f"train/test split at test_fraction={opts.test_fraction}")
    h = hashlib.sha256()
    for p, s in zip(files, sizes):
        h.update(f"{p.relative_to(root)}|{p.stat().st_size}|{s}".encode())

    def subset(idx: np.ndarray) -> ImageFolderDataset:
        return ImageFolderDataset([files[i] for i in idx], [labels[i] for i in idx], opts)

    return DataBundle(
        train=subset(tr), test=subset(te),
        info={"num_classes": len(classes), "in_channels": opts.channels,
              "input_size": max(max(s) for s in sizes)},
        collate=collate_varres, class_names=classes, fingerprint=h.hexdigest()[:16])
