"""Which kernel runs tanh-GELU (DiT's and ViViT's MLP activation) on fp32 CPU tensors.

torch's own CPU kernel for ``F.gelu(x, approximate="tanh")`` evaluates ``tanh`` with SLEEF's
1-ULP vector tanh, which is slow: on the 2-core Intel Xeon (AVX-512) of docs/speed.md it
took 4-5x the time of the erf GELU on the same tensor, about 9% of a DiT-S/2 training step.
The same function written as ``x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))`` (the
identity ``(1 + tanh z) / 2 = sigmoid(2z)``), compiled once by inductor into one pass
forward and one backward, takes about half the time; its values equal torch's to float
rounding (tests/test_speed_paths.py).  ``variants.common.TanhGELU`` obeys this setting.
``python -m harness.metrics.cpu_gelu`` times both paths here; with ``--mlp DIM HIDDEN`` it
times a whole MLP (fc1, GELU, fc2) with fc1's bias added inside the fused GELU's pass (what
``variants.common.Mlp`` runs) against ``addmm`` + the fused GELU, alternated in pairs.

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

from .kernel_choice import KernelChoice, cpu_compile_available

CHOICES = ("aten", "fused")
ENV = "HARNESS_CPU_GELU"
FUSED_MIN_NUMEL = 1 << 18   # 1 MiB of fp32: below this the aten kernel's few 100 us do not matter


def fused_available() -> bool:
    """Whether the fused kernels can be built: torch.compile builds CPU kernels here
    (``kernel_choice.cpu_compile_available``; a Python that dynamo does not support fails
    at the first compile, which then falls back to ``aten``)."""
    return cpu_compile_available()


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
    p.add_argument("--mlp", type=int, nargs=2, metavar=("DIM", "HIDDEN"),
                   help="instead: an MLP of this width and hidden width (ViViT-S / DiT-S: 384 "
                        "1536), fc1's bias in the GELU's pass vs addmm + the fused GELU")
    p.add_argument("--rows", type=int, nargs="+", default=[1024, 4096],
                   help="--mlp: tokens per call (batch x sequence)")
    p.add_argument("--pairs", type=int, default=55, help="--mlp: alternated rounds per row count")
    args = p.parse_args(argv)
    if args.mlp:
        return _mlp_bias(args.mlp, args.rows, args.pairs)
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


def _mlp_bias(mlp: list[int], rows: list[int], pairs: int) -> int:
    """``--mlp``: the bias-in-GELU MLP against addmm + the fused GELU, alternated in pairs."""
    import statistics
    import sys

    import torch
    import torch.nn.functional as F

    from variants.common import Mlp, TanhGELU, bias_in_gelu, gelu_tanh

    from . import cpu_matmul
    from .speed import alternate, paired_ratios
    dim, hidden = mlp
    if dim < 1 or hidden < 1 or min(rows) < 1 or pairs < 1:
        print(f"error: --mlp, --rows and --pairs must be positive (got {mlp}, {rows}, {pairs})",
              file=sys.stderr)
        return 2
    if path() != "fused":
        print(f"error: the CPU GELU path here is {path()!r}; the bias-in-GELU MLP runs only on "
              f"the fused path (see this module's docstring)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    m = Mlp(dim, hidden, TanhGELU)

    def addmm(x):  # the same MLP with fc1's bias added by the GEMM (addmm)
        return m.fc2(gelu_tanh(F.linear(x, m.fc1.weight, m.fc1.bias)))

    if not bias_in_gelu(torch.empty(min(rows), dim), m.fc1.weight, m.fc1.bias):
        print(f"error: fc1 does not add its bias in the GELU's pass here (Linear path "
              f"{cpu_matmul.path()!r}: oneDNN keeps the bias in its GEMM; or {min(rows)} rows x "
              f"{hidden} is under FUSED_MIN_NUMEL = {FUSED_MIN_NUMEL}), so both arms are the same",
              file=sys.stderr)
        return 2
    print(f"Mlp({dim}, {hidden}) with the fused tanh-GELU, fp32 on cpu, {torch.get_num_threads()} "
          f"threads, {pairs} alternated rounds (every other reversed): paired = median over rounds "
          f"of addmm's time / bias-in-GELU's (> 1: the bias in the GELU is faster)")
    for n in rows:
        x = torch.randn(n, dim)
        xg = x.clone().requires_grad_()
        g = torch.randn(n, dim)
        with torch.no_grad():
            diff = (m(x) - addmm(x)).abs().max().item()

        def train(fn):
            def step():
                fn(xg).backward(g)
                m.zero_grad(set_to_none=True)
                xg.grad = None
            return step

        def infer(fn):
            def step():
                with torch.no_grad():
                    fn(x)
            return step

        for what, wrap in (("forward", infer), ("forward+backward", train)):
            t = alternate({"addmm": wrap(addmm), "bias": wrap(m)}, torch.device("cpu"),
                          warmup=3, rounds=pairs, abba=True)
            r = paired_ratios(t["addmm"], t["bias"])
            won = sum(v > 1 for v in r)
            print(f"  rows {n:6d} {what:16s} addmm {statistics.median(t['addmm']) * 1e3:7.2f} ms  "
                  f"bias-in-GELU {statistics.median(t['bias']) * 1e3:7.2f} ms  paired "
                  f"{statistics.median(r):.3f}x ({won}/{pairs} rounds faster)")
        print(f"  rows {n:6d} max |bias-in-GELU - addmm| forward: {diff:.2e}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
