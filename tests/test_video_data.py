"""Video datasets: moving digits (deterministic, balanced, and the label needs frame order)
and a user's folder of clips."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import registry
from harness.data.base import build_dataset, get_dataset
from harness.data.digits import digit_arrays
from harness.data.video import DIRECTIONS, uniform_frame_indices
from harness.errors import ConfigError
from harness.registry import make_config


def options(name: str, **values):
    return make_config(get_dataset(name).options_cls, values, where=f"data {name!r}")


def moving(**values):
    return build_dataset("moving_digits", options("moving_digits", **values))


# ------------------------------------------------------------------ moving digits

SMALL = {"num_train": 240, "num_test": 96, "image_size": 16, "num_frames": 6}


def test_deterministic_by_seed():
    a, b, c = moving(**SMALL), moving(**SMALL), moving(**SMALL, seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_shapes_range_and_info():
    bundle = moving(**SMALL, digits=[3, 7], directions=4)
    x, y = bundle.train.tensors
    assert x.shape == (240, 1, 6, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and bundle.test.tensors[0].shape == (96, 1, 6, 16, 16)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert bundle.info == {"num_classes": 8, "in_channels": 1, "input_size": 16, "num_frames": 6}
    assert bundle.class_names[:4] == ["3-right", "3-left", "3-down", "3-up"]
    assert bundle.class_names[-1] == "7-up"
    # every frame holds exactly one whole digit: its ink is the same in every frame
    ink = x.sum(dim=(-1, -2))[:, 0]                                   # (N, T)
    assert torch.allclose(ink, ink[:, :1].expand_as(ink), rtol=1e-5)


@pytest.mark.parametrize("directions", [2, 4])
def test_labels_balanced(directions):
    bundle = moving(**{**SMALL, "num_train": 250}, directions=directions)
    for split in (bundle.train, bundle.test):
        counts = torch.bincount(split.tensors[1], minlength=3 * directions)
        assert len(counts) == 3 * directions
        assert counts.max() - counts.min() <= 1


def centroids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, T, S, S) -> row and column centre of ink, each (N, T)."""
    ink = x[:, 0]
    S = ink.shape[-1]
    idx = torch.arange(S, dtype=torch.float32)
    mass = ink.sum(dim=(-1, -2))
    return ((ink.sum(-1) * idx).sum(-1) / mass, (ink.sum(-2) * idx).sum(-1) / mass)


def test_digits_move_in_the_labelled_direction():
    bundle = moving(**{**SMALL, "image_size": 24}, max_speed=2)
    x, y = bundle.train.tensors
    row, col = centroids(x)
    drow, dcol = row.diff(dim=1), col.diff(dim=1)                    # (N, T-1) per-frame steps
    step = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
    for j, name in enumerate(DIRECTIONS):
        sel = y % 4 == j
        er, ec = step[name]
        assert sel.any()
        assert torch.all(torch.sign(drow[sel]).round() == er), name
        assert torch.all(torch.sign(dcol[sel]).round() == ec), name
        speed = (drow[sel].abs() + dcol[sel].abs())                   # constant per clip, 1..2
        assert torch.allclose(speed, speed[:, :1].expand_as(speed), atol=1e-4)
        assert set(speed[:, 0].round().int().tolist()) == {1, 2}


def test_frame_set_does_not_give_away_the_direction():
    """Right- and left-moving clips cover the same positions: without the order, the sign
    of the motion is not in the data."""
    x, y = moving(num_train=8000, num_test=8, image_size=24, digits=[0]).train.tensors
    _, col = centroids(x)
    right, left = col[y == 0].flatten(), col[y == 1].flatten()
    assert abs(right.mean() - left.mean()) < 0.3
    assert abs(right.std() - left.std()) < 0.3
    assert (col[y == 0, -1] - col[y == 0, 0]).min() > 0               # yet the order does


def test_generation_is_fast():
    digit_arrays()                                                    # sklearn's file, cached
    t0 = time.perf_counter()
    bundle = moving(num_train=3000, num_test=1000)                    # 4000 clips, 8 x 32 x 32
    assert time.perf_counter() - t0 < 5.0
    assert len(bundle.train) == 3000


@pytest.mark.parametrize("values, message", [
    ({"image_size": 12}, "image_size >= 15"),
    ({"digits": [3, 3]}, "distinct values in 0..9"),
    ({"digits": [10]}, "distinct values in 0..9"),
    ({"num_frames": 1}, "motion needs two frames"),
    ({"directions": 3}, "directions=3 is not valid"),
    ({"noise": 1.5}, "noise must be in"),
])
def test_bad_options_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        options("moving_digits", **values)


def test_time_matters():
    """A tiny ViViT learns the task; the same clips with their frames shuffled are mostly
    misclassified, because the direction of motion lives in the frame order."""
    torch.manual_seed(0)
    data = moving(num_train=1024, num_test=256, image_size=16, num_frames=8, digits=[0, 1],
                  max_speed=1)
    model, _ = registry.build("vivit-ti", {
        **{k: data.info[k] for k in ("num_classes", "in_channels", "input_size", "num_frames")},
        "depth": 2, "hidden_size": 64, "num_heads": 4, "tubelet_size": (2, 8, 8)}, seed=0)
    xtr, ytr = data.train.tensors
    xte, yte = data.test.tensors
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    perm = torch.argsort(torch.rand(len(xte), 8, generator=gen), dim=1)   # per clip
    shuffled = torch.take_along_dim(xte, perm[:, None, :, None, None], dim=2)
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
        acc_shuffled = (model(shuffled).argmax(1) == yte).float().mean().item()
    assert acc >= 0.85, f"the model did not learn the task (test accuracy {acc:.2f})"
    assert acc_shuffled <= acc - 0.3, (acc, acc_shuffled)


# ------------------------------------------------------------------ a folder of clips

def test_uniform_frame_indices():
    assert uniform_frame_indices(10, 4).tolist() == [1, 3, 6, 8]
    assert uniform_frame_indices(8, 8).tolist() == list(range(8))
    assert uniform_frame_indices(3, 5).tolist() == [0, 0, 1, 2, 2]    # short clip: repeats


def write_png_clip(folder, frames: np.ndarray) -> None:
    from PIL import Image
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"frame_{i:03d}.png")


@pytest.fixture
def clip_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "clips"
    for k in range(4):   # class "jump": .npy, uint8 (T, H, W) and float (T, H, W, 3)
        root.joinpath("jump").mkdir(parents=True, exist_ok=True)
        a = np.stack([np.full((12, 10), 20 * t, dtype=np.uint8) for t in range(10)])  # value = frame
        np.save(root / "jump" / f"c{k}.npy", a if k % 2 else
                np.repeat(a[..., None], 3, axis=-1).astype(np.float32) / 255.0)
    for k in range(4):   # class "wave": folders of RGB PNG frames of varying size
        write_png_clip(root / "wave" / f"clip{k}",
                       rng.integers(0, 256, size=(5 + k, 9, 14, 3), dtype=np.uint8))
    (root / "wave" / "notes.txt").write_text("ignored")
    return root


def test_video_folder(clip_root):
    bundle = build_dataset("video_folder", options("video_folder", root=str(clip_root),
                                                    num_frames=4, image_size=8))
    assert bundle.class_names == ["jump", "wave"]
    assert bundle.info == {"num_classes": 2, "in_channels": 3, "input_size": 8, "num_frames": 4}
    assert len(bundle.train) + len(bundle.test) == 8
    assert sorted(bundle.test.tensors[1].tolist()) == [0, 1]          # stratified 25%
    x = torch.cat([bundle.train.tensors[0], bundle.test.tensors[0]])
    y = torch.cat([bundle.train.tensors[1], bundle.test.tensors[1]])
    assert x.shape == (8, 3, 4, 8, 8) and 0 <= x.min() and x.max() <= 1
    # frames 1, 3, 6, 8 of 10 were sampled: their constant values 20 * t / 255
    jump = x[y == 0]
    expected = torch.tensor([20.0, 60.0, 120.0, 160.0]) / 255
    assert torch.allclose(jump.mean(dim=(1, 3, 4)), expected.expand(4, 4), atol=1e-4)
    gray = build_dataset("video_folder", options("video_folder", root=str(clip_root),
                                                  num_frames=4, image_size=8, color="gray"))
    assert gray.train.tensors[0].shape[1] == 1 and gray.info["in_channels"] == 1
    again = build_dataset("video_folder", options("video_folder", root=str(clip_root),
                                                   num_frames=4, image_size=8))
    assert again.fingerprint == bundle.fingerprint


def test_video_folder_errors(tmp_path, clip_root):
    with pytest.raises(ConfigError, match="needs root"):
        options("video_folder")
    with pytest.raises(ConfigError, match="only local paths"):
        options("video_folder", root="https://example.com/clips")
    with pytest.raises(ConfigError, match="no such file"):
        options("video_folder", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="at least 2"):
        build_dataset("video_folder", options("video_folder", root=str(tmp_path / "empty")))
    (clip_root / "idle").mkdir()
    with pytest.raises(ConfigError, match="has no clips"):
        build_dataset("video_folder", options("video_folder", root=str(clip_root)))
    np.save(clip_root / "idle" / "bad.npy", np.zeros((4, 5)))
    with pytest.raises(ConfigError, match="bad.npy has shape"):
        build_dataset("video_folder", options("video_folder", root=str(clip_root)))
    (clip_root / "idle" / "bad.npy").unlink()
    (clip_root / "idle" / "noframes").mkdir()
    with pytest.raises(ConfigError, match="no frame images"):
        build_dataset("video_folder", options("video_folder", root=str(clip_root)))
    (clip_root / "idle" / "noframes" / "f.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot read frame"):
        build_dataset("video_folder", options("video_folder", root=str(clip_root)))
