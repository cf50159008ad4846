"""HARNESS_CPU_MKL: MKL's AVX-512 code on AMD CPUs (harness/metrics/cpu_mkl.py).

The mode only takes effect before torch loads, so every test of the effect runs a fresh
interpreter.  The ones that need an AMD CPU with AVX-512, a C compiler and an MKL-linked
torch skip with that reason elsewhere; the error paths run everywhere."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.metrics import cpu_matmul, cpu_mkl

ROOT = Path(__file__).resolve().parent.parent

AMD_AVX512 = (sys.platform.startswith("linux") and cpu_matmul.cpu_vendor() == "AuthenticAMD"
              and "avx512f" in cpu_matmul.cpu_flags())
HAS_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_amd_avx512 = pytest.mark.skipif(
    not (AMD_AVX512 and HAS_CC),
    reason="needs an AMD CPU with AVX-512F and a C compiler (MKL's AVX-512 code on AMD)")


def _python(code: str, mode: str | None, tmp_path: Path, *args: str,
            **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cpu_mkl.ENV}
    env["HARNESS_CACHE_DIR"] = str(tmp_path / "cache")
    env.update(extra_env)
    if mode is not None:
        env[cpu_mkl.ENV] = mode
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.fixture
def fresh_state(monkeypatch):
    """cpu_mkl's per-process state as if harness had just been imported."""
    monkeypatch.setattr(cpu_mkl, "_state", {"ran": False, "loaded": None, "why": None})


def test_a_bad_value_stops_the_cli_before_any_work(tmp_path):
    env = {**os.environ, cpu_mkl.ENV: "avx2", "HARNESS_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "studies/vit_digits.yaml",
                        "--profile", "smoke", "--runs-dir", str(tmp_path / "runs")],
                       env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "HARNESS_CPU_MKL='avx2'" in r.stderr and "auto, vendor, avx512" in r.stderr
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "cache").exists()  # nothing built either


def _ask_for_avx512_on(monkeypatch, vendor: str, flags: set[str], mode: str = "avx512") -> None:
    """HARNESS_CPU_MKL=mode on an x86-64 Linux machine with this CPU, whatever runs the test."""
    monkeypatch.setenv(cpu_mkl.ENV, mode)
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_matmul, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu_mkl.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_mkl.sys, "platform", "linux")


def test_without_avx512_the_request_is_refused_with_the_reason(fresh_state, monkeypatch):
    _ask_for_avx512_on(monkeypatch, "AuthenticAMD", {"fpu", "sse2", "avx", "avx2", "fma"})
    with pytest.raises(ConfigError, match="no AVX-512F.*HARNESS_CPU_MKL=auto or vendor"):
        cpu_mkl.check()
    assert cpu_mkl.mode() == "vendor"


def test_auto_is_the_default_and_without_avx512_quietly_keeps_mkls_dispatch(fresh_state, monkeypatch):
    monkeypatch.delenv(cpu_mkl.ENV, raising=False)
    assert cpu_mkl.requested() == "auto"
    _ask_for_avx512_on(monkeypatch, "AuthenticAMD", {"fpu", "sse2", "avx", "avx2", "fma"}, "auto")
    assert cpu_mkl.check() == "vendor"  # no error: auto takes the AVX-512 code only where it can
    assert "no AVX-512F" in cpu_mkl.why_not()
    assert not cpu_mkl._state["loaded"]


def test_on_intel_it_changes_nothing(fresh_state, monkeypatch):
    _ask_for_avx512_on(monkeypatch, "GenuineIntel", {"avx2", "avx512f"})
    assert cpu_mkl.check() == "vendor"  # MKL's own dispatch is Intel's code already
    assert not cpu_mkl._state["loaded"]


def test_no_compiler_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc-anywhere")
    with pytest.raises(ConfigError, match="no C compiler.*'no-such-cc-anywhere'"):
        cpu_mkl.build(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_the_shim_is_built_once_and_defines_the_one_symbol(tmp_path):
    import ctypes
    lib = cpu_mkl.build(tmp_path)
    again = cpu_mkl.build(tmp_path)
    assert again == lib and lib.stat().st_mtime_ns == again.stat().st_mtime_ns
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary left behind
    assert ctypes.CDLL(str(lib)).mkl_serv_intel_cpu_true() == 1


@needs_amd_avx512
def test_torch_imported_first_is_refused(tmp_path):
    r = _python("import torch, harness\nfrom harness.metrics import cpu_mkl\ncpu_mkl.check()",
                "avx512", tmp_path)
    assert r.returncode != 0 and "torch was imported before harness" in r.stderr


_WHICH = "import harness\nfrom harness.metrics import cpu_mkl\nprint(cpu_mkl.check(), '|', cpu_mkl.why_not())"


@needs_amd_avx512
def test_auto_falls_back_to_mkls_dispatch_where_it_cannot_act(tmp_path):
    late = _python("import torch\n" + _WHICH, None, tmp_path)
    assert late.returncode == 0, late.stderr
    assert late.stdout.startswith("vendor |") and "torch was imported before harness" in late.stdout
    no_cc = _python(_WHICH, "auto", tmp_path, CC="no-such-cc-anywhere")
    assert no_cc.returncode == 0, no_cc.stderr
    assert no_cc.stdout.startswith("vendor |") and "no C compiler" in no_cc.stdout
    assert not (tmp_path / "cache").exists()
    ok = _python(_WHICH, None, tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "avx512 | None", ok.stderr


_PROBE = """
import json, sys
import harness, torch
from harness.metrics import cpu_matmul, cpu_mkl
from harness.tracking import environment_tags
torch.manual_seed(0)
a, b = torch.randn(384, 1152), torch.randn(1152, 384)
q, k = torch.randn(96, 256, 64), torch.randn(96, 256, 64)
w = torch.randn(1152, 384, requires_grad=True)
x = torch.randn(512, 384)
torch.nn.functional.linear(x, w).square().sum().backward()
torch.save({"mm": a @ b, "bmm": q @ k.transpose(1, 2), "wgrad": w.grad,
            "sdpa": torch.nn.functional.scaled_dot_product_attention(q[None], k[None], k[None])[0]},
           sys.argv[1])
print(json.dumps({"mode": cpu_mkl.check(), "detect": cpu_mkl._mkl_detect(),
                  "tag": environment_tags("cpu")["cpu_mkl"], "linear": cpu_matmul.path()}))
"""


@needs_amd_avx512
def test_mkl_takes_its_avx512_code_and_results_agree_to_rounding(tmp_path):
    import torch
    out = {}
    for mode in ("vendor", "avx512", None):  # None: unset, the default (auto)
        r = _python(_PROBE, mode, tmp_path, str(tmp_path / f"{mode}.pt"))
        assert r.returncode == 0, r.stderr
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    if out["vendor"]["detect"] is None:
        pytest.skip("this torch does not export MKL's dispatcher (no MKL)")
    assert {k: out["vendor"][k] for k in ("mode", "detect", "tag")} == \
        {"mode": "vendor", "detect": 0, "tag": "vendor"}
    assert out["avx512"]["mode"] == "avx512" and out["avx512"]["tag"] == "avx512"
    assert out[None] == out["avx512"]  # on this CPU the default takes the AVX-512 code
    assert out["avx512"]["linear"] == "aten"  # MKL's Intel code: the Intel rule
    assert out["avx512"]["detect"] >= cpu_mkl.AVX512_CODE
    assert any((tmp_path / "cache").glob("mkl_intel_cpu_true-*.so"))
    v, z = torch.load(tmp_path / "vendor.pt"), torch.load(tmp_path / "avx512.pt")
    for key in v:
        scale = v[key].abs().max()
        err = (v[key] - z[key]).abs().max() / scale
        assert err < 1e-5, (key, float(err))  # fp32 rounding of different summation orders
    assert not torch.equal(v["mm"], z["mm"])  # other kernels really ran (1152-long sums)


@needs_amd_avx512
def test_a_benchmark_reports_the_mode(tmp_path):
    env = {**os.environ, cpu_mkl.ENV: "avx512", "HARNESS_CACHE_DIR": str(tmp_path / "cache")}
    b = subprocess.run([sys.executable, "-m", "harness.cli", "bench", "vit-digits", "--steps", "1",
                        "--warmup", "0", "--device", "cpu", "--json"],
                       env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert b.returncode == 0, b.stderr
    assert json.loads(b.stdout)[0]["cpu_mkl"] == "avx512"


def test_the_recorded_command_shows_the_kernel_environment(monkeypatch):
    from harness.metrics.kernel_choice import KERNEL_ENV, kernel_env
    from harness.sweep import command_line
    for k in KERNEL_ENV:
        monkeypatch.delenv(k, raising=False)
    argv = ["run", "studies/speed_dit.yaml", "--profile", "cpu-target"]
    assert command_line(argv) == "harness run studies/speed_dit.yaml --profile cpu-target"
    monkeypatch.setenv("HARNESS_CPU_MKL", "avx512")
    monkeypatch.setenv("HARNESS_CPU_GELU", "aten")
    assert command_line(argv) == ("HARNESS_CPU_MKL=avx512 HARNESS_CPU_GELU=aten "
                                  "harness run studies/speed_dit.yaml --profile cpu-target")
    assert kernel_env() == "HARNESS_CPU_MKL=avx512 HARNESS_CPU_GELU=aten "  # the benchmarks' prefix
