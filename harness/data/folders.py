"""A user's own data, read from local paths (nothing is downloaded).

- ``image_folder``: one class per subfolder (``root/cat/*.png``, ``root/dog/*.jpg``), or a flat
  folder of images as a single class.  Any size and mode: each image is resized so that its
  shorter side is ``image_size`` and centre-cropped to a square, converted to 1 or 3 channels,
  and scaled to [0, 1] (``unit``) or [-1, 1] (``symmetric``, what diffusion needs).  Everything
  is decoded once into memory: meant for folders of up to some 10^5 small images.
- ``latents``: precomputed latents (e.g. SD-VAE, 4 x 32 x 32 for 256px images, as DiT trains on)
  in a ``.npz`` (arrays ``latents`` and ``labels``) or a ``.npy`` of latents with an optional
  ``.npy`` of labels.  ``.npy`` files are memory-mapped, so the set may exceed memory.  Values are
  multiplied by ``scale_factor`` (DiT: 0.18215 for raw SD-VAE latents; 1.0 when already scaled).

Both use the same stratified fixed-seed split as ``digits``.  ``index_batch`` / ``take_tensors``
read batches from any of the harness's datasets (fast paths for tensor and array datasets).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import ConfigError
from .base import DataBundle, check_local_path, register_dataset
from .digits import fingerprint, split_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------ batch access

def index_batch(ds: Dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for the items ``idx`` of a dataset of (image, label) pairs."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][idx], ds.tensors[1][idx]
    if hasattr(ds, "get_batch"):
        return ds.get_batch(idx)
    items = [ds[int(i)] for i in idx]
    return (torch.stack([torch.as_tensor(a) for a, _ in items]),
            torch.as_tensor([int(b) for _, b in items]))


def take_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dataset as (x, y) tensors."""
    return index_batch(ds, torch.arange(len(ds)))


class ArrayDataset(Dataset):
    """Rows ``index`` of a (possibly memory-mapped) array, with labels, as float tensors."""

    def __init__(self, x: np.ndarray, y: np.ndarray, index: np.ndarray, scale: float = 1.0):
        self.x, self.y, self.index, self.scale = x, y, np.asarray(index, dtype=np.int64), scale

    def __len__(self) -> int:
        return len(self.index)

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.index[np.asarray(idx, dtype=np.int64)]
        order = np.argsort(rows)  # sorted reads are much faster on a memory map
        x = np.asarray(self.x[rows[order]], dtype=np.float32)[np.argsort(order)]
        return torch.from_numpy(x * self.scale), torch.from_numpy(self.y[rows].astype(np.int64))

    def __getitem__(self, i: int):
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], y[0]


# ------------------------------------------------------------------ image folders

@dataclass
class ImageFolderOptions:
    path: str = ""                   # local folder: one subfolder of images per class
    image_size: int = 32             # shorter side resized to this, then centre-cropped square
    channels: Literal[1, 3] = 3      # 1: greyscale ("L"), 3: RGB
    value_range: Literal["unit", "symmetric"] = "unit"   # [0, 1] or [-1, 1] (diffusion)
    test_fraction: float = 0.1       # stratified, per class
    split_seed: int = 0

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("data.options.path is required: a local folder with one subfolder "
                              "of images per class")
        if not 4 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [4, 1024], got {self.image_size}")
        if not 0.0 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction must be in [0, 0.5], got {self.test_fraction}")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image -> (channels, size, size) float32 in [0, 1]: resize shorter side, centre crop."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read image {str(path)!r}: {e}") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, class index) pairs; subfolders are classes."""
    if not root.is_dir():
        raise ConfigError(f"data.options.path={str(root)!r} is not a folder")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = [d for d in subdirs if _images_in(d)]
    if classes:
        empty = [d.name for d in subdirs if d not in classes]
        if empty:
            raise ConfigError(f"data.options.path={str(root)!r}: class folders without images "
                              f"({', '.join(empty)}); remove them or add images "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
        files = [(f, k) for k, d in enumerate(classes) for f in _images_in(d)]
        return [d.name for d in classes], files
    flat = _images_in(root)
    if not flat:
        raise ConfigError(f"data.options.path={str(root)!r} holds no images "
                          f"({', '.join(IMAGE_EXTENSIONS)}): put one subfolder of images per class")
    return [root.name], [(f, 0) for f in flat]


@register_dataset("image_folder", ImageFolderOptions)
def image_folder(opts: ImageFolderOptions) -> DataBundle:
    """Your images: one class per subfolder, resized and centre-cropped to image_size."""
    root = check_local_path(opts.path, "data.options.path")
    names, files = scan_image_folder(root)
    x = torch.from_numpy(np.stack([load_image(f, opts.image_size, opts.channels) for f, _ in files]))
    y = torch.tensor([k for _, k in files], dtype=torch.long)
    if opts.value_range == "symmetric":
        x = x * 2 - 1
    tr, te = split_indices(y.numpy(), opts.test_fraction, opts.split_seed)
    tr, te = torch.as_tensor(tr, dtype=torch.long), torch.as_tensor(te, dtype=torch.long)
    return DataBundle(
        train=TensorDataset(x[tr], y[tr]), test=TensorDataset(x[te], y[te]),
        info={"num_classes": len(names), "in_channels": opts.channels,
              "input_size": opts.image_size, "value_range": opts.value_range},
        class_names=names, fingerprint=fingerprint(x, y, tr, te))


# ------------------------------------------------------------------ latents

@dataclass
class LatentsOptions:
    path: str = ""                    # .npz (latents + labels) or .npy (latents)
    labels_path: str | None = None    # .npy of labels when path is a .npy (none: one class)
    latents_key: str = "latents"      # array names inside a .npz
    labels_key: str = "labels"
    scale_factor: float = 1.0         # multiply latents (DiT: 0.18215 for raw SD-VAE latents)
    num_classes: int = 0              # 0: labels.max() + 1 (set it when a subset lacks classes)
    test_fraction: float = 0.05
    split_seed: int = 0

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("data.options.path is required: a local .npz or .npy of latents "
                              "(N, C, H, W)")
        if not 0.0 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction must be in [0, 0.5], got {self.test_fraction}")
        if self.scale_factor <= 0:
            raise ConfigError(f"scale_factor must be > 0, got {self.scale_factor}")


def _load_latent_arrays(opts: LatentsOptions) -> tuple[np.ndarray, np.ndarray]:
    p = check_local_path(opts.path, "data.options.path")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(p) as z:
                if opts.latents_key not in z:
                    raise ConfigError(f"data.options.path={opts.path!r} has no array "
                                      f"{opts.latents_key!r} (latents_key); arrays: {sorted(z.files)}")
                x = z[opts.latents_key]
                y = z[opts.labels_key] if opts.labels_key in z else None
        elif suffix == ".npy":
            x = np.load(p, mmap_mode="r")
            y = None
            if opts.labels_path:
                y = np.load(check_local_path(opts.labels_path, "data.options.labels_path"))
        else:
            raise ConfigError(f"data.options.path={opts.path!r}: expected a .npz or .npy file")
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read latents from {opts.path!r}: {e}") from None
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ConfigError(f"latents in {opts.path!r} have shape {tuple(x.shape)}; expected "
                          "(N, C, H, W) with H == W")
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"latents in {opts.path!r} have dtype {x.dtype}; expected floats")
    y = np.zeros(len(x), dtype=np.int64) if y is None else np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise ConfigError(f"{len(x)} latents but {len(y)} labels in {opts.path!r}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ConfigError(f"labels in {opts.path!r} must be non-negative integers")
    return x, y.astype(np.int64)


def _array_fingerprint(x: np.ndarray, y: np.ndarray, scale: float) -> str:
    """Shape, dtype, scale, every label and up to 1024 evenly spaced rows (cheap on big files)."""
    h = hashlib.sha256()
    h.update(f"{x.shape}{x.dtype}{scale}".encode())
    h.update(np.ascontiguousarray(y).tobytes())
    rows = np.unique(np.linspace(0, len(x) - 1, min(len(x), 1024)).astype(np.int64))
    h.update(np.ascontiguousarray(x[rows]).tobytes())
    return h.hexdigest()[:16]


@register_dataset("latents", LatentsOptions)
def latents(opts: LatentsOptions) -> DataBundle:
    """Precomputed latents (N, C, H, W) + labels from a local .npz / .npy (DiT's setting)."""
    x, y = _load_latent_arrays(opts)
    if len(x) < 2:
        raise ConfigError(f"{opts.path!r} holds {len(x)} latents; need at least 2")
    num_classes = int(y.max()) + 1
    if opts.num_classes:
        if opts.num_classes < num_classes:
            raise ConfigError(f"num_classes={opts.num_classes} but labels go up to {num_classes - 1}")
        num_classes = opts.num_classes
    tr, te = split_indices(y, opts.test_fraction, opts.split_seed)
    return DataBundle(
        train=ArrayDataset(x, y, tr, opts.scale_factor), test=ArrayDataset(x, y, te, opts.scale_factor),
        info={"num_classes": num_classes, "in_channels": int(x.shape[1]),
              "input_size": int(x.shape[2]), "value_range": "latent"},
        class_names=[str(i) for i in range(num_classes)],
        fingerprint=_array_fingerprint(x, y, opts.scale_factor))
