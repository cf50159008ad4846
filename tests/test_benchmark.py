"""The benchmark task, the speed studies and the peer comparison's matching."""
import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from harness import registry
from harness.data.base import build_dataset, get_dataset
from harness.metrics import peak
from harness.metrics.flops import flops_of
from harness.metrics.speed import SpeedOptions, measure_speed
from harness.studies import load_study
from harness.tasks.base import Budget, TrialContext, get_task

from .conftest import load_script, needs_compile, roundings, run_cli

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SPEED_STUDIES = ["speed_dit.yaml", "speed_vivit.yaml", "speed_packing.yaml", "speed_paths.yaml"]
TINY_DIT = {"depth": 1, "hidden_size": 32, "num_heads": 2, "input_size": 8, "num_classes": 10}


def make_ctx(tmp_path, variant, overrides, options, data=None, seed=0):
    task = get_task("benchmark")()
    opts = registry.make_config(task.Options, options, where="task.options")
    model, cfg = registry.build(variant, overrides, seed=seed)
    logged, tags = {}, {}
    ctx = TrialContext(model=model, variant=variant, model_cfg=cfg, options=opts, data=data,
                       budget=Budget(steps=1), seed=seed, device=torch.device("cpu"),
                       workdir=tmp_path, cache_dir=tmp_path,
                       log_metrics=lambda m, step=None: logged.update(m), set_tags=tags.update)
    return task, ctx, logged, tags


def test_benchmark_task_times_a_tiny_dit_and_reports_finite_metrics(tmp_path):
    task, ctx, logged, tags = make_ctx(tmp_path, "dit-s/2", TINY_DIT,
                                       {"batch_size": 2, "warmup": 1, "steps": 2,
                                        "peak_sizes": [64, 128]})
    out = task.run(ctx)
    for k in ("train_samples_per_s", "infer_samples_per_s", "train_tokens_per_s", "train_mfu",
              "infer_mfu", "peak_fp32_tflops", "peak_mem_mb", "train_step_ms_median"):
        assert k in out and math.isfinite(out[k]), k
        assert k in task.metrics, k  # declared, so a study may use it as an objective
    assert out["train_samples_per_s"] > 0 and out["train_mfu"] > 0
    # the counted work is the model's own default input: 8x8 latents, patch 2 -> 16 tokens
    assert out["gflops_fwd_timed"] == pytest.approx(flops_of(ctx.model)["gflops_fwd"], rel=1e-6)
    assert out["train_tokens_per_s"] == pytest.approx(out["train_samples_per_s"] * 16)
    # MFU is the documented formula of the returned figures
    expect = 3 * out["gflops_fwd_timed"] * 1e9 * 2 * out["train_samples_per_s"] / (out["mfu_peak_tflops"] * 1e12)
    assert out["train_mfu"] == pytest.approx(expect)
    assert out["mfu_peak_tflops"] == out["peak_fp32_tflops"]
    assert logged == out
    assert tags["bench.bf16"] == "false" and tags["bench.mfu_peak"] == "measured fp32 GEMM"
    # paired MFU: each timed step against the GEMM rate probed next to it, at the peak's size
    for k in ("train_mfu_paired", "infer_mfu_paired", "train_paired_peak_tflops"):
        assert k in out and out[k] > 0 and k in task.metrics, k
    assert out["train_paired_peak_tflops"] <= out["peak_fp32_tflops"] * 1.5
    assert "probed" in tags["bench.mfu_paired_rule"]
    assert tags["bench.cpu_gelu"] in ("aten", "fused")
    assert tags["bench.attention"] == "auto"


def test_benchmark_peak_override_and_no_peak(tmp_path):
    task, ctx, _, tags = make_ctx(tmp_path, "dit-s/2", TINY_DIT,
                                  {"batch_size": 1, "warmup": 0, "steps": 1, "infer": False,
                                   "peak_tflops": 0.5})
    out = task.run(ctx)
    assert out["mfu_peak_tflops"] == 0.5 and "peak_fp32_tflops" not in out
    assert "train_mfu_paired" not in out  # a datasheet peak has nothing to probe
    assert "infer_samples_per_s" not in out and tags["bench.mfu_peak"] == "override"
    task, ctx, _, _ = make_ctx(tmp_path, "dit-s/2", TINY_DIT,
                               {"batch_size": 1, "warmup": 0, "steps": 1, "measure_peak": False})
    out = task.run(ctx)
    assert "train_mfu" not in out and out["train_samples_per_s"] > 0


def test_benchmark_threads_option_is_restored(tmp_path):
    before = torch.get_num_threads()
    task, ctx, _, tags = make_ctx(tmp_path, "dit-s/2", TINY_DIT,
                                  {"batch_size": 1, "warmup": 0, "steps": 1, "threads": 1,
                                   "measure_peak": False, "infer": False})
    out = task.run(ctx)
    assert out["threads"] == 1 and tags["bench.threads"] == "1"
    assert torch.get_num_threads() == before


def test_benchmark_leaves_torchs_threads_alone_unless_asked(tmp_path, monkeypatch):
    """torch.set_num_threads, even to the count in force, slows the CPU flash-attention
    kernel's small calls for the rest of the process; a trial without ``threads`` must not
    call it (the calls are recorded, and still made)."""
    calls, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    task, ctx, _, tags = make_ctx(tmp_path, "dit-s/2", TINY_DIT,
                                  {"batch_size": 1, "warmup": 0, "steps": 1,
                                   "measure_peak": False, "infer": False})
    out = task.run(ctx)
    assert calls == [] and out["threads"] == torch.get_num_threads()
    task, ctx, _, _ = make_ctx(tmp_path, "dit-s/2", TINY_DIT,
                               {"batch_size": 1, "warmup": 0, "steps": 1, "measure_peak": False,
                                "infer": False, "threads": torch.get_num_threads()})
    task.run(ctx)
    assert calls == []  # the count already in force: nothing to set
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    task, ctx, _, _ = make_ctx(tmp_path, "dit-s/2", TINY_DIT,
                               {"batch_size": 1, "warmup": 0, "steps": 1, "measure_peak": False,
                                "infer": False, "threads": other})
    assert task.run(ctx)["threads"] == other and calls == [other, before]


def test_benchmark_keeps_the_models_defaults_unless_timing_data():
    task = get_task("benchmark")()
    fields = set(registry.config_fields(registry.get("dit-s/2").config_cls))
    info = {"num_classes": 10, "in_channels": 1, "input_size": 8}
    model_opts = registry.make_config(task.Options, {})
    data_opts = registry.make_config(task.Options, {"inputs": "data"})
    assert task.model_overrides(model_opts, info, fields) == {}
    assert task.model_overrides(data_opts, info, fields) == info


def test_benchmark_on_data_times_the_datasets_batch(tmp_path):
    spec = get_dataset("varres_digits")
    data = build_dataset("varres_digits", registry.make_config(
        spec.options_cls, {"min_size": 8, "max_size": 16, "size_step": 4}))
    over = {"depth": 1, "hidden_size": 16, "num_heads": 2, "input_size": 16, "in_channels": 1,
            "num_classes": 10, "max_seq_len": 64, "max_grid": 4}
    task, ctx, _, tags = make_ctx(tmp_path, "navit-ti", over,
                                  {"inputs": "data", "batch_size": 8, "warmup": 0, "steps": 1,
                                   "peak_sizes": [64]}, data=data)
    out = task.run(ctx)
    assert tags["bench.inputs"] == "data"
    assert out["train_samples_per_s"] > 0 and math.isfinite(out["train_mfu"])
    assert 0 <= out["padding_fraction"] < 1  # the model's own figures come back too


def test_bad_benchmark_options_are_refused():
    task = get_task("benchmark")()
    from harness.errors import ConfigError
    for bad in ({"steps": 0}, {"peak_tflops": -1.0}, {"train": False, "infer": False},
                {"inputs": "disk"}, {"peak_sizes": [8]}, {"attention": "xformers"}):
        with pytest.raises(ConfigError):
            registry.make_config(task.Options, bad)


TINY_NAVIT = {"depth": 1, "hidden_size": 16, "num_heads": 2, "input_size": 16, "in_channels": 1,
              "num_classes": 10, "max_seq_len": 64, "max_grid": 4}


def varres_data(skew: float = 4.0):
    spec = get_dataset("varres_digits")
    return build_dataset("varres_digits", registry.make_config(
        spec.options_cls, {"min_size": 4, "max_size": 16, "size_step": 4, "skew": skew}))


def test_reference_times_a_pad_copy_in_turn_and_reports_paired_speedups(tmp_path):
    """A pack trial with reference {batching: pad} also times a pad copy of itself (same
    weights, same images), alternated round by round; the reference's own token figures
    come back prefixed, and equal those of a pad trial on the same batch."""
    data = varres_data()
    opts = {"inputs": "data", "batch_size": 16, "warmup": 1, "steps": 2, "measure_peak": False,
            "reference": {"batching": "pad"}, "reference_rounds": 3}
    task, ctx, logged, tags = make_ctx(tmp_path, "navit-ti", {**TINY_NAVIT, "batching": "pack"},
                                       opts, data=data)
    out = task.run(ctx)
    for mode in ("train", "infer"):
        for k in (f"{mode}_speedup_vs_reference", f"{mode}_ab_step_ms_median",
                  f"{mode}_reference_step_ms_median"):
            assert k in task.metrics and math.isfinite(out[k]) and out[k] > 0, k
        assert 0 <= out[f"{mode}_rounds_won_vs_reference"] <= 1
        # reference_settle (default 10): untimed rounds until neither step grows the heap
        settled = (out[f"{mode}_reference_settle_rounds"], out[f"{mode}_reference_unsettled"])
        assert f"{mode}_reference_settle_rounds" in task.metrics and settled[1] in (0, 1)
        assert 0 <= settled[0] <= 10 and (settled[1] == 0 or settled[0] == 10)
    assert tags["bench.reference"] == '{"batching": "pad"}'
    assert tags["bench.reference_weights"] == "shared" and "3 rounds" in tags["bench.reference_rule"]
    assert "up to 10 untimed rounds more" in tags["bench.reference_rule"]
    # the trial's own figures stay its own (pack pads little); the reference's are pad's
    assert out["padding_fraction"] < out["reference_padding_fraction"]
    task, ctx, _, pad_tags = make_ctx(tmp_path, "navit-ti", {**TINY_NAVIT, "batching": "pad"},
                                      opts, data=data)
    pad = task.run(ctx)
    assert pad["tokens_per_real_token"] == pytest.approx(out["reference_tokens_per_real_token"])
    # a reference that is the trial's own config is not timed against itself
    assert "train_speedup_vs_reference" not in pad and pad_tags["bench.reference"].startswith("skipped")


def test_reference_speedup_points_the_right_way(tmp_path):
    """Against a reference with four times the blocks, the trial's paired speedup is well
    above 1 (and the reference, having other parameters, keeps its own init)."""
    task, ctx, _, tags = make_ctx(tmp_path, "dit-s/2", {**TINY_DIT, "hidden_size": 64},
                                  {"batch_size": 4, "warmup": 1, "steps": 3, "measure_peak": False,
                                   "reference": {"depth": 4}, "reference_settle": 0})
    out = task.run(ctx)
    assert out["train_reference_settle_rounds"] == 0 and out["train_reference_unsettled"] == 0
    assert "untimed rounds more" not in tags["bench.reference_rule"]
    assert out["train_speedup_vs_reference"] > 1.5 and out["infer_speedup_vs_reference"] > 1.5
    assert out["train_rounds_won_vs_reference"] == 1.0
    assert tags["bench.reference_weights"].startswith("own init")


def test_bad_reference_options_are_refused_before_any_store(tmp_path):
    import yaml

    from harness.errors import ConfigError, StudyError
    task = get_task("benchmark")()
    for bad in ({"reference": {}}, {"reference": [1]}, {"reference": {"depth": 2}, "compile": True},
                {"reference_rounds": -1}, {"reference_settle": -1}):
        with pytest.raises(ConfigError):
            registry.make_config(task.Options, bad)
    raw = yaml.safe_load((STUDIES / "speed_packing.yaml").read_text())
    raw["name"] = "speed_reference_test"
    cases = {"batchin": ({"batchin": "pad"}, "did you mean: batching"),
             "input": ({"input_size": 32}, "set the input"),
             "value": ({"batching": "stack"}, "batching"),
             "paired": ({"depth": 2}, "ratios[0].paired")}
    for name, (ref, msg) in cases.items():
        raw["task"]["options"]["reference"] = ref
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(StudyError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            load_study(path, "smoke")
        runs = tmp_path / f"runs-{name}"
        assert run_cli("run", path, "--profile", "smoke", "--runs-dir", runs) == 2
        assert not runs.exists()


def test_channels_last_keeps_the_numbers_of_a_conv_model():
    model, _ = registry.build("dit-s/2", TINY_DIT, seed=0)
    out = measure_speed(model, SpeedOptions(batch_size=2, warmup=0, steps=1, channels_last=True))
    assert out["channels_last"] is True and out["train_samples_per_s"] > 0
    assert model.x_embedder.weight.is_contiguous(memory_format=torch.channels_last)


@needs_compile
def test_compiled_speed_runs_a_static_full_graph_per_batch(graphs_only):
    """``compile=true`` times the model as one graph (a break would be an error, not a
    quietly eager frame), static per batch size: the second batch gets its own graph, not a
    symbolic one that depends on which trial ran first in the process."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model, _ = registry.build("dit-s/2", TINY_DIT, seed=0)
    for batch in (2, 3, 4):
        out = measure_speed(model, SpeedOptions(batch_size=batch, warmup=1, steps=1, compile=True,
                                                train=False))  # inference: quicker to compile
        assert out["compile"] is True and out["infer_samples_per_s"] > 0
    assert not counters["graph_break"]
    # a graph per batch; symbolic sizes would have served 3 and 4 with one graph (2 in all)
    assert counters["stats"]["unique_graphs"] == 3


@needs_compile
def test_compiled_dit_gives_eager_outputs_through_inductor():
    """The timed compile's own backend (inductor: generated CPU kernels, not only dynamo's
    graph) runs DiT as one full graph and gives eager's outputs to rounding."""
    from harness.metrics.speed import COMPILE_BACKEND, compiled
    torch._dynamo.reset()
    model, _ = registry.build("dit-s/2", TINY_DIT, seed=0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.cfg.in_channels, 8, 8, generator=g)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 7])
    with torch.no_grad():
        assert COMPILE_BACKEND == "inductor"
        torch.testing.assert_close(compiled(model, dynamic=False)(x, t, y), model(x, t, y),
                                   rtol=1e-4, atol=1e-5)


def sdpa_ops_under(backend: str) -> set[str]:
    """The aten SDPA ops one attention call dispatches to under ``attention_backend``."""
    from harness.metrics.speed import attention_backend
    q = torch.randn(2, 2, 16, 8, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with attention_backend(backend):
            torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_attention_backend_forces_the_sdpa_kernel_on_cpu():
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in sdpa_ops_under("auto")
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in sdpa_ops_under("flash")
    math_ops = sdpa_ops_under("math")
    assert "aten::_scaled_dot_product_attention_math" in math_ops
    assert not any("flash" in op for op in math_ops)


def test_attention_option_times_the_math_kernel_and_tags_it(tmp_path):
    task, ctx, _, tags = make_ctx(tmp_path, "dit-s/2", TINY_DIT,
                                  {"batch_size": 2, "warmup": 0, "steps": 1, "measure_peak": False,
                                   "attention": "math"})
    out = task.run(ctx)
    assert out["train_samples_per_s"] > 0 and tags["bench.attention"] == "math"


def test_attention_backends_the_device_lacks_are_refused():
    from harness.errors import ConfigError
    from harness.metrics.speed import ATTENTION_BACKENDS, check_attention
    for name in ("efficient", "cudnn"):
        with pytest.raises(ConfigError, match="CUDA kernel; on cpu valid: auto, flash, math"):
            check_attention(name, "cpu", bf16=False)
    with pytest.raises(ConfigError, match="16-bit inputs; set bf16 true"):
        check_attention("flash", "cuda", bf16=False)
    check_attention("efficient", "cuda", bf16=False)  # fp32 is fine for the efficient kernel
    with pytest.raises(ConfigError, match="valid: auto, flash, efficient, cudnn, math"):
        check_attention("xformers", "cpu", bf16=False)
    from harness.cli import build_parser
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    choices = next(a.choices for a in bench._actions if a.dest == "attention")
    assert tuple(choices) == tuple(ATTENTION_BACKENDS)


def test_a_study_asking_a_cuda_attention_kernel_on_cpu_stops_before_any_store(tmp_path):
    import yaml
    raw = yaml.safe_load((STUDIES / "speed_dit.yaml").read_text())
    raw["name"] = "speed_attention_test"
    raw["profiles"]["smoke"]["sweep"]["task.attention"] = ["flash", "efficient"]
    path = tmp_path / "speed_attention_test.yaml"
    path.write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs"
    assert run_cli("run", path, "--profile", "smoke", "--device", "cpu", "--runs-dir", runs) == 2
    assert not runs.exists()


@pytest.mark.parametrize("name", SPEED_STUDIES)
def test_speed_studies_load_for_every_profile(name):
    import yaml
    raw = yaml.safe_load((STUDIES / name).read_text())
    assert set(raw["profiles"]) >= {"smoke", "cpu", "gpu"}
    for profile in [None, *raw["profiles"]]:
        s = load_study(STUDIES / name, profile)
        assert s.task == "benchmark" and s.cells()
        assert s.objectives[0].metric == "train_samples_per_s"


def test_smoke_speed_study_runs_through_the_engine(tmp_path, shared_runs):
    # the smoke profile of speed_dit, made tinier still: 2 trials end to end, MFU in MLflow
    import yaml
    raw = yaml.safe_load((STUDIES / "speed_dit.yaml").read_text())
    raw["name"] = "speed_dit_test"
    raw["profiles"]["smoke"]["model"]["config"].update(hidden_size=32, num_heads=2, input_size=8)
    raw["profiles"]["smoke"]["task"]["options"]["floor"] = True  # and each step's GEMM floor
    path = tmp_path / "speed_dit_test.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_cli("run", path, "--profile", "smoke", "--runs-dir", shared_runs, "--quiet") == 0
    mlflow.set_tracking_uri(f"sqlite:///{shared_runs / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["speed_dit_test-smoke"], output_format="pandas")
    kids = runs[runs["tags.harness.kind"] == "trial"]
    assert len(kids) == 2 and set(kids["status"]) == {"FINISHED"}
    assert (kids["metrics.train_mfu"] > 0).all() and (kids["metrics.peak_fp32_tflops"] > 0).all()
    assert set(kids["tags.bench.bf16"]) == {"false"}
    for m in ("train", "infer"):
        share = kids[f"metrics.{m}_gemm_share"]
        assert (share > 0).all() and (kids[f"metrics.{m}_gemm_calls"] > 0).all()
        assert (kids[f"metrics.{m}_gemm_step_ms"] > 0).all()  # the steps timed between re-runs
        assert kids[f"metrics.{m}_mfu_at_floor"].tolist() == pytest.approx(
            (kids[f"metrics.{m}_mfu"] * kids[f"metrics.{m}_step_ms_median"]
             / kids[f"metrics.{m}_gemm_floor_ms"]).tolist())
    assert kids["tags.bench.gemm_floor"].str.contains("gemm_floor").all()


@pytest.fixture
def bp():
    """harness.bench_peer with its peer loadable; skips where vit-pytorch is not installed
    (an optional peer; `make test` installs it)."""
    pytest.importorskip("einops")
    from harness import bench_peer
    try:
        bench_peer.peer_module("vivit")
    except Exception as e:
        pytest.skip(f"vit-pytorch not installed: {e}")
    return bench_peer


def test_peer_models_match_parameter_counts(bp):
    import sys
    assert "vit_pytorch" not in sys.modules  # loaded by path: no torchvision needed
    dev = torch.device("cpu")
    for model in (2, 3):
        ours, theirs, _ = bp.vivit_pair(model, frames=4, image=16, tubelet=(2, 8, 8), dim=32,
                                        heads=2, depth=2, temporal_depth=1, classes=5, device=dev)
        assert bp.n_params(ours) == bp.n_params(theirs)
        acts = [m for m in theirs.modules() if isinstance(m, torch.nn.GELU)]
        assert acts and all(m.approximate == "tanh" for m in acts)  # ours: tanh-GELU too
        x = torch.randn(2, 3, 4, 16, 16)
        assert theirs(x).shape == ours(x).shape == (2, 5)
    ours, theirs, _ = bp.navit_pair(dim=32, heads=2, depth=2, patch=4, max_size=16, seq_len=16,
                                    classes=5, device=dev)
    assert bp.n_params(ours) == bp.n_params(theirs)
    images = [torch.rand(3, 8, 16), torch.rand(3, 16, 16), torch.rand(3, 4, 8)]
    assert bp.PeerNaViT(theirs, 16)(images).shape == ours(images).shape == (3, 5)


def test_peer_report_from_several_processes(bp, tmp_path):
    """Each process runs the whole comparison (fresh heap, fresh kernels); the report gives
    the medians, every process's ratio, and the paired ratio with its rounds."""
    out = tmp_path / "peer" / "README.md"
    assert bp.main(["--models", "m3", "--processes", "2", "--rounds", "2", "--warmup", "1",
                    "--frames", "4", "--image-size", "16", "--tubelet", "2", "8", "8", "--dim", "32",
                    "--heads", "2", "--depth", "1", "--classes", "5", "--batch-size", "2",
                    "--out", str(out)]) == 0
    r = json.loads((out.parent / "results.json").read_text())
    (row,) = r["rows"]
    assert r["processes"] == 2 and row["model"] == "ViViT Model 3"
    for mode in ("train", "infer"):
        each = row[f"{mode}_ratio_per_process"]
        assert len(each) == 2 and all(v > 0 for v in each)
        assert row[f"{mode}_ratio"] == pytest.approx(sum(each) / 2)  # median of two
        assert 0 <= row[f"{mode}_rounds_faster"] <= 4 and row[f"{mode}_paired_ratio"] > 0
        assert len(row[f"{mode}_settle_rounds_per_process"]) == 2 and 0 <= row[f"{mode}_unsettled"] <= 2
        assert all(1 <= k <= 10 for k in row[f"{mode}_settle_rounds_per_process"])  # --settle's default
        for who in ("ours", "theirs"):
            assert 0 <= row[f"{who}_{mode}_faults_median"] <= row[f"{who}_{mode}_faults_max"]
    text = out.read_text()
    assert "--processes 2" in text and "2 fresh processes" in text and "Per process, in the order" in text
    assert "untimed rounds more until no step faulted" in text and "| ViViT Model 3 | train |" in text
    assert len(row["ours_train_step_ms_median_per_process"]) == 2


def test_peer_floor_measures_both_sides_gemms(bp, tmp_path):
    """--floor: each side's GEMM floor per mode, the same matmul calls on both sides (one
    design), and the table in the report."""
    out = tmp_path / "peer" / "README.md"
    assert bp.main(["--models", "m2", "--rounds", "1", "--warmup", "0", "--frames", "4",
                    "--image-size", "16", "--tubelet", "2", "8", "8", "--dim", "32", "--heads", "2",
                    "--depth", "1", "--temporal-depth", "1", "--classes", "5", "--batch-size", "2",
                    "--attn", "sdpa", "--floor", "--out", str(out)]) == 0
    (row,) = json.loads((out.parent / "results.json").read_text())["rows"]
    for mode in ("train", "infer"):
        for who in ("ours", "theirs"):
            assert 0 < row[f"{who}_{mode}_gemm_floor_ms"]
            assert f"{who}_{mode}_gemm_in_step_only" not in row
        assert row[f"ours_{mode}_gemm_calls"] == row[f"theirs_{mode}_gemm_calls"] > 0
        assert row[f"{mode}_ratio_ceiling"] > 0
        for who in ("ours", "theirs"):
            k = f"{who}_{mode}_gemm"
            assert 0 < row[f"{k}_share"] and row[f"{k}_step_ms"] > 0 and f"{k}_other_ms" in row
    text = out.read_text()
    assert "Where the step goes" in text and "| ViViT Model 2 | train |" in text


def test_packing_study_reports_the_in_trial_ratio_beside_the_across_trial_one(tmp_path, shared_runs):
    """speed_packing's smoke profile end to end: the pack trial's paired speedup against its
    pad copy, over the ideal it logged for that copy, is what the ratio table shows."""
    import numpy as np
    import pandas as pd
    import yaml
    raw = yaml.safe_load((STUDIES / "speed_packing.yaml").read_text())
    raw["name"] = "speed_packing_test"
    path = tmp_path / "speed_packing_test.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_cli("run", path, "--profile", "smoke", "--runs-dir", shared_runs, "--quiet") == 0
    out = tmp_path / "report"
    assert run_cli("report", path, "--profile", "smoke", "--runs-dir", shared_runs, "--out", out) == 0
    csv = pd.read_csv(out / "results.csv")
    pack = csv[csv["batching"] == "pack"].iloc[0]
    pad = csv[csv["batching"] == "pad"].iloc[0]
    assert np.isnan(pad["train_speedup_vs_reference"])  # pad's reference is itself: skipped
    assert pack["reference_tokens_per_real_token"] == pytest.approx(pad["tokens_per_real_token"])
    md = (out / "README.md").read_text()
    assert "in-trial `train_speedup_vs_reference`" in md
    lines = md.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("**pack vs pad, training"))
    row = lines[head + 4]  # title, blank, header, rule, then the skew-2 row
    assert row.startswith("| 2.0 | 1 | "), row
    cells = [c.strip() for c in row.strip("|").split("|")]
    # the table rounds the full value, the CSV holds 6 significant digits of it
    assert cells[7] in roundings(pack["train_speedup_vs_reference"], ".3g", 5e-6)
    judged = pack["train_speedup_vs_reference"] / pack["reference_tokens_per_real_token"]
    assert cells[8] in roundings(judged, ".0%", 5e-6)
    assert cells[9].count("met") == 2 and " / " in cells[9]
    # a benchmark trains nothing: no empty loss-curve plot, and no link to one
    assert not (out / "loss_curves.png").exists() and "loss_curves.png" not in md
    assert "loss_curves.png" not in (out / "report.html").read_text()


@pytest.mark.parametrize("argv, says", [(["--model", "1"], "--model must be 2 or 3, got 1"),
                                        (["--steps", "0"], "--steps must be >= 1, got 0"),
                                        (["--warmup", "-1"], "--warmup must be >= 0, got -1")])
def test_profile_peer_step_refuses_bad_input_before_building(argv, says, capsys):
    """scripts/profile_peer_step.py: a bad model or count stops with exit 2 before either
    model is built or a step profiled."""
    with pytest.raises(SystemExit) as e:
        load_script("profile_peer_step").main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2 and says in out.err and "=====" not in out.out


def test_profile_peer_step_profiles_both_sides_of_the_bench_pair(bp, capsys):
    """One profiled training step of ours and of vit-pytorch's Model 3, built as the bench
    builds them: each side's table names its GEMMs; the peer's attention is fused SDPA, ours
    takes this CPU's default path (batched matmuls on AMD, SDPA on Intel)."""
    from harness.metrics import cpu_attention
    argv = ["--model", "3", "--steps", "1", "--warmup", "0", "--top", "40"]
    assert load_script("profile_peer_step").main(argv) == 0
    out = capsys.readouterr().out
    ours, theirs = out.split("===== theirs: ViViT Model 3, 1 training steps")
    assert ours.startswith("===== ours: ViViT Model 3, 1 training steps")
    for side in (ours, theirs):
        assert "aten::mm" in side and "aten::addmm" in side
    assert "scaled_dot_product" in theirs
    assert ("aten::bmm" if cpu_attention.path() == "matmul" else "scaled_dot_product") in ours
