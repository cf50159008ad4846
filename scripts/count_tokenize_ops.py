"""How many torch ops NaViT's tokenizer dispatches for one batch (CPU; no GPU needed).

    python scripts/count_tokenize_ops.py [--images 256] [--max-size 128]

On a GPU every op that runs a kernel is a launch, and a packed NaViT step at the GPU
profile's size spends longer launching than computing (docs/speed.md, "On a GPU"), so the
count of kernel-running ops per batch matters there.  Views run no kernel and are listed
apart."""
import harness  # noqa: F401  (before torch)
import argparse

import torch

from harness import registry
from harness.bench_packing import make_batch
from harness.metrics.speed import DispatchCount


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--max-size", type=int, default=128)
    a = p.parse_args()
    cfg = {"input_size": a.max_size, "max_seq_len": 1024, "max_grid": a.max_size // 4,
           "patch_size": 4, "in_channels": 1, "num_classes": 10, "depth": 12, "batching": "pack"}
    images = make_batch(a.images, 1, 8, a.max_size, 8, 2.0, 0, torch.device("cpu"))
    model, _ = registry.build("navit-ti", cfg, device="cpu", seed=0)
    with torch.no_grad():
        model.tokenize(images)  # once first: whatever the model caches is cached, as in a run
        with DispatchCount() as ops:
            model.tokenize(images)
    total = sum(ops.names.values())
    print(f"tokenize, {a.images} images of 8-{a.max_size} px: {total} ops, {ops.kernels} that "
          f"run a kernel, {total - ops.kernels} views")
    print("  " + ", ".join(f"{k} {n}" for k, n in ops.names.most_common()))


if __name__ == "__main__":
    main()
