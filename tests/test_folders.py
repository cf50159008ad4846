"""A user's own data: image folders and precomputed latents (harness/data/folders.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness import registry
from harness.data.base import build_dataset, get_dataset
from harness.data.folders import index_batch, take_tensors
from harness.errors import ConfigError


def load(name: str, **options):
    spec = get_dataset(name)
    return build_dataset(name, registry.make_config(spec.options_cls, options, where=f"data {name}"))


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """Two classes, mixed sizes and modes; 'wide' is 30x10: black | white 10x10 | black."""
    root = tmp_path / "imgs"
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255
    for i in range(5):
        write_png(root / "cats" / f"{i}.png", wide)                                # L, 30x10
        write_png(root / "dogs" / f"{i}.png", np.full((12, 12, 3), 255, np.uint8))  # RGB
    write_png(root / "dogs" / "alpha.png", np.full((20, 16, 4), 255, np.uint8))    # RGBA
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_classes_sizes_and_centre_crop(folder):
    data = load("image_folder", path=str(folder), image_size=8, channels=1, test_fraction=0.2)
    assert data.info == {"num_classes": 2, "in_channels": 1, "input_size": 8, "value_range": "unit"}
    assert data.class_names == ["cats", "dogs"]
    assert len(data.train) + len(data.test) == 11 and len(data.test) == 2   # one per class
    x, y = take_tensors(data.train)
    assert x.shape == (9, 1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    cats = x[y == 0]
    # the wide image: shorter side -> 8, centre 8x8 crop = the white middle square
    assert cats[:, :, :, 2:6].min() > 0.95 and set(y.tolist()) == {0, 1}
    rgb = load("image_folder", path=str(folder), image_size=8, channels=3, value_range="symmetric")
    xr, _ = take_tensors(rgb.train)
    xu, _ = take_tensors(load("image_folder", path=str(folder), image_size=8, channels=3).train)
    assert xr.shape[1:] == (3, 8, 8)
    torch.testing.assert_close(xr, xu * 2 - 1)   # symmetric = the unit range mapped to [-1, 1]
    assert rgb.fingerprint != data.fingerprint


def test_image_folder_fingerprint_follows_the_pixels(folder):
    a = load("image_folder", path=str(folder), image_size=8)
    b = load("image_folder", path=str(folder), image_size=8)
    assert a.fingerprint == b.fingerprint
    write_png(folder / "cats" / "0.png", np.full((10, 30), 7, np.uint8))
    assert load("image_folder", path=str(folder), image_size=8).fingerprint != a.fingerprint


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        write_png(tmp_path / "flat" / f"{i}.png", np.full((6, 6), 40 * i, np.uint8))
    data = load("image_folder", path=str(tmp_path / "flat"), image_size=4, channels=1,
                test_fraction=0.0)
    assert data.info["num_classes"] == 1 and data.class_names == ["flat"] and len(data.train) == 3


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(ConfigError, match="path is required"):
        load("image_folder")
    with pytest.raises(ConfigError, match="no such file"):
        load("image_folder", path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="only local paths"):
        load("image_folder", path="https://example.com/imgs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        load("image_folder", path=str(tmp_path / "empty"))
    (folder / "birds").mkdir()
    with pytest.raises(ConfigError, match="without images.*birds"):
        load("image_folder", path=str(folder))
    (folder / "birds").rmdir()
    (folder / "cats" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match="cannot read image.*broken.png"):
        load("image_folder", path=str(folder))
    with pytest.raises(ConfigError, match="channels"):
        load("image_folder", path=str(folder), channels=2)
    f = tmp_path / "file.png"
    write_png(f, np.zeros((4, 4), np.uint8))
    with pytest.raises(ConfigError, match="is not a folder"):
        load("image_folder", path=str(f))


def test_latents_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4, 8, 8)).astype(np.float32)
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "lat.npz", latents=x, labels=y)
    data = load("latents", path=str(tmp_path / "lat.npz"), scale_factor=0.5, test_fraction=0.1)
    assert data.info == {"num_classes": 4, "in_channels": 4, "input_size": 8, "value_range": "latent"}
    assert len(data.train) == 36 and len(data.test) == 4
    xb, yb = index_batch(data.train, torch.tensor([3, 0, 7]))
    rows = data.train.index[[3, 0, 7]]
    np.testing.assert_allclose(xb.numpy(), 0.5 * x[rows])
    assert yb.tolist() == y[rows].tolist() and xb.dtype == torch.float32
    x0, y0 = data.train[0]
    assert x0.shape == (4, 8, 8) and int(y0) == y[data.train.index[0]]
    assert load("latents", path=str(tmp_path / "lat.npz"), num_classes=10).info["num_classes"] == 10
    assert load("latents", path=str(tmp_path / "lat.npz")).fingerprint != data.fingerprint  # scale


def test_latents_npy_memory_mapped_with_and_without_labels(tmp_path):
    x = np.arange(6 * 2 * 4 * 4, dtype=np.float32).reshape(6, 2, 4, 4)
    np.save(tmp_path / "lat.npy", x)
    np.save(tmp_path / "lab.npy", np.array([0, 0, 1, 1, 2, 2]))
    data = load("latents", path=str(tmp_path / "lat.npy"), labels_path=str(tmp_path / "lab.npy"),
                test_fraction=0.0)
    assert isinstance(data.train.x, np.memmap) and data.info["num_classes"] == 3
    xs, ys = take_tensors(data.train)
    np.testing.assert_array_equal(xs.numpy(), x)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2]
    assert load("latents", path=str(tmp_path / "lat.npy")).info["num_classes"] == 1


def test_latents_errors(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((5, 16), np.float32))
    with pytest.raises(ConfigError, match=r"expected \(N, C, H, W\)"):
        load("latents", path=str(tmp_path / "flat.npy"))
    np.save(tmp_path / "rect.npy", np.zeros((5, 4, 8, 6), np.float32))
    with pytest.raises(ConfigError, match="H == W"):
        load("latents", path=str(tmp_path / "rect.npy"))
    np.savez(tmp_path / "bad.npz", z=np.zeros((5, 4, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="no array 'latents'.*'z'"):
        load("latents", path=str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "mis.npz", latents=np.zeros((5, 4, 8, 8), np.float32), labels=np.zeros(4, int))
    with pytest.raises(ConfigError, match="5 latents but 4 labels"):
        load("latents", path=str(tmp_path / "mis.npz"))
    np.savez(tmp_path / "int.npz", latents=np.zeros((5, 4, 8, 8), np.int64))
    with pytest.raises(ConfigError, match="dtype"):
        load("latents", path=str(tmp_path / "int.npz"))
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"\.npz or \.npy"):
        load("latents", path=str(tmp_path / "x.pt"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match="cannot read latents"):
        load("latents", path=str(tmp_path / "junk.npy"))
    np.savez(tmp_path / "ok.npz", latents=np.zeros((6, 4, 8, 8), np.float32), labels=np.arange(6) % 3)
    with pytest.raises(ConfigError, match="num_classes=2"):
        load("latents", path=str(tmp_path / "ok.npz"), num_classes=2)
    with pytest.raises(ConfigError, match="path is required"):
        load("latents")
