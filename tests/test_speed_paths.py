"""The fast paths give the numbers of the plain ones: oneDNN linears (eager and compiled),
the CPU linear path's rule and override, the fused tanh-GELU (values, gradients, fallback,
override), DiT's fused adaLN ops, the CPU malloc settings / memory counter, and the short CPU
attention path (values, gradients, when it applies, FLOP counting, override)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.metrics import cpu_attention, cpu_gelu, cpu_malloc, cpu_matmul, cpu_mkl
from harness.metrics.speed import SpeedOptions, measure_speed
from variants import common
from variants.dit import gated, modulate

from .conftest import needs_compile, run_cli


needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(),
                                  reason="this torch build has no oneDNN linear")


@pytest.fixture(params=cpu_matmul.ONEDNN_PATHS)
def onednn_path(request, monkeypatch):
    """Force each oneDNN path whatever this CPU's default is, so every path is tested, with
    the narrow-layer cut lifted (the layers here are small)."""
    monkeypatch.setattr(cpu_matmul, "ONEDNN_MIN_FEATURES", 1)
    old = cpu_matmul.set_path(request.param)
    yield request.param
    cpu_matmul.set_path(old)


@needs_onednn
@pytest.mark.parametrize("path", cpu_matmul.ONEDNN_PATHS)
def test_narrow_layers_take_f_linear_on_every_path(path):
    """Below ONEDNN_MIN_FEATURES in or out features the oneDNN path's per-call cost loses to
    F.linear (docs/speed.md), so such layers skip it; a layer at the cut takes it."""
    cut = cpu_matmul.ONEDNN_MIN_FEATURES
    with cpu_matmul.using_path(path):
        x = torch.randn(4, cut)
        assert common._use_onednn(x, torch.randn(cut, cut))
        assert not common._use_onednn(x, torch.randn(cut - 1, cut))      # narrow output
        assert not common._use_onednn(torch.randn(4, cut - 1), torch.randn(4 * cut, cut - 1))


@needs_onednn
def test_layer_timings_cover_every_path_and_restore_the_cut():
    cut = cpu_matmul.ONEDNN_MIN_FEATURES
    (row,) = cpu_matmul.compare_layers(8, [(16, 24)], reps=2)
    assert {p for p in cpu_matmul.CHOICES if row.get(p, 0) > 0} == set(cpu_matmul.CHOICES)
    assert cpu_matmul.ONEDNN_MIN_FEATURES == cut


@needs_onednn
@pytest.mark.parametrize("k,n", [(24, 72), (72, 24), (32, 32)])  # both weight-grad branches
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_forward_and_backward(k, n, bias, onednn_path):
    torch.manual_seed(0)
    lin = common.Linear(k, n, bias=bias)
    x = torch.randn(3, 5, k, requires_grad=True)
    y = lin(x)
    gy = torch.randn_like(y)
    gx, gw, *gb = torch.autograd.grad(y, [x, lin.weight, *([lin.bias] if bias else [])], gy)
    x2 = x.detach().clone().requires_grad_()
    y2 = F.linear(x2, lin.weight, lin.bias)
    rx, rw, *rb = torch.autograd.grad(y2, [x2, lin.weight, *([lin.bias] if bias else [])], gy)
    assert y.shape == (3, 5, n)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(gb[0], rb[0], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linear_is_used_on_cpu_fp32_only(onednn_path):
    w = torch.randn(4, 3)
    assert common._use_onednn(torch.randn(2, 3), w)
    assert not common._use_onednn(torch.randn(2, 3, dtype=torch.float64), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not common._use_onednn(torch.randn(2, 3), w)


@needs_onednn
def test_mm_wgrad_path_takes_the_weight_gradient_off_onednn(onednn_path, monkeypatch):
    """On ``onednn-mm-wgrad`` the weight gradient is ``torch.mm``'s, on ``onednn`` oneDNN's
    (``_weight_grad``): with that function broken, only the first still trains."""
    def broken(*args, **kwargs):
        raise AssertionError("oneDNN weight gradient called")
    monkeypatch.setattr(common, "_weight_grad", broken)
    lin = common.Linear(8, 12)
    loss = lin(torch.randn(4, 8)).square().sum()
    if onednn_path == "onednn-mm-wgrad":
        loss.backward()
        assert lin.weight.grad is not None and lin.weight.grad.shape == (12, 8)
    else:
        with pytest.raises(AssertionError, match="oneDNN weight gradient"):
            loss.backward()


def test_aten_path_never_takes_onednn():
    old = cpu_matmul.set_path("aten")
    try:
        assert not common._use_onednn(torch.randn(2, 3), torch.randn(4, 3))
    finally:
        cpu_matmul.set_path(old)


def _path_in_subprocess(choice, env_value: str | None) -> subprocess.CompletedProcess:
    """``choice.path()`` in a fresh process, with its environment variable unset or set."""
    env = {k: v for k, v in os.environ.items() if k not in (choice.ENV, "HARNESS_CPU_MKL")}
    if env_value is not None:
        env[choice.ENV] = env_value
    name = choice.__name__.rsplit(".", 1)[-1]
    return subprocess.run([sys.executable, "-c", f"from harness.metrics import {name}; "
                           f"print({name}.path())"], env=env, capture_output=True, text=True)


def test_cpu_linear_default_follows_the_vendor_rule_and_the_env_override():
    r = _path_in_subprocess(cpu_matmul, None)
    assert r.returncode == 0, r.stderr
    onednn = (cpu_matmul.cpu_vendor() not in ("GenuineIntel", "")
              and "avx512f" in cpu_matmul.cpu_flags()
              and cpu_matmul.onednn_available() and os.uname().machine == "x86_64")
    zen4 = cpu_matmul.cpu_vendor() == "AuthenticAMD" and cpu_matmul.cpu_family() == 25
    rule = ("onednn-mm-wgrad" if zen4 else "onednn") if onednn else "aten"
    if cpu_mkl.mode() == "avx512":  # the subprocess, like this one, took MKL's AVX-512 code
        rule = "aten"
    assert r.stdout.strip() == rule
    assert _path_in_subprocess(cpu_matmul, "aten").stdout.strip() == "aten"
    bad = _path_in_subprocess(cpu_matmul, "mkl")
    assert bad.returncode != 0 and "HARNESS_CPU_LINEAR='mkl'" in bad.stderr and "aten, onednn" in bad.stderr
    with pytest.raises(ConfigError, match="must be one of aten, onednn"):
        cpu_matmul.set_path("blas")


@pytest.mark.parametrize("vendor,family,flags,mkl,want", [
    ("AuthenticAMD", 26, {"avx2", "avx512f"}, "vendor", "onednn"),           # Zen 5, MKL's AVX2 code
    ("AuthenticAMD", 25, {"avx2", "avx512f"}, "vendor", "onednn-mm-wgrad"),  # Zen 4: MKL's weight grads win
    ("AuthenticAMD", 26, {"avx2", "avx512f"}, "avx512", "aten"),  # MKL's AVX-512 code (the default)
    ("AuthenticAMD", 25, {"avx2", "avx512f"}, "avx512", "aten"),
    ("AuthenticAMD", 25, {"avx2"}, "vendor", "aten"),  # Zen 3, or a Zen 4 with AVX-512 hidden: MKL
    ("GenuineIntel", 6, {"avx2", "avx512f"}, "vendor", "aten"),              # MKL runs AVX-512 on Intel
    ("", None, set(), "vendor", "aten"),                                     # no /proc/cpuinfo
])
def test_cpu_linear_rule_table(monkeypatch, vendor, family, flags, mkl, want):
    # an x86 machine whose torch build has oneDNN, whatever runs the test
    monkeypatch.setattr(cpu_mkl, "mode", lambda: mkl)
    monkeypatch.setattr(cpu_matmul.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_matmul, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_matmul, "cpu_family", lambda: family)
    monkeypatch.setattr(cpu_matmul, "cpu_flags", lambda: frozenset(flags))
    assert cpu_matmul._rule() == want


def test_cpu_flags_reads_proc_cpuinfo():
    flags = cpu_matmul.cpu_flags()
    if os.path.exists("/proc/cpuinfo") and os.uname().machine == "x86_64":
        assert "sse2" in flags    # every x86-64 CPU has it
    assert isinstance(flags, frozenset)


def test_harness_cli_rejects_a_bad_cpu_linear_before_any_work(tmp_path):
    env = {**os.environ, cpu_matmul.ENV: "fast"}
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "studies/vit_digits.yaml",
                        "--profile", "smoke", "--runs-dir", str(tmp_path / "runs")],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode != 0
    assert "HARNESS_CPU_LINEAR='fast'" in r.stderr and "aten, onednn" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path", ["aten", *(pytest.param(p, marks=needs_onednn)
                                           for p in cpu_matmul.ONEDNN_PATHS)])
def test_compiled_linear_matches_eager(path, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "ONEDNN_MIN_FEATURES", 1)  # the layers here are small
    old = cpu_matmul.set_path(path)
    try:
        _compiled_linear_matches_eager()
    finally:
        cpu_matmul.set_path(old)


def _compiled_linear_matches_eager():
    torch.manual_seed(0)
    mlp = common.Mlp(16, 48)
    x = torch.randn(2, 7, 16)
    compiled = torch.compile(mlp)
    y, yc = mlp(x), compiled(x)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.square().sum(), mlp.fc1.weight)[0]
    gc = torch.autograd.grad(compiled(x).square().sum(), mlp.fc1.weight)[0]
    torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-5)


def test_dit_fused_adaln_ops_equal_the_papers_formulas():
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    shift, scale, gate = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(modulate(x, shift, scale),
                               x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
    torch.testing.assert_close(gated(x, gate, y), x + gate.unsqueeze(1) * y)


def test_malloc_counter_sees_a_live_tensor():
    before = cpu_malloc.in_use_bytes()
    if before is None:
        pytest.skip("no glibc mallinfo2 here: CPU peak memory falls back to resident memory")
    t = torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB
    during = cpu_malloc.in_use_bytes()
    del t
    assert during - before >= 60 * 2**20


def _mode_in_subprocess(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_MALLOC"}
    if env_value is not None:
        env["HARNESS_MALLOC"] = env_value
    code = "from harness.metrics import cpu_malloc; print(cpu_malloc.tune(), cpu_malloc.mode())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_malloc_settings_apply_once_and_can_be_turned_off():
    tuned = _mode_in_subprocess(None)
    assert tuned in ("tuned tuned", "unavailable unavailable")
    assert _mode_in_subprocess("system") == "system system"


def test_cpu_speed_records_malloc_mode_and_memory_from_an_extra_step():
    model = common.Mlp(256, 1024)
    model.example_inputs = lambda b, device=None, generator=None: (
        torch.randn(b, 512, 256, generator=generator),)
    model.bench_loss = lambda out: out.square().mean()
    model.tokens_per_sample = lambda: 512
    r = measure_speed(model, SpeedOptions(batch_size=4, warmup=1, steps=2), "cpu")
    assert r["malloc"] == cpu_malloc.mode()
    assert r["peak_mem_source"] in ("cpu_malloc_in_use", "cpu_rss_growth")
    if r["peak_mem_source"] == "cpu_malloc_in_use":
        # a train step holds at least the (4, 512, 1024) fp32 hidden activation (8 MiB)
        assert r["train_peak_mem_mb"] >= 8
    assert r["train_samples_per_s"] > 0 and r["infer_samples_per_s"] > 0


# ------------------------------------------------------------ tanh-GELU

def _path_setter(choice):
    """A function that sets ``choice``'s path for one test; the first path comes back after."""
    olds = []
    yield lambda name: olds.append(choice.set_path(name))
    if olds:
        choice.set_path(olds[0])


@pytest.fixture
def gelu_path():
    yield from _path_setter(cpu_gelu)


@needs_compile
def test_fused_tanh_gelu_equals_torchs_values_and_gradients(gelu_path):
    gelu_path("fused")
    torch.manual_seed(0)
    act = common.tanh_gelu()
    assert isinstance(act, nn.GELU) and act.approximate == "tanh"
    n = cpu_gelu.FUSED_MIN_NUMEL
    x = torch.cat([torch.randn(n) * 3, torch.linspace(-30, 30, 1008)]).view(-1, 16)
    assert common._use_fused_gelu(x)
    for inp in (x, x.t()):  # contiguous and transposed
        inp = inp.detach().requires_grad_()
        y = act(inp)
        assert y.grad_fn is not None and "FusedGeluTanh" in type(y.grad_fn).__name__
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, inp, g)
        ref_in = inp.detach().requires_grad_()
        ref = F.gelu(ref_in, approximate="tanh")
        (gref,) = torch.autograd.grad(ref, ref_in, g)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx, gref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(act(x), F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(n for n, _ in f.next_functions)
    return names


def _mlp_and_reference(x, mlp):
    """(mlp(x), the same MLP from torch's own F.linear / F.gelu) with every gradient."""
    params = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    y = mlp(x)
    ref = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias), approximate="tanh"),
                   mlp.fc2.weight, mlp.fc2.bias)
    g = torch.randn_like(y)
    return y, ref, torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)


@needs_compile
def test_mlp_adds_fc1s_bias_inside_the_fused_gelu(gelu_path):
    """On the fused path with torch's GEMM, fc1 runs without its bias and the GELU's pass
    adds it: the same values and gradients (fc1's bias included) as F.linear + F.gelu."""
    gelu_path("fused")
    old = cpu_matmul.set_path("aten")
    try:
        torch.manual_seed(0)
        mlp = common.Mlp(64, 256, act=common.tanh_gelu)
        with torch.no_grad():
            mlp.fc1.bias.normal_()  # a bias that matters
        x = torch.randn(4, 300, 64, requires_grad=True)  # 307,200 hidden values: fused
        y, ref, grads, ref_grads = _mlp_and_reference(x, mlp)
        assert "_FusedGeluTanhBiasBackward" in _grad_fn_names(y)
        assert "AddmmBackward0" in _grad_fn_names(ref)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        with torch.inference_mode():
            torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-5)
        # no bias, a small hidden layer, or torch's GELU kernel: fc1 keeps its bias (F.linear)
        w = mlp.fc1.weight.detach()
        torch.testing.assert_close(common.linear_gelu_tanh(x.detach(), w),
                                   F.gelu(F.linear(x.detach(), w), approximate="tanh"),
                                   rtol=1e-5, atol=1e-5)
        small = torch.randn(2, 3, 64, requires_grad=True)
        assert "_FusedGeluTanhBiasBackward" not in _grad_fn_names(mlp(small))
        gelu_path("aten")
        assert "_FusedGeluTanhBiasBackward" not in _grad_fn_names(mlp(x))
    finally:
        cpu_matmul.set_path(old)


@needs_compile
def test_fused_bias_gelu_compiles_once_for_every_width(gelu_path):
    """One compile serves every hidden width, with and without grad: a kernel that
    specialised on the width (a Parameter's shape) or on requires_grad would recompile per
    model, and past dynamo's recompile limit fail outright (fullgraph=True)."""
    gelu_path("fused")
    old = cpu_matmul.set_path("aten")
    try:
        common.fused_gelu_tanh_bias_kernels()
        with torch._dynamo.config.patch(recompile_limit=2):  # restored after, unlike setattr
            _mlps_of_six_widths()
    finally:
        cpu_matmul.set_path(old)


def _mlps_of_six_widths():
    for hidden in (256, 320, 384, 448, 512, 1040):
        mlp = common.Mlp(64, hidden, act=common.tanh_gelu)
        x = torch.randn(4, 300, 64, requires_grad=True)
        y = mlp(x)
        assert "_FusedGeluTanhBiasBackward" in _grad_fn_names(y)
        y.square().mean().backward()
        assert mlp.fc1.bias.grad is not None
        with torch.inference_mode():
            mlp(x)
        with torch.no_grad():
            mlp(x)


@needs_compile
@needs_onednn
def test_mlp_leaves_fc1s_bias_to_onednn(gelu_path, onednn_path):
    """oneDNN's Linears add the bias inside the GEMM: there fc1 keeps it, and the GELU is
    the plain fused one."""
    gelu_path("fused")
    torch.manual_seed(0)
    mlp = common.Mlp(64, 256, act=common.tanh_gelu)
    x = torch.randn(4, 300, 64, requires_grad=True)
    y, ref, grads, ref_grads = _mlp_and_reference(x, mlp)
    names = _grad_fn_names(y)
    assert "_FusedGeluTanhBiasBackward" not in names and "_FusedGeluTanhBackward" in names
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tanh_gelu_takes_torchs_kernel_off_the_fused_path(gelu_path):
    small = torch.randn(4, 8)
    assert not common._use_fused_gelu(small)  # too small to be worth a compile
    big = torch.randn(cpu_gelu.FUSED_MIN_NUMEL)
    assert not common._use_fused_gelu(big.bfloat16())  # bf16 autocast: torch's kernel
    gelu_path("aten")
    assert not common._use_fused_gelu(big)
    torch.testing.assert_close(common.tanh_gelu()(small), F.gelu(small, approximate="tanh"))


@needs_compile
def test_fused_gelu_falls_back_to_torch_once_if_it_cannot_compile(gelu_path, monkeypatch):
    gelu_path("fused")

    def no_compiler():
        raise RuntimeError("no working C++ compiler")
    monkeypatch.setattr(common, "fused_gelu_tanh_kernels", no_compiler)
    x = torch.randn(cpu_gelu.FUSED_MIN_NUMEL)
    with pytest.warns(UserWarning, match="could not be compiled"):
        y = common.gelu_tanh(x)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"))
    assert cpu_gelu.path() == "aten"


def _mlp_flops(rows: int, dim: int, hidden: int) -> int:
    return 2 * rows * dim * hidden * 2 * 3  # two GEMMs, forward + input grad + weight grad


@pytest.mark.parametrize("linear", ["aten", *cpu_matmul.ONEDNN_PATHS])
def test_flop_counter_mode_sees_every_matmul_and_the_fast_paths_survive_it(linear, gelu_path,
                                                                          monkeypatch):
    """torch's FlopCounterMode (a Python dispatch mode) over the MLP, forward and backward,
    on every Linear path and the fused GELU: every GEMM is counted (oneDNN's op was counted
    as 0), nothing fails (compiled kernels refuse to run under a mode), the fused GELU is
    not switched off for the rest of the process, and values and gradients are unchanged,
    also with the mode entered only between the forward and the backward."""
    from torch.utils.flop_counter import FlopCounterMode
    if linear != "aten" and not cpu_matmul.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    fused = cpu_gelu.fused_available()
    gelu_path("fused" if fused else "aten")
    monkeypatch.setattr(cpu_matmul, "ONEDNN_MIN_FEATURES", 1)
    old = cpu_matmul.set_path(linear)
    try:
        torch.manual_seed(0)
        mlp = common.Mlp(64, 256, act=common.tanh_gelu)
        x = torch.randn(4, 300, 64, requires_grad=True)  # 307,200 hidden values: fused
        params = [x, *mlp.parameters()]
        g = torch.randn(4, 300, 64)

        def backward(out):  # .backward: FlopCounterMode does not support autograd.grad
            for p in params:
                p.grad = None
            out.backward(g)
            return [p.grad for p in params]

        y = mlp(x)  # the fast paths, first use outside any mode
        grads = backward(y)
        with FlopCounterMode(display=False) as counter:
            y_seen = mlp(x)
            grads_seen = backward(y_seen)
        assert counter.get_total_flops() == _mlp_flops(1200, 64, 256)
        y_late = mlp(x)  # forward on the fast paths, the mode entered only for the backward
        with FlopCounterMode(display=False) as late:
            grads_late = backward(y_late)
        assert late.get_total_flops() == _mlp_flops(1200, 64, 256) * 2 // 3
        for out in (y_seen, y_late):
            torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)
        for gs in (grads_seen, grads_late):
            for a, b in zip(gs, grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert cpu_gelu.path() == ("fused" if fused else "aten")  # not switched off
        if fused and linear == "aten":  # the fast path is still taken outside the mode
            assert "_FusedGeluTanhBiasBackward" in _grad_fn_names(mlp(x))
    finally:
        cpu_matmul.set_path(old)


@needs_compile
def test_a_warm_fused_mlp_step_builds_no_compile_probe(gelu_path):
    """The compiled kernels are looked up at every call; the probe tensors that compile
    them are built once, not at every call (each cost ~0.2 ms: a 1 MiB linspace)."""
    from torch.profiler import ProfilerActivity, profile
    gelu_path("fused")
    old = cpu_matmul.set_path("aten")
    try:
        mlp = common.Mlp(64, 256, act=common.tanh_gelu)
        x = torch.randn(4, 300, 64, requires_grad=True)
        mlp(x).sum().backward()
        common.gelu_tanh(torch.randn(cpu_gelu.FUSED_MIN_NUMEL)).sum()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = mlp(x)
            y.sum().backward()
            common.gelu_tanh(torch.randn(cpu_gelu.FUSED_MIN_NUMEL))
        assert "_FusedGeluTanhBiasBackward" in _grad_fn_names(y)
        assert not [e.name for e in prof.events() if e.name == "aten::linspace"]
    finally:
        cpu_matmul.set_path(old)


@needs_compile
def test_a_dispatch_mode_at_the_first_fused_call_does_not_switch_the_fused_gelu_off(gelu_path):
    """The first fused call under a dispatch mode runs torch's ops and leaves the kernels to
    compile at the first call outside it (it used to fail there and fall back for good)."""
    from torch.utils.flop_counter import FlopCounterMode
    gelu_path("fused")
    common._GELU_KERNELS.clear()  # as in a fresh process
    x = torch.randn(cpu_gelu.FUSED_MIN_NUMEL)
    with FlopCounterMode(display=False):
        y = common.gelu_tanh(x)
    assert cpu_gelu.path() == "fused" and not common._GELU_KERNELS
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"))
    torch.testing.assert_close(common.gelu_tanh(x), y, rtol=1e-5, atol=1e-5)
    assert "plain" in common._GELU_KERNELS


@needs_compile
def test_cpu_gelu_mlp_benchmark_runs_both_mlps_and_rejects_bad_input(gelu_path, capsys):
    """``python -m harness.metrics.cpu_gelu --mlp``: both arms agree and are timed; bad
    sizes, or a GELU path without the bias kernel, stop it before any timing."""
    gelu_path("fused")
    assert cpu_gelu.main(["--mlp", "64", "256", "--rows", "1024", "--pairs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("paired") == 3 and "forward+backward" in out  # header + two rows
    diff = float(out.rsplit("forward: ", 1)[1].split()[0])
    assert diff < 1e-4
    assert cpu_gelu.main(["--mlp", "64", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert cpu_gelu.main(["--mlp", "64", "256", "--rows", "8"]) == 2  # too small to fuse
    assert "both arms are the same" in capsys.readouterr().err
    gelu_path("aten")
    assert cpu_gelu.main(["--mlp", "64", "256"]) == 2
    assert "runs only on the fused path" in capsys.readouterr().err


def _cli_smoke_run_with(env_var: str, value: str, tmp_path) -> subprocess.CompletedProcess:
    """``harness run`` of the smoke study with ``env_var=value``."""
    return subprocess.run([sys.executable, "-m", "harness.cli", "run", "studies/vit_digits.yaml",
                           "--profile", "smoke", "--runs-dir", str(tmp_path / "runs")],
                          env={**os.environ, env_var: value}, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))


def test_cpu_gelu_default_and_env_override():
    r = _path_in_subprocess(cpu_gelu, None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("fused" if cpu_gelu.fused_available() else "aten")
    assert _path_in_subprocess(cpu_gelu, "aten").stdout.strip() == "aten"
    bad = _path_in_subprocess(cpu_gelu, "fast")
    assert bad.returncode != 0 and "HARNESS_CPU_GELU='fast'" in bad.stderr and "aten, fused" in bad.stderr
    with pytest.raises(ConfigError, match="must be one of aten, fused"):
        cpu_gelu.set_path("sleef")


def test_harness_cli_rejects_a_bad_cpu_gelu_before_any_work(tmp_path):
    r = _cli_smoke_run_with(cpu_gelu.ENV, "fast", tmp_path)
    assert r.returncode != 0 and "HARNESS_CPU_GELU='fast'" in r.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------ short CPU attention

@pytest.fixture
def attn_path():
    yield from _path_setter(cpu_attention)


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def _qkv(B, H, Lq, Lk, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=gen), torch.randn(B, H, Lk, D, generator=gen),
            torch.randn(B, H, Lk, D, generator=gen), torch.randn(B, H, Lq, D, generator=gen))


@pytest.mark.parametrize("mask_kind", ["none", "bool_keys", "bool_full_rows", "additive"])
@pytest.mark.parametrize("lq,lk", [(16, 16), (8, 8), (24, 3), (1, 48)])
def test_matmul_attention_equals_sdpa_values_and_gradients(mask_kind, lq, lk):
    q, k, v, g = _qkv(2, 3, lq, lk, 16)
    gen = torch.Generator().manual_seed(1)
    mask = None
    if mask_kind == "bool_keys":  # NaViT's bucket masks: (B, 1, 1, Lk), True = a real key
        mask = torch.rand(2, 1, 1, lk, generator=gen) > 0.3
        mask[..., 0] = True
    elif mask_kind == "bool_full_rows":  # some query rows may attend to nothing: zeros
        mask = torch.rand(2, 1, lq, lk, generator=gen) > 0.5
        mask[:, :, 0] = False
    elif mask_kind == "additive":
        mask = torch.randn(1, 3, lq, lk, generator=gen)
    ours = _grads(lambda q, k, v: common.matmul_attention(q, k, v, mask), q, k, v, g)
    ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v, g)
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if mask_kind == "bool_full_rows":
        assert (ours[0][:, :, 0] == 0).all()


def _sdpa_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if "scaled_dot_product" in e.key)


def test_attention_takes_the_matmul_path_only_for_short_fp32_cpu_calls(attn_path):
    attn_path("matmul")
    b = -(-cpu_attention.MATMUL_MIN_ROWS // (3 * 16))  # just enough query rows
    short = _qkv(b, 3, 16, cpu_attention.MATMUL_MAX_KEYS, 8)[:3]
    long = _qkv(b, 3, 16, cpu_attention.MATMUL_MAX_KEYS + 1, 8)[:3]
    small = _qkv(b - 1, 3, 16, cpu_attention.MATMUL_MAX_KEYS, 8)[:3]
    assert common._use_matmul_attention(short[0], short[1])
    assert _sdpa_calls(lambda: common.attention(*short)) == 0
    assert _sdpa_calls(lambda: common.attention(*long)) > 0  # long: SDPA's flash kernel
    assert _sdpa_calls(lambda: common.attention(*small)) > 0  # too few rows: one flash call
    bf16 = [t.bfloat16() for t in short]
    assert not common._use_matmul_attention(bf16[0], bf16[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not common._use_matmul_attention(short[0], short[1])
    from harness.metrics.speed import attention_backend
    with attention_backend("math"):  # a forced SDPA backend takes every call
        assert _sdpa_calls(lambda: common.attention(*short)) > 0
    assert cpu_attention.path() == "matmul"
    attn_path("sdpa")
    assert _sdpa_calls(lambda: common.attention(*short)) > 0


def test_heads_of_gives_the_permuted_views_and_one_pass_backward():
    """heads_of: the views permute(2, 0, 3, 1, 4).unbind(0) gives (same values, strides and
    storage), and a backward whose gradient is the same, without the copy back."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3 * 4 * 8, requires_grad=True)
    packed = qkv.view(2, 5, 3, 4, 8)
    new, old = common.heads_of(packed), packed.permute(2, 0, 3, 1, 4).unbind(0)
    for a, b in zip(new, old):
        assert a.shape == b.shape == (2, 4, 5, 8) and a.stride() == b.stride()
        assert a.data_ptr() == b.data_ptr()
    gs = [torch.randn(2, 4, 5, 8) for _ in range(3)]
    (g_new,) = torch.autograd.grad(new, qkv, gs)
    (g_old,) = torch.autograd.grad(old, qkv, gs)
    assert torch.equal(g_new, g_old)
    names = _grad_fn_names(new[0])
    assert "UnbindBackward0" in names and "PermuteBackward0" not in names


def test_flop_counting_traces_sdpa_on_the_matmul_path(attn_path):
    """FLOPs are counted on SDPA (its attention FLOPs), whichever kernel runs."""
    from harness import registry
    from harness.metrics.flops import flops_of
    cfg = {"model": 3, "num_frames": 4, "input_size": 16, "hidden_size": 32, "num_heads": 2,
           "depth": 1, "tubelet_size": [2, 8, 8], "num_classes": 5}
    model, _ = registry.build("vivit-s", cfg, seed=0)
    counts = {}
    for name in ("sdpa", "matmul"):
        attn_path(name)
        counts[name] = flops_of(model)
    assert counts["sdpa"] == counts["matmul"]


def test_vivit_models_give_the_same_outputs_and_gradients_on_both_paths(attn_path, monkeypatch):
    from harness import registry
    calls = []
    real = common.matmul_attention
    monkeypatch.setattr(common, "matmul_attention", lambda *a: (calls.append(1), real(*a))[1])
    for m in (2, 3, 4):  # batch 32: 4096 query rows in the spatial calls
        cfg = {"model": m, "num_frames": 8, "input_size": 32, "hidden_size": 16, "num_heads": 4,
               "depth": 1, "temporal_layers": 1, "tubelet_size": [2, 8, 8], "num_classes": 5}
        model, _ = registry.build("vivit-s", cfg, seed=0)
        x = torch.randn(32, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
        res = {}
        for name in ("sdpa", "matmul"):
            attn_path(name)
            calls.clear()
            model.zero_grad(set_to_none=True)
            out = model(x)
            out.square().sum().backward()
            res[name] = (out.detach(), [p.grad.clone() for p in model.parameters()])
            assert bool(calls) == (name == "matmul"), (m, name)
        torch.testing.assert_close(res["sdpa"][0], res["matmul"][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(res["sdpa"][1], res["matmul"][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("vendor, rule", [("GenuineIntel", "sdpa"), ("AuthenticAMD", "matmul"),
                                          ("", "matmul")])
def test_cpu_attention_rule_is_sdpa_on_intel_and_matmul_elsewhere(monkeypatch, vendor, rule):
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: vendor)
    assert cpu_attention._rule() == rule


def test_cpu_attention_default_env_override_and_cli_check(tmp_path):
    expected = "sdpa" if cpu_matmul.cpu_vendor() == "GenuineIntel" else "matmul"
    assert _path_in_subprocess(cpu_attention, None).stdout.strip() == expected
    assert _path_in_subprocess(cpu_attention, "sdpa").stdout.strip() == "sdpa"
    bad = _path_in_subprocess(cpu_attention, "flash")
    assert bad.returncode != 0 and "HARNESS_CPU_ATTENTION='flash'" in bad.stderr
    with pytest.raises(ConfigError, match="must be one of sdpa, matmul"):
        cpu_attention.set_path("fast")
    r = _cli_smoke_run_with(cpu_attention.ENV, "flash", tmp_path)
    assert r.returncode != 0 and "HARNESS_CPU_ATTENTION='flash'" in r.stderr
    assert not (tmp_path / "runs").exists()


@needs_compile
def test_timed_compiled_paths_run_compiled_or_fail_never_eager(graphs_only):
    """``speed.compiled``: a study's trials share one process and dynamo's cache of graphs per
    code object (8 by default), which the packing study's compiled blocks outgrew after five
    trials and then ran eager with only a log line.  Twelve graphs of one function now all
    compile; a graph break is an error, not a silent eager frame."""
    from torch._dynamo.utils import counters
    from harness.metrics.speed import RECOMPILE_LIMIT, compiled

    def step(x, arm: str):  # one graph per arm: dynamo guards on the string
        return x * 2 + 1 if arm else x

    torch._dynamo.reset()
    counters.clear()
    run = compiled(step)
    x = torch.ones(4)
    for i in range(12):
        assert torch.equal(run(x, f"arm{i}"), torch.full((4,), 3.0))
    assert counters["stats"]["unique_graphs"] == 12 and not counters["graph_break"]
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT > 12

    def breaks(x):
        print("host side effect")  # a graph break
        return x + 1

    with pytest.raises(Exception, match="print|graph break|Unsupported"):
        compiled(breaks)(x)


@needs_compile
def test_compiled_blocks_trace_when_their_first_call_picks_the_kernel_paths(monkeypatch):
    """The CPU kernel paths are resolved once per process, reading files; a process whose
    first model call was compiled (``python -m harness.bench_packing --compile-blocks``)
    resolved them inside the trace, and the blocks fell back to eager at that graph break."""
    from variants.navit import NaViT, NaViTConfig
    for module in (cpu_matmul, cpu_gelu, cpu_attention):
        monkeypatch.setattr(module._choice, "_path", None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NaViT(NaViTConfig(hidden_size=32, depth=1, num_heads=2, patch_size=4, max_grid=8,
                              max_seq_len=64, compile_blocks=True))
    out = model([torch.rand(1, 16, 8), torch.rand(1, 8, 12)])
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert cpu_matmul._choice._path is not None  # resolved before the compiled call


@pytest.mark.parametrize("study, unset", [("speed_packing", "set compile_blocks false"),
                                          ("speed_paths", "set task.compile false")])
def test_compiling_on_a_cpu_without_a_cxx_compiler_stops_before_any_store(study, unset, tmp_path,
                                                                          monkeypatch, capsys):
    """Inductor builds CPU kernels with a C++ compiler ($CXX alone where it is set): without
    one, a compiled cell on cpu is refused before any store is opened, as are the benchmarks'
    compile flags, instead of failing in every trial."""
    from harness import bench_packing
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    assert not cpu_gelu.fused_available()
    runs = tmp_path / "runs"
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "studies", f"{study}.yaml")
    assert run_cli("run", path, "--profile", "smoke-compile", "--runs-dir", runs) == 2
    err = capsys.readouterr().err
    assert "on cpu: torch.compile cannot build CPU kernels here" in err and unset in err, err
    assert not runs.exists()
    assert run_cli("bench", "dit-s/8", "--compile", "--device", "cpu") == 2
    assert run_cli("bench", "dit-s/8", "--alternate", "eager,compile", "--device", "cpu") == 2
    assert bench_packing.main(["--compile-blocks", "--depth", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("cannot build CPU kernels here") == 3
