"""Optuna: resumable storage, the ablation grid run exactly once per cell x seed, TPE for
`search`, pruning, heartbeats and retries, multi-objective.

How "exactly once" holds, with one process or many:
- every grid point (cell, seed[, slot]) is *enqueued* as a WAITING trial with fixed
  params; Optuna hands a waiting trial to one worker only (an atomic WAITING -> RUNNING
  update in the RDB storage);
- on (re)start each process enqueues only the points that are neither done (COMPLETE,
  PRUNED, or FAILED for a reason that would repeat, like divergence) nor pending;
- a trial that finds the same point already COMPLETE, or RUNNING under a lower trial
  number, yields (pruned as a duplicate before any compute or MLflow run);
- a worker killed mid-trial: on this host its dead PID is noticed at the next start; on
  any host its heartbeat stops, the trial is failed and re-enqueued by the next worker,
  and its MLflow run is closed as KILLED.
"""
from __future__ import annotations

import copy
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

from . import registry
from .errors import ConfigError, DivergedError, HarnessError, StorageError, StudyError, TrialFailed
from .metrics.kernel_choice import kernel_env
from .studies import Study, load_study, resolve_trial
from .tracking import (RUN_STATUS, Tracker, default_tracking_uri, environment_tags, mask_url,
                       sqlite_file, terminate_run)

HEARTBEAT_S = 10      # a running trial's worker writes a heartbeat this often (seconds)
GRACE_FACTOR = 4      # ... and is declared dead after GRACE_FACTOR missed heartbeats
POLL_S = 1.0          # a worker waiting on other workers' trials looks this often if they ended
MAX_RETRIES = 3       # a grid point whose worker died this many times is given up (and reported)
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_storage(runs_dir: Path) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'optuna.db'}"


def check_storage_url(url: str) -> str:
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in STORAGE_SCHEMES:
        raise StorageError(f"--storage {mask_url(url)!r}: unsupported; valid: "
                           "sqlite:///path/optuna.db, postgresql://user@host:5432/db, mysql://...")
    if scheme == "sqlite" and not url.startswith("sqlite:///"):
        raise StorageError(f"--storage {mask_url(url)!r}: a SQLite URL needs three slashes: "
                           "sqlite:///relative/path.db or sqlite:////absolute/path.db")
    if scheme == "postgresql":
        try:
            import psycopg  # noqa: F401  (SQLAlchemy 2's default PostgreSQL driver)
        except ImportError:
            raise StorageError("PostgreSQL storage needs psycopg: pip install "
                               "'sora-ablation-harness[postgres]'") from None
    return url


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is visible to this torch; valid here: cpu, auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: valid: auto, cpu, cuda")
    return name


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Runner:
    """One process taking trials of one study until no grid point is left."""

    def __init__(self, study: Study, storage_url: str, tracking_uri: str, runs_dir: Path,
                 device: str, quiet: bool = False, command: str = "", heartbeat: int = HEARTBEAT_S):
        self.study, self.runs_dir, self.device = study, Path(runs_dir), device
        self.storage_url, self.tracking_uri = storage_url, tracking_uri
        self.quiet, self.command, self.heartbeat = quiet, command, heartbeat
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.data_cache: dict = {}
        self.failures: list[str] = []
        self.given_up: set = set()
        self.interrupted = False
        self.finished: list[dict] = []

    # ------------------------------------------------------------- stores
    def open(self) -> None:
        import optuna
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if (db := sqlite_file(self.storage_url)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker(self.tracking_uri, self.study.study_name, self.runs_dir)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
        retry = RetryHeartbeatStaleTrialCallback(max_retry=3)

        def on_stale(study, trial):  # heartbeat stopped: close its MLflow run, then retry
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                terminate_run(self.tracker.client, run_id, "KILLED",
                              "worker stopped sending heartbeats (killed or lost)")
            retry(study, trial)

        engine_kwargs = {"connect_args": {"timeout": 60}} if self.storage_url.startswith("sqlite") else {}
        try:
            self.storage = RDBStorage(self.storage_url, engine_kwargs=engine_kwargs,
                                      heartbeat_interval=self.heartbeat,
                                      grace_period=self.heartbeat * GRACE_FACTOR,
                                      heartbeat_stale_trial_callback=on_stale)
        except Exception as e:
            raise StorageError(f"cannot open Optuna storage {mask_url(self.storage_url)}: "
                               f"{type(e).__name__}: {mask_url(str(e)).splitlines()[0]}") from None
        s = self.study
        directions = [o.direction for o in s.objectives]
        self.optuna_study = optuna.create_study(
            study_name=s.study_name, storage=self.storage, load_if_exists=True,
            directions=directions, sampler=self._sampler(), pruner=self._pruner())
        have = [d.name.lower() for d in self.optuna_study.directions]
        if have != directions:
            raise ConfigError(f"study {s.study_name!r} already exists in the storage with "
                              f"directions {have}, but the file now says {directions}; "
                              "rename the study or use another storage")
        for k, v in {"question": s.question, "study_file": str(s.path),
                     "objectives": [f"{o.metric}:{o.direction}" for o in s.objectives]}.items():
            self.optuna_study.set_user_attr(k, v)

    def _sampler(self):
        import optuna
        name = self.study.sampler.get("name")
        seed = int(self.study.sampler.get("seed", 0))
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        return optuna.samplers.RandomSampler(seed=seed)  # grid: every param is fixed by enqueue

    def _pruner(self):
        import optuna
        args = {k: v for k, v in self.study.pruner.items() if k != "name"}
        name = self.study.pruner["name"]
        if self.study.multi_objective or name == "none":
            return optuna.pruners.NopPruner()
        if name == "median":
            args.setdefault("n_startup_trials", 4)
            return optuna.pruners.MedianPruner(**args)
        if name == "percentile":
            return optuna.pruners.PercentilePruner(**args)
        return optuna.pruners.HyperbandPruner(**args)

    # --------------------------------------------------------------- grid
    def point_of(self, trial) -> tuple | None:
        p = trial.system_attrs.get("fixed_params") or trial.params
        if "cell" not in p:
            return None
        return (p["cell"], p["seed"], p.get("slot", 0))

    def grid(self) -> list[tuple]:
        return [(c, s, k) for c, s in self.study.grid_points() for k in range(self.study.search_trials)]

    @cached_property
    def grid_set(self) -> frozenset:
        """The grid's points, for membership tests (made once: the runner's study is fixed)."""
        return frozenset(self.grid())

    def fail_dead_local_trials(self) -> None:
        """RUNNING trials of a dead process on this host: failed now, not after the grace period."""
        from optuna.trial import TrialState
        for t in self.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self.died_here(t):
                reason = f"worker process {t.user_attrs['pid']} on {self.host} died mid-trial"
                try:
                    self.storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
                    self.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                except Exception as e:  # finished meanwhile: nothing to do
                    print(f"harness: trial {t.number}: {e}", file=sys.stderr)
                    continue
                if t.user_attrs.get("mlflow_run_id"):
                    terminate_run(self.tracker.client, t.user_attrs["mlflow_run_id"], "KILLED", reason)

    def close_dead_parent_runs(self) -> None:
        """Parent runs of `harness run` processes on this host that died (kill -9): KILLED."""
        client = self.tracker.client
        runs = client.search_runs(
            [self.tracker.experiment_id],
            filter_string=f"tags.`harness.kind` = 'study_run' and attributes.status = 'RUNNING' "
                          f"and tags.host = '{self.host}'", max_results=1000)
        for r in runs:
            pid = r.data.tags.get("pid")
            if pid and int(pid) != self.pid and not pid_alive(int(pid)):
                terminate_run(client, r.info.run_id, "KILLED", f"process {pid} died")

    def sync_grid(self) -> tuple[int, int]:
        """Enqueue the grid points not done and not pending; returns (done, pending)."""
        import optuna
        from optuna.trial import TrialState
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.optuna_study)
        self.fail_dead_local_trials()
        self.close_dead_parent_runs()
        done, pending, deaths = set(), set(), {}
        for t in self.optuna_study.get_trials(deepcopy=False):
            pt = self.point_of(t)
            if pt is None or t.user_attrs.get("duplicate_of") is not None:
                continue
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                done.add(pt)
            elif t.state == TrialState.FAIL and t.user_attrs.get("final"):
                done.add(pt)
            elif t.state == TrialState.FAIL:
                deaths[pt] = deaths.get(pt, 0) + 1
            elif t.state in (TrialState.WAITING, TrialState.RUNNING):
                pending.add(pt)
        for pt, n in deaths.items():
            if n >= MAX_RETRIES and pt not in done and pt not in pending:
                done.add(pt)
                self.given_up.add(pt)
        for cell, seed, slot in self.grid():
            if (cell, seed, slot) in done or (cell, seed, slot) in pending:
                continue
            params = {"cell": cell, "seed": seed}
            if self.study.search_trials > 1:
                params["slot"] = slot
            self.optuna_study.enqueue_trial(params)
        return len(done & self.grid_set), len(pending & self.grid_set)

    def waiting(self) -> int:
        from optuna.trial import TrialState
        return len(self.optuna_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    # --------------------------------------------------------------- run
    def run(self, n_trials: int | None = None, timeout: float | None = None) -> int:
        import optuna
        from tqdm import tqdm

        self.open()
        done, pending = self.sync_grid()
        total = len(self.grid())
        s = self.study
        print(f"study {s.study_name}: {total} grid points ({len(s.cells())} cells x "
              f"{len(s.seeds)} seeds{f' x {s.search_trials} searched' if s.search_trials > 1 else ''}); "
              f"{done} done, {self.waiting()} to run here or by other workers")
        if self.waiting() == 0 and not self.wait_for_stragglers():
            print("nothing left to run")
            return 0
        env = environment_tags(self.device)
        parent = self.tracker.start_run(
            f"{s.study_name} @ {time.strftime('%Y-%m-%d %H:%M:%S')}",
            {**env, "harness.kind": "study_run", "study": s.study_name, "profile": s.profile or "",
             "harness.command": self.command, "question": s.question,
             "storage": mask_url(self.storage_url), "pid": self.pid},
            {"study_file": str(s.path), "n_grid_points": total})
        self.parent, self.env = parent, env
        self.bar = tqdm(total=total, initial=done, desc=s.study_name, unit="trial",
                        disable=self.quiet or None, position=0, leave=True)
        status = "FINISHED"
        # Ctrl-C: Python's default KeyboardInterrupt can land in a finaliser and be swallowed,
        # so the first SIGINT only sets a flag that the trial checks at its next logged step
        # (a second one interrupts at once).
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self.optuna_study.optimize(
                self.objective, n_trials=n_trials, timeout=timeout, catch=(Exception,),
                callbacks=[self._after_trial], gc_after_trial=False)
        except KeyboardInterrupt:
            status = "KILLED"
            print("\nharness: interrupted; the current trial is marked failed and will be re-run "
                  "on resume", file=sys.stderr)
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            self.bar.close()
            parent.log_metrics({"trials_finished": len(self.finished),
                                "trials_failed": len(self.failures)})
            parent.end(status)
        print(f"study {s.study_name}: {len(self.finished)} trials finished here, "
              f"{len(self.failures)} failed")
        for f in self.failures:
            print(f"  failed: {f}")
        unexpected = [f for f in self.failures if "[unexpected]" in f]
        return 1 if unexpected else 0

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\nharness: interrupt: stopping at the trial's next step (Ctrl-C again: now)",
              file=sys.stderr, flush=True)

    def check_interrupt(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    def _after_trial(self, study, trial) -> None:
        self.check_interrupt()
        if self.point_of(trial) is not None and not trial.user_attrs.get("duplicate_of"):
            self.bar.update(1)
        if self.waiting() == 0 and not self.wait_for_stragglers():
            study.stop()

    def wait_for_stragglers(self) -> bool:
        """No queued work: wait while other workers run trials, in case one of them dies.

        Returns True when work reappeared (a dead worker's trial was re-queued), False
        when every grid point is done."""
        announced = False
        while True:
            self.sync_grid()  # fails stale / dead trials, re-queues their points
            if self.waiting():
                return True
            running = self.running_elsewhere()
            if not running:
                return False
            if not announced:
                print(f"waiting for {len(running)} trial(s) running in other workers "
                      f"(re-run here if their worker dies)", flush=True)
                announced = True
            # The full sync above (stale heartbeats, dead processes, parent runs) runs once a
            # heartbeat; in between, a cheap look every POLL_S whether a straggler ended or its
            # process on this host died, so the grid's last trial does not leave every other
            # worker waiting out its heartbeat (10 s by default) before it exits.
            ids = {t.number for t in running}
            until = time.monotonic() + self.heartbeat
            while (left := until - time.monotonic()) > 0:
                time.sleep(min(POLL_S, left))
                self.check_interrupt()
                now = self.running_elsewhere()
                if {t.number for t in now} != ids or any(self.died_here(t) for t in now):
                    break

    def running_elsewhere(self) -> list:
        """RUNNING trials of this study's grid (other workers': this one is between trials)."""
        from optuna.trial import TrialState
        running = self.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t for t in running if self.point_of(t) in self.grid_set]

    def died_here(self, trial) -> bool:
        """The trial's worker was a process on this host that is gone."""
        pid = trial.user_attrs.get("pid")
        return trial.user_attrs.get("host") == self.host and pid not in (None, self.pid) \
            and not pid_alive(int(pid))

    # ------------------------------------------------------------ a trial
    def objective(self, trial):
        import optuna
        s = self.study
        trial.set_user_attr("host", self.host)  # first: a dead worker's trial is recognisable
        trial.set_user_attr("pid", self.pid)
        fixed = self.storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
        if not fixed:  # the queue ran dry between our check and Optuna's ask
            trial.set_user_attr("duplicate_of", -1)
            trial.study.stop()
            raise optuna.TrialPruned("no grid point left for this worker")
        cells = s.cell_by_id()
        cid = trial.suggest_categorical("cell", list(cells))
        seed = trial.suggest_categorical("seed", s.seeds)
        slot = trial.suggest_categorical("slot", list(range(s.search_trials))) if s.search_trials > 1 else 0
        dup = self.duplicate_of(trial, (cid, seed, slot))
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup)
            raise optuna.TrialPruned(f"grid point already taken by trial {dup}")
        search_values = {}
        for key, sp in s.search.items():
            if sp.type == "float":
                search_values[key] = trial.suggest_float(key, sp.low, sp.high, log=sp.log, step=sp.step)
            elif sp.type == "int":
                search_values[key] = trial.suggest_int(key, int(sp.low), int(sp.high), log=sp.log,
                                                       step=int(sp.step or 1))
            else:
                search_values[key] = trial.suggest_categorical(key, sp.choices)
        resolved = resolve_trial(s, cells[cid], seed, search_values, data_info_cache=self.data_cache)
        trial.set_user_attr("cell_id", cid)
        trial.set_user_attr("seed", seed)
        tags = {**self.env, "harness.kind": "trial", "load_avg_1m_start": f"{os.getloadavg()[0]:.2f}", "study": s.study_name, "trial_number": trial.number,
                "cell_id": cid, "seed": seed, "variant": resolved.variant, "task": s.task,
                "data": s.data, **{f"axis.{k}": v for k, v in cells[cid].items()}}
        run = self.tracker.start_run(f"{cid} seed={seed}" + (f" #{slot}" if slot else ""), tags,
                                     resolved.flat_params(), parent_id=self.parent.run_id)
        trial.set_user_attr("mlflow_run_id", run.run_id)
        t0 = time.perf_counter()
        try:
            metrics = self.execute(trial, resolved, run)
        except optuna.TrialPruned as e:
            trial.set_user_attr("prune_reason", str(e))
            run.end(RUN_STATUS["PRUNED"], reason=f"pruned: {e}")
            self._summary(trial.number, cid, seed, f"pruned ({e})", t0)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (SIGINT)")
            run.end("KILLED", reason="interrupted (SIGINT)")
            raise
        except BaseException as e:
            reason, final = self.failure_reason(e)
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("final", final)
            run.end(RUN_STATUS["FAIL"], reason=reason)
            self.failures.append(f"trial {trial.number} {cid} seed={seed}: {reason}"
                                 + ("" if final else " [unexpected]"))
            self._summary(trial.number, cid, seed, f"FAILED: {reason}", t0)
            raise
        values = []
        for o in s.objectives:
            if o.metric not in metrics:
                reason = f"the task returned no {o.metric!r} (it returned {sorted(metrics)})"
                trial.set_user_attr("fail_reason", reason)
                trial.set_user_attr("final", True)
                run.end("FAILED", reason=reason)
                raise TrialFailed(reason)
            values.append(float(metrics[o.metric]))
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                trial.set_user_attr(f"m.{k}", float(v))
        run.set_tags({"load_avg_1m_end": f"{os.getloadavg()[0]:.2f}"})
        run.end(RUN_STATUS["COMPLETE"])
        self.finished.append(metrics)
        shown = ", ".join(f"{o.metric}={metrics[o.metric]:.4g}" for o in s.objectives)
        self._summary(trial.number, cid, seed, f"{shown}, {metrics.get('gflops_fwd', 0):.3g} GFLOPs", t0)
        return values[0] if len(values) == 1 else values

    def run_task(self, task, ctx, run) -> dict:
        """task.run, halving the batch size after an out-of-memory error if the study asks."""
        import dataclasses

        import torch
        while True:
            try:
                return task.run(ctx)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
                bs = getattr(ctx.options, "batch_size", None)
                if not (oom and self.study.oom_backoff and isinstance(bs, int) and bs > 1):
                    raise
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                ctx.options = dataclasses.replace(ctx.options, batch_size=bs // 2)
                run.set_tags({"oom_backoff": f"batch_size {bs} -> {bs // 2}"})
                print(f"out of memory at batch_size {bs}; retrying with {bs // 2}", file=sys.stderr)
                seed_everything(ctx.seed)
                ctx.generator = torch.Generator().manual_seed(ctx.seed)

    def _summary(self, number, cid, seed, what, t0) -> None:
        msg = f"trial {number} [{cid} seed={seed}] {what} ({time.perf_counter() - t0:.1f} s)"
        if getattr(self, "bar", None) is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def duplicate_of(self, trial, point) -> int | None:
        from optuna.trial import TrialState
        for t in self.optuna_study.get_trials(deepcopy=False,
                                              states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.number == trial.number or self.point_of(t) != point:
                continue
            if t.state == TrialState.COMPLETE or t.number < trial.number:
                return t.number
        return None

    @staticmethod
    def failure_reason(e: BaseException) -> tuple[str, bool]:
        """(reason, final): final failures would repeat on a re-run, so they are not retried."""
        import torch
        if isinstance(e, DivergedError):
            return f"diverged: {e}", True
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return f"out of memory: {str(e).splitlines()[0][:300]}", True
        if isinstance(e, HarnessError):
            return str(e), True
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}{where}", False

    def execute(self, trial, resolved, run) -> dict:
        """Build, measure cost, train and judge one trial; returns all its metrics."""
        import optuna
        import torch

        from .data.base import build_dataset
        from .metrics.flops import build_uninitialised
        from .metrics.speed import SpeedOptions, measure_speed
        from .tasks.base import TrialContext, get_task

        s, device = self.study, torch.device(self.device)
        t_start = time.perf_counter()
        task = get_task(s.task)()
        key = f"{s.data}:{resolved.data_options}"
        if key not in self.data_cache:
            self.data_cache[key] = build_dataset(s.data, resolved.data_options)
        data = self.data_cache[key]
        task.check_device(resolved.task_options, self.device)
        registry.check_config_device(resolved.model_cfg, self.device)
        task.check(resolved.task_options, resolved.model_cfg, data)

        t0 = time.perf_counter()
        counted, _ = build_uninitialised(resolved.variant, resolved.model_overrides)
        cost = {k: v for k, v in counted.flops().items() if k != "unsupported_ops"}
        del counted
        t_flops = time.perf_counter() - t0

        seed_everything(resolved.seed)
        model, _ = registry.build(resolved.variant, resolved.model_overrides, device=device)
        run.set_tags({f"impl.{k}": v for k, v in getattr(model, "tags", dict)().items()})
        t0 = time.perf_counter()
        speed = {}
        if s.budget.speed_steps:
            probe = copy.deepcopy(model)
            sp = measure_speed(probe, SpeedOptions(batch_size=task.speed_batch_size(resolved.task_options),
                                                   warmup=1, steps=s.budget.speed_steps), device)
            speed = {k: v for k, v in sp.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and k not in ("batch_size", "timed_steps", "warmup_steps")}
            del probe
            if hasattr(model, "extra_metrics"):
                model.extra_metrics()  # reset counters the probe may have touched
        t_speed = time.perf_counter() - t0
        run.log_metrics({**cost, **speed}, step=0)

        workdir = self.runs_dir / "tmp" / f"{s.study_name}-trial{trial.number}-{os.getpid()}"
        workdir.mkdir(parents=True, exist_ok=True)
        cache_dir = self.runs_dir / "cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        single = not s.multi_objective
        sign = 1.0
        if single and getattr(task, "intermediate_direction", "maximize") != s.objectives[0].direction:
            sign = -1.0
        steps_bar = None
        if not self.bar.disable:
            from tqdm import tqdm
            steps_bar = tqdm(total=s.budget.steps, desc=f"  trial {trial.number}", unit="step",
                             position=1, leave=False)

        optuna_s = [0.0]  # Optuna's share of the task's wall time (overhead accounting)

        def report(value: float, step: int) -> None:
            self.check_interrupt()
            if not single:
                return
            t = time.perf_counter()
            trial.report(sign * float(value), step)
            prune = trial.should_prune()
            optuna_s[0] += time.perf_counter() - t
            if prune:
                raise optuna.TrialPruned(f"at step {step}, intermediate value {value:.4g}")

        def log_metrics(metrics: dict, step: int | None = None) -> None:
            self.check_interrupt()
            run.log_metrics(metrics, step)
            if steps_bar is not None and step:
                steps_bar.n = min(step, s.budget.steps)
                steps_bar.refresh()

        resolved_cfg = workdir / "resolved_config.yaml"
        import yaml
        resolved_cfg.write_text(yaml.safe_dump(
            {"study": s.study_name, "trial": trial.number, **resolved.flat_params(),
             "budget": s.budget.__dict__}, sort_keys=True))
        run.log_artifact(resolved_cfg)
        seed_everything(resolved.seed)
        ctx = TrialContext(model=model, variant=resolved.variant, model_cfg=resolved.model_cfg,
                           options=resolved.task_options, data=data, budget=s.budget,
                           seed=resolved.seed, device=device, workdir=workdir, cache_dir=cache_dir,
                           report=report, log_metrics=log_metrics, log_artifact=run.log_artifact,
                           set_tags=run.set_tags,
                           generator=torch.Generator().manual_seed(resolved.seed))
        t0, log0 = time.perf_counter(), run.log_seconds
        try:
            metrics = self.run_task(task, ctx, run)
        finally:
            if steps_bar is not None:
                steps_bar.close()
        # the task's own compute: its wall time less the engine's work it called back into
        # (MLflow logging and Optuna reports / pruning checks during the task)
        bookkeeping = (run.log_seconds - log0) + optuna_s[0]
        t_task = time.perf_counter() - t0 - bookkeeping
        total = time.perf_counter() - t_start
        overhead = total - t_task
        out = {**cost, **speed, **metrics, "trial_time_s": total, "task_time_s": t_task,
               "flops_time_s": t_flops, "speed_time_s": t_speed,
               "task_bookkeeping_s": bookkeeping, "optuna_in_task_s": optuna_s[0],
               "overhead_time_s": overhead, "overhead_frac": overhead / total if total else 0.0,
               "tracking_time_s": run.log_seconds}
        run.log_metrics({k: v for k, v in out.items() if k not in cost and k not in speed},
                        step=s.budget.steps)
        del model  # (no gc.collect() per trial: it cost ~0.7 s each with MLflow and torch loaded)
        return out


# ------------------------------------------------------------ entry points

def prepare(study_path, profile, storage, tracking_uri, runs_dir, device) -> tuple:
    """Validate everything (no compute, no writes) and resolve the store URLs."""
    runs_dir = Path(runs_dir or "runs")
    study = load_study(study_path, profile)
    storage_url = check_storage_url(storage or os.environ.get("HARNESS_STORAGE") or default_storage(runs_dir))
    from .tracking import check_tracking_uri
    tracking = check_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                  or default_tracking_uri(runs_dir))
    dev = resolve_device(device or study.device)
    check_cells_on_device(study, dev)
    return study, storage_url, tracking, runs_dir, dev


def check_cells_on_device(study, device: str) -> None:
    """Every cell's task options and model config against the device the trials will run on
    (no compute)."""
    from .studies import cell_id, cell_task_options
    from .tasks.base import get_task
    task = get_task(study.task)()
    for cell in study.cells():
        try:
            task.check_device(cell_task_options(study, cell), device)
            registry.check_config_device(study.cell_models.get(cell_id(cell)), device)
        except ConfigError as e:
            raise StudyError(f"{study.path}: cell {cell_id(cell)} on device {device}: {e}") from None


def command_line(argv: list[str] | None = None) -> str:
    """The invocation as typed (URLs masked), for the parent run and the report, after the
    kernel-choosing environment variables that are set (``kernel_choice.KERNEL_ENV``)."""
    import shlex
    args = sys.argv[1:] if argv is None else argv
    return kernel_env() + "harness " + " ".join(shlex.quote(mask_url(a)) for a in args)


def run_study(study_path, *, profile=None, storage=None, tracking_uri=None, n_trials=None,
              timeout=None, runs_dir="runs", workers=1, device=None, quiet=False,
              argv: list[str] | None = None, heartbeat: int = HEARTBEAT_S) -> int:
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials must be >= 1, got {n_trials}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {timeout}")
    if workers < 1 or workers > 256:
        raise ConfigError(f"--workers must be in [1, 256], got {workers}")
    if not 1 <= heartbeat <= 600:
        raise ConfigError(f"--heartbeat must be in [1, 600] seconds, got {heartbeat}")
    study, storage_url, tracking, runs_dir, dev = prepare(study_path, profile, storage,
                                                          tracking_uri, runs_dir, device)
    if workers > 1:
        if n_trials is not None or timeout is not None:
            raise ConfigError("--n-trials and --timeout apply to one process; with --workers, "
                              "each worker runs until the grid is done")
        return run_local_workers(study, study_path, profile, storage_url, tracking, runs_dir, dev,
                                 workers, heartbeat, command_line(argv))
    return Runner(study, storage_url, tracking, runs_dir, dev, quiet, command_line(argv),
                  heartbeat).run(n_trials, timeout)


def run_worker(study_path, *, profile=None, storage=None, tracking_uri=None, runs_dir="runs",
               device=None, quiet=False, argv: list[str] | None = None,
               heartbeat: int = HEARTBEAT_S) -> int:
    if not 1 <= heartbeat <= 600:
        raise ConfigError(f"--heartbeat must be in [1, 600] seconds, got {heartbeat}")
    study, storage_url, tracking, runs_dir, dev = prepare(study_path, profile, storage,
                                                          tracking_uri, runs_dir, device)
    return Runner(study, storage_url, tracking, runs_dir, dev, quiet, command_line(argv),
                  heartbeat).run()


def run_local_workers(study, study_path, profile, storage_url, tracking, runs_dir, device,
                      workers, heartbeat, command) -> int:
    """N local `harness worker` processes on one storage; waits for all.

    The store URLs travel in the environment, not on the command line, so a password
    never shows in `ps`.  This process creates the study and enqueues the grid first."""
    runner = Runner(study, storage_url, tracking, runs_dir, device, True, command, heartbeat)
    runner.open()
    runner.sync_grid()
    if storage_url.startswith("sqlite"):
        print("note: several workers on SQLite serialise their writes; use PostgreSQL "
              "(--storage postgresql://...) for real parallel sweeps", file=sys.stderr)
    cmd = [sys.executable, "-m", "harness.cli", "worker", str(study_path), "--runs-dir",
           str(runs_dir), "--device", device, "--quiet", "--heartbeat", str(heartbeat)]
    if profile:
        cmd += ["--profile", profile]
    env = {**os.environ, "HARNESS_STORAGE": storage_url, "MLFLOW_TRACKING_URI": tracking}
    procs = [subprocess.Popen(cmd, env=env) for _ in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    return max(codes) if codes else 0
