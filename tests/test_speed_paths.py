"""The fast paths give the numbers of the plain ones: oneDNN linears (eager and compiled),
the CPU linear path's rule and override, the fused tanh-GELU (values, gradients, fallback,
override), DiT's fused adaLN ops, and the CPU malloc settings / memory counter."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.metrics import cpu_gelu, cpu_malloc, cpu_matmul
from harness.metrics.speed import SpeedOptions, measure_speed
from variants import common
from variants.dit import gated, modulate


needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(),
                                  reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn_path():
    """Force the oneDNN path whatever this CPU's default is, so both paths are tested."""
    old = cpu_matmul.set_path("onednn")
    yield
    cpu_matmul.set_path(old)


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


def test_aten_path_never_takes_onednn():
    old = cpu_matmul.set_path("aten")
    try:
        assert not common._use_onednn(torch.randn(2, 3), torch.randn(4, 3))
    finally:
        cpu_matmul.set_path(old)


def _default_path_in_subprocess(env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cpu_matmul.ENV}
    if env_value is not None:
        env[cpu_matmul.ENV] = env_value
    return subprocess.run([sys.executable, "-c", "from harness.metrics import cpu_matmul; "
                           "print(cpu_matmul.path())"], env=env, capture_output=True, text=True)


def test_cpu_linear_default_follows_the_vendor_rule_and_the_env_override():
    r = _default_path_in_subprocess(None)
    assert r.returncode == 0, r.stderr
    rule = ("onednn" if cpu_matmul.cpu_vendor() not in ("GenuineIntel", "")
            and "avx512f" in cpu_matmul.cpu_flags()
            and cpu_matmul.onednn_available() and os.uname().machine == "x86_64" else "aten")
    assert r.stdout.strip() == rule
    assert _default_path_in_subprocess("aten").stdout.strip() == "aten"
    bad = _default_path_in_subprocess("mkl")
    assert bad.returncode != 0 and "HARNESS_CPU_LINEAR='mkl'" in bad.stderr and "aten, onednn" in bad.stderr
    with pytest.raises(ConfigError, match="must be one of aten, onednn"):
        cpu_matmul.set_path("blas")


@pytest.mark.parametrize("vendor,flags,want", [
    ("AuthenticAMD", {"avx2", "avx512f"}, "onednn"),   # Zen 4 / Zen 5
    ("AuthenticAMD", {"avx2"}, "aten"),                # Zen 3: MKL's AVX2 kernels win
    ("GenuineIntel", {"avx2", "avx512f"}, "aten"),     # MKL runs AVX-512 on Intel
    ("", set(), "aten"),                               # no /proc/cpuinfo
])
def test_cpu_linear_rule_table(monkeypatch, vendor, flags, want):
    # an x86 machine whose torch build has oneDNN, whatever runs the test
    monkeypatch.setattr(cpu_matmul.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_matmul, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: vendor)
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


@pytest.mark.parametrize("path", ["aten", pytest.param("onednn", marks=needs_onednn)])
def test_compiled_linear_matches_eager(path):
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

needs_fused_gelu = pytest.mark.skipif(not cpu_gelu.fused_available(),
                                      reason="torch.compile cannot build CPU kernels here")


@pytest.fixture
def gelu_path():
    """Set the GELU path for one test, restored after."""
    olds = []
    yield lambda name: olds.append(cpu_gelu.set_path(name))
    if olds:
        cpu_gelu.set_path(olds[0])


@needs_fused_gelu
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


def test_tanh_gelu_takes_torchs_kernel_off_the_fused_path(gelu_path):
    small = torch.randn(4, 8)
    assert not common._use_fused_gelu(small)  # too small to be worth a compile
    big = torch.randn(cpu_gelu.FUSED_MIN_NUMEL)
    assert not common._use_fused_gelu(big.bfloat16())  # bf16 autocast: torch's kernel
    gelu_path("aten")
    assert not common._use_fused_gelu(big)
    torch.testing.assert_close(common.tanh_gelu()(small), F.gelu(small, approximate="tanh"))


@needs_fused_gelu
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


def _gelu_path_in_subprocess(env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cpu_gelu.ENV}
    if env_value is not None:
        env[cpu_gelu.ENV] = env_value
    return subprocess.run([sys.executable, "-c", "from harness.metrics import cpu_gelu; "
                           "print(cpu_gelu.path())"], env=env, capture_output=True, text=True)


def test_cpu_gelu_default_and_env_override():
    r = _gelu_path_in_subprocess(None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("fused" if cpu_gelu.fused_available() else "aten")
    assert _gelu_path_in_subprocess("aten").stdout.strip() == "aten"
    bad = _gelu_path_in_subprocess("fast")
    assert bad.returncode != 0 and "HARNESS_CPU_GELU='fast'" in bad.stderr and "aten, fused" in bad.stderr
    with pytest.raises(ConfigError, match="must be one of aten, fused"):
        cpu_gelu.set_path("sleef")


def test_harness_cli_rejects_a_bad_cpu_gelu_before_any_work(tmp_path):
    env = {**os.environ, cpu_gelu.ENV: "fast"}
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "studies/vit_digits.yaml",
                        "--profile", "smoke", "--runs-dir", str(tmp_path / "runs")],
                       env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode != 0 and "HARNESS_CPU_GELU='fast'" in r.stderr
    assert not (tmp_path / "runs").exists()
