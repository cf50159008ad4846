"""How long NaViT's compiled blocks take to compile: one block compiled and called for each
block (what ``compile_blocks`` does) against the whole stack of blocks compiled as one
function (what it did before), on this machine's CPU (no GPU needed).

    python scripts/compile_time.py [--depth 12] [--width 192] [--attn dense_mask|flex]

Each arm runs in a fresh process with an empty inductor cache and inductor's graph caches
off, so every compile is a cold one: the time to the first training step (forward, loss and
backward: dynamo, AOT autograd and inductor for both directions) and to the first forward
(no grad: a graph of its own), then the steady step (median of --steps), and the largest
difference of the logits and gradients from the same model run eagerly.  ``--attn flex``
(FlexAttention, the GPU's packed path) times the forward only: FlexAttention has no CPU
backward.  The batch is the peer comparison's: 64 images of 8-64 px at skew 2, patch 4,
packs of 256 tokens."""
import harness  # noqa: F401  (before torch)
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ARMS = ("block", "stack")


def measure(arm: str, depth: int, width: int, attn: str, steps: int) -> dict:
    """One arm in this process (``main`` gives each its own)."""
    from torch._dynamo.utils import counters

    from harness import registry
    from harness.bench_packing import make_batch
    from harness.metrics.speed import compiled
    images = make_batch(64, 1, 8, 64, 8, 2.0, 0, torch.device("cpu"))
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    cfg = {"depth": depth, "hidden_size": width, "num_heads": max(1, width // 64),
           "input_size": 64, "max_grid": 16, "max_seq_len": 256, "batching": "pack",
           "attn_impl": attn}
    eager, _ = registry.build("navit-ti", cfg, device="cpu", seed=0)
    model, _ = registry.build("navit-ti", {**cfg, "compile_blocks": arm == "block"},
                              device="cpu", seed=0)
    if arm == "stack":
        model.run_blocks = compiled(model._blocks)  # the whole stack as one function
    train = attn != "flex"

    def train_step(m):
        m.train()
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(images), labels).backward()

    def forward(m):
        m.eval()
        with torch.no_grad():
            return m(images)

    out = {"arm": arm}
    if train:
        t = time.perf_counter()
        train_step(model)
        out["first_train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    logits = forward(model)
    out["first_forward_s"] = time.perf_counter() - t
    out["graphs"] = counters["stats"]["unique_graphs"]
    out["logits_diff"] = (logits - forward(eager)).abs().max().item()
    if train:
        train_step(eager)
        out["grads_diff"] = max((p.grad - q.grad).abs().max().item()
                                for p, q in zip(model.parameters(), eager.parameters()))
    modes = (("train", train_step),) if train else ()
    for mode, fn in modes + (("forward", forward),):
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn(model)
            times.append(time.perf_counter() - t)
        out[f"{mode}_ms"] = statistics.median(times) * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--width", type=int, default=192, help="heads: width / 64")
    p.add_argument("--attn", default="dense_mask", choices=("dense_mask", "flex"))
    p.add_argument("--steps", type=int, default=5, help="steady steps timed after the first")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in a child
    a = p.parse_args()
    for name in ("depth", "width", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    if a.arm:
        print(json.dumps(measure(a.arm, a.depth, a.width, a.attn, a.steps)))
        return
    from harness.errors import ConfigError
    from harness.metrics.speed import check_compile_supported
    try:
        check_compile_supported("compile_time.py", "run it where there is one", "cpu")
    except ConfigError as e:
        p.error(str(e))
    rows = []
    for arm in ARMS:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
                   "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
            r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--arm", arm],
                               capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(f"compile_time: the {arm} arm failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"NaViT depth {a.depth}, width {a.width}, attention {a.attn}, 64 images; cold "
          f"compiles, torch {torch.__version__}")
    for r in rows:
        first = (f"first training step {r['first_train_s']:.1f} s, " if "first_train_s" in r
                 else "")
        steady = ", ".join(f"{m} {r[f'{m}_ms']:.0f} ms" for m in ("train", "forward")
                           if f"{m}_ms" in r)
        diffs = f"logits {r['logits_diff']:.1e}" + (f", grads {r['grads_diff']:.1e}"
                                                    if "grads_diff" in r else "")
        print(f"  {r['arm']:5s}: {first}first forward {r['first_forward_s']:.1f} s; "
              f"{r['graphs']} graphs; steady {steady}; from eager: {diffs}")


if __name__ == "__main__":
    main()
