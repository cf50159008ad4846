"""A per-process choice between named CPU kernel paths (``cpu_matmul``, ``cpu_gelu``): an
environment variable overrides a default rule, checked before any work; ``set`` forces one
(benchmarks that compare paths); the path in force is recorded with every trial."""
from __future__ import annotations

import contextlib
import os
from typing import Callable

from ..errors import ConfigError

# the environment variables that change which kernels run (harness/metrics/cpu_*.py): a run
# made with one set is reproduced only with it, so recorded commands show them
KERNEL_ENV = ("HARNESS_CPU_MKL", "HARNESS_CPU_LINEAR", "HARNESS_CPU_GELU",
              "HARNESS_CPU_ATTENTION", "HARNESS_MALLOC")


def kernel_env() -> str:
    """``KERNEL_ENV`` variables that are set, as a command's prefix (``"K=V "``), or ''."""
    import shlex
    return "".join(f"{k}={shlex.quote(os.environ[k])} " for k in KERNEL_ENV
                   if os.environ.get(k, "").strip())


def cpu_compile_available() -> bool:
    """Whether torch.compile may build CPU kernels here: it exists and a C++ compiler is on
    the PATH, ``$CXX`` alone where it is set, as inductor takes it (cheap: importing dynamo to
    ask it costs a second; a Python it does not support fails at the first compile)."""
    import shutil

    import torch
    if not hasattr(torch, "compile"):
        return False
    cxx = os.environ.get("CXX")
    if cxx:
        return bool(shutil.which(cxx))
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def resolve_kernel_paths() -> None:
    """Fix every CPU kernel path now (``cpu_matmul``, ``cpu_gelu``, ``cpu_attention``): a bad
    ``HARNESS_CPU_*`` fails here, before any compute."""
    from . import cpu_attention, cpu_gelu, cpu_matmul
    for choice in (cpu_matmul, cpu_gelu, cpu_attention):
        choice.path()


class KernelChoice:
    """``choices[0]`` is the plain path that always works; ``unavailable(name)`` says why
    another cannot run here (None: it can); ``rule()`` is the default."""

    def __init__(self, env: str, label: str, choices: tuple[str, ...], rule: Callable[[], str],
                 unavailable: Callable[[str], str | None]):
        self.env, self.label, self.choices = env, label, choices
        self.rule, self.unavailable = rule, unavailable
        self._path: str | None = None

    def resolve(self) -> str:
        """``$ENV`` if set (validated), else the rule."""
        want = os.environ.get(self.env, "").strip().lower()
        if not want:
            return self.rule()
        if want not in self.choices:
            raise ConfigError(f"{self.env}={os.environ[self.env]!r}: must be one of "
                              f"{', '.join(self.choices)}")
        why = self.unavailable(want)
        if why:
            raise ConfigError(f"{self.env}={want}: {why}; use {self.env}={self.choices[0]}")
        return want

    def get(self) -> str:
        if self._path is None:
            self._path = self.resolve()
        return self._path

    def check(self, name: str) -> None:
        """ConfigError unless ``name`` is a choice that can run here."""
        if name not in self.choices:
            raise ConfigError(f"{self.label} {name!r}: must be one of {', '.join(self.choices)}")
        why = self.unavailable(name)
        if why:
            raise ConfigError(f"{self.label} {name!r}: {why}")

    def set(self, name: str) -> str:
        """Force ``name`` for this process; returns the old path."""
        self.check(name)
        old, self._path = self.get(), name
        return old

    def functions(self):
        """``(default_path, path, set_path, using_path)``: the module-level API of a choice."""
        return self.resolve, self.get, self.set, self.using

    @contextlib.contextmanager
    def using(self, name: str):
        """``name`` in force inside the block, the previous path restored after."""
        old = self.set(name)
        try:
            yield
        finally:
            self._path = old
