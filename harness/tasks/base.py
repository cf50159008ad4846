"""How a variant is trained and judged.  The engine knows tasks only through this.

A task is a small class with an ``Options`` dataclass (checked like a model config),
the metric names it can produce, and one ``run(ctx)`` that trains for the budget,
reports intermediate values (for pruning) and returns final metrics.  Tasks register
by name with ``@register_task``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import DivergedError, DuplicateRegistrationError, UnknownKeyError, did_you_mean


@dataclass
class Budget:
    steps: int = 100                 # optimiser steps per trial
    eval_every: int = 0              # report an intermediate value every N steps (0: steps // 5)
    max_time_s: float | None = None  # stop training early after this many seconds
    speed_steps: int = 3             # timed steps of the per-trial throughput measurement (0: skip)

    def validate(self) -> None:
        from ..errors import ConfigError
        if self.steps < 1:
            raise ConfigError(f"budget.steps must be >= 1, got {self.steps}")
        if self.eval_every < 0 or self.speed_steps < 0:
            raise ConfigError("budget.eval_every and budget.speed_steps must be >= 0")

    @property
    def report_every(self) -> int:
        return self.eval_every or max(1, self.steps // 5)


@dataclass
class TrialContext:
    """Everything a task needs for one trial; callbacks go to Optuna and MLflow."""
    model: nn.Module
    variant: str
    model_cfg: Any
    options: Any                      # the task's Options instance
    data: Any                         # a built dataset (harness.data.base.DataBundle)
    budget: Budget
    seed: int
    device: torch.device
    workdir: Path                     # scratch folder; files logged as artifacts from here
    cache_dir: Path                   # persistent cache (e.g. the FID feature network), under runs/
    report: Callable[[float, int], None] = lambda value, step: None   # may raise optuna.TrialPruned
    log_metrics: Callable[[dict, int | None], None] = lambda metrics, step=None: None
    log_artifact: Callable[[Path], None] = lambda path: None
    set_tags: Callable[[dict], None] = lambda tags: None
    generator: torch.Generator | None = None  # seeded CPU generator for data order


# model config fields a dataset may imply (``Task.model_overrides``)
DATA_FIELDS = ("num_classes", "in_channels", "input_size", "num_frames")


class Task:
    """Base class: one abstract method, ``run``; the rest are no-op hooks."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = dataclass(type("NoOptions", (), {}))
    metrics: ClassVar[tuple[str, ...]] = ()           # names ``run`` may return
    metric_patterns: ClassVar[tuple[str, ...]] = ()   # globs, e.g. "fid_*"

    def check(self, options: Any, model_cfg: Any, data: Any) -> None:
        """Refuse combinations that cannot work (raise ConfigError) before any compute."""

    def check_device(self, options: Any, device: str) -> None:
        """Refuse options the resolved device cannot run (raise ConfigError); called for
        every cell before any store is opened, and again before each trial."""

    def model_overrides(self, options: Any, data_info: dict, config_fields: set[str]) -> dict:
        """Config fields implied by the data (num_classes, in_channels, input_size, ...)."""
        return {k: data_info[k] for k in DATA_FIELDS if k in data_info and k in config_fields}

    def related_models(self, options: Any) -> dict[str, dict]:
        """Further models the task builds beside the trial's own: option name -> model
        config overrides on top of the trial's config (e.g. a benchmark's ``reference``).
        The engine builds each config before any compute, so a bad one fails the study
        file, not a trial."""
        return {}

    def speed_batch_size(self, options: Any) -> int:
        return int(getattr(options, "batch_size", 8))

    def run(self, ctx: TrialContext) -> dict[str, float]:
        raise NotImplementedError


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise DuplicateRegistrationError(f"task {cls.name!r} is already registered")
    _TASKS[cls.name] = cls
    return cls


TASK_MODULES = ("classify", "diffusion", "benchmark")  # harness.tasks.<module> register tasks


def load_tasks() -> None:
    import importlib
    for mod in TASK_MODULES:
        try:
            importlib.import_module(f"harness.tasks.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"harness.tasks.{mod}":
                raise


def get_task(name: str) -> type[Task]:
    load_tasks()
    if name not in _TASKS:
        raise UnknownKeyError(f"unknown task {name!r}; {did_you_mean(name, _TASKS)}")
    return _TASKS[name]


def task_names() -> list[str]:
    load_tasks()
    return sorted(_TASKS)


def check_finite(loss: torch.Tensor, step: int) -> float:
    """The loss as a float; a NaN or inf loss ends the trial as diverged."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise DivergedError(f"loss is {value} at step {step}: training diverged")
    return value


def options_dict(opts: Any) -> dict:
    return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}
