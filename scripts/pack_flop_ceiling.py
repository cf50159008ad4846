"""Is FlexAttention's block granularity what keeps packing from its ideal on a GPU? (CPU; no GPU needed)

    python scripts/pack_flop_ceiling.py [--images 256] [--max-size 128] [--max-seq-len 1024]
                                        [--skews 0 2 4] [--block-sizes 128 64]

Counts the multiply-accumulates of one forward of NaViT's blocks for the speed_packing study's
gpu profile batch (the same images as ``harness bench-packing``), pad against pack:

- pad: every image a row of the longest image's length; its attention is over the whole row
  (key padding masks keys, the kernel still runs them);
- pack: rows of ``max_seq_len`` slots (flex keeps that length static), and the attention work
  FlexAttention does: every block of ``block_size`` x ``block_size`` query-key pairs its
  BlockMask marks partial or full (``variants.navit.block_sparsity``, the model's own
  BlockMask, tested equal to ``create_block_mask``'s).

Per token and layer, the Linears cost (4 + 2 * mlp_ratio) * D^2 MACs; per query-key pair,
attention costs 2 * D (q.k and the weighted sum of v). The ideal speedup of the benchmarks
is a token ratio (pad's tokens / real tokens), so a MAC ratio above it means the block
granularity is not what stands between pack and its ideal: a pack step bound by its kernels
would reach the ideal, and one that does not is bound by something else (on the H200, by
launching kernels; docs/speed.md, "One NVIDIA H200")."""
import harness  # noqa: F401  (before torch)
import argparse

import numpy as np
import torch

from harness import registry
from harness.bench_packing import make_batch, model_overrides
from variants import navit as nv


def ceiling(images, model, block_sizes) -> dict:
    cfg = model.cfg
    D, p = cfg.hidden_size, cfg.patch_size
    n = np.array([(int(x.shape[1]) // p) * (int(x.shape[2]) // p) for x in images], np.int64)
    lay = model.layout(n.tolist(), "flex")
    B, L = len(lay.rows), lay.length
    per_token = (4 + 2 * cfg.mlp_ratio) * D * D
    per_pair = 2 * D
    pad_tokens = len(n) * int(n.max())
    pad = pad_tokens * per_token + len(n) * int(n.max()) ** 2 * per_pair
    out = {"images": len(n), "real_tokens": int(n.sum()), "pad_tokens": pad_tokens, "rows": B,
           "slots": B * L, "token_ideal": pad_tokens / int(n.sum()),
           "block_diagonal_pairs": int((n ** 2).sum()), "blocks": {}}
    for bs in block_sizes:
        partial, full = nv.block_sparsity(lay, bs)  # the tiles create_block_mask marks (tested)
        pairs = int(partial.sum() + full.sum()) * bs * bs
        pack = B * L * per_token + pairs * per_pair
        out["blocks"][bs] = {"pairs": pairs, "mac_ratio": pad / pack}
    return out


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--images", type=int, default=256)
    a.add_argument("--max-size", type=int, default=128)
    a.add_argument("--max-seq-len", type=int, default=1024)
    a.add_argument("--skews", type=float, nargs="+", default=[0.0, 2.0, 4.0])
    a.add_argument("--block-sizes", type=int, nargs="+", default=[128, 64])
    args = a.parse_args()
    for name in ("images", "max_seq_len"):
        if getattr(args, name) < 1:
            a.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_size < 8:
        a.error(f"--max-size must be at least 8 px (the smallest side drawn), got {args.max_size}")
    if min(args.block_sizes) < 1:
        a.error(f"--block-sizes must be positive, got {args.block_sizes}")
    cfg = {**model_overrides(args.max_size, args.max_seq_len, depth=12), "batching": "pack"}
    model, _ = registry.build("navit-ti", cfg, device="cpu", seed=0)
    print(f"NaViT-Ti blocks, {args.images} images of 8-{args.max_size} px (bench-packing's batch, "
          f"seed 0), pack rows of {args.max_seq_len} slots; MACs of one forward, pad / pack")
    print("| skew | real tokens | pad tokens | pack rows x slots | token ideal | block | flex pairs / "
          "block-diagonal | MAC ratio pad / pack | of the token ideal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for skew in args.skews:
        images = make_batch(args.images, 1, 8, args.max_size, 8, skew, 0, torch.device("cpu"))
        r = ceiling(images, model, args.block_sizes)
        for bs, b in r["blocks"].items():
            print(f"| {skew:g} | {r['real_tokens']:,} | {r['pad_tokens']:,} | {r['rows']} x "
                  f"{r['slots'] // r['rows']} | {r['token_ideal']:.2f}x | {bs} | "
                  f"{b['pairs'] / r['block_diagonal_pairs']:.2f}x | {b['mac_ratio']:.2f}x | "
                  f"{b['mac_ratio'] / r['token_ideal']:.0%} |")


if __name__ == "__main__":
    main()
