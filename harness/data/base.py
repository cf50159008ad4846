"""Datasets by name, each with a typed options dataclass (checked like a model config).

A dataset factory returns a ``DataBundle``: train/test splits (torch Datasets), an
optional ``collate`` (NaViT's lists of variable-size images), and ``info``, whose
keys (``num_classes``, ``in_channels``, ``input_size``, ``num_frames``) fill the model
config fields of the same name unless the study fixes them.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DuplicateRegistrationError, UnknownKeyError, did_you_mean


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    info: dict                               # num_classes, in_channels, input_size, ...
    collate: Callable | None = None          # batch collation (default: stack)
    class_names: list[str] | None = None
    fingerprint: str = ""                    # stable hash of the data (caches key on it)

    def loader(self, split: str, batch_size: int, *, shuffle: bool,
               generator: torch.Generator | None = None, drop_last: bool = False) -> DataLoader:
        ds = self.train if split == "train" else self.test
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=self.collate, drop_last=drop_last, num_workers=0)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    options_cls: type
    factory: Callable[[Any], DataBundle]
    doc: str = ""


_DATASETS: dict[str, DatasetSpec] = {}
DATA_MODULES = ("digits", "video", "varres", "folders")  # harness.data.<module> register datasets


def register_dataset(name: str, options: type) -> Callable:
    def deco(factory):
        if name in _DATASETS:
            raise DuplicateRegistrationError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetSpec(name, options, factory, (factory.__doc__ or "").strip())
        return factory
    return deco


def load_datasets() -> None:
    for mod in DATA_MODULES:
        try:
            importlib.import_module(f"harness.data.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"harness.data.{mod}":
                raise


def get_dataset(name: str) -> DatasetSpec:
    load_datasets()
    if name not in _DATASETS:
        raise UnknownKeyError(f"unknown dataset {name!r}; {did_you_mean(name, _DATASETS)}")
    return _DATASETS[name]


def dataset_names() -> list[str]:
    load_datasets()
    return sorted(_DATASETS)


def build_dataset(name: str, options: Any) -> DataBundle:
    return get_dataset(name).factory(options)


def check_local_path(path: str, key: str, must_exist: bool = True) -> Path:
    """A user-given data path: must be local (nothing is downloaded) and exist."""
    if "://" in path:
        raise ConfigError(f"{key}={path!r}: only local paths are read (nothing is downloaded)")
    p = Path(path).expanduser()
    if must_exist and not p.exists():
        raise ConfigError(f"{key}={path!r}: no such file or folder")
    return p
