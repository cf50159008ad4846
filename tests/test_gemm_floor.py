"""harness.metrics.gemm_floor: a step's matrix multiplies, recorded and re-run alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.metrics import cpu_matmul, gemm_floor
from variants import common


def test_records_every_gemm_of_a_training_step_once_and_rebuilds_each():
    """A two-layer MLP trained one step: 2 forward GEMMs (addmm), 4 backward (mm: input and
    weight grads of each layer, the first layer's input grad included); a convolution
    counts once (its inner GEMM is not counted again); keyword-only scalars (addmm's beta)
    and transposed operands are rebuilt as recorded."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w1, w2 = torch.randn(48, 32, requires_grad=True), torch.randn(16, 48, requires_grad=True)
    b1, b2 = torch.zeros(48, requires_grad=True), torch.zeros(16, requires_grad=True)
    im, k = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 4, 4)
    c = torch.randn(48)

    def step():
        F.linear(F.relu(F.linear(x, w1, b1)), w2, b2).sum().backward()
        F.conv2d(im, k, stride=4)
        torch.addmm(c, x.detach(), w1.detach().t(), beta=0.5)

    calls, in_step = gemm_floor.record(step)
    names = sorted(key[0] for key in calls.elements())
    assert names == ["aten::addmm"] * 3 + ["aten::convolution"] + ["aten::mm"] * 4
    assert set(in_step) == set(calls) and all(v > 0 for v in in_step.values())
    beta = [key for key in calls if key[0] == "aten::addmm" and 0.5 in key[4]]
    assert len(beta) == 1  # addmm's keyword-only beta, recorded as a scalar argument
    for key in calls:  # each rebuilt with the recorded layout, and runs
        assert gemm_floor.replay_seconds(key, torch.device("cpu"), repeats=1, warmup=0) > 0
    f = gemm_floor.floor(step, rounds=2)
    assert f["calls"] == 8 and f["distinct"] == len(calls) and f["in_step_only"] == []
    assert f["floor_s"] > 0 and f["in_step_s"] > 0


def test_rebuilt_arguments_keep_the_recorded_strides_and_scalars():
    key = ("aten::addmm", ((4,), (3, 5), (5, 4), (), ()), ((1,), (5, 1), (1, 5), (), ()),
           ("float", "float", "float", "Scalar", "Scalar"), (None, None, None, 0.5, 1))
    args = gemm_floor._args(key, torch.device("cpu"))
    assert [a.stride() for a in args[:3]] == [(1,), (5, 1), (1, 5)]  # the transposed operand too
    assert [a.shape for a in args[:3]] == [(4,), (3, 5), (5, 4)] and args[3:] == [0.5, 1]
    bad = ("aten::mm", ((2, 2), (2, 2)), ((2, 1), (2, 1)), ("float", "Device"), (None, None))
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        gemm_floor._args(bad, torch.device("cpu"))


def test_a_step_without_matmuls_has_no_floor():
    x = torch.randn(1000)
    f = gemm_floor.floor(lambda: (x.exp() + 1).sum())
    assert (f["floor_s"], f["in_step_s"], f["calls"], f["distinct"], f["share"]) == (0, 0, 0, 0, 0)
    assert f["in_step_only"] == [] and f["other_s"] == f["step_s"] > 0


def test_a_call_that_cannot_be_rerun_counts_by_its_time_in_the_step(monkeypatch):
    a, b = torch.randn(64, 64), torch.randn(64, 64)

    def refuse(name, args):
        raise ValueError(f"{name}: not here")
    monkeypatch.setattr(gemm_floor, "_call", refuse)
    f = gemm_floor.floor(lambda: (a @ b, a @ b))
    assert f["calls"] == 2 and f["floor_s"] == pytest.approx(f["in_step_s"])
    assert len(f["in_step_only"]) == 1 and f["in_step_only"][0].startswith("2 x aten::mm")


@pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="this torch build has no oneDNN linear")
def test_onednn_linears_are_recorded_and_rerun(monkeypatch):
    """oneDNN's linear (its string arguments are not recorded: the op's fixed ones are used)."""
    monkeypatch.setattr(cpu_matmul, "ONEDNN_MIN_FEATURES", 1)
    old = cpu_matmul.set_path("onednn")
    try:
        lin = common.Linear(32, 48)
        x = torch.randn(64, 32, requires_grad=True)
        step = lambda: lin(x).sum().backward()  # noqa: E731
        calls, _ = gemm_floor.record(step)
        f = gemm_floor.floor(step, rounds=2)
    finally:
        cpu_matmul.set_path(old)
    assert {key[0] for key in calls} == {"mkldnn::_linear_pointwise"}
    assert f["calls"] == 3 and f["in_step_only"] == [] and f["floor_s"] > 0


def test_a_gemm_two_steps_share_is_timed_once_for_both():
    a, b, c = torch.randn(96, 64), torch.randn(64, 80), torch.randn(80, 64)
    f = gemm_floor.floors({"one": lambda: a @ b, "two": lambda: (a @ b, a @ b),
                           "other": lambda: (a @ b, (a @ b) @ c)}, rounds=3)
    assert f["two"]["floor_s"] == pytest.approx(2 * f["one"]["floor_s"])
    assert f["other"]["floor_s"] > f["one"]["floor_s"] and f["other"]["distinct"] == 2


def test_sdpas_fused_kernels_are_in_the_floor():
    """SDPA's fused kernels carry attention's matmuls (which the FLOP count includes): they
    are in the floor, forward and backward, re-run alone with their optional arguments."""
    q, k, v = (torch.randn(2, 3, 64, 32, requires_grad=True) for _ in range(3))
    mask = torch.rand(64, 64) > 0.2

    def step():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    calls, _ = gemm_floor.record(step)
    names = {key[0] for key in calls}
    assert len(names) == 2 and all("scaled_dot_product" in n for n in names)
    assert any(n.endswith("_backward") for n in names)
    f = gemm_floor.floor(step, rounds=2)
    assert f["calls"] == 2 and f["in_step_only"] == [] and f["floor_s"] > 0


def test_profiling_a_step_leaves_stderr_to_the_step(capfd):
    """torch's Kineto prints a 'USDT:... profiler_start' and '... profiler_stop' line to fd 2
    at every profiler start and stop; recording a step (and ``op_profile``) drops those two,
    while what the step itself writes there, and any other line at start or stop, stays."""
    import os

    from harness.metrics import speed
    x = torch.randn(16, 16)

    def step():
        os.write(2, b"the step's own line\n")
        torch.mm(x, x)

    calls, _ = gemm_floor.record(step)
    speed.op_profile(step, torch.device("cpu"), steps=1)
    assert sum(calls.values()) == 1
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "profiler_stop" not in err and "USDT" not in err
    assert err.count("the step's own line\n") == 2
    with speed._kineto_lines_dropped():
        os.write(2, b"USDT:2026-12-04 04:28:28 6645:6645 SyncActivityProfilerHandler.cpp:52] "
                    b"profiler_start\nan error of its own\n")
    assert capfd.readouterr().err == "an error of its own\n"
