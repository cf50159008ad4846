import json

import pytest

from harness import cli


def test_variants_lists_dit_sizes(capsys):
    assert cli.main(["variants", "dit-*", "--no-flops"]) == 0
    out = capsys.readouterr().out
    for s in ("s", "b", "l", "xl"):
        for p in (2, 4, 8):
            assert f"dit-{s}/{p}" in out


def test_variants_json_has_params_and_gflops(capsys):
    assert cli.main(["variants", "dit-s/*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["dit-s/2", "dit-s/4", "dit-s/8"]
    assert rows[0]["gflops_fwd"] == pytest.approx(6.07, rel=0.01)
    assert rows[0]["params_m"] == pytest.approx(32.9, abs=0.1)


def test_unknown_variant_exits_nonzero_with_close_matches(capsys):
    assert cli.main(["bench", "dit-q/2"]) == 2
    err = capsys.readouterr().err
    assert "dit-s/2" in err and "did you mean" in err


def test_misspelt_key_exits_nonzero_with_close_matches(capsys):
    assert cli.main(["bench", "dit-s/2", "--set", "conditoning=x"]) == 2
    assert "conditioning" in capsys.readouterr().err


def test_bad_value_and_bad_set_syntax(capsys):
    assert cli.main(["bench", "dit-s/2", "--set", "conditioning=film"]) == 2
    assert "adaln_zero" in capsys.readouterr().err
    assert cli.main(["bench", "dit-s/2", "--set", "conditioning"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert cli.main(["bench", "dit-s/2", "--device", "tpu"]) == 2


def test_bench_flops_only_json(capsys):
    assert cli.main(["bench", "dit-s/2", "--set", "conditioning=in_context", "--flops-only", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    assert rec["name"] == "dit-s/2" and rec["config.conditioning"] == "in_context"
    assert rec["gflops_fwd"] > rec["gflops_attn_fwd"] > 0
    assert "1 multiply-add = 1 flop" in rec["flop_convention"]


def test_bench_measures_throughput(capsys):
    args = ["bench", "dit-s/8", "--set", "depth=1", "--set", "input_size=16", "--batch-size", "2",
            "--steps", "2", "--warmup", "1", "--json"]
    assert cli.main(args) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    for k in ("name", "params", "gflops_fwd", "train_samples_per_s", "infer_samples_per_s",
              "peak_mem_mb", "train_tokens_per_s", "train_step_ms_median", "train_step_ms_min",
              "train_step_ms_max", "config.depth"):
        assert k in rec, k
    assert rec["train_samples_per_s"] > 0 and rec["infer_samples_per_s"] > 0
    assert rec["train_step_ms_min"] <= rec["train_step_ms_median"] <= rec["train_step_ms_max"]
    assert rec["config.depth"] == 1
    from harness.metrics import cpu_mkl
    assert rec["cpu_mkl"] == cpu_mkl.mode() in ("vendor", "avx512")  # what MKL's dispatcher chose


def test_bench_table_names_the_cpu_kernels_it_ran(capsys):
    from harness.metrics import cpu_attention, cpu_gelu, cpu_matmul
    args = ["bench", "vit-digits", "--batch-size", "2", "--steps", "1", "--warmup", "0",
            "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("CPU kernels:"))
    assert f"Linear {cpu_matmul.path()}," in line and f"GELU {cpu_gelu.path()}," in line
    from harness.metrics import cpu_mkl
    assert f"short attention {cpu_attention.path()}," in line
    assert f"MKL dispatch {cpu_mkl.mode()}" in line
    if cpu_mkl.why_not():  # auto left MKL's own dispatch here: the line says why
        assert f"MKL dispatch vendor ({cpu_mkl.why_not()})" in line


def test_bench_ops_prints_where_a_train_step_goes(capsys):
    args = ["bench", "dit-s/8", "--set", "depth=1", "--set", "input_size=16", "--batch-size", "2",
            "--steps", "1", "--warmup", "1", "--ops", "2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "Where a dit-s/8 train step's time goes" in out
    table = out.split("train step's time goes")[1]
    # the model's own kernels (oneDNN linears or torch's mm / addmm, by cpu_matmul's path)
    assert any(k in table for k in ("scaled_dot_product", "linear", "aten::mm", "aten::addmm"))
    assert "%" in table
    assert cli.main(["bench", "dit-s/8", "--ops", "-1"]) == 2
    assert cli.main(["bench", "dit-s/8", "--ops", "2", "--flops-only"]) == 2
    assert "--flops-only" in capsys.readouterr().err


def test_bench_floor_gives_each_steps_gemm_floor_and_the_mfu_at_it(capsys):
    args = ["bench", "dit-s/8", "--set", "depth=1", "--set", "input_size=16", "--batch-size", "2",
            "--steps", "1", "--warmup", "1", "--floor", "--mfu", "--json"]
    assert cli.main(args) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    for mode, calls in (("train", 3), ("infer", 1)):  # each Linear: fwd; bwd: input + weight
        assert rec[f"{mode}_gemm_calls"] >= calls * 6  # >= 6 Linears in a DiT block
        assert 0 < rec[f"{mode}_gemm_floor_ms"]
        assert 0 < rec[f"{mode}_gemm_share"] and rec[f"{mode}_gemm_step_ms"] > 0  # paired in rounds
        assert rec[f"{mode}_mfu_at_floor"] == pytest.approx(
            rec[f"{mode}_mfu"] * rec[f"{mode}_step_ms_median"] / rec[f"{mode}_gemm_floor_ms"])
    assert cli.main(args[:-1]) == 0
    assert "GEMM floor: every matrix multiply of one step" in capsys.readouterr().out
    assert cli.main(["bench", "dit-s/8", "--floor", "--flops-only"]) == 2
    assert cli.main(["bench", "dit-s/8", "--floor", "--alternate", "eager,compile"]) == 2


def test_op_profile_shares_add_up():
    import torch

    from harness.metrics.speed import op_profile
    w = torch.randn(64, 64, requires_grad=True)

    def step():
        (torch.randn(32, 64) @ w).relu().sum().backward()
    rows = op_profile(step, torch.device("cpu"), steps=3, top=100)
    assert rows and all(r["ms_per_step"] > 0 for r in rows)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-6)
    assert any(r["op"] == "aten::mm" and r["calls_per_step"] >= 1 for r in rows)


def test_bench_alternate_times_each_arm_in_rounds(capsys):
    args = ["bench", "dit-s/8", "--set", "depth=1", "--set", "input_size=16", "--batch-size", "2",
            "--steps", "2", "--rounds", "2", "--warmup", "1", "--alternate", "eager,bf16"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "2 rounds x 1 timed steps per arm" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("eager ", "bf16 "))]
    assert len(lines) == 2 and "1.000x" in lines[0]
    assert cli.main(args + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    assert set(rec["arms"]) == {"eager", "bf16"} and rec["arms"]["eager"]["speed_vs_eager"] == 1.0
    assert rec["arms"]["eager"]["paired_speed_vs_eager"] == 1.0
    assert 0 <= rec["arms"]["bf16"]["paired_rounds_faster"] <= 2
    assert cli.main(["bench", "dit-s/8", "--alternate", "eager,bf16", "--ops", "2"]) == 2
    assert cli.main(["bench", "dit-s/8", "--alternate", "eager"]) == 2
    assert cli.main(["bench", "dit-s/8", "--alternate", "eager,turbo"]) == 2
    err = capsys.readouterr().err
    assert "unknown: turbo" in err and "compile" in err and "aten-gelu" in err
    assert cli.main(["bench", "dit-s/8", "--alternate", "eager,bf16", "--mfu"]) == 2


def test_paired_ratios_compare_arms_within_each_round():
    from harness.metrics import speed
    # round 1: base 2 s vs 1 s (2x), round 2: base 4 s vs 8 s (0.5x); per_round 2 takes medians
    assert speed.paired_ratios([2.0, 4.0], [1.0, 8.0], 1) == [2.0, 0.5]
    assert speed.paired_ratios([1.0, 3.0, 4.0, 4.0], [1.0, 1.0, 8.0, 8.0], 2) == [2.0, 0.5]


def test_bench_alternate_kernel_arms_run_their_paths_and_restore_them(capsys):
    from harness.metrics import cpu_attention, cpu_gelu, cpu_matmul
    paths = lambda: (cpu_gelu.path(), cpu_attention.path(), cpu_matmul.path())  # noqa: E731
    before, seen = paths(), []
    for attention in ("sdpa", "matmul"):
        cli.with_kernel_paths(lambda: seen.append(paths()), gelu="aten", attention=attention,
                              linear="aten")()
    assert seen == [("aten", "sdpa", "aten"), ("aten", "matmul", "aten")] and paths() == before
    args = ["bench", "dit-s/8", "--set", "depth=1", "--set", "input_size=16", "--batch-size", "2",
            "--steps", "2", "--rounds", "2", "--warmup", "0", "--alternate",
            "eager,aten-gelu,sdpa-attn,matmul-attn,aten-linear"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "aten-gelu" in out and "sdpa-attn" in out and "HARNESS_CPU_LINEAR=aten" in out
    assert "HARNESS_CPU_ATTENTION=matmul" in out
    assert paths() == before


def test_bench_mfu_prints_fixed_and_paired_mfu(capsys):
    args = ["bench", "dit-s/8", "--set", "depth=1", "--set", "input_size=16", "--batch-size", "2",
            "--steps", "2", "--warmup", "1", "--mfu", "--json"]
    assert cli.main(args) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    for k in ("train_mfu", "train_mfu_paired", "infer_mfu_paired", "mfu_peak_tflops"):
        assert rec[k] > 0, k
    assert len(rec["train_step_s"]) == len(rec["train_probe_flops"]) == 2
    assert cli.main(["bench", "dit-s/8", "--mfu", "--flops-only"]) == 2


def test_alternate_takes_the_arms_in_turn():
    import torch

    from harness.metrics.speed import alternate
    calls = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                      torch.device("cpu"), warmup=1, rounds=2, per_round=2, rewarm=True)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}


def test_alternate_abba_reverses_every_other_round():
    import torch

    from harness.metrics.speed import alternate
    calls = []
    alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
              torch.device("cpu"), warmup=0, rounds=3, abba=True)
    assert calls == ["a", "b", "b", "a", "a", "b"]
