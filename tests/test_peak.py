"""The dense-matmul peak and the MFU formula."""
import math

import pytest
import torch

from harness.metrics import peak


def test_measure_peak_returns_positive_rates_in_both_conventions():
    r = peak.measure_peak("cpu", sizes=(64, 128), dtypes=("fp32",), warmup=1, repeats=2)
    assert r["peak_fp32_tflops"] > 0 and math.isfinite(r["peak_fp32_tflops"])
    assert r["peak_fp32_tflops"] == pytest.approx(2 * r["peak_fp32_tmacs"])  # 2 flops per MAC
    assert r["peak_fp32_size"] in (64, 128)
    assert r["peak_threads"] == torch.get_num_threads()
    assert "peak_bf16_tflops" not in r  # not asked for


def test_bf16_peak_present_exactly_when_supported():
    r = peak.measure_peak("cpu", sizes=(64,), warmup=0, repeats=1)
    assert ("peak_bf16_tflops" in r) == peak.bf16_supported("cpu")
    if "peak_bf16_tflops" in r:
        assert r["peak_bf16_tflops"] > 0


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="fp32, bf16"):
        peak.measure_peak("cpu", sizes=(32,), dtypes=("fp8",))


def test_gemm_rate_counts_m_n_k_macs(monkeypatch):
    # a fake clock: every mm takes exactly 0.5 s -> 64^3 / 0.5 MACs per second
    clock = iter(range(1000))
    monkeypatch.setattr(peak.time, "perf_counter", lambda: 0.5 * next(clock))
    assert peak.gemm_rate(64, torch.float32, "cpu", warmup=0, repeats=3) == pytest.approx(64 ** 3 / 0.5)


def test_mfu_formula_on_a_known_case():
    # 1 GMAC forward per sample, 10 samples/s, a 60 GFLOP/s machine:
    # train = 3 x 1e9 MACs x 2 flops/MAC x 10 / 60e9 = 1.0; inference a third of that
    assert peak.mfu(1.0, 10.0, 60e9, train=True) == pytest.approx(1.0)
    assert peak.mfu(1.0, 10.0, 60e9, train=False) == pytest.approx(1 / 3)
    m = peak.mfu_metrics({"train_samples_per_s": 5.0, "infer_samples_per_s": 30.0}, 2.0, 120e9)
    assert m["train_mfu"] == pytest.approx(3 * 2e9 * 2 * 5 / 120e9)       # 0.5
    assert m["infer_mfu"] == pytest.approx(2e9 * 2 * 30 / 120e9)          # 1.0
    assert m["train_model_tflops"] == pytest.approx(0.06)


def test_mfu_denominator_choice():
    p = {"peak_fp32_tflops": 1.0, "peak_bf16_tflops": 4.0}
    assert peak.peak_for(p, "cpu", bf16=False) == (1e12, "fp32")
    assert peak.peak_for(p, "cpu", bf16=True) == (4e12, "bf16")
    assert peak.peak_for(p, "cuda", bf16=False) == (4e12, "bf16")  # GPU MFU: always the bf16 peak
    assert peak.peak_for(p, "cpu", bf16=False, override_tflops=2.5) == (2.5e12, "override")
    assert peak.peak_for({"peak_fp32_tflops": 1.0}, "cpu", bf16=True) == (1e12, "fp32")


def test_cached_peak_measures_once_and_refresh_keeps_the_best(monkeypatch):
    measured = iter([{"peak_fp32_tflops": 1.0, "peak_fp32_size": 64},
                     {"peak_fp32_tflops": 3.0, "peak_fp32_size": 128},
                     {"peak_fp32_tflops": 2.0, "peak_fp32_size": 64}])
    calls = []
    monkeypatch.setattr(peak, "_BEST", {})
    monkeypatch.setattr(peak, "measure_peak", lambda d, s: calls.append(d) or next(measured))
    a = peak.cached_peak("cpu", (32,))
    assert peak.cached_peak("cpu", (32,)) == a and calls == ["cpu"]  # measured once
    a["peak_fp32_tflops"] = 9.0  # callers get copies
    assert peak.cached_peak("cpu", (32,))["peak_fp32_tflops"] == 1.0
    # a re-measurement that is faster replaces the peak (with its size); a slower one does not
    assert peak.cached_peak("cpu", (32,), refresh=True) == {"peak_fp32_tflops": 3.0, "peak_fp32_size": 128}
    assert peak.cached_peak("cpu", (32,), refresh=True)["peak_fp32_tflops"] == 3.0
    assert len(calls) == 3


def test_other_load_counts_only_other_processes(monkeypatch):
    # the machine was busy for 300 jiffies, 100 of them ours, over 2 s: others used 1 core
    hz = peak.os.sysconf("SC_CLK_TCK")
    busy, own, clock = iter([0, 3 * hz]), iter([0.0, 1.0 * hz]), iter([10.0, 12.0])
    monkeypatch.setattr(peak, "_busy_jiffies", lambda: next(busy))
    monkeypatch.setattr(peak, "_own_jiffies", lambda: next(own))
    monkeypatch.setattr(peak.time, "perf_counter", lambda: next(clock))
    with peak.OtherLoad() as other:
        pass
    assert other.cores == pytest.approx(1.0)


@pytest.mark.skipif(not peak.os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_other_load_leaves_out_this_jobs_own_child_processes():
    """A child this process ran and waited for (as torch.compile runs its C++ compiler) is
    the job's own work: about a core-second of it inside the block is not other load.  The
    block is read against one of the same length without the child, so load that other
    processes put on the machine meanwhile (a busy CI host) reads in both."""
    import subprocess
    import sys
    import time
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
    t = time.perf_counter()
    with peak.OtherLoad() as other:
        subprocess.run([sys.executable, "-c", burn], check=True)
    seconds = time.perf_counter() - t
    with peak.OtherLoad() as baseline:
        time.sleep(seconds)
    # counted as another process's, the child would read about 1 core above the baseline
    assert other.cores < baseline.cores + 0.5, (other.cores, baseline.cores)


def test_other_load_without_proc_is_nan(monkeypatch):
    monkeypatch.setattr(peak, "_busy_jiffies", lambda: None)
    with peak.OtherLoad() as other:
        pass
    assert math.isnan(other.cores)


def test_gemm_probe_times_the_peaks_dtype_size_and_path():
    p = peak.measure_peak("cpu", sizes=(64, 96), dtypes=("fp32",), warmup=1, repeats=2)
    probe = peak.gemm_probe(p, "cpu", bf16=False)
    rates = [probe() for _ in range(3)]
    assert all(r > 0 and math.isfinite(r) for r in rates)
    assert peak.gemm_probe({}, "cpu", bf16=False) is None  # nothing measured: no probe
    # a bf16 run on a CPU has no paired MFU (its bf16 GEMM rate jumps; see gemm_probe);
    # without a bf16 peak it runs against the fp32 one (as peak_for), and so is probed
    assert peak.gemm_probe({**p, "peak_bf16_tflops": 1.0, "peak_bf16_size": 64,
                            "peak_bf16_impl": "torch.mm"}, "cpu", bf16=True) is None
    assert peak.gemm_probe({k: v for k, v in p.items() if "bf16" not in k}, "cpu", bf16=True) is not None


def test_paired_mfu_divides_each_step_by_its_own_probe():
    # 1 GMAC fwd per sample, batch 10; steps of 1 s and 2 s; probes 60 and 30 GFLOP/s:
    # step 1: 3 x 1e9 x 2 x 10 / 60e9 = 1.0; step 2: 3 x 1e9 x 2 x 5 / 30e9 = 1.0
    assert peak.paired_mfu([1.0, 2.0], [60e9, 30e9], 1.0, 10, train=True) == pytest.approx(1.0)
    # against one fixed peak the same steps read 1.0 and 0.5: the drift, not the code
    assert peak.mfu(1.0, 5.0, 60e9, train=True) == pytest.approx(0.5)
    assert peak.paired_mfu([1.0, 1.0, 4.0], [60e9] * 3, 1.0, 10, train=False) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one per step"):
        peak.paired_mfu([1.0], [], 1.0, 10, train=True)
    m = peak.paired_mfu_metrics({"train_step_s": [1.0], "train_probe_flops": [60e9]}, 1.0, 10)
    assert m == {"train_mfu_paired": pytest.approx(1.0), "train_paired_peak_tflops": pytest.approx(0.06)}
    assert peak.paired_mfu_metrics({"train_samples_per_s": 3.0}, 1.0, 10) == {}


def test_probed_steps_take_the_faster_probe_on_either_side():
    from harness.metrics.speed import time_steps_probed
    probes, steps = iter([5.0, 1.0, 3.0, 2.0]), []
    times, rates = time_steps_probed(lambda: steps.append(1), torch.device("cpu"), warmup=2,
                                     steps=3, probe=lambda: next(probes))
    assert len(steps) == 5 and len(times) == 3
    assert rates == [5.0, 3.0, 3.0]  # max(5, 1), max(1, 3), max(3, 2)


def test_drift_reports_one_rate_per_window():
    rates = peak.drift(0.05, "cpu", size=64, window=0.01)
    assert len(rates) >= 3 and all(r > 0 and math.isfinite(r) for r in rates)
