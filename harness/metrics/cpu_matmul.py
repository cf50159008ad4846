"""Which library runs the fp32 CPU matmuls of the models' ``Linear`` layers.

torch has two on CPU: ``F.linear`` / ``torch.mm`` go to its BLAS (MKL), and oneDNN ships
inside the same build.  Which is faster depends on the CPU's vendor, because MKL picks its
code path by vendor, and on whether the CPU has AVX-512:

- **AMD with AVX-512** (Zen 4, Zen 5): MKL takes an AVX2 path, about half of what these
  cores do; oneDNN runs AVX-512.  Measured on an AMD EPYC (Zen 5), 2 cores: oneDNN 1.5-2.3x
  faster per DiT-S linear; on a Zen 4, 1.27x at the GEMM peak.
- **AMD without AVX-512** (Zen 3 and older): both run AVX2, and MKL's kernels are the
  better ones.  Measured on an AMD EPYC (Zen 3, family 25 model 1), 2 cores, at DiT-S shapes:
  MKL 128-168 GFLOP/s against oneDNN 71-146, furthest ahead on the two gradients; a DiT-S/2
  training step ran 3.33 samples/s with MKL, 2.72 with oneDNN (docs/speed.md).  The same
  holds on a Zen 4 VM whose hypervisor hides AVX-512 (family 25 model 17, AVX2 flags only):
  MKL 104-151 GFLOP/s against oneDNN 85-153, ahead on every weight gradient (104-150
  against 85-128; docs/speed.md).  The rule reads the flags, not the model, so it takes MKL.
- **Intel**: MKL runs AVX-512 and is the faster one.  Measured on an Intel Xeon with
  AVX-512 / AMX, 2 cores, at DiT-S shapes (4096 rows): MKL 0.43-0.45 TFLOP/s forward and
  input gradient, 0.36-0.39 weight gradient; oneDNN 0.39-0.42 and 0.19-0.31.  A DiT-S/2
  training step: 7.3 samples/s with MKL, 6.0 with oneDNN (docs/speed.md).

A third path, ``onednn-mm-wgrad``, runs the forward and the input gradient on oneDNN and
the weight gradient on ``torch.mm`` (MKL).  On Zen 4, whose AVX-512 runs on 256-bit units,
MKL's AVX2 path is close to oneDNN and ahead of it on most weight gradients: measured on an
AMD EPYC (Zen 4, family 25 model 17), 2 cores, at ViT-S / DiT-S shapes, oneDNN / MKL
GFLOP/s 208-217 / 188-203 forward, 208-221 / 187-199 input gradient, but 149-194 / 187-203
weight gradient.  Whole training steps, alternated in one process, ran 1.02-1.03x faster
with the weight gradients on MKL at ViViT's 1024-row shapes, and within 1% of oneDNN at
2048-4096 rows (docs/speed.md).  Zen 5's full-width AVX-512 keeps all three on oneDNN.

Narrow layers stay on ``F.linear`` on every path: below ``ONEDNN_MIN_FEATURES`` input or
output features, the oneDNN path's fixed cost per call (its autograd Function, in Python)
outweighs its faster kernel.  Measured on the Zen 4 (``python -m harness.metrics.cpu_matmul
--layers``: a whole Linear forward + backward), layers of 64-128 features ran at 0.44-0.98x
of ``F.linear``'s speed in 16 of 18 shapes at 64-1024 rows; whole train steps of the
quality studies' width-64 models ran at 0.92x (vit-digits), 0.99x (ViViT-Ti) and 0.93x
(NaViT-Ti) on ``onednn-mm-wgrad`` without the cut, and at parity with it.  So those models
run on ``F.linear``, and every layer of ViT-S / DiT-S / NaViT-Ti (192) and wider on the
chosen path.  On Zen 5, whose MKL runs at half speed, the cut may be conservative (not
measured there).

So the default is ``onednn-mm-wgrad`` on AMD family 25 with AVX-512 (Zen 4; that family's
Zen 3 parts lack AVX-512), ``onednn`` on other non-Intel x86 CPUs with AVX-512 (where the
build has oneDNN), and ``aten`` (torch's own ``F.linear``) elsewhere: a fixed rule, not a
per-process timing, so the same machine always runs the same kernels.  Where MKL runs
its Intel AVX-512 code on an AMD CPU (``cpu_mkl``: the default ``HARNESS_CPU_MKL=auto`` does
that wherever a C compiler is there), the rule is Intel's, ``aten``, so on Zen 4 and Zen 5
the oneDNN paths above are what a machine without a C compiler, or ``HARNESS_CPU_MKL=vendor``,
runs.  Under it, whole train steps alternated in one process ran faster on ``aten`` than on
``onednn-mm-wgrad``: on the Zen 4 1.02x (DiT-S/2, 7 of 8 rounds; ViViT-S Model 1, 6 of 8),
on a Zen 5 1.00x (DiT-S/2) and 1.08x (ViViT-S Model 1, 7 of 8).
``HARNESS_CPU_LINEAR=aten|onednn|onednn-mm-wgrad`` overrides it; every benchmark trial
records the path in force as a tag.  The engine only holds the setting;
``variants.common.Linear`` obeys it.  CUDA, autocast and other dtypes always take
``F.linear``.
"""
from __future__ import annotations

import platform

from ..tracking import cpuinfo
from .kernel_choice import KernelChoice

CHOICES = ("aten", "onednn", "onednn-mm-wgrad")
ONEDNN_PATHS = ("onednn", "onednn-mm-wgrad")  # the paths whose forward runs on oneDNN
ENV = "HARNESS_CPU_LINEAR"
ONEDNN_MIN_FEATURES = 192  # narrower Linears (in or out features) take F.linear on any path


def cpu_vendor() -> str:
    """``/proc/cpuinfo``'s vendor_id (``GenuineIntel``, ``AuthenticAMD``, ...), or ''."""
    return cpuinfo().get("vendor_id", "")


def cpu_flags() -> frozenset[str]:
    """``/proc/cpuinfo``'s feature flags of the first CPU (``avx2``, ``avx512f``, ...), or
    an empty set where there is no such file."""
    return frozenset(cpuinfo().get("flags", "").split())


def cpu_family() -> int | None:
    """``/proc/cpuinfo``'s ``cpu family`` (AMD: 25 = Zen 3 / Zen 4, 26 = Zen 5), or None."""
    try:
        return int(cpuinfo().get("cpu family", ""))
    except ValueError:
        return None


def onednn_available() -> bool:
    import torch
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def x86() -> bool:
    """Whether this is an x86-64 machine."""
    return platform.machine().lower() in ("x86_64", "amd64")


def intel() -> bool:
    """Whether this CPU is Intel's (``/proc/cpuinfo``'s vendor_id)."""
    return cpu_vendor() == "GenuineIntel"


def _rule() -> str:
    from . import cpu_mkl
    if cpu_mkl.mode() == "avx512":
        return "aten"  # MKL runs its Intel AVX-512 code (HARNESS_CPU_MKL), as on Intel
    if (x86() and cpu_vendor() not in ("GenuineIntel", "") and "avx512f" in cpu_flags()
            and onednn_available()):
        return "onednn-mm-wgrad" if cpu_vendor() == "AuthenticAMD" and cpu_family() == 25 else "onednn"
    return "aten"


def _unavailable(name: str) -> str | None:
    if name in ONEDNN_PATHS and not onednn_available():
        return "this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)"
    return None


_choice = KernelChoice(ENV, "CPU linear path", CHOICES, _rule, _unavailable)
# default_path(): the rule above, or $HARNESS_CPU_LINEAR; path(): the path in force in this
# process; set_path(name): force one (benchmarks that compare both), returns the old one
default_path, path, set_path, using_path = _choice.functions()
check_path = _choice.check  # ConfigError unless the path is a choice this build can run


def compare_paths(rows: int, shapes, reps: int = 15) -> list[dict]:
    """GFLOP/s of one Linear's three fp32 matmuls (forward, input gradient, weight gradient)
    on oneDNN, exactly as ``variants.common``'s Linear runs them, and on torch's own ``mm`` (MKL on x86), per (in, out) shape at ``rows`` rows."""
    import torch

    from variants.common import _input_grad, _mm_onednn, _weight_grad, _weight_grad_mm

    from .speed import median_seconds
    out = []
    for k, n in shapes:
        x, gy, w = torch.randn(rows, k), torch.randn(rows, n), torch.randn(n, k)
        arms = {"fwd": (lambda: _mm_onednn(x, w), lambda: x @ w.t()),
                "dgrad": (lambda: _input_grad(gy, w), lambda: gy @ w),
                "wgrad": (lambda: _weight_grad(gy, x), lambda: _weight_grad_mm(gy, x))}
        flop = 2 * rows * k * n
        row = {"rows": rows, "in": k, "out": n}
        for name, (a, b) in arms.items():
            row[f"{name}_onednn"] = flop / median_seconds(a, reps, warmup=3) / 1e9
            row[f"{name}_mm"] = flop / median_seconds(b, reps, warmup=3) / 1e9
        out.append(row)
    return out


def compare_layers(rows: int, shapes, reps: int = 40) -> list[dict]:
    """Milliseconds of one whole Linear forward + backward (input, weight and bias
    gradients) through ``variants.common.linear`` on each path this build has, with the
    ``ONEDNN_MIN_FEATURES`` cut lifted, per (in, out) shape at ``rows`` rows."""
    import torch

    from harness.metrics import cpu_matmul as cm  # what the models read (this may be __main__)
    from variants.common import linear

    from .speed import median_seconds
    paths = [p for p in CHOICES if p == "aten" or onednn_available()]
    cut, cm.ONEDNN_MIN_FEATURES = cm.ONEDNN_MIN_FEATURES, 0
    out = []
    try:
        for k, n in shapes:
            x = torch.randn(rows, k, requires_grad=True)
            w, b = torch.randn(n, k, requires_grad=True), torch.randn(n, requires_grad=True)
            gy = torch.randn(rows, n)

            def step():
                linear(x, w, b).backward(gy)
                x.grad = w.grad = b.grad = None
            row = {"rows": rows, "in": k, "out": n}
            for p in paths:
                with cm.using_path(p):
                    row[p] = median_seconds(step, reps, warmup=5) * 1e3
            out.append(row)
    finally:
        cm.ONEDNN_MIN_FEATURES = cut
    return out


def _shape(text: str) -> tuple[int, int]:
    import argparse
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want IN x OUT features, e.g. 384x1152") from None
    if k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: features must be >= 1")
    return k, n


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.metrics.cpu_matmul``: both paths per Linear shape."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m harness.metrics.cpu_matmul",
                                description="fp32 Linear matmuls on oneDNN vs torch.mm, GFLOP/s "
                                "per shape (forward, input gradient, weight gradient)")
    p.add_argument("--rows", type=int, nargs="+", default=[1024, 4096], help="rows (tokens x batch)")
    p.add_argument("--shapes", nargs="+", type=_shape, metavar="INxOUT",
                   help="IN x OUT features, e.g. 384x1152 (default: the ViT-S / DiT-S Linears; "
                        "with --layers also narrower ones)")
    p.add_argument("--layers", action="store_true",
                   help="time whole Linear layers (forward + backward, as the models run them) "
                        "on each path instead, ms, the narrow-layer cut lifted")
    a = p.parse_args(argv)
    if min(a.rows) < 1:
        p.error(f"--rows must be >= 1, got {a.rows}")
    if not onednn_available():
        raise SystemExit("oneDNN is not available in this torch build")
    if a.layers:
        return _print_layers(a.rows, a.shapes or [(64, 192), (128, 384), (192, 576), (384, 1152),
                                                  (384, 1536), (1536, 384)])
    shapes = a.shapes or [(384, 1152), (384, 384), (384, 1536), (1536, 384)]
    avx512 = "with" if "avx512f" in cpu_flags() else "without"
    print(f"fp32 GFLOP/s, oneDNN / torch.mm, median of 15; CPU vendor {cpu_vendor()}, {avx512} "
          f"AVX-512; default path {default_path()}")
    for m in a.rows:
        for r in compare_paths(m, shapes):
            print(f"rows {m:5d}  {r['in']:5d} -> {r['out']:5d}:  " + "   ".join(
                f"{k} {r[k + '_onednn']:4.0f} / {r[k + '_mm']:4.0f}" for k in ("fwd", "dgrad", "wgrad")))
    return 0


def _print_layers(rows: list[int], shapes) -> int:
    print(f"ms per Linear forward + backward, median of 40, per path (speed vs aten); CPU "
          f"vendor {cpu_vendor()}; default path {default_path()}; layers narrower than "
          f"{ONEDNN_MIN_FEATURES} features take aten on every path")
    for m in rows:
        for r in compare_layers(m, shapes):
            cells = [f"{p} {r[p]:7.3f}" + ("" if p == "aten" else f" ({r['aten'] / r[p]:.2f}x)")
                     for p in CHOICES if p in r]
            print(f"rows {m:5d}  {r['in']:5d} -> {r['out']:5d}:  " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
