"""One root exception; narrow subclasses that also inherit a built-in.

Every error a user can cause (bad study file, unknown variant, impossible
combination) is a ``HarnessError``: the CLI prints its message and exits non-zero
before any compute and before anything is written to a store.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class HarnessError(Exception):
    """Root of every error the harness raises on purpose."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(HarnessError, ValueError):
    """A config value or combination that cannot work."""


def check_counts(*checks: tuple) -> None:
    """ConfigError for the first ``(flag, value, least[, most])`` whose value lies outside its
    bounds."""
    for flag, value, least, *most in checks:
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if most and value > most[0]:
            raise ConfigError(f"{flag} must be at most {most[0]}, got {value}")


class UnknownVariantError(HarnessError, KeyError):
    """No variant registered under that name."""


class UnknownKeyError(HarnessError, KeyError):
    """A config / option key that does not exist."""


class DuplicateRegistrationError(HarnessError, ValueError):
    """Two variants (or tasks, datasets) registered under one name."""


class StudyError(HarnessError, ValueError):
    """A study file that fails validation; names file, key and fix."""


class StorageError(HarnessError, ValueError):
    """A storage / tracking URL or path that cannot be used."""


class TrialFailed(HarnessError, RuntimeError):
    """A trial that cannot produce a result (the study goes on)."""


class DivergedError(TrialFailed, FloatingPointError):
    """The training loss became NaN or infinite."""


def close_matches(word: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Choices that look like ``word`` (for 'did you mean' messages)."""
    choices = list(choices)
    hits = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not hits:  # fall back to prefix / substring matches
        stem = word.split("/")[0].split("-")[0].lower()
        hits = [c for c in choices if stem and stem in c.lower()][:n]
    return hits


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = sorted(set(choices))
    hits = close_matches(word, choices)
    msg = f"did you mean: {', '.join(hits)}? " if hits else ""
    shown = ", ".join(choices) if len(choices) <= 30 else ", ".join(choices[:30]) + ", ..."
    return f"{msg}valid: {shown}"
