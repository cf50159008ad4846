"""Variable-resolution datasets: sizes, skew, determinism, collate, and the folder loader's
refusals; one NaViT train step on a real collated batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harness import registry
from harness.data.base import build_dataset, get_dataset
from harness.data.varres import sample_sizes
from harness.errors import ConfigError
from harness.registry import make_config


def varres(**options):
    spec = get_dataset("varres_digits")
    return build_dataset("varres_digits", make_config(spec.options_cls, options))


def folder(**options):
    spec = get_dataset("image_folder_native")
    return build_dataset("image_folder_native", make_config(spec.options_cls, options))


def test_sample_sizes_bounds_steps_and_skew():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    sizes = sample_sizes(4000, 8, 64, 8, skew=0.0, max_aspect=2.0, generator=g())
    assert all(8 <= s <= 64 and s % 8 == 0 for hw in sizes for s in hw)
    assert sizes == sample_sizes(4000, 8, 64, 8, skew=0.0, max_aspect=2.0, generator=g())
    area = lambda ss: np.mean([h * w for h, w in ss])  # noqa: E731
    skewed = sample_sizes(4000, 8, 64, 8, skew=3.0, max_aspect=2.0, generator=g())
    assert area(skewed) < 0.5 * area(sizes)
    small = np.mean([h * w <= 16 * 16 for h, w in skewed])
    assert small > 0.5 and max(h * w for h, w in skewed) >= 48 * 48  # most small, a few large
    assert any(h != w for h, w in sizes)  # aspect ratios vary


def test_varres_digits_samples_sizes_split_and_collate():
    data = varres(skew=2.0)
    assert data.info == {"num_classes": 10, "in_channels": 1, "input_size": 64}
    assert len(data.train) + len(data.test) == 1797 and len(data.test) > 400
    shapes = {tuple(data.train[i][0].shape) for i in range(200)}
    assert len(shapes) > 10
    assert all(c == 1 and 8 <= h <= 64 and 8 <= w <= 64 and h % 8 == 0 == w % 8
               for c, h, w in shapes)
    x, y = data.train[0]
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    images, labels = data.collate([data.train[i] for i in range(5)])
    assert isinstance(images, list) and len(images) == 5 and labels.shape == (5,)
    assert labels.dtype == torch.long
    again = varres(skew=2.0)
    assert again.fingerprint == data.fingerprint
    assert varres(skew=0.0).fingerprint != data.fingerprint


def test_varres_digits_refuses_bad_options():
    with pytest.raises(ConfigError, match="size_step"):
        varres(min_size=12, size_step=8)
    with pytest.raises(ConfigError, match="skew"):
        varres(skew=-1.0)


def test_navit_trains_on_a_collated_varres_batch():
    data = varres(size_step=8, max_size=32)
    model, _ = registry.build("navit-ti", {"depth": 1, "hidden_size": 32, "num_heads": 2,
                                           "patch_size": 8, "input_size": 32, "max_seq_len": 16,
                                           "max_grid": 4, "res_range": (8, 32)}, seed=0)
    images, labels = next(iter(data.loader("train", 16, shuffle=False)))
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad.abs().sum() > 0  # zero-init head


# ------------------------------------------------------------------ image_folder_native

def _save(path, h, w, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(h * 100 + w).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def test_image_folder_native_keeps_native_sizes(tmp_path):
    for c in ("cat", "dog"):
        for i, (h, w) in enumerate([(20, 30), (40, 16), (33, 33), (12, 50), (64, 48)]):
            _save(tmp_path / c / f"{i}.png", h, w)
    data = folder(root=str(tmp_path), test_fraction=0.2)
    assert data.class_names == ["cat", "dog"]
    assert data.info == {"num_classes": 2, "in_channels": 3, "input_size": 64}
    assert len(data.train) == 8 and len(data.test) == 2
    shapes = {tuple(data.train[i][0].shape) for i in range(len(data.train))}
    assert len(shapes) >= 4 and all(s[0] == 3 for s in shapes)
    images, labels = data.collate([data.train[i] for i in range(3)])
    assert len(images) == 3 and labels.tolist() == [int(data.train[i][1]) for i in range(3)]
    capped = folder(root=str(tmp_path), max_side=32, channels=1)
    assert capped.info["input_size"] == 32 and capped.info["in_channels"] == 1
    assert all(max(capped.train[i][0].shape[1:]) <= 32 for i in range(len(capped.train)))
    assert folder(root=str(tmp_path)).fingerprint == data.fingerprint


def test_image_folder_native_refuses_bad_folders(tmp_path):
    with pytest.raises(ConfigError, match="needs root"):
        folder()
    with pytest.raises(ConfigError, match="only local paths"):
        folder(root="https://example.com/images")
    with pytest.raises(ConfigError, match="no such"):
        folder(root=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no class subfolders"):
        folder(root=str(tmp_path))
    _save(tmp_path / "a" / "0.png", 10, 10)
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="without images.*'b'"):
        folder(root=str(tmp_path))
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot read image"):
        folder(root=str(tmp_path))
