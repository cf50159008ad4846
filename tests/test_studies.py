"""Invalid study files: each gets the intended error, and neither store gains a row."""
import pytest

from harness import cli
from harness.errors import StudyError
from harness.studies import load_study

from .conftest import row_counts, write_study

GOOD = dict(name="valid")

BAD = {
    "unknown top-level key": ("sweeps:\n  depth: [1]\n", "unknown key; did you mean: sweep"),
    "unknown variant": ({"variant": "vit-digitz"}, "did you mean: vit-digits"),
    "misspelt sweep key": ({"sweep": "  patch_sise: [2, 4]"}, "patch_size"),
    "impossible combination": ({"sweep": "  patch_size: [3]"}, "does not divide input_size"),
    "heads do not divide width": ({"sweep": "  num_heads: [3]"}, "divisible by num_heads"),
    "wrong value type": ({"sweep": "  depth: [two]"}, "expected int"),
    "bad literal": ({"sweep": "  pool: [max]"}, "valid: cls, mean"),
    "unknown objective metric": ({"objectives": "  - {metric: acuracy, direction: maximize}"}, "accuracy"),
    "bad direction": ({"objectives": "  - {metric: accuracy, direction: up}"}, "minimize, maximize"),
    "empty sweep list": ({"sweep": "  depth: []"}, "non-empty list"),
    "repeats zero": ({"repeats": 0}, "repeats"),
    "ratio on an axis not swept": (
        "ratios:\n  - {text: t, axis: depth, metric: accuracy, value: 1, baseline: 2}\n",
        "ratios[0].axis"),
    "ratio arm not on its axis": (
        "ratios:\n  - {text: t, axis: patch_size, metric: accuracy, value: 8, baseline: 4}\n",
        "ratios[0].value"),
    "ratio of an unknown metric": (
        "ratios:\n  - {text: t, axis: pool, metric: acuracy, value: cls, baseline: mean}\n",
        "accuracy"),
    "paired ratio without a model of the baseline arm": (
        "ratios:\n  - {text: t, axis: pool, metric: accuracy, value: cls, baseline: mean, "
        "paired: accuracy}\n", "ratios[0].paired"),
    "ratio target not a number": (
        "ratios:\n  - {text: t, axis: pool, metric: accuracy, value: cls, baseline: mean, "
        "target: high}\n", "ratios[0].target"),
}


def make_bad(tmp_path, case):
    spec, _ = BAD[case]
    p = tmp_path / "bad.yaml"
    if isinstance(spec, str):
        write_study(p, **GOOD, extra=spec)
    else:
        write_study(p, **GOOD, **spec)
    return p


@pytest.fixture(scope="module")
def stores(shared_runs):
    """Stores with real content, so 'no new rows' is a real check."""
    from .conftest import write_study as ws
    p = shared_runs / "valid.yaml"
    ws(p, name="valid", sweep="  patch_size: [4]", repeats=1, steps=2)
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    return shared_runs


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_file_is_refused_before_any_write(case, tmp_path, stores, capsys):
    before = row_counts(stores)
    path = make_bad(tmp_path, case)
    code = cli.main(["run", str(path), "--runs-dir", str(stores), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err, err
    assert BAD[case][1] in err, err
    assert row_counts(stores) == before


def test_yaml_level_errors(tmp_path, stores, capsys):
    before = row_counts(stores)
    cases = {
        "notyaml.yaml": ("name: [unclosed", "not valid YAML"),
        "list.yaml": ("- 1\n- 2\n", "top level must be a mapping"),
        "python.yaml": ("name: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        "dupkey.yaml": ("name: a\nname: b\n", "duplicate key"),
        "missing.yaml": ("name: x\nquestion: y\n", "is required"),
    }
    for fname, (text, msg) in cases.items():
        p = tmp_path / fname
        p.write_text(text)
        assert cli.main(["run", str(p), "--runs-dir", str(stores), "--quiet"]) == 2
        assert msg in capsys.readouterr().err, fname
    assert cli.main(["run", str(tmp_path / "nope.yaml"), "--runs-dir", str(stores)]) == 2
    assert "no such study file" in capsys.readouterr().err
    assert row_counts(stores) == before


def test_bad_profile_and_cli_values(tmp_path, stores, capsys):
    before = row_counts(stores)
    p = write_study(tmp_path / "s.yaml", name="valid")
    assert cli.main(["run", str(p), "--profile", "smok", "--runs-dir", str(stores)]) == 2
    assert "did you mean: smoke" in capsys.readouterr().err
    assert cli.main(["run", str(p), "--n-trials", "0", "--runs-dir", str(stores)]) == 2
    assert cli.main(["run", str(p), "--storage", "redis://x", "--runs-dir", str(stores)]) == 2
    assert "unsupported" in capsys.readouterr().err
    assert cli.main(["run", str(p), "--tracking-uri", "ftp://x", "--runs-dir", str(stores)]) == 2
    assert row_counts(stores) == before


def test_profiles_merge_and_grid(tmp_path):
    p = write_study(tmp_path / "s.yaml", name="grid2", repeats=3)
    s = load_study(p)
    assert len(s.cells()) == 4 and s.seeds == [0, 1, 2] and s.budget.steps == 4
    s2 = load_study(p, "smoke")
    assert s2.budget.steps == 2 and s2.study_name == "grid2-smoke"
    assert len(s2.grid_points()) == 12


def test_paths_cannot_escape_the_project(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("""\
name: paths
question: q
task: classify
data: {name: digits}
model: {variant: vit-digits}
objectives: [{metric: accuracy, direction: maximize}]
""")
    load_study(p)  # valid
    from harness.studies import check_option_paths
    from dataclasses import dataclass

    @dataclass
    class O:
        root: str = "/etc"
    from harness.errors import ConfigError
    from pathlib import Path
    with pytest.raises(ConfigError, match="outside the project"):
        check_option_paths(O(), "data.options", [Path.cwd()])
    with pytest.raises(ConfigError, match="outside the project"):
        check_option_paths(O(root="../../x"), "data.options", [Path.cwd()])
    check_option_paths(O(root="tests"), "data.options", [Path.cwd()])


def test_every_reference_report_a_study_names_is_committed():
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    named = []
    for f in sorted((root / "studies").glob("*.yaml")):
        for m in re.finditer(r"Reference run: (reports/\S+)", f.read_text()):
            named.append((f.name, m.group(1)))
    assert named, "no study names a reference report"
    missing = [(f, p) for f, p in named if not (root / p).is_file()]
    assert not missing, f"studies name reports that are not committed: {missing}"
