"""Where does a ViViT training step spend its time, ours against vit-pytorch's? (CPU diagnostic)

Builds the pair exactly as ``python -m harness.bench_peer`` does (its defaults: ViViT-S width,
16 frames of 64x64, batch 8, parameter counts matched), runs ``--warmup`` untimed training steps
of each, then profiles ``--steps`` more with ``torch.profiler`` and prints the ops by self time.
Divide a row's time and calls by ``--steps`` for one step.  One profile moves by tens of ms
between runs: read it for where the time goes, and the bench for which side is faster.

    python scripts/profile_peer_step.py --model 3 --steps 3
"""
import harness  # noqa: F401  (before torch)
import argparse
import sys

import torch

from harness import bench_peer
from harness.errors import HarnessError, check_counts
from harness.metrics import cpu_malloc
from harness.metrics.speed import profiled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="profile_peer_step", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=int, default=3, help="ViViT model: 2 or 3")
    p.add_argument("--steps", type=int, default=3, help="profiled training steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before them")
    p.add_argument("--top", type=int, default=25, help="rows of the table")
    args = p.parse_args(argv)
    try:
        check_counts(("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                     ("--top", args.top, 1))
    except HarnessError as e:
        p.error(str(e))
    if args.model not in (2, 3):
        p.error(f"--model must be 2 or 3, got {args.model}")
    b = bench_peer.parser().parse_args([])  # the bench's own defaults
    cpu_malloc.tune()  # as the bench does, for both sides
    dev = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)  # as the bench draws its clips
    ours, theirs, _, x = bench_peer.vivit_case(args.model, b, dev, gen)
    labels = bench_peer.step_labels(b.classes, b.batch_size, dev)
    for name, model in (("ours", ours), ("theirs", theirs)):
        step = bench_peer.make_step(model, (x,), labels, True)
        for _ in range(args.warmup):
            step()
        with profiled(dev) as prof:  # without Kineto's start / stop lines on stderr
            for _ in range(args.steps):
                step()
        print(f"===== {name}: ViViT Model {args.model}, {args.steps} training steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                        max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
