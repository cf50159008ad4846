"""How many torch ops NaViT's tokenizer and its FlexAttention mask dispatch for one batch (CPU; no GPU needed).

    python scripts/count_tokenize_ops.py [--images 256] [--max-size 128]

On a GPU every op that runs a kernel is a launch, and a packed NaViT step at the GPU
profile's size spends longer launching than computing (docs/speed.md, "On a GPU"), so the
count of kernel-running ops per batch matters there.  Views run no kernel and are listed
apart.  Then the packs' FlexAttention BlockMask, built on the host (``flex_block_mask``, what
the model runs) and by ``create_block_mask`` (what it ran before): ops, and the host time of
each on the meta device, where no kernel runs, so the time is all Python and dispatch (the
median of --repeats calls).  Last, one eager training step of the whole model (forward, loss,
backward, fused AdamW) for pack and pad: the kernel-running ops of each part, and of the
transformer blocks alone.  Pack attends
here with the dense block mask, which, like FlexAttention on the GPU, is one attention call per
block.  The counts do not depend on the width, so the step runs at width --step-width (on CPU
the pad arm at full width would take minutes)."""
import harness  # noqa: F401  (before torch)
import argparse
import statistics
import time

import torch

from harness import registry
from harness.bench_packing import make_batch, model_overrides
from harness.metrics.speed import DispatchCount
from variants.navit import create_flex_block_mask, flex_block_mask, row_indices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--max-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--step-width", type=int, default=32,
                   help="width of the model whose training step is counted (heads: width / 16)")
    a = p.parse_args()
    for name in ("images", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    if a.step_width < 16 or a.step_width % 16:
        p.error(f"--step-width must be a multiple of 16 (heads of 16), got {a.step_width}")
    if a.max_size < 8:
        p.error(f"--max-size must be at least 8 px (the smallest side drawn), got {a.max_size}")
    cfg = {**model_overrides(a.max_size, 1024, depth=12), "batching": "pack"}
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

    tok, lengths, _ = model.tokenize(images)
    lay = model.layout(lengths, "flex")
    _, doc, _ = row_indices(lay, torch.device("cpu"))
    B, L = (int(s) for s in doc.shape)
    ways = {"host-built (flex_block_mask)": lambda d: flex_block_mask(lay, d),
            "create_block_mask": create_flex_block_mask}
    for name, make in ways.items():
        make(doc)
        with DispatchCount() as ops:
            make(doc)
        meta = doc.to("meta")
        make(meta)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            make(meta)
            times.append(time.perf_counter() - t)
        print(f"flex BlockMask, {B} packs of {L}, {name}: {sum(ops.names.values())} ops, "
              f"{ops.kernels} that run a kernel (a copy to the device counts one); host time on "
              f"meta {statistics.median(times) * 1e3:.2f} ms (median of {a.repeats})")

    labels = torch.zeros(len(images), dtype=torch.long)
    for arm, extra in (("pack (dense block mask)", {"batching": "pack", "attn_impl": "dense_mask"}),
                       ("pad", {"batching": "pad"})):
        narrow = {**cfg, **extra, "hidden_size": a.step_width, "num_heads": a.step_width // 16}
        model, _ = registry.build("navit-ti", narrow, device="cpu", seed=0)
        counts = step_kernels(model.train(), images, labels)
        blocks = block_kernels(model, images)
        print(f"training step, {arm}: " + ", ".join(f"{k} {n}" for k, n in counts.items())
              + f"; {sum(counts.values())} kernels in all, of which the {len(model.blocks)} "
              f"blocks {blocks['forward']} forward and {blocks['backward']} backward")


def step_kernels(model, images, labels) -> dict[str, int]:
    """Kernel-running ops of one eager training step, by part (after one untimed step)."""
    import torch.nn.functional as F
    from harness.metrics.speed import adamw
    optim = adamw(model.parameters(), torch.device("cpu"))
    parts: dict[str, int] = {}
    for _ in range(2):  # the first step makes the optimiser's state; the second is counted
        with DispatchCount() as ops:
            logits = model(images)
        parts["forward"] = ops.kernels
        with DispatchCount() as ops:
            loss = F.cross_entropy(logits.float(), labels)
        parts["loss"] = ops.kernels
        with DispatchCount() as ops:
            loss.backward()
        parts["backward"] = ops.kernels
        with DispatchCount() as ops:
            optim.step()
            optim.zero_grad(set_to_none=True)
        parts["optimizer"] = ops.kernels
    return parts


def block_kernels(model, images) -> dict[str, int]:
    """Kernel-running ops of the transformer blocks alone in that step: their forward, and
    their backward to their input and their weights (what ``compile_blocks`` compiles)."""
    run, seen = model.run_blocks, {}

    def counted(x, ctx):
        x = x.detach().requires_grad_()
        with DispatchCount() as ops:
            y = run(x, ctx)
        seen["forward"] = ops.kernels
        g = torch.ones_like(y)
        with DispatchCount() as ops:
            torch.autograd.grad(y, [x, *model.blocks.parameters()], g)
        seen["backward"] = ops.kernels
        return y

    model.run_blocks = counted
    try:
        model(images)
    finally:
        del model.run_blocks  # the method again
    return seen


if __name__ == "__main__":
    main()
