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
