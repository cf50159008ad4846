"""Video datasets: generated moving digits (the embedded default) and a user's own clips.

Every sample is a float tensor (C, T, H, W) in [0, 1] with an int label, the layout
``variants.vivit`` takes.  ``info`` carries ``num_classes``, ``in_channels``,
``input_size`` and ``num_frames``, which fill the model config fields of those names.

``moving_digits``: a handwritten digit (scikit-learn's 8x8 digits, no download) moves in a
straight line across a blank canvas.  The class is (digit, direction of motion).  The
direction needs temporal order: a clip moving right from x0 to x1 and one moving left from
x1 to x0 hold exactly the same frames, in reverse order, and start positions are drawn so
both are equally likely.  Shuffling the frames therefore leaves at best the digit and the
axis of motion (with 4 directions) or only the digit (with 2).  Test clips use digit images
that no training clip uses.

``video_folder``: ``root/<class>/<clip>``, where a clip is a folder of frame images
(PNG/JPEG/BMP, read in name order) or a ``.npy`` array (T, H, W) or (T, H, W, C)
(integers are read as 0..255, floats as 0..1);
``num_frames`` frames are sampled uniformly over the clip (segment centres) and resized
to ``image_size`` (squashed, aspect ratio not kept).  Clips are loaded into memory once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import ConfigError
from .base import DataBundle, check_local_path, register_dataset
from .digits import digit_arrays, fingerprint, resize_images, split_indices

DIRECTIONS = ("right", "left", "down", "up")   # label = digit_index * directions + direction


# ------------------------------------------------------------------ moving digits

@dataclass
class MovingDigitsOptions:
    num_frames: int = 8              # T frames per clip
    image_size: int = 32             # canvas side H = W
    digit_size: int = 8              # side of the moving digit (8 = native, larger: bilinear)
    digits: tuple[int, ...] = (0, 1, 2)  # digit classes used (each x every direction)
    directions: Literal[2, 4] = 4    # 2: right/left; 4: right/left/down/up
    max_speed: int = 2               # pixels per frame, uniform in 1..max_speed (capped to fit)
    num_train: int = 2000
    num_test: int = 500
    noise: float = 0.0               # std of Gaussian pixel noise (then clipped to [0, 1])
    seed: int = 0                    # everything (digit split, clips, labels) follows from it

    def validate(self) -> None:
        if self.num_frames < 2:
            raise ConfigError(f"num_frames must be >= 2 (motion needs two frames), got "
                              f"{self.num_frames}")
        if self.digit_size < 4:
            raise ConfigError(f"digit_size must be >= 4, got {self.digit_size}")
        need = self.digit_size + self.num_frames - 1
        if self.image_size < need:
            raise ConfigError(f"image_size={self.image_size} is too small: a {self.digit_size}px "
                              f"digit moving 1px per frame for {self.num_frames} frames needs "
                              f"image_size >= {need} (or a smaller digit_size / num_frames)")
        if self.image_size > 256:
            raise ConfigError(f"image_size must be <= 256, got {self.image_size}")
        if not self.digits or len(set(self.digits)) != len(self.digits) or \
                not all(0 <= d <= 9 for d in self.digits):
            raise ConfigError(f"digits must be distinct values in 0..9, got {list(self.digits)}")
        if self.max_speed < 1:
            raise ConfigError(f"max_speed must be >= 1, got {self.max_speed}")
        if self.num_train < 1 or self.num_test < 1:
            raise ConfigError(f"num_train and num_test must be >= 1, got {self.num_train}, "
                              f"{self.num_test}")
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"noise must be in [0, 1), got {self.noise}")

    @property
    def num_classes(self) -> int:
        return len(self.digits) * self.directions


def moving_digit_clips(opts: MovingDigitsOptions, images: np.ndarray, labels: np.ndarray,
                       n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips (n, 1, T, S, S) in [0, 1] and balanced labels, from digit ``images``."""
    T, S, d, k = opts.num_frames, opts.image_size, opts.digit_size, opts.directions
    y = rng.permutation(np.arange(n) % opts.num_classes)          # balanced to within one
    digit_idx, direction = y // k, y % k
    # one source image per clip, of the clip's digit class
    src = np.empty(n, dtype=np.int64)
    for i, c in enumerate(opts.digits):
        pool = np.flatnonzero(labels == c)
        sel = digit_idx == i
        src[sel] = rng.choice(pool, size=int(sel.sum()))
    patches = resize_images(torch.from_numpy(images[src]).unsqueeze(1), d)[:, 0].numpy()
    # straight-line motion: speed v, start p0 on the motion axis, q across it
    v = rng.integers(1, min(opts.max_speed, (S - d) // (T - 1)) + 1, size=n)
    travel = v * (T - 1)
    p0 = np.floor(rng.random(n) * (S - d - travel + 1)).astype(np.int64)
    q = rng.integers(0, S - d + 1, size=n)
    t = np.arange(T)
    forward = direction % 2 == 0                                   # right / down
    pos = np.where(forward[:, None], p0[:, None] + v[:, None] * t,
                   (p0 + travel)[:, None] - v[:, None] * t)        # (n, T)
    horizontal = direction < 2
    row = np.where(horizontal[:, None], q[:, None], pos)           # (n, T) top edge
    col = np.where(horizontal[:, None], pos, q[:, None])           # (n, T) left edge
    canvas = np.zeros((n, T, S, S), dtype=np.float32)
    ii = np.arange(d)
    canvas[np.arange(n)[:, None, None, None], t[None, :, None, None],
           row[:, :, None, None] + ii[:, None], col[:, :, None, None] + ii[None, :]] = \
        patches[:, None]                                           # paste (n, T, d, d)
    if opts.noise > 0:
        canvas += rng.normal(0.0, opts.noise, size=canvas.shape).astype(np.float32)
        np.clip(canvas, 0.0, 1.0, out=canvas)
    return torch.from_numpy(canvas).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


@register_dataset("moving_digits", MovingDigitsOptions)
def moving_digits(opts: MovingDigitsOptions) -> DataBundle:
    """A digit moving across a canvas; class = digit x direction, so frame order matters."""
    images, labels = digit_arrays()
    train_pool, test_pool = split_indices(labels, 0.25, opts.seed)  # unseen handwriting in test
    rng_train, rng_test = (np.random.default_rng(s) for s in
                           np.random.SeedSequence(opts.seed).spawn(2))
    xtr, ytr = moving_digit_clips(opts, images[train_pool], labels[train_pool], opts.num_train,
                                  rng_train)
    xte, yte = moving_digit_clips(opts, images[test_pool], labels[test_pool], opts.num_test,
                                  rng_test)
    names = [f"{d}-{DIRECTIONS[j]}" for d in opts.digits for j in range(opts.directions)]
    return DataBundle(
        train=TensorDataset(xtr, ytr), test=TensorDataset(xte, yte),
        info={"num_classes": opts.num_classes, "in_channels": 1, "input_size": opts.image_size,
              "num_frames": opts.num_frames},
        class_names=names, fingerprint=fingerprint(xtr, ytr, xte, yte))


# ------------------------------------------------------------------ a user's own clips

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class VideoFolderOptions:
    root: str = ""                   # local folder: root/<class>/<clip folder or .npy>
    num_frames: int = 8              # frames sampled uniformly over each clip
    image_size: int = 32             # frames resized (squashed) to image_size x image_size
    color: Literal["rgb", "gray"] = "rgb"   # 3 or 1 input channels
    test_fraction: float = 0.25      # per-class (stratified) split
    split_seed: int = 0

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("video_folder needs root: a local folder with one subfolder per "
                              "class, each holding clips (frame folders or .npy arrays)")
        check_local_path(self.root, "root")
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.num_frames}")
        if not 4 <= self.image_size <= 512:
            raise ConfigError(f"image_size must be in [4, 512], got {self.image_size}")
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction must be in [0.05, 0.5], got {self.test_fraction}")


def uniform_frame_indices(length: int, num_frames: int) -> np.ndarray:
    """Centres of ``num_frames`` equal segments of a clip of ``length`` frames (repeats
    frames when the clip is shorter)."""
    return np.minimum(((np.arange(num_frames) + 0.5) * length / num_frames).astype(np.int64),
                      length - 1)


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def load_clip(path: Path, opts: VideoFolderOptions) -> torch.Tensor:
    """One clip -> (C, num_frames, S, S) float in [0, 1]; ConfigError naming the file if bad."""
    channels = 3 if opts.color == "rgb" else 1
    S = opts.image_size
    if path.is_dir():
        from PIL import Image
        files = _frame_files(path)
        if not files:
            raise ConfigError(f"video_folder: {path} has no frame images "
                              f"({', '.join(FRAME_SUFFIXES)})")
        frames = []
        for i in uniform_frame_indices(len(files), opts.num_frames):
            try:
                with Image.open(files[i]) as im:
                    im = im.convert("RGB" if channels == 3 else "L").resize(
                        (S, S), Image.BILINEAR)
                    frames.append(np.asarray(im, dtype=np.float32) / 255.0)
            except OSError as e:
                raise ConfigError(f"video_folder: cannot read frame {files[i]}: {e}") from None
        x = torch.from_numpy(np.stack(frames))  # (T, S, S[, 3])
        x = x.unsqueeze(-1) if x.ndim == 3 else x
        return x.permute(3, 0, 1, 2).contiguous()  # (C, T, S, S)
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"video_folder: cannot read {path}: {e}") from None
    if a.ndim not in (3, 4) or a.shape[0] < 1 or (a.ndim == 4 and a.shape[-1] not in (1, 3, 4)):
        raise ConfigError(f"video_folder: {path} has shape {a.shape}; expected (T, H, W) or "
                          "(T, H, W, C) with C in 1, 3, 4")
    scale = 255.0 if np.issubdtype(a.dtype, np.integer) else 1.0
    a = a[uniform_frame_indices(a.shape[0], opts.num_frames)].astype(np.float32) / scale
    x = torch.from_numpy(a if a.ndim == 4 else a[..., None]).permute(0, 3, 1, 2)  # (T, c, H, W)
    x = x[:, :3]                                                    # drop alpha
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1)
    x = resize_images(x.clamp(0, 1), S)  # (T, C, S, S)
    return x.permute(1, 0, 2, 3).contiguous()  # (C, T, S, S)


def find_clips(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Clip paths, labels and class names (sorted subfolder names) under ``root``."""
    if not root.is_dir():
        raise ConfigError(f"video_folder: root={str(root)!r} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"video_folder: root={str(root)!r} has {len(classes)} class "
                          "subfolder(s); classification needs at least 2 (root/<class>/<clip>)")
    paths, labels = [], []
    for i, c in enumerate(classes):
        clips = sorted(p for p in (root / c).iterdir() if not p.name.startswith(".") and
                       (p.is_dir() or p.suffix.lower() == ".npy"))
        if not clips:
            raise ConfigError(f"video_folder: class folder {root / c} has no clips (a clip is a "
                              "folder of frame images or a .npy array)")
        paths += clips
        labels += [i] * len(clips)
    return paths, np.array(labels, dtype=np.int64), classes


@register_dataset("video_folder", VideoFolderOptions)
def video_folder(opts: VideoFolderOptions) -> DataBundle:
    """A user's own clips: root/<class>/<clip>, frame folders or .npy arrays."""
    root = check_local_path(opts.root, "root")
    paths, labels, classes = find_clips(root)
    x = torch.stack([load_clip(p, opts) for p in paths])  # (N, C, T, S, S)
    y = torch.from_numpy(labels)
    tr, te = split_indices(labels, opts.test_fraction, opts.split_seed)
    if len(te) == 0:
        raise ConfigError(f"video_folder: {len(paths)} clips leave an empty test split at "
                          f"test_fraction={opts.test_fraction}; add clips or raise it")
    return DataBundle(
        train=TensorDataset(x[tr], y[tr]), test=TensorDataset(x[te], y[te]),
        info={"num_classes": len(classes), "in_channels": x.shape[1],
              "input_size": opts.image_size, "num_frames": opts.num_frames},
        class_names=classes, fingerprint=fingerprint(x, y))
