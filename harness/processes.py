"""A benchmark's whole measurement repeated in fresh processes, and the records merged.

A speed ratio of two arms timed in one process is one sample: on the same quiet machine it
moves from one process to the next by more than its rounds scatter (docs/speed.md, "Between
processes").  ``harness bench-peer`` and ``harness bench-packing`` take ``--processes N``:
the parent re-runs its own command line N times, one process after another, each printing
its record as JSON, and merges them with ``merge_numbers``.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

# keys whose every process's value is kept (``<key>_per_process``) beside the merged one
PER_PROCESS = ("_ratio", "_step_ms_median", "_fraction_of_ideal", "_speedup", "_settle_rounds")
# keys whose merged value is the sum over the processes (counts of rounds or of processes)
SUMMED = ("_rounds_faster", "_unsettled")


def child_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--processes``, ``--out`` and ``--json``: each child runs the
    measurement once and prints its record as JSON (the parsers take no abbreviations)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--processes", "--out"):
            skip = True
        elif not (a == "--json" or a.startswith(("--processes=", "--out="))):
            out.append(a)
    return out


def run_in_processes(module: str, argv: list[str], n: int) -> list[dict]:
    """``python -m module <argv minus the parent's options> --json``, ``n`` times in turn;
    each process's record.  A failing child stops the run (TrialFailed, its stderr)."""
    from .errors import TrialFailed
    cmd = [sys.executable, "-m", module, *child_argv(argv), "--json"]
    records = []
    for i in range(n):
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in p.stdout.splitlines() if line.strip()]
        if p.returncode != 0 or not lines:
            raise TrialFailed(f"{module} process {i + 1} of {n} exited {p.returncode}: "
                              f"{p.stderr.strip()[-2000:]}")
        records.append(json.loads(lines[-1]))
    return records


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge_numbers(records: list[dict]) -> dict:
    """One record from several processes' records of the same measurement.  Each number is
    the median over the processes (a value they all share stays as it is, an int an int),
    except: ``SUMMED`` keys (``*_rounds_faster``, ``*_unsettled``) the sum, ``*_min`` the
    lowest, ``*_max`` and other processes' load (``*_other_cpu_cores``, ``load_avg_1m``)
    the highest.  Keys ending in
    one of ``PER_PROCESS``' suffixes also keep every process's value, in order, as
    ``<key>_per_process``.  Anything else is the first record's."""
    merged = dict(records[0])
    for k, v in records[0].items():
        if not _number(v):
            continue
        vals = [r[k] for r in records]
        if k.endswith(SUMMED):
            merged[k] = sum(vals)
        elif k.endswith(("_max", "_other_cpu_cores")) or k == "load_avg_1m":
            merged[k] = max(vals)
        elif k.endswith("_min"):
            merged[k] = min(vals)
        elif any(x != v for x in vals):
            merged[k] = statistics.median(vals)
        if k.endswith(PER_PROCESS):
            merged[f"{k}_per_process"] = vals
    return merged


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of per-process speed ratios: the 95% Student-t interval of
    their mean log, mapped back, each process one sample (``low`` and ``high`` NaN for fewer
    than two).  In logs, a ratio and its inverse are symmetric about 1.0, as ours / theirs
    and theirs / ours should be."""
    from .report import mean_ci  # the reports' mean ± t-interval, here over the logs
    mean, half, _ = mean_ci([math.log(r) for r in ratios])  # half: NaN for one value
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def interval_reads(low: float, high: float, above: str, below: str) -> str:
    """What a ratio's interval shows: ``above`` if it lies above 1.0, ``below`` if under, and
    "no difference shown" where it holds 1.0 (or could not be formed)."""
    if low > 1.0:
        return above
    if high < 1.0:
        return below
    return "no difference shown"
