"""The machine's dense matmul peak, measured in this process, and MFU against it.

    python -m harness.metrics.peak [--device cpu] [--sizes 2048 3072] [--json]
    python -m harness.metrics.peak --drift 30     # how steady is this machine's speed?

Peak: square GEMMs (M = N = K = s) at a few large sizes, warm-up calls, then timed repeats
(device-synchronised); the best rate over sizes, repeats and matmul paths is the peak: the
best a well-shaped dense matmul achieves here, with this torch and its thread count.  fp32
on CPU is timed on both paths torch has, ``torch.mm`` (its BLAS: MKL) and oneDNN, because
they differ by 2x on some CPUs (MKL takes an AVX2 path on AMD; oneDNN uses AVX-512): a peak
from the slower one would flatter every MFU.  Two units, to be explicit:

    real flops       2 * M * N * K per GEMM (a multiply-add is two flops): ``*_tflops``
    MAC convention   M * N * K per GEMM (one multiply-add = one flop), the convention of
                     ``harness.metrics.flops`` (and of the DiT / ViViT papers): ``*_tmacs``

so ``peak_fp32_tflops == 2 * peak_fp32_tmacs``.

MFU (model FLOPs utilisation) of a training step:

    train_mfu = 3 * F_fwd * 2 * samples_per_s / peak_flops_per_s

F_fwd is the forward multiply-adds per sample from ``harness.metrics.flops`` (fvcore MACs,
attention matmuls included, element-wise ops free); x 2 turns MACs into real flops; x 3 is
the usual rule that a training step costs a forward plus a backward of about twice the
forward (activation gradients + weight gradients: two matmuls per forward matmul).  The
optimiser step and the element-wise work count as zero, so MFU measures how close the
step gets to pure dense-matmul speed.  Inference: ``infer_mfu = F_fwd * 2 * samples/s /
peak``.  The denominator: on CUDA the bf16 dense peak (the convention of GPU MFU figures);
on CPU the peak of the run's compute dtype (bf16 under bf16 autocast, else fp32).  A
datasheet number can replace the measured one (``peak_tflops``, in real TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Sequence

import torch

CPU_SIZES = (1024, 2048)          # 2 CPU cores: ~0.01-0.2 s per GEMM in fp32
CUDA_SIZES = (4096, 8192)         # large enough to saturate an H100's tensor cores
TRAIN_FLOP_FACTOR = 3             # forward + backward ~ 3 x forward (see module docstring)


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively on ``device`` (not emulated at a crawl)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def onednn_fp32_available(device: torch.device | str) -> bool:
    """Whether fp32 matmuls can run on oneDNN here (CPU builds with mkldnn)."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _gemm_call(size: int, dtype: torch.dtype, device: torch.device, impl: str):
    """A closure running one ``size``^3 GEMM on preallocated operands."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    if impl == "onednn":
        def call():
            torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    elif impl == "mm":
        out = torch.empty(size, size, device=device, dtype=dtype)

        def call():
            torch.mm(a, b, out=out)
    else:
        raise ValueError(f"impl {impl!r}: valid: mm, onednn")
    return call


def _best_rate(call, size: int, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return size ** 3 / best


def gemm_rate(size: int, dtype: torch.dtype, device: torch.device | str = "cpu",
              warmup: int = 1, repeats: int = 3, impl: str = "mm") -> float:
    """Best multiply-adds per second of a ``size``^3 GEMM over ``repeats`` timed calls.

    impl: "mm" is ``torch.mm`` (fp32 on CPU: torch's BLAS, MKL; bf16 on CPU: oneDNN);
    "onednn" is oneDNN's fp32 matmul (``torch.ops.mkldnn._linear_pointwise``), the path
    ``variants.common.Linear`` takes for fp32 on CPU where oneDNN is the faster library."""
    device = torch.device(device)
    return _best_rate(_gemm_call(size, dtype, device, impl), size, device, warmup, repeats)


def default_sizes(device: torch.device | str) -> tuple[int, ...]:
    return CUDA_SIZES if torch.device(device).type == "cuda" else CPU_SIZES


def measure_peak(device: torch.device | str = "cpu", sizes: Sequence[int] | None = None,
                 dtypes: Sequence[str] = ("fp32", "bf16"), warmup: int = 1,
                 repeats: int = 3) -> dict:
    """Flat dict: ``peak_{fp32,bf16}_tflops`` (2*M*N*K / s / 1e12), ``peak_*_tmacs``
    (M*N*K / s / 1e12), ``peak_*_size`` (the GEMM side that gave the best), plus the device
    and thread count.  bf16 is skipped (absent) where the device has no native bf16.

    fp32 on CPU is timed on every matmul path torch offers, torch.mm (its BLAS) and oneDNN
    (``peak_fp32_blas_tflops``, ``peak_fp32_onednn_tflops``); the peak is the faster one,
    so the denominator of MFU is what the cores can do, not what one library does."""
    device = torch.device(device)
    sizes = tuple(sizes or default_sizes(device))
    out: dict = {"peak_device": str(device), "peak_threads": torch.get_num_threads(),
                 "peak_method": f"best of {repeats} x square GEMM at sizes {list(sizes)}"}
    kinds = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name in dtypes:
        if name not in kinds:
            raise ValueError(f"dtype {name!r}: valid: fp32, bf16")
        if name == "bf16" and not bf16_supported(device):
            continue
        impls = ["mm"] + (["onednn"] if name == "fp32" and onednn_fp32_available(device) else [])
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            # fp32 means fp32: no TF32 shortcut on CUDA (the harness never turns it on)
            torch.backends.cuda.matmul.allow_tf32 = False
            rates = {(impl, s): gemm_rate(s, kinds[name], device, warmup, repeats, impl)
                     for impl in impls for s in sizes}
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
        (impl, size), macs = max(rates.items(), key=lambda kv: kv[1])
        out[f"peak_{name}_tmacs"] = macs / 1e12
        out[f"peak_{name}_tflops"] = 2 * macs / 1e12
        out[f"peak_{name}_size"] = size
        out[f"peak_{name}_impl"] = {"mm": "torch.mm", "onednn": "onednn"}[impl]
        if len(impls) > 1:
            for i, label in (("mm", "blas"), ("onednn", "onednn")):
                out[f"peak_{name}_{label}_tflops"] = 2 * max(r for (j, _), r in rates.items() if j == i) / 1e12
    return out


_BEST: dict = {}  # (device, threads, sizes) -> the best peak seen in this process


def _merge_best(a: dict, b: dict) -> dict:
    """Per dtype, the faster of two measurements (with its size and path)."""
    out = dict(a)
    for name in ("fp32", "bf16"):
        key = f"peak_{name}_tflops"
        if key in b and b[key] > a.get(key, 0.0):
            out.update({k: v for k, v in b.items() if k.startswith(f"peak_{name}_")})
        for label in ("blas", "onednn"):
            k = f"peak_{name}_{label}_tflops"
            if k in b:
                out[k] = max(a.get(k, 0.0), b[k])
    return out


def cached_peak(device: torch.device | str = "cpu", sizes: Sequence[int] | None = None,
                refresh: bool = False) -> dict:
    """The best dense-GEMM peak measured in this process (per device, thread count, sizes):
    measured on the first call; ``refresh=True`` measures again and keeps the faster, so a
    first measurement taken while other work held the cores does not stay the denominator
    (a too-low peak would inflate every MFU)."""
    key = (str(torch.device(device)), torch.get_num_threads(), tuple(sizes) if sizes else None)
    if key not in _BEST:
        _BEST[key] = measure_peak(device, sizes)
    elif refresh:
        _BEST[key] = _merge_best(_BEST[key], measure_peak(device, sizes))
    return dict(_BEST[key])


def peak_for(peak: dict, device: torch.device | str, bf16: bool,
             override_tflops: float | None = None) -> tuple[float, str]:
    """(peak real flop/s, which peak) used as MFU's denominator for a run on ``device``."""
    if override_tflops:
        return override_tflops * 1e12, "override"
    if torch.device(device).type == "cuda" and "peak_bf16_tflops" in peak:
        return peak["peak_bf16_tflops"] * 1e12, "bf16"
    if bf16 and "peak_bf16_tflops" in peak:
        return peak["peak_bf16_tflops"] * 1e12, "bf16"
    return peak["peak_fp32_tflops"] * 1e12, "fp32"


def gemm_probe(peak: dict, device: torch.device | str, bf16: bool, repeats: int = 2):
    """A callable returning the dense-GEMM rate (real flop/s) the machine gives *now*: best
    of ``repeats`` GEMMs at the dtype, size and matmul path of the measured peak that is
    MFU's denominator (``peak_for``).  Timed next to each step (``measure_speed(probe=)``),
    it gives the paired MFU: a shared or throttling machine whose speed drifts by tens of
    % within a minute slows the steps and the probes alike.  None without a measured peak,
    and for bf16 on a CPU: there the bf16 GEMM rate (AMX on Intel) jumps between two levels
    (seen on a 2-core Xeon: ~1.1 and ~0.4 TFLOP/s, for seconds at a time, while fp32 GEMMs
    did not), and a bf16-autocast step, half fp32 element-wise work, does not follow it,
    so a probe would flatter the step."""
    if not peak:
        return None
    _, which = peak_for(peak, device, bf16)
    if which == "bf16" and torch.device(device).type == "cpu":
        return None
    size, impl = peak.get(f"peak_{which}_size"), peak.get(f"peak_{which}_impl")
    if size is None or impl is None:
        return None
    device = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[which]
    call = _gemm_call(int(size), dtype, device, {"torch.mm": "mm", "onednn": "onednn"}[impl])

    def probe() -> float:
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the peak
            return 2 * _best_rate(call, int(size), device, 0, repeats)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return probe


def paired_mfu(step_s: Sequence[float], probe_flops: Sequence[float], gmacs_fwd_per_sample: float,
               batch_size: int, train: bool) -> float:
    """Median over timed steps of each step's MFU against the GEMM rate probed next to it
    (the faster of the probes just before and just after the step)."""
    if not step_s or len(step_s) != len(probe_flops):
        raise ValueError(f"{len(step_s)} step times vs {len(probe_flops)} probes: need one per step")
    return statistics.median(mfu(gmacs_fwd_per_sample, batch_size / t, r, train)
                             for t, r in zip(step_s, probe_flops))


def paired_mfu_metrics(speed: dict, gmacs_fwd_per_sample: float, batch_size: int) -> dict:
    """``{train,infer}_mfu_paired`` and ``{train,infer}_paired_peak_tflops`` (the median
    probe) from a ``measure_speed(probe=...)`` dict; {} where it has no probes."""
    out = {}
    for mode in ("train", "infer"):
        rates = speed.get(f"{mode}_probe_flops")
        if rates:
            out[f"{mode}_mfu_paired"] = paired_mfu(speed[f"{mode}_step_s"], rates,
                                                   gmacs_fwd_per_sample, batch_size, mode == "train")
            out[f"{mode}_paired_peak_tflops"] = statistics.median(rates) / 1e12
    return out


def mfu(gmacs_fwd_per_sample: float, samples_per_s: float, peak_flops_per_s: float,
        train: bool) -> float:
    """Model FLOPs utilisation: (3 if train else 1) x fwd MACs x 2 flops/MAC x samples/s / peak."""
    factor = TRAIN_FLOP_FACTOR if train else 1
    return factor * gmacs_fwd_per_sample * 1e9 * 2 * samples_per_s / peak_flops_per_s


def mfu_metrics(speed: dict, gmacs_fwd_per_sample: float, peak_flops_per_s: float) -> dict:
    """``train_mfu`` / ``infer_mfu`` and the model's achieved TFLOP/s from a measure_speed dict."""
    out = {}
    for mode in ("train", "infer"):
        sps = speed.get(f"{mode}_samples_per_s")
        if sps is None:
            continue
        out[f"{mode}_mfu"] = mfu(gmacs_fwd_per_sample, sps, peak_flops_per_s, mode == "train")
        out[f"{mode}_model_tflops"] = out[f"{mode}_mfu"] * peak_flops_per_s / 1e12
    return out


BUSY_CORES = 0.25  # other processes' load (OtherLoad, cores) above which timings are flagged


class OtherLoad:
    """CPU use of *other* processes while a block runs, in cores (Linux /proc; else NaN):
    (busy jiffies of the whole machine - this process's and its finished children's, e.g.
    the compiler torch.compile runs) / wall time.  Timings taken while
    this is well above 0 on a machine with few cores are not worth comparing.

        with OtherLoad() as other: ...time something...
        other.cores  # e.g. 0.05 on an idle machine, 1.0 when another job holds a core
    """

    def __enter__(self):
        self.t0, self.all0, self.own0 = time.perf_counter(), _busy_jiffies(), _own_jiffies()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        all1, own1 = _busy_jiffies(), _own_jiffies()
        if self.all0 is None or all1 is None or wall <= 0:
            self.cores = float("nan")
        else:
            hz = os.sysconf("SC_CLK_TCK")
            self.cores = max(0.0, ((all1 - self.all0) - (own1 - self.own0)) / hz / wall)


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(v) - v[3] - v[4]  # minus idle and iowait


def _own_jiffies() -> float:
    """CPU time of this process and of its finished children (a C++ compiler that
    torch.compile ran for us is this job's work, not another process's load)."""
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")


def add_mfu(record: dict, device: torch.device | str, bf16: bool = False,
            override_tflops: float | None = None, sizes: Sequence[int] | None = None) -> dict:
    """Peak + MFU figures for a ``harness bench`` record (``gflops_fwd``, ``batch_size`` and
    the speed keys): ``peak_*`` (the best measured in this process unless
    ``override_tflops``), ``mfu_peak_tflops``, ``train_mfu``, ``infer_mfu``, and the paired
    figures where the record has probes.  Returns the added keys."""
    peak = {} if override_tflops else cached_peak(device, sizes)
    flops, which = peak_for(peak, device, bf16, override_tflops)
    out = {k: v for k, v in peak.items() if k.endswith(("_tflops", "_tmacs"))}
    out.update(mfu_metrics(record, record["gflops_fwd"], flops))
    out.update(paired_mfu_metrics(record, record["gflops_fwd"], record["batch_size"]))
    out["mfu_peak_tflops"] = flops / 1e12
    out["mfu_peak"] = which
    record.update(out)
    return out


def drift(seconds: float, device: torch.device | str = "cpu", size: int = 2048, impl: str = "mm",
          window: float = 1.0) -> list[float]:
    """fp32 GEMM rate (real flop/s) in each ``window`` of a ``seconds``-long loop of ``size``^3
    GEMMs: how steady this machine's speed is (a VM sharing its host is not)."""
    device = torch.device(device)
    call = _gemm_call(size, torch.float32, device, impl)
    call()
    _sync(device)
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0, n = time.perf_counter(), 0
        while True:
            call()
            _sync(device)
            n += 1
            if time.perf_counter() - t0 >= window:
                break
        rates.append(2 * size ** 3 * n / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.metrics.peak",
                                description="dense GEMM peak of this machine (fp32, bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--drift", type=float, default=0.0, metavar="SECONDS",
                   help="instead: time fp32 GEMMs (torch.mm, the largest --sizes) back to back "
                        "for SECONDS and print the rate of each second (how steady the machine is)")
    args = p.parse_args(argv)
    if args.threads:
        from .speed import set_threads
        set_threads(args.threads)
    if args.drift:
        size = max(args.sizes or [2048])
        rates = [r / 1e12 for r in drift(args.drift, args.device, size)]
        if args.json:
            print(json.dumps({"drift_fp32_tflops": rates, "size": size}))
            return 0
        print(f"fp32 {size}^3 GEMMs (torch.mm) back to back for {args.drift:g} s on {args.device}, "
              f"{torch.get_num_threads()} threads; TFLOP/s per second:")
        print("  " + " ".join(f"{r:.3f}" for r in rates))
        print(f"  min {min(rates):.3f}  median {statistics.median(rates):.3f}  max {max(rates):.3f}"
              f"  (max / min {max(rates) / min(rates):.2f})")
        return 0
    r = measure_peak(args.device, args.sizes, repeats=args.repeats)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"dense GEMM peak on {r['peak_device']} ({r['peak_threads']} threads; {r['peak_method']})")
    for name in ("fp32", "bf16"):
        if f"peak_{name}_tflops" in r:
            print(f"  {name}: {r[f'peak_{name}_tflops']:.3f} TFLOP/s (2*M*N*K)  = "
                  f"{r[f'peak_{name}_tmacs']:.3f} TMAC/s (M*N*K, the harness FLOP convention)"
                  f"  at {r[f'peak_{name}_size']}^3 ({r[f'peak_{name}_impl']})")
            if f"peak_{name}_blas_tflops" in r:
                print(f"        paths: torch.mm (BLAS) {r[f'peak_{name}_blas_tflops']:.3f}, oneDNN "
                      f"{r[f'peak_{name}_onednn_tflops']:.3f} TFLOP/s")
        else:
            print(f"  {name}: not supported natively on this device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
