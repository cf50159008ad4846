"""The engine against a real SQLite Optuna storage and a real MLflow store."""
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState

from harness import cli, registry
from variants.vit import ViT, ViTConfig

from .conftest import write_study


def trials_of(runs, name):
    storage = f"sqlite:///{runs / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def points(trials, state=TrialState.COMPLETE):
    return sorted((t.params["cell"], t.params["seed"]) for t in trials if t.state == state)


def mlflow_runs(runs, name):
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[name], output_format="pandas")


def test_grid_runs_each_cell_and_seed_once_and_resumes_to_nothing(shared_runs):
    p = write_study(shared_runs / "grid.yaml", name="grid")
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    done = points(trials_of(shared_runs, "grid"))
    cells = ["patch_size=2,pool=cls", "patch_size=2,pool=mean", "patch_size=4,pool=cls",
             "patch_size=4,pool=mean"]
    assert done == sorted((c, s) for c in cells for s in (0, 1))
    n = len(trials_of(shared_runs, "grid"))
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    assert len(trials_of(shared_runs, "grid")) == n  # nothing added

    runs = mlflow_runs(shared_runs, "grid")
    kids = runs[runs["tags.harness.kind"] == "trial"]
    parents = runs[runs["tags.harness.kind"] == "study_run"]
    assert len(kids) == 8 and set(kids["status"]) == {"FINISHED"}
    assert len(parents) == 1  # the second invocation found nothing to do
    assert set(kids["tags.mlflow.parentRunId"]) == set(parents["run_id"])
    for col in ("tags.study", "tags.trial_number", "tags.cell_id", "tags.seed", "tags.git_sha",
                "tags.torch_version", "tags.device_name", "tags.flop_convention",
                "params.model.depth", "params.task.lr", "params.data.image_size",
                "metrics.params_m", "metrics.gflops_fwd", "metrics.train_samples_per_s",
                "metrics.peak_mem_mb", "metrics.accuracy", "metrics.train_loss"):
        assert col in kids and kids[col].notna().all(), col
    client = mlflow.tracking.MlflowClient()
    rid = kids.iloc[0]["run_id"]
    assert len(client.get_metric_history(rid, "train_loss")) >= 2
    arts = {a.path for a in client.list_artifacts(rid)}
    assert {"resolved_config.yaml", "confusion_matrix.png"} <= arts


def test_same_seed_same_numbers(shared_runs):
    p = write_study(shared_runs / "det.yaml", name="det_a", sweep="  patch_size: [4]", repeats=1, steps=6)
    q = write_study(shared_runs / "det2.yaml", name="det_b", sweep="  patch_size: [4]", repeats=1, steps=6)
    for f in (p, q):
        assert cli.main(["run", str(f), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    a = [t.user_attrs for t in trials_of(shared_runs, "det_a")][0]
    b = [t.user_attrs for t in trials_of(shared_runs, "det_b")][0]
    assert a["m.accuracy"] == b["m.accuracy"] and a["m.train_loss"] == b["m.train_loss"]


def test_a_dead_trials_finished_run_is_marked_killed(tmp_path):
    """A worker killed after closing its MLflow run FINISHED but before Optuna recorded the
    trial: Optuna fails the trial and re-runs the point, so the run is marked too."""
    from harness.tracking import Tracker, default_tracking_uri, terminate_run
    tracker = Tracker(default_tracking_uri(tmp_path), "dead", tmp_path)
    client = tracker.client
    done = client.create_run(tracker.experiment_id).info.run_id
    client.set_terminated(done, "FINISHED")
    running = client.create_run(tracker.experiment_id).info.run_id
    failed = client.create_run(tracker.experiment_id).info.run_id
    client.set_terminated(failed, "FAILED")
    for run_id in (done, running, failed):
        terminate_run(client, run_id, "KILLED", "worker process 1 died mid-trial")
    for run_id, status in ((done, "KILLED"), (running, "KILLED"), (failed, "FAILED")):
        run = client.get_run(run_id)
        assert run.info.status == status
        assert ("fail_reason" in run.data.tags) == (status == "KILLED")


def test_killed_run_completes_only_missing_cells(shared_runs):
    p = write_study(shared_runs / "kill.yaml", name="kill", steps=60, eval_every=30, repeats=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(p), "--runs-dir",
                             str(shared_runs), "--quiet", "--threads", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    db = shared_runs / "optuna.db"
    deadline = time.time() + 240
    complete = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if db.exists():
            try:
                con = sqlite3.connect(db, timeout=1)
                complete = con.execute(
                    "select count(*) from trials t join studies s on t.study_id = s.study_id "
                    "where s.study_name='kill' and t.state='COMPLETE'").fetchone()[0]
                running = con.execute(  # a trial under way (its worker has tagged it)
                    "select count(*) from trials t join studies s on t.study_id = s.study_id "
                    "join trial_user_attributes a on a.trial_id = t.trial_id "
                    "where s.study_name='kill' and t.state='RUNNING' and a.key='mlflow_run_id'"
                ).fetchone()[0]
                con.close()
            except sqlite3.OperationalError:
                continue
            if complete >= 2 and running == 1:
                break
    assert proc.poll() is None, "the study finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = trials_of(shared_runs, "kill")
    done_before = points(before)
    assert 2 <= len(done_before) < 8
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    after = trials_of(shared_runs, "kill")
    done_after = points(after)
    assert len(done_after) == 8 and len(set(done_after)) == 8  # every point, once
    # finished points were not repeated: their trials are the same ones as before the kill
    first = {(t.params["cell"], t.params["seed"]): t.number for t in before if t.state == TrialState.COMPLETE}
    again = {(t.params["cell"], t.params["seed"]): t.number for t in after if t.state == TrialState.COMPLETE}
    assert all(again[k] == v for k, v in first.items())
    killed = [t for t in after if t.state == TrialState.FAIL]
    assert killed and "died mid-trial" in killed[0].user_attrs["fail_reason"]
    runs = mlflow_runs(shared_runs, "kill")
    assert "RUNNING" not in set(runs["status"]), runs[["status", "tags.harness.kind"]]
    killed_run = runs[runs["run_id"] == killed[0].user_attrs["mlflow_run_id"]].iloc[0]
    assert killed_run["status"] == "KILLED" and "died" in killed_run["tags.fail_reason"]


def test_a_waiting_worker_leaves_once_the_last_straggler_ends_not_a_heartbeat_later(shared_runs):
    """Nothing left to queue: a worker waits while other workers run the grid's last trials
    (to re-run them if their worker dies). It looks every POLL_S seconds whether they ended, so
    even with a 600 s heartbeat it returns within seconds of the last one's end."""
    from harness.sweep import POLL_S, Runner, prepare
    p = write_study(shared_runs / "straggle.yaml", name="straggle", sweep="  patch_size: [4]",
                    repeats=1)
    study, storage, tracking, runs, dev = prepare(p, None, None, None, shared_runs, None)
    runner = Runner(study, storage, tracking, runs, dev, quiet=True, heartbeat=600)
    runner.open()
    runner.sync_grid()
    other = optuna.load_study(study_name="straggle", storage=storage)
    trial = other.ask()  # another worker takes the grid's one point
    assert runner.waiting() == 0 and [t.state for t in other.trials] == [TrialState.RUNNING]
    result = {}
    waiter = threading.Thread(target=lambda: result.update(work=runner.wait_for_stragglers()),
                              daemon=True)
    waiter.start()
    time.sleep(3 * POLL_S)
    assert waiter.is_alive() and not result, "stopped waiting while a trial was still running"
    other.tell(trial, 0.5)
    waiter.join(timeout=60)
    assert not waiter.is_alive(), "the worker waited out its heartbeat after the last trial ended"
    assert result == {"work": False}  # every grid point done: nothing reappeared


@dataclass
class PoisonConfig(ViTConfig):
    poison_pool: str = "none"   # "patch_size=2": that cell's logits become NaN


class Poisoned(ViT):
    def forward(self, x):
        out = super().forward(x)
        return out * float("nan") if self.cfg.patch_size == 2 else out


@pytest.fixture
def poisoned_variant():
    registry.register("test-poisoned", family="vit", config=PoisonConfig, input_size=8,
                      in_channels=1, patch_size=4, hidden_size=16, depth=1, num_heads=2,
                      num_classes=10)(lambda cfg: Poisoned(cfg))
    yield "test-poisoned"
    registry.unregister("test-poisoned")


def test_diverging_trial_fails_with_reason_and_study_goes_on(shared_runs, poisoned_variant):
    p = write_study(shared_runs / "nan.yaml", name="nan", variant=poisoned_variant,
                    sweep="  patch_size: [2, 4]", repeats=1)
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    trials = trials_of(shared_runs, "nan")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].params["cell"] == "patch_size=2"
    assert "diverged" in failed[0].user_attrs["fail_reason"]
    assert points(trials) == [("patch_size=4", 0)]
    runs = mlflow_runs(shared_runs, "nan")
    bad = runs[runs["run_id"] == failed[0].user_attrs["mlflow_run_id"]].iloc[0]
    assert bad["status"] == "FAILED" and "diverged" in bad["tags.fail_reason"]
    # a divergence is final: resuming does not re-run it
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    assert len(trials_of(shared_runs, "nan")) == len(trials)


def test_multi_objective_and_search(shared_runs):
    p = write_study(shared_runs / "mo.yaml", name="mo", sweep="  patch_size: [4]", repeats=1,
                    objectives="  - {metric: accuracy, direction: maximize}\n"
                               "  - {metric: gflops_fwd, direction: minimize}",
                    extra="search:\n  task.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                          "search_trials: 3\n")
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    st = optuna.load_study(study_name="mo", storage=f"sqlite:///{shared_runs / 'optuna.db'}")
    assert len(st.directions) == 2
    done = [t for t in st.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and len({t.params["task.lr"] for t in done}) == 3
    assert all(len(t.values) == 2 for t in done)


def test_sigint_marks_the_trial_and_closes_the_runs(shared_runs):
    p = write_study(shared_runs / "int.yaml", name="interrupt", sweep="  patch_size: [2, 4]",
                    repeats=1, steps=200, eval_every=100)
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(p), "--runs-dir",
                             str(shared_runs), "--quiet", "--threads", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    target = None
    while time.time() < deadline and target is None and proc.poll() is None:
        time.sleep(0.5)
        try:
            for t in trials_of(shared_runs, "interrupt"):
                if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs:
                    target = t
        except KeyError:
            continue
    assert target is not None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    t = [x for x in trials_of(shared_runs, "interrupt") if x.number == target.number][0]
    assert t.state == TrialState.FAIL and "SIGINT" in t.user_attrs["fail_reason"]
    runs = mlflow_runs(shared_runs, "interrupt")
    assert "RUNNING" not in set(runs["status"])
    assert runs[runs["run_id"] == target.user_attrs["mlflow_run_id"]].iloc[0]["status"] == "KILLED"


class OOMAbove8(ViT):
    """Behaves as a GPU out of memory when a training batch exceeds 8 samples."""

    def forward(self, x):
        if self.training and x.shape[0] > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


@pytest.fixture
def oom_variant():
    registry.register("test-oom", family="vit", config=ViTConfig, input_size=8, in_channels=1,
                      patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=10)(
        lambda cfg: OOMAbove8(cfg))
    yield "test-oom"
    registry.unregister("test-oom")


def test_oom_is_recorded_and_optionally_backs_off(shared_runs, oom_variant):
    p = write_study(shared_runs / "oom.yaml", name="oom", variant=oom_variant,
                    sweep="  patch_size: [4]", repeats=1, steps=3, speed_steps=0)
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    t = trials_of(shared_runs, "oom")[0]
    assert t.state == TrialState.FAIL and "out of memory" in t.user_attrs["fail_reason"]
    q = write_study(shared_runs / "oom2.yaml", name="oom_backoff", variant=oom_variant,
                    sweep="  patch_size: [4]", repeats=1, steps=3, speed_steps=0,
                    extra="oom_backoff: true\n")
    assert cli.main(["run", str(q), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    t = trials_of(shared_runs, "oom_backoff")[0]
    assert t.state == TrialState.COMPLETE
    runs = mlflow_runs(shared_runs, "oom_backoff")
    assert runs.iloc[0]["tags.oom_backoff"] == "batch_size 16 -> 8"
