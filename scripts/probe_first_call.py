"""Where the engine's per-trial speed probe spends its time: first call against later ones.

    python scripts/probe_first_call.py [--variant vit-digits] [--batch-size 64] [--steps 3] [--calls 3]

Calls ``measure_speed`` (the probe ``harness.sweep`` runs before each trial's training, with
its settings: a ``deepcopy`` of the model, warm-up 1, ``budget.speed_steps`` timed steps,
train and infer) ``--calls`` times in one fresh process, on ``bench_peer overhead``'s
model and batch by default, and prints each call's wall time with its median step times.
The first call also pays the process's first use of the model's kernels; the later ones
show what the probe itself costs a worker that runs trial after trial in one process."""
import harness  # noqa: F401  (before torch)
import argparse
import copy
import time

from harness import registry
from harness.errors import HarnessError
from harness.metrics.speed import SpeedOptions, measure_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="vit-digits")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    for name in ("batch_size", "steps", "calls"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        model, _ = registry.build(args.variant, {}, device="cpu")
    except HarnessError as e:
        ap.error(f"--variant: {e}")
    for i in range(args.calls):
        t0 = time.perf_counter()
        sp = measure_speed(copy.deepcopy(model),
                           SpeedOptions(batch_size=args.batch_size, warmup=1, steps=args.steps), "cpu")
        print(f"call {i}: {time.perf_counter() - t0:.3f} s; median step: train "
              f"{sp['train_step_ms_median']:.1f} ms, infer {sp['infer_step_ms_median']:.1f} ms")


if __name__ == "__main__":
    main()
