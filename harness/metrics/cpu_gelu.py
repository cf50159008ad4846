"""Which kernel runs tanh-GELU (DiT's and ViViT's MLP activation) on fp32 CPU tensors.

torch's own CPU kernel for ``F.gelu(x, approximate="tanh")`` evaluates ``tanh`` with SLEEF's
1-ULP vector tanh, which is slow: on the 2-core Intel Xeon (AVX-512) of docs/speed.md it
took 4-5x the time of the erf GELU on the same tensor, about 9% of a DiT-S/2 training step.
The same function written as ``x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))`` (the
identity ``(1 + tanh z) / 2 = sigmoid(2z)``), compiled once by inductor into one pass
forward and one backward, takes about half the time; its values equal torch's to float
rounding (tests/test_speed_paths.py).  ``variants.common.TanhGELU`` obeys this setting.
``python -m harness.metrics.cpu_gelu`` times both paths here.

Paths:
    fused  the compiled kernels (``torch.compile(dynamic=True)`` over flat tensors: one
           compile per process, seconds, then cached by inductor on disk), for fp32 CPU
           tensors of at least ``FUSED_MIN_NUMEL`` elements (small ones are not worth it)
    aten   torch's ``F.gelu(approximate="tanh")`` everywhere

Default: ``fused`` where torch.compile can build CPU kernels here (a C++ compiler on the
PATH), else ``aten``; ``HARNESS_CPU_GELU=fused|aten`` overrides (a bad value stops the CLI
before any work).  If compiling fails at first use anyway, the process warns once and
falls back to ``aten``.  Every trial records the path in force (tag ``cpu_gelu``) and
benchmark trials the path that ran (``bench.cpu_gelu``).
"""
from __future__ import annotations

import os
import shutil

from .kernel_choice import KernelChoice

CHOICES = ("aten", "fused")
ENV = "HARNESS_CPU_GELU"
FUSED_MIN_NUMEL = 1 << 18   # 1 MiB of fp32: below this the aten kernel's few 100 us do not matter


def fused_available() -> bool:
    """Whether torch.compile may build CPU kernels here: it exists and a C++ compiler is on
    the PATH (cheap: importing dynamo to ask it costs a second; a Python it does not
    support fails at the first compile, which then falls back to ``aten``)."""
    import torch
    if not hasattr(torch, "compile"):
        return False
    cxx = os.environ.get("CXX")
    return any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"])


def _unavailable(name: str) -> str | None:
    if name == "fused" and not fused_available():
        return "torch.compile cannot build CPU kernels here (no C++ compiler on the PATH)"
    return None


_choice = KernelChoice(ENV, "CPU GELU path", CHOICES,
                       lambda: "fused" if fused_available() else "aten", _unavailable)
# default_path(): ``fused`` where torch.compile can build CPU kernels, else ``aten``, or
# $HARNESS_CPU_GELU; path(): the path in force; set_path / using_path: force one
default_path, path, set_path, using_path = _choice.functions()


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.metrics.cpu_gelu``: time both paths, forward and backward."""
    import argparse
    import time

    import torch
    import torch.nn.functional as F

    from variants.common import fused_gelu_tanh_kernels

    from .speed import median_seconds
    p = argparse.ArgumentParser(prog="python -m harness.metrics.cpu_gelu",
                                description="tanh-GELU on fp32 CPU: torch's kernel vs the fused one")
    p.add_argument("--shape", type=int, nargs="+", default=[4096, 1536],
                   help="tensor shape (default: DiT-S/2's MLP hidden at batch 16)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(*args.shape, generator=gen), torch.randn(*args.shape, generator=gen)
    t0 = time.perf_counter()
    fwd, bwd = fused_gelu_tanh_kernels()
    xf, gf = x.reshape(-1), g.reshape(-1)  # the kernels take flat tensors
    compile_s = time.perf_counter() - t0

    def median_ms(fn) -> float:
        return median_seconds(fn, args.repeats) * 1e3

    rows = {"aten": (lambda: F.gelu(x, approximate="tanh"),
                     lambda: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
            "fused": (lambda: fwd(xf), lambda: bwd(gf, xf))}
    print(f"tanh-GELU, fp32 {tuple(x.shape)} on cpu, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} (fused: compiled in {compile_s:.1f} s, this process)")
    for name, (f, b) in rows.items():
        print(f"  {name:6s} forward {median_ms(f):7.2f} ms   backward {median_ms(b):7.2f} ms")
    err_f = (fwd(xf).view(x.shape) - F.gelu(x, approximate="tanh")).abs().max().item()
    err_b = (bwd(gf, xf).view(x.shape)
             - torch.ops.aten.gelu_backward(g, x, approximate="tanh")).abs().max().item()
    print(f"  max |fused - aten|: forward {err_f:.2e}, backward {err_b:.2e}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
