"""Each family's task runs through the real engine and logs what its report needs."""
import mlflow
import pytest

from harness import cli


def run(tmp_path, shared_runs, text, name):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    assert cli.main(["run", str(p), "--runs-dir", str(shared_runs), "--quiet"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{shared_runs / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=[name])
    return df[df["tags.harness.kind"] == "trial"]


def test_dit_smoke_study_logs_fid_cond_acc_and_gflops(tmp_path, shared_runs):
    kids = run(tmp_path, shared_runs, """
name: dit_tiny
question: Does the engine run the diffusion task end to end?
task:
  name: diffusion
  options: {batch_size: 16, num_samples: 20, sample_steps: 4, sample_batch_size: 20, max_real: 200,
            grid_per_class: 1}
data: {name: digits, options: {image_size: 8, value_range: symmetric}}
model:
  variant: dit-s/4
  config: {depth: 1, hidden_size: 32, num_heads: 2, learn_sigma: true}
sweep:
  conditioning: [in_context, adaln_zero]
repeats: 1
budget: {steps: 3, eval_every: 3, speed_steps: 1}
objectives: [{metric: fid_digits_cnn, direction: minimize}]
pruner: none
device: cpu
""", "dit_tiny")
    assert len(kids) == 2 and set(kids["status"]) == {"FINISHED"}
    for col in ("metrics.fid_digits_cnn", "metrics.cond_acc", "metrics.gflops_fwd", "metrics.params_m"):
        assert kids[col].notna().all() and (kids[col] >= 0).all(), col
    client = mlflow.tracking.MlflowClient()
    arts = {a.path for a in client.list_artifacts(kids.iloc[0]["run_id"])}
    assert any(a.endswith(".png") for a in arts), arts


def test_navit_study_logs_padding_and_wasted_flops(tmp_path, shared_runs):
    kids = run(tmp_path, shared_runs, """
name: navit_tiny
question: Does packing waste less than padding?
task: {name: classify, options: {batch_size: 16, eval_batch_size: 64, log_every: 1}}
data: {name: varres_digits, options: {min_size: 8, max_size: 16, size_step: 4}}
model:
  variant: navit-ti
  config: {depth: 1, hidden_size: 16, num_heads: 2, patch_size: 4, max_grid: 4, max_seq_len: 64}
sweep:
  batching: [pad, pack]
repeats: 1
budget: {steps: 2, eval_every: 2, speed_steps: 1}
objectives: [{metric: accuracy, direction: maximize}]
report_metrics: [padding_fraction, gflops_wasted_fwd]
pruner: none
device: cpu
""", "navit_tiny").set_index("tags.axis.batching")
    for col in ("metrics.padding_fraction", "metrics.images_per_pack", "metrics.gflops_useful_fwd",
                "metrics.gflops_wasted_fwd", "tags.impl.attn_path"):
        assert kids[col].notna().all(), col
    assert kids.loc["pack", "metrics.padding_fraction"] < kids.loc["pad", "metrics.padding_fraction"]
    assert kids.loc["pack", "metrics.gflops_wasted_fwd"] < kids.loc["pad", "metrics.gflops_wasted_fwd"]


def test_vivit_study_runs_all_four_models(tmp_path, shared_runs):
    kids = run(tmp_path, shared_runs, """
name: vivit_tiny
question: Do all four ViViT models train through the engine?
task: {name: classify, options: {batch_size: 16, eval_batch_size: 64}}
data: {name: moving_digits, options: {image_size: 16, num_frames: 4, digits: [0, 1, 2], num_train: 64, num_test: 32}}
model:
  variant: vivit-ti
  config: {depth: 1, hidden_size: 16, num_heads: 2, temporal_layers: 1, tubelet_size: [2, 8, 8], pooling: mean}
sweep:
  model: [1, 2, 3, 4]
repeats: 1
budget: {steps: 2, eval_every: 2, speed_steps: 1}
objectives: [{metric: accuracy, direction: maximize}]
pruner: none
device: cpu
""", "vivit_tiny")
    assert len(kids) == 4 and set(kids["status"]) == {"FINISHED"}
    assert kids["metrics.top5_accuracy"].notna().all()  # 12 classes: top-5 is reported
    k = kids.set_index("tags.axis.model")
    assert k.loc["4", "metrics.params_m"] == k.loc["1", "metrics.params_m"]  # same weights, split heads
    assert k.loc["4", "metrics.gflops_attn_fwd"] < k.loc["1", "metrics.gflops_attn_fwd"]
