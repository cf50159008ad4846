"""Which kernel runs short fp32 attention on the CPU (ViViT's factorised sequences).

torch's CPU ``F.scaled_dot_product_attention`` runs its flash kernel for every fp32 call
without dropout.  The kernel tiles queries and keys in blocks of 32 and more, and calls a
small GEMM per tile inside its parallel loop, so on short sequences much of its time is
per-tile overhead.  ViViT's factorised models attend over exactly such sequences: 16
spatial tokens per frame and 8 temporal tokens per patch at 16x64x64 with 2x16x16 tubelets.
There, two batched matmuls around a softmax (the math written out, ``matmul_attention``)
can be cheaper.

``python -m harness.metrics.cpu_attention`` times both kernels.  On the 2-core AMD EPYC Zen 3
of docs/speed.md, with 6 heads of 64 and 4096 query tokens per head (batch x length), on
contiguous q, k and v (now ``--layout contiguous``), flash / matmul in ms:

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

Measured against the layout the models call it in, the picture changes on Intel.  Every
Attention layer splits q, k and v as strided views of one qkv projection and merges the
output back to (batch, length, heads x head dim).  The flash kernel reads those views and
writes its output in the merged layout; the matmul path copies q, k and v and the output.
``python -m harness.metrics.cpu_attention`` (``--layout views``, the default) times that.
On a 2-core Intel Xeon (family 6 model 167, AVX-512 and AMX; docs/speed.md, 2026-12-03),
sdpa / matmul in ms, 6 heads of 64, 4096 query tokens per head:

    keys  8: forward 2.36 / 4.51,   forward+backward 16.60 / 19.01
    keys 16: forward 1.41 / 2.71,   forward+backward 13.46 / 14.35
    keys 32: forward 1.81 / 3.19,   forward+backward 13.90 / 15.16
    keys 48: forward 2.53 / 3.60,   forward+backward 15.89 / 16.20

and on whole ViViT-S steps against vit-pytorch (3 processes x 9 rounds), SDPA moved Model 3
from 0.96 to 1.01 (train) and 0.98 to 1.01 (inference), Model 2 from 0.97 to 0.99 and 1.02
to 1.04.  So on Intel CPUs the default is ``sdpa``.  On AMD the matmul path stays the
default: re-measured on a Zen 4 with ``--layout views`` (docs/speed.md, "Zen 4 again"), the
forward favours SDPA from 32 keys up and forward+backward the matmul path at 8-9 keys, and
whole ViViT models were equal within noise either way (in-process, SDPA 0.986-1.013x).

Paths:
    sdpa    ``F.scaled_dot_product_attention`` for every call
    matmul  fp32 CPU calls with at most MATMUL_MAX_KEYS keys and at least MATMUL_MIN_ROWS
            query rows through ``matmul_attention``; the rest through SDPA

Default: ``sdpa`` on Intel CPUs, ``matmul`` elsewhere; ``HARNESS_CPU_ATTENTION=sdpa|matmul``
overrides (a bad value stops the CLI before any work).  Tracing (FLOP counting),
``torch.compile``, autocast, CUDA, other dtypes, and a forced SDPA backend (the benchmark
task's ``attention`` option other than ``auto``) always take SDPA.  Every trial records the
path in force (tag ``cpu_attention``).
"""
from __future__ import annotations

from .kernel_choice import KernelChoice

CHOICES = ("sdpa", "matmul")
ENV = "HARNESS_CPU_ATTENTION"
MATMUL_MAX_KEYS = 48    # measured crossover: the matmul path wins forward and backward up to here
MATMUL_MIN_ROWS = 4096  # query rows (batch x heads x queries): on smaller calls its extra ops cost more


def _rule() -> str:
    """``sdpa`` on Intel CPUs, ``matmul`` elsewhere (the measurements above)."""
    from . import cpu_matmul
    return "sdpa" if cpu_matmul.intel() else "matmul"


_choice = KernelChoice(ENV, "CPU attention path", CHOICES, _rule, lambda name: None)
# default_path(): the rule, or $HARNESS_CPU_ATTENTION; path(): the path in force in this
# process; set_path / using_path: force one
default_path, path, set_path, using_path = _choice.functions()


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.metrics.cpu_attention``: time both kernels over key lengths."""
    import argparse

    import torch
    import torch.nn.functional as F

    from variants.common import heads_of, matmul_attention

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
    p.add_argument("--layout", choices=("views", "contiguous"), default="views",
                   help="views (default): q, k, v are views of one qkv projection's output and "
                        "the output is merged back to (batch, length, heads x head dim), as the "
                        "models' Attention layers call it, so each kernel pays for the copies "
                        "its layout needs; contiguous: q, k, v and the output as they are")
    args = p.parse_args(argv)
    if min(*args.lengths, args.heads, args.head_dim, args.tokens, args.repeats) < 1:
        p.error("--lengths, --heads, --head-dim, --tokens and --repeats must all be >= 1")
    gen = torch.Generator().manual_seed(0)
    H, Dh = args.heads, args.head_dim
    print(f"fp32 self-attention on cpu, {torch.get_num_threads()} threads, {H} heads of {Dh}, "
          f"{args.tokens} query tokens per head, layout {args.layout}, median ms of "
          f"{args.repeats}: sdpa / matmul")
    for n in args.lengths:
        b = max(1, args.tokens // n)
        if args.layout == "views":  # Attention.split_heads / merge_heads around the kernel
            qkv = torch.randn(b, n, 3 * H * Dh, generator=gen).requires_grad_()
            g = torch.randn(b, n, H * Dh, generator=gen)

            def call(fn):
                q, k, v = heads_of(qkv.view(b, n, 3, H, Dh))
                return fn(q, k, v).transpose(1, 2).reshape(b, n, H * Dh)
        else:
            q, k, v = (torch.randn(b, H, n, Dh, generator=gen).requires_grad_() for _ in range(3))
            g = torch.randn(b, H, n, Dh, generator=gen)

            def call(fn):
                return fn(q, k, v)
        row = []
        for fn in (F.scaled_dot_product_attention, matmul_attention):
            with torch.no_grad():
                fwd = median_seconds(lambda: call(fn), args.repeats)
            both = median_seconds(lambda: call(fn).backward(g), args.repeats)
            row.append((fwd * 1e3, both * 1e3))
        with torch.no_grad():
            err = (call(F.scaled_dot_product_attention) - call(matmul_attention)).abs().max().item()
        (sf, sb), (mf, mb) = row
        print(f"  keys {n:4d}: forward {sf:7.2f} / {mf:7.2f} ({sf / mf:4.2f}x)   forward+backward "
              f"{sb:7.2f} / {mb:7.2f} ({sb / mb:4.2f}x)   max |diff| {err:.1e}")
    print(f"  in force: {path()} (the rule here: {_rule()}; matmul takes calls with at most "
          f"{MATMUL_MAX_KEYS} keys and at least {MATMUL_MIN_ROWS} query rows)")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
