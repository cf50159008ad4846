"""The stand-alone benchmarks write honest reports: packing vs padding against the ideal
ratio, and the engine's overhead on a (short) trial."""
import json
import math
import os
import statistics

import pytest

from harness import bench_packing, bench_peer, processes
from harness.tracking import git_sha

from .conftest import load_script, needs_compile


def test_packing_benchmark_report_states_ideal_peak_and_hardware(tmp_path, capsys):
    out = tmp_path / "packing" / "README.md"
    rc = bench_packing.main(["--depth", "1", "--batch-size", "12", "--max-size", "32",
                             "--warmup", "1", "--steps", "1", "--threads", "1",
                             "--device", "cpu", "--out", str(out)])
    assert rc == 0
    # progress on stderr as it goes (a run cut short by a time limit still says where it was)
    err = capsys.readouterr().err
    for line in ("pack: first forward", "pad train: first step", "train: pack", "infer: pack"):
        assert line in err, err
    text = out.read_text()
    r = json.loads((out.parent / "results.json").read_text())
    # the ideal is what padding wastes: (real + padded) / real tokens of the pad arm
    assert r["ideal_speedup"] == pytest.approx(1 / (1 - r["pad_padding_fraction"]), rel=1e-6)
    for mode in ("train", "infer"):
        sp = r[f"pack_{mode}_speedup"]
        assert sp == pytest.approx(r[f"pad_{mode}_step_ms_median"] / r[f"pack_{mode}_step_ms_median"])
        assert r[f"pack_{mode}_fraction_of_ideal"] == pytest.approx(sp / r["ideal_speedup"])
    assert r["peak_fp32_tflops"] > 0 and math.isfinite(r["peak_fp32_tflops"])
    assert f"{r['ideal_speedup']:.2f}x" in text and "peak measured in the same run" in text
    assert "python -m harness.bench_packing --depth 1" in text and "| pack | train |" in text
    assert f"this code at git `{git_sha()}`" in text  # which code made the figures
    # other processes' load while timing: measured per mode and stated; the warning follows
    # it, not the load average (which this benchmark's own threads raise to the core count)
    assert all(r[f"{m}_other_cpu_cores"] >= 0 for m in ("train", "infer"))
    assert "other processes' CPU use while steps were timed: train" in text
    quiet = {**r, "load_avg_1m": 2.0 * r["cpu_count"], "train_other_cpu_cores": 0.0,
             "infer_other_cpu_cores": 0.0}
    assert "warning" not in bench_packing.render(quiet)
    assert "other processes used 1.00 cores" in bench_packing.render({**quiet, "infer_other_cpu_cores": 1.0})
    # --settle (default 10): settling rounds and page faults per timed step, per arm and mode
    assert r["settle"] == 10 and "(the shared heap settled)" in text
    for mode in ("train", "infer"):
        assert 0 <= r[f"{mode}_settle_rounds"] <= 10 and r[f"{mode}_unsettled"] in (0, 1)
        assert r[f"{mode}_unsettled"] == 0 or r[f"{mode}_settle_rounds"] == 10  # ran out of rounds
        for arm in ("pack", "pad"):
            assert 0 <= r[f"{arm}_{mode}_faults_median"] <= r[f"{arm}_{mode}_faults_max"]
        assert (f"| {r['variant']} | {mode} | {r[f'{mode}_settle_rounds']:g} | "
                f"{r[f'{mode}_unsettled']} | {r[f'pack_{mode}_faults_median']:g} "
                f"({r[f'pack_{mode}_faults_max']}) |") in text
    assert "| variant | mode | settling rounds | unsettled | faults pack | faults pad |" in text
    assert f"heap settled after {r['train_settle_rounds']:g} (train)" in bench_packing.render(r)
    # a record from before --settle renders as it did: no settling clause, table or line
    old = {k: v for k, v in r.items() if "settle" not in k and not k.endswith(("_faults_median",
                                                                                "_faults_max"))}
    assert "Heap settling" not in bench_packing.render_report(old)
    assert "untimed rounds" not in bench_packing.render_report(old) + bench_packing.render(old)


def test_packing_benchmark_bf16_runs_both_arms_under_autocast_and_says_so(tmp_path):
    out = tmp_path / "bf16" / "README.md"
    assert bench_packing.main(["--depth", "1", "--batch-size", "8", "--max-size", "32",
                               "--warmup", "0", "--steps", "1", "--settle", "0", "--bf16",
                               "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads((out.parent / "results.json").read_text())
    assert r["precision"] == "bf16 autocast"
    assert "precision bf16 autocast" in out.read_text() and "bf16 autocast" in bench_packing.render(r)
    fp32 = {k: v for k, v in r.items() if k != "precision"}  # a record from before --bf16
    assert "precision fp32" in bench_packing.render_report(fp32)


@needs_compile
def test_packing_benchmark_compiles_every_arms_blocks_on_request(tmp_path, graphs_only):
    out = tmp_path / "compiled" / "README.md"
    assert bench_packing.main(["--depth", "1", "--batch-size", "8", "--max-size", "32",
                               "--warmup", "0", "--steps", "1", "--settle", "0",
                               "--compile-blocks", "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads((out.parent / "results.json").read_text())
    assert r["compile_blocks"] is True and r["pack_train_step_ms_median"] > 0
    assert "blocks compiled (torch.compile)" in out.read_text()
    assert "compiled blocks" in bench_packing.render(r)
    assert "blocks eager" in bench_packing.render_report({**r, "compile_blocks": False})


def test_pack_flop_ceiling_counts_flex_blocks_and_padded_attention_exactly():
    """scripts/pack_flop_ceiling.py on four 32x32 images (64 tokens each, patch 4): pad runs
    4 rows of 64; pack runs 2 rows of 128 slots, two images each. At block 128 each row is one
    partial block, twice the block-diagonal pairs; at block 64 the two diagonal blocks are
    exactly the images', so the counts equal the block-diagonal work."""
    import torch
    from harness import registry
    script = load_script("pack_flop_ceiling")
    cfg = {"input_size": 32, "max_seq_len": 128, "max_grid": 8, "patch_size": 4, "in_channels": 1,
           "num_classes": 10, "depth": 1, "batching": "pack"}
    model, _ = registry.build("navit-ti", cfg, device="cpu", seed=0)
    r = script.ceiling([torch.zeros(1, 32, 32)] * 4, model, [128, 64])
    D, m = model.cfg.hidden_size, model.cfg.mlp_ratio
    per_token, per_pair = (4 + 2 * m) * D * D, 2 * D
    assert (r["real_tokens"], r["pad_tokens"], r["rows"], r["slots"]) == (256, 256, 2, 256)
    assert r["token_ideal"] == 1.0 and r["block_diagonal_pairs"] == 4 * 64 ** 2
    assert r["blocks"][128]["pairs"] == 2 * 128 ** 2 and r["blocks"][64]["pairs"] == 4 * 64 ** 2
    pad = 256 * per_token + 4 * 64 ** 2 * per_pair
    assert r["blocks"][128]["mac_ratio"] == pytest.approx(pad / (256 * per_token + 2 * 128 ** 2 * per_pair))
    assert r["blocks"][64]["mac_ratio"] == pytest.approx(1.0)


def test_pack_cost_split_takes_each_ops_median_over_the_profiled_steps(capfd):
    """One stalled step does not move the split: an op that ran in one of four profiled steps
    reads 0 calls and 0 ms (a mean would give it a quarter of that step), an op every step
    runs reads its calls per step, and the kinds sum those medians.  Its eight profiler starts
    and stops print none of Kineto's lines to stderr (it profiles through speed.profiled)."""
    import torch
    script = load_script("pack_cost_split")
    a, b = torch.ones(64, 64), torch.ones(4096)
    runs = {"pack": 0}

    def pack():
        runs["pack"] += 1
        torch.mm(a, a)
        if runs["pack"] == 2:
            torch.cumsum(b, 0)  # the one step with an extra op

    def pad():
        torch.mm(a, a)
        torch.mm(a, a)

    capfd.readouterr()
    kinds, ops = script.profile_kinds({"pack": pack, "pad": pad}, 4)
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "profiler_stop" not in err and "USDT" not in err
    assert runs["pack"] == 4
    assert ops["pack"]["aten::mm"][0] == 1 and ops["pad"]["aten::mm"][0] == 2
    assert ops["pack"]["aten::cumsum"] == (0, 0.0) and "aten::cumsum" not in ops["pad"]
    for arm in ("pack", "pad"):
        assert kinds[arm]["GEMM (Linear layers)"] == pytest.approx(ops[arm]["aten::mm"][1])
        assert kinds[arm]["GEMM (Linear layers)"] > 0


def test_pack_cost_split_times_the_study_cell_and_sorts_every_op(capsys, tmp_path):
    """scripts/pack_cost_split.py on the speed_packing study's smoke cell: pad's rows over the
    real tokens is the ideal, pack computes no more rows than pad and no fewer than the real
    tokens, each arm's ops are sorted into the named kinds with the GEMMs and SDPA calls found;
    pack (grouped attention) makes more op calls per step than pad; ``--out`` writes the table,
    the calls and the top ops of the kinds that do not shrink, with its command and machine;
    a skew the study does not sweep, no rounds or a negative ``--top`` is refused with exit 2
    before any work."""
    from pathlib import Path
    from harness.studies import load_study
    script = load_script("pack_cost_split")
    assert script.kind_of("aten::addmm") == "GEMM (Linear layers)"
    assert script.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention (SDPA)"
    assert script.kind_of("aten::_fused_adamw_") == "optimiser (AdamW)"
    assert script.kind_of("aten::index_select") == "gather, scatter, embeddings"
    assert script.kind_of("aten::view") == script.OTHER
    path = str(Path(__file__).resolve().parents[1] / "studies" / "speed_packing.yaml")
    study = load_study(path, "smoke")
    r = script.measure(study, 2.0, 0, rounds=1, profiled=1)
    assert r["images"] == 16 and r["ideal"] == pytest.approx(r["rows"]["pad"] / r["real"])
    assert r["ideal"] > 1.5 and r["real"] <= r["rows"]["pack"] < r["rows"]["pad"]
    assert r["speedup"] > 0 and set(r["ms"]) == {"pack", "pad"}
    names = {k for k, _ in script.KINDS} | {script.OTHER}
    for arm in ("pack", "pad"):
        assert set(r["kinds"][arm]) <= names
        assert r["kinds"][arm]["GEMM (Linear layers)"] > 0 and r["kinds"][arm]["attention (SDPA)"] > 0
    # the grouped path makes pack's step more op calls than pad's
    assert sum(n for n, _ in r["ops"]["pack"].values()) > sum(n for n, _ in r["ops"]["pad"].values())
    rows = script.top_fixed_ops(r["ops"], 3)
    assert len(rows) == 2 + 3 and all(any(k in row for k in script.FIXED) for row in rows[2:])
    out = tmp_path / "split" / "README.md"
    assert script.main(["--study", path, "--profile", "smoke", "--skew", "2", "--rounds", "1",
                        "--profiled", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python scripts/pack_cost_split.py" in text and "torch " in text
    assert "| all |" in text and "of the ideal" in text and "op calls per profiled step" in text
    assert "| op | kind | pack calls |" in text  # --top's default: 8 ops listed
    assert sum(line.startswith("| `") for line in text.splitlines()) == 8
    capsys.readouterr()
    assert script.main(["--study", path, "--profile", "smoke", "--skew", "3"]) == 2
    assert "its skews: [2.0]" in capsys.readouterr().err
    assert script.main(["--study", path, "--profile", "smoke", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    assert script.main(["--study", path, "--profile", "smoke", "--top", "-1"]) == 2
    assert "--top must be >= 0" in capsys.readouterr().err


def test_gpu_wheels_carries_only_what_the_device_lacks_and_refuses_bad_input(tmp_path):
    """scripts/gpu_wheels.sh: a device that already has every package of this venv needs no
    wheels (nothing fetched, no folder made); one that lacks torch and optuna gets optuna
    alone; an unreadable or empty list stops with exit 2."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_wheels.sh"
    freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable}

    def run(present_text, name="present.txt"):
        present = tmp_path / name
        present.write_text(present_text)
        return subprocess.run(["bash", str(script), str(present), str(tmp_path / "whl")],
                              capture_output=True, text=True, env=env, timeout=120)
    r = run(freeze)
    assert r.returncode == 0 and "0 packages to carry" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "whl").exists()
    # the same names as an image's comma-separated manifest, in capitals: still nothing
    names = [line.split("==")[0] for line in freeze.splitlines() if "==" in line]
    r = run(", ".join(n.upper() for n in names), "manifest.txt")
    assert r.returncode == 0 and "0 packages to carry" in r.stdout, r.stdout + r.stderr
    bad = subprocess.run(["bash", str(script), str(tmp_path / "missing.txt")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "cannot read PRESENT file" in bad.stderr
    r = run(" \n")
    assert r.returncode == 2 and "names no packages" in r.stderr
    # a device without optuna (and, as ever, torch left to the device): optuna alone, named
    # with this venv's version, and nothing fetched under LIST_ONLY
    env["LIST_ONLY"] = "1"
    r = run("\n".join(n for n in names if n.lower() not in ("torch", "optuna")))
    import optuna
    assert r.returncode == 0, r.stderr
    assert f"1 packages to carry: optuna=={optuna.__version__}" in r.stdout, r.stdout
    assert not (tmp_path / "whl").exists()


def test_wheel_scripts_match_names_without_a_pipe_that_pipefail_can_break():
    """present_names.sh's `listed NAME LIST` is an exact, literal line match, and no script
    under pipefail pipes into `grep -q`: grep's early exit can kill the writer with SIGPIPE
    (141) and pipefail then reads a match as none (it made gpu_wheels.sh count present
    packages as missing in about a third of its runs under load)."""
    import re
    import subprocess
    from pathlib import Path
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    helper = scripts / "present_names.sh"
    cases = [("optuna", 0), ("OPTUNA", 1), ("optun", 1), ("ml-flow", 1), ("mlxflow", 1),
             ("-x", 1)]
    probe = "; ".join(f'listed {n!r} "$L"; echo $?' for n, _ in cases)
    r = subprocess.run(["bash", "-c", f'set -o pipefail; source {helper}; '
                        f'L=$(printf "ml.flow\\noptuna\\ntorch\\n"); {probe}'],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == [want for _, want in cases], r.stdout
    for script in sorted(scripts.glob("*.sh")):
        text = "\n".join(line for line in script.read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        if "pipefail" in text:
            bad = re.findall(r"\|\s*grep\s+-[A-Za-z]*q[^\n]*", text)
            assert not bad, f"{script.name}: {bad}"


def test_gpu_rehearsal_refuses_bad_input_before_building_anything(tmp_path):
    """scripts/gpu_rehearse.sh (the whole rehearsal needs the package index and minutes, so
    it is a command, not a test): no PRESENT, an unreadable one or one that names nothing
    stops with exit 2 and a message, and its work folder is never made."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_rehearse.sh"
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable}
    work = tmp_path / "work"
    empty = tmp_path / "empty.txt"
    empty.write_text(" ,\n")
    for args, says in (([], "usage:"), ([str(tmp_path / "missing.txt"), str(work)], "cannot read"),
                       ([str(empty), str(work)], "names no packages")):
        r = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env,
                           timeout=60)
        assert r.returncode == 2 and says in r.stderr, (args, r.stdout, r.stderr)
        assert not work.exists()
    r = subprocess.run(["bash", str(script), str(empty), str(work)], capture_output=True,
                       text=True, env={**env, "PY": str(tmp_path / "nopython")}, timeout=60)
    assert r.returncode == 2 and "no python" in r.stderr and not work.exists()


def test_gpu_checks_refuses_bad_steps_before_touching_the_device(tmp_path):
    """scripts/gpu_checks.sh (it needs CUDA, so its run is a device command): an unknown or
    empty STEPS, a DEADLINE that is not whole seconds, or a missing OUTDIR stops with exit 2,
    a message naming what would be valid, and no results.tgz; a valid STEPS subset gets past
    those checks to the import line, which stops with exit 3 where no GPU is visible."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable, "PYTHONPATH": str(root)}
    valid = "bench-eager bench-compiled study-packing-compile study-packing study-dit study-paths"
    for extra, out, says in (({"STEPS": "bench-eager benchh"}, tmp_path, "unknown step 'benchh'"),
                             ({"STEPS": "  "}, tmp_path, "STEPS is empty"),
                             ({"DEADLINE": "9m"}, tmp_path, "DEADLINE must be whole seconds"),
                             ({}, tmp_path / "missing", "is not a folder")):
        r = subprocess.run(["bash", str(root / "scripts" / "gpu_checks.sh"), str(out)],
                           capture_output=True, text=True, env={**env, **extra}, cwd=tmp_path,
                           timeout=60)
        assert r.returncode == 2 and says in r.stderr, (extra, r.stdout, r.stderr)
        assert r.stdout == "" and not (tmp_path / "results.tgz").exists()
        if "STEPS" in extra:
            assert valid in r.stderr
    # no GPU visible (so on a CUDA machine too), the import line's device query fails
    r = subprocess.run(["bash", str(root / "scripts" / "gpu_checks.sh"), str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**env, "STEPS": "study-dit bench-eager", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "bench-packing" not in r.stdout and not (tmp_path / "results.tgz").exists()


def test_dispatch_count_counts_kernels_not_views_or_aliases():
    """``DispatchCount.kernels``: ops that make a view or an alias (``detach``, which a
    backward dispatches many times) run no kernel and are not counted; arithmetic is."""
    import torch
    from harness.metrics.speed import DispatchCount
    x = torch.ones(4, 6)
    with DispatchCount() as ops:
        x.view(6, 4).t().detach().unsqueeze(0)
    assert ops.kernels == 0 and ops.names["detach"] == 1, ops.names
    with DispatchCount() as ops:
        (x.detach() + 1).sum()
    assert ops.kernels == 2, ops.names


def test_compile_time_script_refuses_bad_input_before_compiling():
    """scripts/compile_time.py (cold compiles take minutes, so the run itself is a command):
    a depth, width or step count under 1, or no C++ compiler for inductor, stops with exit 2
    and says what would be valid, before any child process compiles."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_time.py"
    root = str(script.parents[1])
    for args, env, says in ((["--depth", "0"], {}, "--depth must be at least 1"),
                            (["--steps", "0"], {}, "--steps must be at least 1"),
                            ([], {"CXX": "/no/such/g++"}, "cannot build CPU kernels here")):
        r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": root, **env}, timeout=120)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr[-2000:])
        assert "first training step" not in r.stdout


def test_packing_benchmark_times_the_grouped_path_at_each_call_cost(tmp_path):
    """--call-costs: one grouped pack arm per cost, each against pad; a cost of 0 makes one
    attention call per image length, a huge one a single call, and the report says so."""
    out = tmp_path / "costs" / "README.md"
    assert bench_packing.main(["--depth", "1", "--batch-size", "12", "--max-size", "32",
                               "--warmup", "0", "--steps", "1", "--call-costs", "0", "1000000000",
                               "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads((out.parent / "results.json").read_text())
    assert bench_packing.timed_arms(r) == ["pack_cost0", "pack_cost1000000000", "pad"]
    assert bench_packing.timed_arms({f"pack_cost{c}_train_step_ms_median": 1.0 for c in (16384, 0, 2048)}) \
        == ["pack_cost0", "pack_cost2048", "pack_cost16384"]  # costs in numeric order
    assert r["pack_attn_path"] == "grouped"
    assert r["pack_cost1000000000_attn_calls_per_block"] == 1
    assert r["pack_cost0_attn_calls_per_block"] > 1  # 12 images of several lengths
    for mode in ("train", "infer"):
        assert r[f"pack_cost0_{mode}_fraction_of_ideal"] > 0
    calls = f"pack_cost0 {r['pack_cost0_attn_calls_per_block']:g}, pack_cost1000000000 1"
    assert f"`variants.navit.GROUP_CALL_COST`): {calls}" in out.read_text()


@pytest.mark.parametrize("argv, says", [
    (["--call-costs", "0", "0"], "distinct costs >= 0"),
    (["--call-costs", "-1"], "distinct costs >= 0"),
    (["--call-costs", "0", "--paths"], "give one")])
def test_packing_benchmark_bad_call_costs_stop_before_any_work(argv, says, capsys, tmp_path):
    out = tmp_path / "costs" / "README.md"
    assert bench_packing.main([*argv, "--device", "cpu", "--out", str(out)]) == 2
    assert says in capsys.readouterr().err and not out.parent.exists()


def test_packing_benchmark_refuses_a_non_navit_variant(capsys):
    assert bench_packing.main(["--variant", "dit-s/2", "--device", "cpu"]) != 0
    assert "navit" in capsys.readouterr().err


def test_overhead_report_breaks_a_real_trial_down(tmp_path):
    out = tmp_path / "overhead" / "README.md"
    assert bench_peer.main(["overhead", "--seconds", "2", "--out", str(out)]) == 0
    r = json.loads((out.parent / "results.json").read_text())
    assert r["trial_time_s"] >= r["task_time_s"] > 0
    assert r["overhead_time_s"] == pytest.approx(r["trial_time_s"] - r["task_time_s"], abs=0.05)
    assert 0 <= r["overhead_frac"] < 1
    assert r["task_bookkeeping_s"] > 0  # the task logged to MLflow: counted as overhead, not task
    assert "target <= 5%" in out.read_text() and f"git `{git_sha()}`" in out.read_text()


def test_overhead_report_gives_each_trial_of_one_worker(tmp_path):
    """--trials N: N trials in one process, each one's breakdown; the top level is the first."""
    out = tmp_path / "overhead" / "README.md"
    assert bench_peer.main(["overhead", "--seconds", "1", "--trials", "2", "--out", str(out)]) == 0
    r = json.loads((out.parent / "results.json").read_text())
    assert len(r["trials"]) == 2 and r["trials"][0]["trial_time_s"] == r["trial_time_s"]
    for t in r["trials"]:
        assert t["trial_time_s"] >= t["task_time_s"] > 0 and t["speed_time_s"] > 0
        assert t["overhead_frac"] == pytest.approx(t["overhead_time_s"] / t["trial_time_s"])
    assert r["outside_trial_s"] == pytest.approx(
        r["command_wall_s"] - sum(t["trial_time_s"] for t in r["trials"]))
    text = out.read_text()
    assert "2 `classify` trials (seeds 0-1), one after another in one worker process" in text
    assert "the later trials' not-task share" in text


def test_overhead_refuses_zero_trials_before_any_trial(capsys):
    assert bench_peer.main(["overhead", "--trials", "0"]) == 2
    assert "--trials must be >= 1, got 0" in capsys.readouterr().err
    assert bench_peer.main(["overhead", "--trials", "1001"]) == 2
    assert "--trials must be at most 1000, got 1001" in capsys.readouterr().err


def test_cpu_identity_names_family_and_model():
    """A VM may call two CPU generations "AMD EPYC"; the recorded identity tells them apart."""
    from pathlib import Path

    from harness.tracking import cpu_model, device_name
    info = Path("/proc/cpuinfo")
    if not info.exists() or "cpu family" not in info.read_text():
        pytest.skip("no x86 /proc/cpuinfo here")
    first = info.read_text().split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in first.splitlines())}
    assert cpu_model() == f"{fields['model name']}, family {fields['cpu family']} model {fields['model']}"
    assert device_name("cpu").startswith(cpu_model() + " (")
    assert bench_peer.hardware()["cpu"] == cpu_model()


def test_linear_path_comparison_times_all_three_matmuls():
    from harness.metrics import cpu_matmul
    if not cpu_matmul.onednn_available():
        pytest.skip("no oneDNN in this torch build")
    (row,) = cpu_matmul.compare_paths(64, [(32, 48)], reps=1)
    assert (row["rows"], row["in"], row["out"]) == (64, 32, 48)
    for k in ("fwd", "dgrad", "wgrad"):
        for side in ("onednn", "mm"):
            assert math.isfinite(row[f"{k}_{side}"]) and row[f"{k}_{side}"] > 0


@pytest.mark.parametrize("argv", [["--shapes", "384x"], ["--shapes", "0x384"], ["--rows", "0"]])
def test_linear_path_comparison_refuses_bad_shapes_before_timing(argv, capsys):
    from harness.metrics import cpu_matmul
    with pytest.raises(SystemExit) as e:
        cpu_matmul.main(argv)
    assert e.value.code == 2 and ("--shapes" in capsys.readouterr().err or "--rows" in argv)


def _peer_record(ratios: list[tuple[float, float]], load=(0.0, 0.0, 0.0)) -> dict:
    """A bench-peer record of one process, as ``run_peer`` returns it (two models)."""
    rows = []
    for model, (ours_ms, theirs_ms) in zip(("ViViT Model 2", "NaViT (packed)"), ratios):
        row = {"model": model, "params": 10, "batch_size": 8, "config": {"m": model}}
        for mode in ("train", "infer"):
            row.update({f"{mode}_other_cpu_cores": 0.1, f"{mode}_paired_ratio": theirs_ms / ours_ms,
                        f"{mode}_rounds_faster": 2, f"ours_{mode}_step_ms_median": ours_ms,
                        f"theirs_{mode}_step_ms_median": theirs_ms,
                        f"{mode}_ratio": theirs_ms / ours_ms})
        rows.append(row)
    return {"bench": "peer", "peer": "vit-pytorch", "peer_version": "x", "device": "cpu",
            "rounds": 3, "warmup": 1, "load_avg_before": load, "load_avg_after": load,
            "hardware": bench_peer.hardware(), "rows": rows, "command": "child"}


def test_peer_processes_merge_to_medians_and_keep_every_ratio():
    runs = [_peer_record([(100.0, 110.0), (50.0, 40.0)]),
            _peer_record([(100.0, 100.0), (50.0, 50.0)]),
            _peer_record([(90.0, 108.0), (40.0, 50.0)], load=(1.0, 1.0, 1.0))]
    m = bench_peer.merge_processes(runs)
    vivit, navit = m["rows"]
    assert m["processes"] == 3 and m["load_avg_after"] == (1.0, 1.0, 1.0)
    assert vivit["train_ratio_per_process"] == pytest.approx([1.1, 1.0, 1.2])
    assert vivit["train_ratio"] == pytest.approx(1.1)  # the median process, not a pooled ratio
    assert navit["infer_ratio"] == pytest.approx(1.0) and navit["ours_train_step_ms_median"] == 50.0
    assert vivit["train_rounds_faster"] == 6 and vivit["config"] == {"m": "ViViT Model 2"}
    text = bench_peer.render_peer({**m, "command": "python -m harness.bench_peer --processes 3"})
    assert "**1.10** (1.00-1.20)" in text and "3 fresh processes" in text
    assert "1.100 (100 / 110) / 1.100, 1.000 (100 / 100) / 1.000, 1.200 (90 / 108) / 1.200" in text
    assert vivit["ours_train_step_ms_median_per_process"] == [100.0, 100.0, 90.0]
    assert "(6/9)" in text  # rounds won out of rounds x processes
    # the interval over processes: three samples spread 1.0-1.2 show no difference
    assert vivit["train_ratio_gmean"] == pytest.approx((1.1 * 1.0 * 1.2) ** (1 / 3))
    assert vivit["train_ratio_ci95_low"] < 1.0 < vivit["train_ratio_ci95_high"]
    assert "Between processes" in text and "| ViViT Model 2 | 1.097 (" in text
    assert "| no difference shown |" in text


def _growing_step(calls: int, keep: list):
    """A step that maps 8 MiB of fresh anonymous memory, writes it and keeps it, for its
    first ``calls`` calls (2048 new 4 KiB pages each time, whatever malloc holds free), then
    touches nothing new."""
    import mmap
    size = 8 * 2**20
    count = [0]

    def step():
        count[0] += 1
        if count[0] <= calls:
            m = mmap.mmap(-1, size)
            m.write(b"\x01" * size)
            keep.append(m)
    return step


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(_thp_always(), reason="transparent huge pages always on: a fresh 8 MiB "
                    "faults in as four 2 MiB pages, under the settling threshold")
def test_alternate_settles_once_no_arm_grows_the_heap_and_counts_faults_per_step():
    import torch
    from harness.metrics import speed
    if speed.minor_faults() == 0:
        pytest.skip("no page-fault counter here (no resource module)")
    keep: list = []
    log: dict = {}
    steps = {"quiet": lambda: None, "grows": _growing_step(3, keep)}
    times = speed.alternate(steps, torch.device("cpu"), warmup=0, rounds=2, abba=True,
                            settle=10, faults=log)
    assert log["settle_rounds"] == 4 and log["settled"]  # 3 rounds growing, then a quiet one
    assert len(times["grows"]) == 2 and max(log["per_step"]["grows"]) <= speed.SETTLED_FAULTS
    log.clear()
    steps = {"quiet": lambda: None, "grows": _growing_step(100, keep)}
    speed.alternate(steps, torch.device("cpu"), warmup=1, rounds=2, settle=3, faults=log)
    assert log["settle_rounds"] == 3 and not log["settled"]  # ran out of rounds
    assert min(log["per_step"]["grows"]) >= 2048 > max(log["per_step"]["quiet"])
    log.clear()
    speed.alternate({"quiet": lambda: None}, torch.device("cpu"), 0, 1, faults=log)
    assert log["settle_rounds"] == 0 and log["settled"]  # settle=0: nothing asked
    for m in keep:
        m.close()


def test_ratio_interval_is_a_t_interval_of_the_log_ratios():
    from scipy.stats import t
    ratios = [1.05, 1.02, 1.04, 1.03]
    g, lo, hi = processes.ratio_interval(ratios)
    logs = [math.log(r) for r in ratios]
    m = sum(logs) / 4
    half = t.ppf(0.975, 3) * statistics.stdev(logs) / 2
    assert (g, lo, hi) == pytest.approx((math.exp(m), math.exp(m - half), math.exp(m + half)))
    assert processes.interval_reads(lo, hi, "ours faster", "theirs faster") == "ours faster"
    # theirs / ours: the same interval inverted, so the verdict flips and nothing else
    gi, loi, hii = processes.ratio_interval([1 / r for r in ratios])
    assert (gi, loi, hii) == pytest.approx((1 / g, 1 / hi, 1 / lo))
    assert processes.interval_reads(loi, hii, "ours faster", "theirs faster") == "theirs faster"
    one = processes.ratio_interval([1.2])
    assert one[0] == pytest.approx(1.2) and math.isnan(one[1]) and math.isnan(one[2])
    assert processes.interval_reads(one[1], one[2], "a", "b").startswith("no difference shown")


def test_peer_render_reads_a_saved_record_without_timing(tmp_path):
    m = bench_peer.merge_processes([_peer_record([(100.0, 105.0), (50.0, 40.0)]),
                                    _peer_record([(100.0, 104.0), (50.0, 41.0)]),
                                    _peer_record([(100.0, 106.0), (50.0, 39.0)])])
    saved = tmp_path / "old" / "results.json"
    saved.parent.mkdir()
    record = {**m, "command": "python -m harness.bench_peer --processes 3"}
    saved.write_text(json.dumps(record))
    out = tmp_path / "old" / "README.md"
    assert bench_peer.main(["--render", str(saved), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == bench_peer.render_peer(json.loads(saved.read_text()))
    assert "| ViViT Model 2 | 1.050 (" in text and "| ours faster |" in text
    assert "| theirs faster |" in text  # NaViT: 0.80, 0.82, 0.78
    assert saved.read_text() == json.dumps(record)  # the record it read is left as it was
    # several records: one summary, a row per record and model; one process has no interval
    single = tmp_path / "single.json"
    single.write_text(json.dumps(_peer_record([(100.0, 90.0), (50.0, 50.0)])))
    summary = tmp_path / "summary" / "README.md"
    assert bench_peer.main(["--render", str(saved), str(single), "--out", str(summary)]) == 0
    text = summary.read_text()
    assert f"--render {saved} {single} --out {summary}" in text
    assert text.count(f"| `{saved}` |") == 2 and text.count(f"| `{single}` |") == 2
    assert "| 3 | ViViT Model 2 | 1.050 (" in text and "| ours faster |" in text
    assert "| 1 | ViViT Model 2 | 0.900 | one process: no interval |" in text
    # the machine column names the instruction set torch ran (AVX-512 may be hidden by a VM)
    hw = bench_peer.hardware()
    assert f"| {hw['cpu']} ({hw['cpu_capability']}) | `{hw['git_sha'][:7]}` |" in text
    assert sorted(p.name for p in summary.parent.iterdir()) == ["README.md"]  # Markdown only


@pytest.mark.parametrize("content, what, says", [
    (None, [], "cannot read it"), ("{not json", [], "not JSON"),
    ('{"bench": "packing", "rows": []}', [], "not a bench-peer record"),
    ('{"bench": "peer", "rows": []}', ["overhead"], "renders peer records")])
def test_peer_render_refuses_what_is_not_a_peer_record(content, what, says, tmp_path, capsys):
    saved = tmp_path / "results.json"
    if content is not None:
        saved.write_text(content)
    out = tmp_path / "new" / "README.md"
    assert bench_peer.main([*what, "--render", str(saved), "--out", str(out)]) == 2
    assert says in capsys.readouterr().err and not out.parent.exists()
    good = tmp_path / "good.json"  # a good record before a bad one: still nothing written
    good.write_text(json.dumps(_peer_record([(100.0, 90.0), (50.0, 50.0)])))
    assert bench_peer.main([*what, "--render", str(good), str(saved), "--out", str(out)]) == 2
    assert says in capsys.readouterr().err and not out.parent.exists()


def test_peer_child_processes_drop_only_the_parent_options():
    argv = ["--models", "m2", "--processes", "3", "--out=r/README.md", "--rounds", "5", "--json",
            "--processes=2", "--out", "x.md", "--linear", "aten"]
    assert processes.child_argv(argv) == ["--models", "m2", "--rounds", "5", "--linear", "aten"]


@pytest.mark.parametrize("argv, says", [(["--models", "m2,m9"], "unknown m9"),
                                        (["--processes", "0"], "--processes must be >= 1"),
                                        (["--rounds", "0"], "--rounds must be >= 1"),
                                        (["--settle", "-1"], "--settle must be >= 0"),
                                        (["--models", " , "], "unknown (empty)")])
def test_peer_bad_arguments_stop_before_any_work(argv, says, capsys, tmp_path):
    out = tmp_path / "peer" / "README.md"
    assert bench_peer.main([*argv, "--out", str(out)]) == 2
    assert says in capsys.readouterr().err and not out.parent.exists()


def test_merged_numbers_follow_their_kind():
    recs = [{"batch_size": 8, "x_step_ms_median": 10.0, "x_step_ms_min": 9.0, "x_step_ms_max": 12.0,
             "train_rounds_faster": 3, "load_avg_1m": 0.5, "flag": True, "name": "a"},
            {"batch_size": 8, "x_step_ms_median": 14.0, "x_step_ms_min": 8.0, "x_step_ms_max": 15.0,
             "train_rounds_faster": 3, "load_avg_1m": 1.5, "flag": False, "name": "b"}]
    m = processes.merge_numbers(recs)
    assert m["batch_size"] == 8 and isinstance(m["batch_size"], int)  # shared: kept as it was
    assert m["x_step_ms_median"] == 12.0 and m["x_step_ms_median_per_process"] == [10.0, 14.0]
    assert (m["x_step_ms_min"], m["x_step_ms_max"]) == (8.0, 15.0)
    assert m["train_rounds_faster"] == 6 and m["load_avg_1m"] == 1.5  # equal counts still add up
    assert m["flag"] is True and m["name"] == "a"  # not numbers: the first record's
    s = processes.merge_numbers([{"train_unsettled": 1, "train_settle_rounds": 3, "cpu_count": 2},
                                 {"train_unsettled": 0, "train_settle_rounds": 10, "cpu_count": 2}])
    assert s["train_unsettled"] == 1 and s["cpu_count"] == 2  # a count of processes; a shared value
    assert s["train_settle_rounds_per_process"] == [3, 10]


def test_packing_benchmark_over_processes_reports_each(tmp_path):
    out = tmp_path / "packing" / "README.md"
    assert bench_packing.main(["--depth", "1", "--batch-size", "8", "--max-size", "16",
                               "--warmup", "1", "--steps", "1", "--processes", "2", "--settle", "0",
                               "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads((out.parent / "results.json").read_text())
    # --settle 0: no settling rounds in either process, none left unsettled
    assert r["train_settle_rounds_per_process"] == [0, 0] and r["train_unsettled"] == 0
    assert "untimed rounds more" not in out.read_text()
    each = r["pack_train_fraction_of_ideal_per_process"]
    assert r["processes"] == 2 and len(each) == 2
    assert r["pack_train_fraction_of_ideal"] == pytest.approx(sum(each) / 2)  # median of two
    assert r["batch_size"] == 8 and "--processes 2" in r["command"]
    text = out.read_text()
    assert "2 fresh processes" in text and "Of the ideal, per process" in text


@pytest.mark.parametrize("argv, says", [(["--processes", "0"], "--processes must be >= 1"),
                                        (["--steps", "0"], "--steps must be >= 1"),
                                        (["--settle", "-1"], "--settle must be >= 0")])
def test_packing_benchmark_bad_counts_stop_before_any_work(argv, says, capsys, tmp_path):
    out = tmp_path / "packing" / "README.md"
    assert bench_packing.main([*argv, "--device", "cpu", "--out", str(out)]) == 2
    assert says in capsys.readouterr().err and not out.parent.exists()


def test_git_sha_is_dirty_for_code_changes_only(tmp_path, monkeypatch):
    """A report the harness re-rendered into the checkout does not make the code 'dirty';
    a changed source file does, seen from the root or from a subfolder."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("harness/x.py", "reports/r/README.md", "runs/s/meta.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    sha = git_sha()
    assert len(sha) == 12 and not sha.endswith("-dirty")
    (tmp_path / "reports/r/README.md").write_text("b\n")
    (tmp_path / "runs/s/meta.txt").write_text("b\n")
    assert git_sha() == sha
    (tmp_path / "harness/x.py").write_text("b\n")
    assert git_sha() == sha + "-dirty"
    monkeypatch.chdir(tmp_path / "reports")
    assert git_sha() == sha + "-dirty"
