from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from harness import registry
from harness.errors import (ConfigError, DuplicateRegistrationError, HarnessError,
                            UnknownKeyError, UnknownVariantError)


def test_glob_lists_the_twelve_dit_sizes():
    names = [s.name for s in registry.list_variants("dit-*")]
    assert names == sorted(f"dit-{s}/{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8))
    assert [s.name for s in registry.list_variants("dit-xl/*")] == ["dit-xl/2", "dit-xl/4", "dit-xl/8"]
    assert all(s.family == "dit" for s in registry.list_variants("dit-*"))


def test_unknown_variant_lists_close_matches():
    with pytest.raises(UnknownVariantError) as e:
        registry.get("dit-q/2")
    assert "dit-s/2" in str(e.value) and "did you mean" in str(e.value)
    assert isinstance(e.value, KeyError) and isinstance(e.value, HarnessError)


def test_unknown_key_lists_close_matches():
    with pytest.raises(UnknownKeyError) as e:
        registry.build("dit-s/2", {"conditoning": "adaln"})
    assert "conditioning" in str(e.value)


def test_values_are_typed_and_checked():
    cfg = registry.get("dit-s/2").config(input_size="64", learn_sigma="false", mlp_ratio="2")
    assert cfg.input_size == 64 and cfg.learn_sigma is False and cfg.mlp_ratio == 2.0
    with pytest.raises(ConfigError, match="expected int"):
        registry.get("dit-s/2").config(depth="deep")
    with pytest.raises(ConfigError, match="adaln_zero"):
        registry.get("dit-s/2").config(conditioning="film")
    with pytest.raises(ConfigError, match="expected bool"):
        registry.get("dit-s/2").config(learn_sigma=3)


def test_impossible_combinations_are_refused():
    with pytest.raises(ConfigError, match="does not divide"):
        registry.get("dit-s/2").config(patch_size=3)
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        registry.get("dit-s/2").config(num_heads=5)


def test_duplicate_registration_is_an_error():
    @dataclass
    class C:
        width: int = 4
        kind: Literal["a", "b"] = "a"

    registry.register("test-dup", family="test", config=C)(lambda cfg: torch.nn.Linear(1, 1))
    try:
        with pytest.raises(DuplicateRegistrationError):
            registry.register("test-dup", family="test", config=C)(lambda cfg: None)
        assert registry.choices_of(C, "kind") == ("a", "b")
    finally:
        registry.unregister("test-dup")


def test_build_is_seeded():
    a, _ = registry.build("dit-s/8", {"depth": 1, "input_size": 16}, seed=3)
    b, _ = registry.build("dit-s/8", {"depth": 1, "input_size": 16}, seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
