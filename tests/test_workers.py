"""Many workers on one study over the real PostgreSQL on 127.0.0.1:5432, with an MLflow
tracking server backed by PostgreSQL.  Skipped, with the reason, where no server runs."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from harness import cli

from .conftest import write_study
from .test_ui import free_port

PG = "postgresql://postgres@127.0.0.1:5432"


def _admin():
    import psycopg2
    con = psycopg2.connect(f"{PG}/postgres", connect_timeout=3)
    con.autocommit = True
    return con


@pytest.fixture(scope="module")
def pg_server():
    try:
        _admin().close()
    except Exception as e:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432 (trust auth, user postgres): {e}")
    return PG


@pytest.fixture
def pg_db(pg_server):
    """A fresh database per test, dropped afterwards."""
    name = f"harness_test_{uuid.uuid4().hex[:10]}"
    con = _admin()
    con.cursor().execute(f'create database "{name}"')
    yield f"{pg_server}/{name}"
    con.cursor().execute(f'drop database if exists "{name}" with (force)')
    con.close()


def pg_counts(url):
    import psycopg2
    con = psycopg2.connect(url)
    cur = con.cursor()
    cur.execute("select table_name from information_schema.tables where table_schema='public'")
    out = {}
    for (t,) in cur.fetchall():
        cur.execute(f'select count(*) from "{t}"')
        out[t] = cur.fetchone()[0]
    con.close()
    return out


@pytest.fixture(scope="module")
def tracking_server(pg_server, tmp_path_factory):
    """A real `mlflow server` with a PostgreSQL backend store, shared by the module's tests
    (each names its own experiment; starting the server takes seconds)."""
    name = f"harness_mlflow_{uuid.uuid4().hex[:10]}"
    con = _admin()
    con.cursor().execute(f'create database "{name}"')
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{pg_server}/{name}",
         "--artifacts-destination", str(tmp_path_factory.mktemp("artifacts")),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    con.cursor().execute(f'drop database if exists "{name}" with (force)')
    con.close()


def complete_points(storage, name):
    import optuna
    from optuna.trial import TrialState
    st = optuna.load_study(study_name=name, storage=storage)
    return st, [(t.params["cell"], t.params["seed"]) for t in st.trials if t.state == TrialState.COMPLETE]


def search(url, payload):
    req = urllib.request.Request(url + "/api/2.0/mlflow/runs/search", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read()).get("runs", [])


def experiment_id(url, name):
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}") as r:
        return json.loads(r.read())["experiment"]["experiment_id"]


TWELVE = "  patch_size: [2, 4]\n  pool: [cls, mean]\n  depth: [1, 2, 3]"


def test_three_workers_run_a_12_cell_grid_exactly_once(pg_db, tracking_server, tmp_path):
    p = write_study(tmp_path / "w.yaml", name="workers", sweep=TWELVE, repeats=1, steps=3)
    code = cli.main(["run", str(p), "--workers", "3", "--storage", pg_db, "--tracking-uri",
                     tracking_server, "--runs-dir", str(tmp_path / "runs"), "--threads", "1"])
    assert code == 0
    st, done = complete_points(pg_db, "workers")
    assert len(done) == 12 and len(set(done)) == 12
    workers = {t.user_attrs["pid"] for t in st.trials if t.state.name == "COMPLETE"}
    assert len(workers) >= 2, "the grid was not shared between workers"
    runs = search(tracking_server, {"experiment_ids": [experiment_id(tracking_server, "workers")],
                                    "filter": "tags.`harness.kind` = 'trial'", "max_results": 100})
    assert len(runs) == 12 and {r["info"]["status"] for r in runs} == {"FINISHED"}


def test_killed_worker_loses_no_trial(pg_db, tracking_server, tmp_path):
    p = write_study(tmp_path / "k.yaml", name="killworker", sweep="  patch_size: [2, 4]\n  pool: [cls, mean]",
                    repeats=1, steps=60, eval_every=30)
    env = {**os.environ, "HARNESS_STORAGE": pg_db, "MLFLOW_TRACKING_URI": tracking_server}
    cmd = [sys.executable, "-m", "harness.cli", "worker", str(p), "--runs-dir", str(tmp_path / "runs"),
           "--quiet", "--heartbeat", "2", "--threads", "1"]
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import optuna
    deadline = time.time() + 180
    victim_trial = None
    while time.time() < deadline and victim_trial is None:
        time.sleep(0.5)
        try:
            st = optuna.load_study(study_name="killworker", storage=pg_db)
        except KeyError:
            continue
        for t in st.get_trials(deepcopy=False):
            if t.state.name == "RUNNING" and t.user_attrs.get("pid") == victim.pid \
                    and "mlflow_run_id" in t.user_attrs:
                victim_trial = t
    assert victim_trial is not None, "the worker never started a trial"
    survivor = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert survivor.wait(timeout=300) == 0
    st, done = complete_points(pg_db, "killworker")
    assert len(done) == 4 and len(set(done)) == 4
    killed = [t for t in st.trials if t.number == victim_trial.number][0]
    assert killed.state.name == "FAIL"
    runs = search(tracking_server, {"experiment_ids": [experiment_id(tracking_server, "killworker")],
                                    "max_results": 100})
    by_id = {r["info"]["run_id"]: r for r in runs}
    assert by_id[victim_trial.user_attrs["mlflow_run_id"]]["info"]["status"] in ("KILLED", "FAILED")
    trial_runs = [r for r in runs if any(t["key"] == "harness.kind" and t["value"] == "trial"
                                         for t in r["data"]["tags"])]
    assert "RUNNING" not in {r["info"]["status"] for r in trial_runs}


def test_password_never_reaches_params_tags_or_reports(pg_db, tmp_path):
    secret = "s3cr3t-" + uuid.uuid4().hex[:6]
    url = pg_db.replace("postgres@", f"postgres:{secret}@")  # trust auth ignores the password
    p = write_study(tmp_path / "pw.yaml", name="pw", sweep="  patch_size: [4]", repeats=1, steps=2)
    runs = tmp_path / "runs"
    assert cli.main(["run", str(p), "--storage", url, "--runs-dir", str(runs), "--quiet"]) == 0
    assert cli.main(["report", str(p), "--runs-dir", str(runs), "--out", str(tmp_path / "rep")]) == 0
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=["pw"])
    assert secret not in df.to_csv()
    assert "***" in " ".join(df.get("tags.storage", []).dropna())
    for f in (tmp_path / "rep").iterdir():
        if f.suffix in (".md", ".html", ".csv", ".tex"):
            assert secret not in f.read_text(), f
    # and an unreachable server's error message masks it too
    bad = f"postgresql://postgres:{secret}@127.0.0.1:1/nowhere"
    import io
    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["run", str(p), "--storage", bad, "--runs-dir", str(runs)]) == 2
    assert secret not in err.getvalue() and "***" in err.getvalue()


def test_twenty_malformed_inputs_leave_both_stores_untouched(pg_db, tmp_path, capsys):
    from .conftest import row_counts
    from .test_studies import BAD, make_bad
    runs = tmp_path / "runs"
    good = write_study(tmp_path / "good.yaml", name="good", sweep="  patch_size: [4]", repeats=1, steps=2)
    assert cli.main(["run", str(good), "--storage", pg_db, "--runs-dir", str(runs), "--quiet"]) == 0
    before = (pg_counts(pg_db), row_counts(runs))
    capsys.readouterr()
    cases = []
    for name in sorted(BAD):  # 11 kinds of bad study file
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        cases.append((name, ["run", str(make_bad(d, name)), "--storage", pg_db]))
    g = str(good)
    cases += [
        ("unknown profile", ["run", g, "--profile", "gpuu", "--storage", pg_db]),
        ("zero trials", ["run", g, "--n-trials", "0", "--storage", pg_db]),
        ("negative timeout", ["run", g, "--timeout", "-5", "--storage", pg_db]),
        ("zero workers", ["run", g, "--workers", "0", "--storage", pg_db]),
        ("bad heartbeat", ["run", g, "--heartbeat", "0", "--storage", pg_db]),
        ("bad threads", ["run", g, "--threads", "0", "--storage", pg_db]),
        ("bad device", ["run", g, "--device", "tpu", "--storage", pg_db]),
        ("unsupported storage scheme", ["run", g, "--storage", "redis://127.0.0.1/0"]),
        ("two-slash sqlite", ["run", g, "--storage", "sqlite://optuna.db"]),
        ("unreachable postgres", ["run", g, "--storage", "postgresql://postgres@127.0.0.1:1/x"]),
        ("bad tracking scheme", ["run", g, "--storage", pg_db, "--tracking-uri", "ftp://host/x"]),
        ("malformed tracking url", ["run", g, "--storage", pg_db, "--tracking-uri", "http://"]),
        ("worker on missing file", ["worker", str(tmp_path / "missing.yaml"), "--storage", pg_db]),
        ("unknown variant for bench", ["bench", "vivit-q"]),
    ]
    assert len(cases) >= 20
    for name, args in cases:
        code = cli.main([*args, "--runs-dir", str(runs)] if args[0] != "bench" else args)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert err.startswith("harness: error:") and len(err.strip().splitlines()) == 1, (name, err)
    assert (pg_counts(pg_db), row_counts(runs)) == before
