"""Shared fixtures: a tiny, fast study and helpers to run the real CLI in-process."""
from __future__ import annotations

import os
import sqlite3
import textwrap
from pathlib import Path

# MKL's dispatch is fixed when torch loads, before any test runs: the suite runs on the
# default (HARNESS_CPU_MKL=auto, whatever the caller's), so harness is imported before torch;
# tests/test_cpu_mkl.py starts fresh interpreters for the other modes
os.environ.pop("HARNESS_CPU_MKL", None)

import harness  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402

from harness import cli
from harness.metrics.kernel_choice import cpu_compile_available

# The test models are tiny: one thread is faster than two (and much faster on a shared
# machine).  Throughput is never asserted on, so this changes no result.
torch.set_num_threads(1)

# tests that run torch.compile on CPU (inductor needs a C++ compiler; so does the fused GELU)
needs_compile = pytest.mark.skipif(not cpu_compile_available(),
                                   reason="torch.compile cannot build CPU kernels here")


@pytest.fixture
def graphs_only(monkeypatch):
    """``speed.compiled`` on the ``aot_eager`` backend, for tests that count dynamo's graphs,
    guards and breaks: dynamo hands the backend the same graphs whichever it is, and inductor
    takes 6-8 s per graph on the 2-core CPU to generate and build its kernels.  The tests that
    compare compiled numbers with eager ones keep inductor."""
    from harness.metrics import speed
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier test (or CLI --threads) set."""
    torch.set_num_threads(1)
    yield

TINY_STUDY = """\
name: {name}
question: Does patch size matter for a 2-layer ViT on 8x8 digits?
task:
  name: classify
  options: {{lr: 3.0e-3, batch_size: 32, eval_batch_size: 512, log_every: 2}}
data: {{name: digits, options: {{image_size: 8}}}}
model:
  variant: {variant}
  config: {{depth: 1, hidden_size: 16, num_heads: 2, mlp_ratio: 1.0}}
sweep:
{sweep}
repeats: {repeats}
budget: {{steps: {steps}, eval_every: {eval_every}, speed_steps: {speed_steps}}}
objectives:
{objectives}
pruner: {{name: none}}
device: cpu
profiles:
  smoke: {{budget: {{steps: 2}}}}
"""


def write_study(path: Path, name: str = "tiny", *, variant: str = "vit-digits",
                sweep: str = "  patch_size: [2, 4]\n  pool: [cls, mean]", repeats: int = 2,
                steps: int = 4, eval_every: int = 2, speed_steps: int = 1, objectives: str = "  - {metric: accuracy, direction: maximize}",
                extra: str = "") -> Path:
    path.write_text(TINY_STUDY.format(name=name, variant=variant, sweep=sweep, repeats=repeats,
                                      steps=steps, eval_every=eval_every, speed_steps=speed_steps,
                                      objectives=objectives) + textwrap.dedent(extra))
    return path


def roundings(value: float, spec: str, rel: float) -> set[str]:
    """``value`` formatted by ``spec`` as any value within ``rel`` of it may be: what a report
    that rounds the full value can show, where a test holds only a CSV's rounded copy of it
    (0.9715 in the CSV could be 0.971 in the table)."""
    return {format(value * (1 + e), spec) for e in (-rel, 0.0, rel)}


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str) -> int:
    return cli.main([str(a) for a in args])


def row_counts(runs_dir: Path) -> dict:
    """Rows in every table of both embedded stores (to prove nothing was written)."""
    out = {}
    for db in ("optuna.db", "mlflow.db"):
        p = runs_dir / db
        if not p.exists():
            out[db] = None
            continue
        con = sqlite3.connect(p)
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        out[db] = {t: con.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables}
        con.close()
    return out


@pytest.fixture(autouse=True)
def no_tracking_uri_leak():
    """mlflow.set_tracking_uri() also sets MLFLOW_TRACKING_URI in the environment, which
    the CLI honours: clear it after each test so one test's store never leaks into the next."""
    import os
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> Path:
    """One runs folder for the session (creating MLflow's SQLite schema takes seconds)."""
    return tmp_path_factory.mktemp("runs")
