"""The benchmark loss before and after commit c37eb3e, train steps alternated in one process.

    python docs/bench_loss_ab.py NAME BATCH ROUNDS [KEY=JSON ...]
    python docs/bench_loss_ab.py dit-s/2 16 20
    python docs/bench_loss_ab.py vivit-s 16 12 model=1 num_frames=16 input_size=64 \
        'tubelet_size=[2,16,16]' num_classes=400

``old``: the output's mean square, whose gradient is exactly zero at the zero output every
variant here starts from (zero-initialised heads, adaLN-Zero), so nothing ever moves;
``new``: the registry's ``bench_loss`` (distance to a target of ones).  Each arm has its own
model and AdamW, three warm-up steps, then ROUNDS rounds of one step per arm in ABBA order.
Prints each arm's median step and the paired ratio old / new (median over rounds): below 1
means the zero-gradient steps were faster.  A one-off check kept for reproducibility, not
part of the harness.
"""
import json
import statistics
import sys

import torch

from harness import registry
from harness.metrics import cpu_malloc
from harness.metrics.speed import adamw, alternate, make_train_step, paired_ratios


def main(argv: list[str]) -> None:
    name, batch, rounds = argv[0], int(argv[1]), int(argv[2])
    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in argv[3:])}
    cpu_malloc.tune()
    device = torch.device("cpu")
    steps = {}
    for arm in ("old", "new"):
        model, _ = registry.build(name, overrides, seed=0)
        model.train()
        inputs = model.example_inputs(batch, generator=torch.Generator().manual_seed(0))
        if arm == "old":
            model.bench_loss = lambda out: out.float().pow(2).mean()
        steps[arm] = make_train_step(model, model, inputs, adamw(model.parameters(), device),
                                     device, False)
    times = alternate(steps, device, warmup=3, rounds=rounds, abba=True)
    for arm, t in times.items():
        print(f"{name} {overrides} {arm}: median step {statistics.median(t) * 1e3:.0f} ms")
    ratios = paired_ratios(times["old"], times["new"])
    print(f"{name}: paired step-time ratio old / new {statistics.median(ratios):.3f} "
          f"(median over {rounds} rounds; old faster in {sum(r < 1 for r in ratios)})")


if __name__ == "__main__":
    main(sys.argv[1:])
