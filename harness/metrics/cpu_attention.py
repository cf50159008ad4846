"""Which kernel runs short fp32 attention on the CPU (ViViT's factorised sequences).

torch's CPU ``F.scaled_dot_product_attention`` runs its flash kernel for every fp32 call
without dropout.  The kernel tiles queries and keys in blocks of 32 and more, and calls a
small GEMM per tile inside its parallel loop, so on short sequences much of its time is
per-tile overhead.  ViViT's factorised models attend over exactly such sequences: 16
spatial tokens per frame and 8 temporal tokens per patch at 16x64x64 with 2x16x16 tubelets.
There, two batched matmuls around a softmax (the math written out, ``matmul_attention``)
can be cheaper.

``python -m harness.metrics.cpu_attention`` times both kernels.  On the 2-core AMD EPYC Zen 3
of docs/speed.md, with 6 heads of 64 and 4096 query tokens per head (batch x length),
flash / matmul in ms:

    keys  8: forward 6.8 / 4.9,    forward+backward 31.9 / 22.2
    keys 16: forward 6.4 / 6.5,    forward+backward 29.6 / 20.9
    keys 32: forward 6.4 / 7.2,    forward+backward 30.9 / 25.5
    keys 48: forward 8.5 / 8.9,    forward+backward 33.3 / 27.6
    keys 64: forward 8.1 / 10.4,   forward+backward 31.4 / 33.4

A process that has called ``torch.set_num_threads`` (even with the count already in force)
runs the flash kernel's small calls about twice as slowly, while the matmuls do not change:
then the matmul path wins by 1.4-3x.  On small calls (a few hundred query rows), the matmul
path's several ops cost more than the one flash call.  So the matmul path takes calls with
at most ``MATMUL_MAX_KEYS`` keys and at least ``MATMUL_MIN_ROWS`` query rows; flash keeps
the rest: DiT's 256-token attention, ViViT Model 1's 128 tokens, and NaViT's small packs.
Whole ViViT-S train steps (16x64x64, batch 8, the vit-pytorch comparison's models, this
path against ``sdpa`` alternated in one process) were equal within noise in a fresh process
(Model 2 1.00x train / 1.04x inference, Model 3 0.99x / 0.97x, 12 rounds), and faster after
``torch.set_num_threads(2)`` (Model 3 1.07x / 1.05x, Model 2 0.99x / 1.15x).  The results
equal SDPA's to float rounding, with or without a mask, and a query row with no key to
attend gets zeros, as in SDPA (tests/test_speed_paths.py).

Paths:
    sdpa    ``F.scaled_dot_product_attention`` for every call
    matmul  fp32 CPU calls with at most MATMUL_MAX_KEYS keys and at least MATMUL_MIN_ROWS
            query rows through ``matmul_attention``; the rest through SDPA

Default: ``matmul``; ``HARNESS_CPU_ATTENTION=sdpa|matmul`` overrides (a bad value stops the
CLI before any work).  Tracing (FLOP counting), ``torch.compile``, autocast, CUDA, other
dtypes, and a forced SDPA backend (the benchmark task's ``attention`` option other than
``auto``) always take SDPA.  Every trial records the path in force (tag ``cpu_attention``).
"""
from __future__ import annotations

from .kernel_choice import KernelChoice

CHOICES = ("sdpa", "matmul")
ENV = "HARNESS_CPU_ATTENTION"
MATMUL_MAX_KEYS = 48    # measured crossover: the matmul path wins forward and backward up to here
MATMUL_MIN_ROWS = 4096  # query rows (batch x heads x queries): on smaller calls its extra ops cost more

_choice = KernelChoice(ENV, "CPU attention path", CHOICES, lambda: "matmul", lambda name: None)
# default_path(): ``matmul``, or $HARNESS_CPU_ATTENTION; path(): the path in force in this
# process; set_path / using_path: force one
default_path, path, set_path, using_path = _choice.functions()


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.metrics.cpu_attention``: time both kernels over key lengths."""
    import argparse

    import torch
    import torch.nn.functional as F

    from variants.common import matmul_attention

    from .speed import median_seconds
    p = argparse.ArgumentParser(prog="python -m harness.metrics.cpu_attention",
                                description="fp32 CPU self-attention: SDPA (flash) vs matmul + "
                                            "softmax + matmul, forward and forward+backward")
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 24, 32, 48, 64, 96, 128],
                   help="sequence lengths (queries = keys)")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4096,
                   help="query rows per call, per head (batch x length; x heads in all)")
    p.add_argument("--repeats", type=int, default=25)
    args = p.parse_args(argv)
    if min(*args.lengths, args.heads, args.head_dim, args.tokens, args.repeats) < 1:
        p.error("--lengths, --heads, --head-dim, --tokens and --repeats must all be >= 1")
    gen = torch.Generator().manual_seed(0)
    print(f"fp32 self-attention on cpu, {torch.get_num_threads()} threads, {args.heads} heads of "
          f"{args.head_dim}, {args.tokens} query tokens per head, median ms of {args.repeats}: sdpa / matmul")
    for n in args.lengths:
        shape = (max(1, args.tokens // n), args.heads, n, args.head_dim)
        q, k, v = (torch.randn(*shape, generator=gen).requires_grad_() for _ in range(3))
        g = torch.randn(*shape, generator=gen)
        row = []
        for fn in (F.scaled_dot_product_attention, matmul_attention):
            with torch.no_grad():
                fwd = median_seconds(lambda: fn(q, k, v), args.repeats)
            both = median_seconds(lambda: fn(q, k, v).backward(g), args.repeats)
            row.append((fwd * 1e3, both * 1e3))
        with torch.no_grad():
            err = (F.scaled_dot_product_attention(q, k, v) - matmul_attention(q, k, v)).abs().max().item()
        (sf, sb), (mf, mb) = row
        print(f"  keys {n:4d}: forward {sf:7.2f} / {mf:7.2f} ({sf / mf:4.2f}x)   forward+backward "
              f"{sb:7.2f} / {mb:7.2f} ({sb / mb:4.2f}x)   max |diff| {err:.1e}")
    print(f"  in force: {path()} (matmul for at most {MATMUL_MAX_KEYS} keys and at least "
          f"{MATMUL_MIN_ROWS} query rows)")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
