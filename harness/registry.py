"""Decorator registry of variants, each with a family and a typed dataclass config.

    @register("dit-s/2", family="dit", config=DiTConfig, depth=12, hidden_size=384, ...)
    def dit(cfg: DiTConfig) -> DiT: ...

    build("dit-s/2", {"conditioning": "adaln"})   # -> (model, resolved config)

An ablation arm is a config field (``conditioning``, ``model``), never a copied
model.  Overrides are validated against the config's fields *and types* before a
model is built; unknown names and keys list their close matches.  Every registered
model is a ``Variant``: it can make example inputs for itself, so the engine can
count FLOPs, time it and test it without knowing its family.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Literal, get_args, get_origin

import torch
from torch import nn

from .errors import (ConfigError, DuplicateRegistrationError, UnknownKeyError,
                     UnknownVariantError, did_you_mean)


class Variant(nn.Module):
    """What the engine needs of every registered model (besides ``forward``)."""

    def example_inputs(self, batch_size: int, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> tuple:
        """Positional args of ``forward`` for a batch at the config's default input."""
        raise NotImplementedError(f"{type(self).__name__} must implement example_inputs")

    def tokens_per_sample(self) -> int:
        """Transformer tokens one sample becomes (for tokens/s)."""
        raise NotImplementedError(f"{type(self).__name__} must implement tokens_per_sample")

    def bench_loss(self, output: Any) -> torch.Tensor:
        """A scalar to back-propagate when only timing a train step: the mean squared distance
        of the output to a target of ones.  Its gradient is non-zero wherever the output is,
        zero included, so the timed backward and optimiser steps work on real values, as in
        training: zero-initialised heads and adaLN-Zero start every variant here at an output
        of exactly zero, where ``output.pow(2).mean()`` (the loss used before) gave every
        weight a gradient of exactly zero, step after step."""
        out = output[0] if isinstance(output, (tuple, list)) else output
        return out.float().sub(1.0).pow(2).mean()

    def tags(self) -> dict[str, str]:
        """Implementation choices worth recording (attention path, ...)."""
        return {}

    def extra_metrics(self) -> dict[str, float]:
        """Family-specific figures gathered while running (padding fraction, ...)."""
        return {}

    def flops(self) -> dict:
        """Params and forward FLOPs per sample at the default input (harness convention).

        Override to report more (NaViT splits useful FLOPs from those spent on padding)."""
        from harness.metrics.flops import flops_of
        return flops_of(self)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    family: str
    config_cls: type
    factory: Callable[[Any], nn.Module]
    defaults: dict = field(default_factory=dict)   # config fields this name fixes
    test_overrides: dict = field(default_factory=dict)  # shrink for the registry-wide tests
    description: str = ""

    @property
    def doc(self) -> str:
        """One line saying what this variant is (the factory's docstring by default)."""
        return self.description or (self.factory.__doc__ or "").strip()

    def config(self, **overrides) -> Any:
        return make_config(self.config_cls, {**self.defaults, **overrides},
                           where=f"variant {self.name!r}")


_REGISTRY: dict[str, VariantSpec] = {}
_PLUGINS_LOADED = False


def register(name: str, *, family: str, config: type, test_overrides: dict | None = None,
             doc: str = "", **defaults) -> Callable:
    """Register ``factory(cfg) -> nn.Module`` under ``name`` with fixed config defaults."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config for {name!r} must be a dataclass, got {config!r}")
    unknown = set(defaults) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise UnknownKeyError(f"register({name!r}): {sorted(unknown)} are not fields of "
                              f"{config.__name__}")

    def deco(factory: Callable) -> Callable:
        if name in _REGISTRY:
            raise DuplicateRegistrationError(
                f"variant {name!r} is already registered (family {_REGISTRY[name].family!r}, "
                f"{_REGISTRY[name].factory.__module__}); pick another name")
        _REGISTRY[name] = VariantSpec(name, family, config, factory, dict(defaults),
                                      dict(test_overrides or {}), doc)
        return factory

    return deco


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def load_plugins() -> None:
    """Import the modules that register variants (entry points ``harness.variants``)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    names = []
    try:
        names = [ep.value for ep in metadata.entry_points(group="harness.variants")]
    except Exception as exc:  # broken metadata: fall back to the bundled zoo, but say so
        print(f"harness: could not read entry points ({exc}); loading bundled variants",
              file=sys.stderr)
    for mod in names or ["variants"]:
        importlib.import_module(mod)


def list_variants(*patterns: str, family: str | None = None) -> list[VariantSpec]:
    """Registered variants whose name matches any glob (all when no pattern)."""
    load_plugins()
    pats = [p for p in patterns if p] or ["*"]
    out = [s for n, s in sorted(_REGISTRY.items())
           if any(fnmatch.fnmatchcase(n, p) for p in pats) and (family is None or s.family == family)]
    return out


def get(name: str) -> VariantSpec:
    load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownVariantError(f"unknown variant {name!r}; {did_you_mean(name, _REGISTRY)}") from None


def families() -> dict[str, type]:
    load_plugins()
    return {s.family: s.config_cls for s in _REGISTRY.values()}


def build(name: str, overrides: dict | None = None, *, device: str | torch.device | None = None,
          seed: int | None = None) -> tuple[nn.Module, Any]:
    """Validate overrides, then build the variant (seeded if ``seed`` is given)."""
    spec = get(name)
    cfg = spec.config(**(overrides or {}))
    if seed is not None:
        torch.manual_seed(seed)
    model = spec.factory(cfg)
    if device is not None:
        model = model.to(device)
    return model, cfg


# ---------------------------------------------------------------- typed configs

def config_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = describe_type(args[0]) if args else "any"
        return f"{origin.__name__}[{inner}, ...]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; parse strings from the command line."""
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{where}: {key}={value!r} is not valid; expected "
                           f"{describe_type(tp)}{extra}")

    origin = get_origin(tp)
    if isinstance(value, str) and tp is not str and origin is not Literal:
        import yaml  # CLI values arrive as text: '64', 'true', '[2, 16, 16]'
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise bad() from None
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):
            for c in choices:  # '3' for Literal[1, 2, 3, 4]
                if str(c) == value:
                    return c
        raise ConfigError(f"{where}: {key}={value!r} is not valid; "
                          f"{did_you_mean(str(value), [str(c) for c in choices])}")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key, where)
            except ConfigError as e:
                errors.append(e)
        raise bad()
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = get_args(tp)
        inner = args[0] if args else Any
        if args and len(args) > 1 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f" of length {len(args)}")
            items = [coerce(v, a, key, where) for v, a in zip(value, args)]
        else:
            items = [coerce(v, inner, key, where) if inner is not Any else v for v in value]
        return origin(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return make_config(tp, value, where=f"{where}: {key}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad()
    return value


def make_config(cls: type, values: dict, *, where: str = "config") -> Any:
    """Build ``cls(**values)`` with every key and value checked; then ``cfg.validate()``."""
    fields = config_fields(cls)
    for key in values:
        if key not in fields:
            raise UnknownKeyError(f"{where}: unknown key {key!r} for {cls.__name__}; "
                                  f"{did_you_mean(key, fields)}")
    clean = {k: coerce(v, fields[k], k, where) for k, v in values.items()}
    cfg = cls(**clean)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return cfg


def check_config_device(cfg: Any, device: str) -> None:
    """``cfg.check_device(device)`` where the config has one: a ConfigError for settings
    this device cannot run (a model config's ``validate`` does not know the device)."""
    check = getattr(cfg, "check_device", None)
    if callable(check):
        check(device)


def choices_of(cls: type, key: str) -> tuple | None:
    """The allowed values of a Literal field, or None."""
    tp = config_fields(cls).get(key)
    if tp is not None and get_origin(tp) is Literal:
        return get_args(tp)
    return None


def config_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
