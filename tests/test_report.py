import hashlib
import re

import pytest

from harness import cli

from .conftest import roundings, write_study


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def study(shared_runs):
    p = write_study(shared_runs / "rep.yaml", name="rep", steps=4,
                    extra="claims:\n  - {text: 'Smaller patches are more accurate', axis: patch_size, best: 2}\n"
                          "ratios:\n  - {text: 'Patch 2 over patch 4', axis: patch_size, "
                          "metric: train_samples_per_s, value: 2, baseline: 4, target: 0.01}\n")
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    return p


def test_report_is_complete_and_byte_for_byte_deterministic(study, shared_runs, tmp_path):
    a = tmp_path / "a"
    digests = []
    for _ in range(2):  # the same command twice: the same bytes
        assert cli.main(["report", str(study), "--runs-dir", str(shared_runs), "--out", str(a)]) == 0
        digests.append(digest(a))
    assert digests[0] == digests[1]
    names = {p.name for p in a.iterdir()}
    assert {"README.md", "report.html", "results.csv", "results.tex", "pareto.png",
            "throughput.png", "loss_curves.png"} <= names
    md = (a / "README.md").read_text()
    assert "Does patch size matter" in md                      # the question
    assert "harness run" in md and "rep.yaml" in md            # the exact command
    assert f"harness report {study} --runs-dir {shared_runs} --out {a}" in md  # and where to
    assert "### By patch_size" in md and "### By pool" in md   # one table per axis
    assert "★" in md and "±" in md
    assert "Smaller patches are more accurate" in md and ("HOLDS here" in md or "DOES NOT HOLD here" in md)
    assert "torch version" in md
    import pandas as pd
    csv = pd.read_csv(a / "results.csv")
    assert len(csv) == 8 and {"cell", "seed", "accuracy", "gflops_fwd"} <= set(csv.columns)
    assert "\\begin{tabular}" in (a / "results.tex").read_text()


def test_report_of_unknown_study_is_a_clear_error(tmp_path, shared_runs, capsys):
    p = write_study(tmp_path / "never.yaml", name="never_run")
    assert cli.main(["report", str(p), "--runs-dir", str(shared_runs), "--out", str(tmp_path / "o")]) == 2
    assert "no MLflow experiment" in capsys.readouterr().err


def test_report_from_a_runs_dir_with_no_store_stops_and_creates_none(tmp_path, capsys):
    p = write_study(tmp_path / "never.yaml", name="never_run")
    empty = tmp_path / "no-such-runs"
    assert cli.main(["report", str(p), "--runs-dir", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no tracking store at" in err and "--runs-dir" in err
    assert not empty.exists() and not (tmp_path / "o").exists()  # nothing half-written


def test_ratio_section_pairs_the_arms_by_seed(study, shared_runs, tmp_path):
    """The ratio table's figures are the per-seed ratios of the runs in results.csv."""
    import numpy as np
    import pandas as pd
    out = tmp_path / "r"
    assert cli.main(["report", str(study), "--runs-dir", str(shared_runs), "--out", str(out)]) == 0
    md = (out / "README.md").read_text()
    assert "## Ratios" in md and "**Patch 2 over patch 4**" in md
    csv = pd.read_csv(out / "results.csv")
    for pool in ("cls", "mean"):
        g = csv[csv["pool"] == pool]
        a = g[g["patch_size"] == 2].set_index("seed")["train_samples_per_s"]
        b = g[g["patch_size"] == 4].set_index("seed")["train_samples_per_s"]
        rs = [a[s] / b[s] for s in sorted(a.index)]
        want = f"| {pool} | {len(rs)} | "
        row = next(line for line in md.splitlines() if line.startswith(want))
        # the report divides the full values, this test the CSV's 6-digit ones
        mean, low, high = re.search(r"\| ([0-9.e+-]+) \(([0-9.e+-]+)-([0-9.e+-]+)\)", row).groups()
        assert mean in roundings(np.mean(rs), ".3g", 1e-5) and low in roundings(min(rs), ".3g", 1e-5) \
            and high in roundings(max(rs), ".3g", 1e-5), row
        assert "met" in row and "not met" not in row


def test_report_header_names_the_swept_variants_not_the_files_default():
    """speed_dit's gpu-target profile sweeps variant to dit-b/2: the header says so rather
    than the study's default dit-s/2, which no trial ran."""
    from harness.report import variant_text
    from harness.studies import load_study
    gpu = load_study("studies/speed_dit.yaml", "gpu-target")
    assert variant_text(gpu) == "variants `dit-b/2` (swept)"
    assert variant_text(load_study("studies/vit_digits.yaml", "smoke")) == "variant `vit-digits`"
