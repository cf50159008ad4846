"""`harness ui` serves the MLflow UI, and its REST API lists the study's runs."""
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from harness import cli
from harness.tracking import serve_ui

from .conftest import write_study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


def test_ui_serves_a_page_and_the_rest_api_lists_runs(shared_runs):
    p = write_study(shared_runs / "ui.yaml", name="ui", sweep="  patch_size: [4]", repeats=2, steps=2)
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    port = free_port()
    proc = serve_ui(runs_dir=shared_runs, port=port, block=False)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                status, body = call(base + "/")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert proc.poll() is None, "mlflow server exited"
                assert time.time() < deadline, "mlflow server did not start in 120 s"
                time.sleep(1)
        assert status == 200 and b"<html" in body.lower()
        _, body = call(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui")
        exp_id = json.loads(body)["experiment"]["experiment_id"]
        _, body = call(base + "/api/2.0/mlflow/runs/search",
                       {"experiment_ids": [exp_id], "filter": "tags.`harness.kind` = 'trial'"})
        runs = json.loads(body)["runs"]
        assert len(runs) == 2
        assert all(r["info"]["status"] == "FINISHED" for r in runs)
        names = {m["key"] for m in runs[0]["data"]["metrics"]}
        assert {"accuracy", "gflops_fwd", "params_m"} <= names
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ui_without_a_store_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["ui", "--runs-dir", str(tmp_path / "none")]) == 2
    assert "run a study first" in capsys.readouterr().err
