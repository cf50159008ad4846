"""MLflow: one experiment per study, a parent run per `harness run` invocation and one
child run per trial, written through ``MlflowClient`` (no global active-run state).

Embedded default: a SQLite store ``<runs>/mlflow.db`` with artifacts in
``<runs>/mlartifacts``.  ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``) points the same
code at a tracking server.  URLs are never logged with their passwords.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import StorageError

RUN_STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}  # optuna -> mlflow
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "file", "databricks", "mysql")


def mask_url(url: str | None) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db"""
    if not url:
        return ""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (MLflow's or Optuna's); None for others."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def default_tracking_uri(runs_dir: Path) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def artifact_root(runs_dir: Path) -> str:
    return (Path(runs_dir).resolve() / "mlartifacts").as_uri()


def check_tracking_uri(uri: str) -> str:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    scheme = scheme.split("+", 1)[0]
    if scheme not in TRACKING_SCHEMES:
        raise StorageError(f"--tracking-uri {mask_url(uri)!r}: unsupported scheme {scheme!r}; "
                           f"valid: sqlite:///path/mlflow.db, http://host:port, postgresql://...")
    if scheme in ("http", "https") and not re.match(r"https?://[^/\s:]+(:\d+)?(/.*)?$", uri):
        raise StorageError(f"--tracking-uri {mask_url(uri)!r}: not a valid URL (http://host:port)")
    return uri


# what the harness writes itself: a change there says nothing about the code that ran
RESULT_PATHS = ("reports", "runs")


def git_sha() -> str:
    """The commit the code runs from, ``-dirty`` where a tracked file outside
    ``RESULT_PATHS`` differs from it (a report re-rendered into the checkout is a result,
    not a change to the code), ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top)", *(f":(top,exclude){p}" for p in RESULT_PATHS)],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (``model name``, ``vendor_id``,
    ``flags``, ...), read once per process; empty where there is no such file."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, with its family and model numbers: a VM may
    report only "AMD EPYC", and two generations under that name differ 2x in GEMM speed."""
    info = cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "cpu"
    if "cpu family" in info and "model" in info:
        name += f", family {info['cpu family']} model {info['model']}"
    return name


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment_tags(device: str) -> dict[str, str]:
    import torch

    from . import __version__
    from .metrics import cpu_attention, cpu_gelu, cpu_matmul, cpu_mkl
    from .metrics.flops import FLOP_CONVENTION
    return {"git_sha": git_sha(), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "harness_version": __version__,
            "device": device, "device_name": device_name(device),
            "flop_convention": FLOP_CONVENTION, "host": socket.gethostname(),
            "torch_threads": str(torch.get_num_threads()),
            "cpu_linear": cpu_matmul.path() if device == "cpu" else "n/a",
            "cpu_gelu": cpu_gelu.path() if device == "cpu" else "n/a",
            "cpu_attention": cpu_attention.path() if device == "cpu" else "n/a",
            "cpu_mkl": cpu_mkl.mode() if device == "cpu" else "n/a"}


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Tracker:
    """The study's experiment; creates parent and trial runs."""

    def __init__(self, tracking_uri: str, experiment: str, runs_dir: Path):
        import logging

        from mlflow.tracking import MlflowClient
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # schema-creation chatter
        self.uri = check_tracking_uri(tracking_uri)
        if (db := sqlite_file(self.uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                loc = artifact_root(runs_dir) if not self.uri.startswith("http") else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=loc)
            except Exception:  # another worker created it first
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id

    def start_run(self, name: str, tags: dict, params: dict | None = None,
                  parent_id: str | None = None) -> "Run":
        tags = {k: str(v) for k, v in tags.items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        r = Run(self.client, run.info.run_id)
        if params:
            r.log_params(params)
        return r


class Run:
    """One MLflow run; metrics are buffered and written in batches."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._buffer: list = []
        self.ended = False
        self.log_seconds = 0.0   # time spent writing to the store (overhead accounting)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param
        t0 = time.perf_counter()
        items = [Param(str(k), str(v)[:6000]) for k, v in sorted(params.items())]
        for chunk in _chunks(items, 100):
            self.client.log_batch(self.run_id, params=chunk)
        self.log_seconds += time.perf_counter() - t0

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag
        t0 = time.perf_counter()
        items = [RunTag(str(k), str(v)[:5000]) for k, v in tags.items()]
        for chunk in _chunks(items, 100):
            self.client.log_batch(self.run_id, tags=chunk)
        self.log_seconds += time.perf_counter() - t0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            self._buffer.append(Metric(str(k), float(v), ts, int(step or 0)))
        if len(self._buffer) >= 200:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        t0 = time.perf_counter()
        for chunk in _chunks(self._buffer, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)
        self._buffer = []
        self.log_seconds += time.perf_counter() - t0

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        t0 = time.perf_counter()
        self.client.log_artifact(self.run_id, str(path), artifact_path)
        self.log_seconds += time.perf_counter() - t0

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        if self.ended:
            return
        self.flush()
        if reason:
            self.set_tags({"fail_reason": reason})
        self.client.set_terminated(self.run_id, status)
        self.ended = True


def terminate_run(client, run_id: str, status: str, reason: str) -> None:
    """End the run of a trial that Optuna has just failed as dead (KILLED/FAILED), recording
    why.  A run the worker had already closed FINISHED gets the same status: the worker died
    between closing its run and Optuna recording the trial complete, so Optuna re-runs the
    point and this run is not a result (the two stores agree on that)."""
    try:
        run = client.get_run(run_id)
    except Exception as e:  # the run is gone: nothing to close, but say so
        print(f"harness: could not close MLflow run {run_id}: {e}", file=sys.stderr)
        return
    if run.info.status in ("RUNNING", "FINISHED"):
        client.set_tag(run_id, "fail_reason", reason)
        client.set_terminated(run_id, status)


# ------------------------------------------------------------------------ ui

def serve_ui(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 5000,
             backend_uri: str | None = None, block: bool = True):
    """Start the MLflow UI on the local store (blocking unless ``block=False``)."""
    runs_dir = Path(runs_dir)
    uri = backend_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_dir)
    check_tracking_uri(uri)
    if (db := sqlite_file(uri)) is not None and not db.exists():
        raise StorageError(f"no MLflow store at {uri}: run a study first (harness run STUDY)")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifact_root(runs_dir), "--serve-artifacts",
           "--host", host, "--port", str(port), "--workers", "1"]
    optuna_db = runs_dir.resolve() / "optuna.db"
    print(f"MLflow UI: http://{host}:{port}  (store {mask_url(uri)})")
    print(f"Optuna dashboard: pip install optuna-dashboard && optuna-dashboard sqlite:///{optuna_db}")
    proc = subprocess.Popen(cmd)
    if not block:
        return proc
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return 0
