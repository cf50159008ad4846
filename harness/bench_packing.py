"""Does packing pay?  Images/s of NaViT packing vs padding, same backbone, same weights.

    python -m harness.bench_packing [--variant navit-ti] [--batch-size 64] [--skew 2]
                                    [--processes 1] [--json] [--out DIR/README.md]
    harness bench-packing ...          (the same, through the CLI)

One batch of images from a skewed resolution distribution (most small, a few large) is run
by two copies of one model that differ only in ``batching``: "pack" (NaViT) and "pad" (each
sequence padded to the longest, key-padding mask).  Train steps (forward, cross entropy,
backward, AdamW: fused where torch has it, as in the studies) and inference are timed
apart: warm-up steps, then (``--settle N``) up to N untimed rounds more until no step
still grows the heap the arms share (docs/speed.md, "Heap settling"), then timed steps
alternating pack and pad, every other round in reverse order (so a change in background load
hits both arms alike), median per arm.
``--processes N`` repeats the whole measurement in N fresh processes and reports the medians
with each process's figures (``harness.processes``).

    ideal speedup   = padded tokens / real tokens (the pad batch's tokens over the images' own)
    measured        = pack images/s / pad images/s
    fraction        = measured / ideal

``--paths`` also times every pack attention implementation available on the device (the
measurement behind ``variants.navit.CPU_PACK_ATTENTION``); ``--call-costs C ...`` instead
times the grouped path at each call cost C (arms ``pack_cost<C>``: nearby image lengths share
an attention call when padding them costs less than C; the measurement behind
``variants.navit.GROUP_CALL_COST``).  Each arm is timed against pad, so its speedup and
fraction of the ideal read as for pack.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .metrics import cpu_malloc, cpu_mkl
from .metrics.peak import BUSY_CORES, OtherLoad
from .metrics.speed import (SETTLED_FAULTS, adamw, alternate, autocast, check_compile_supported,
                            set_threads, settle_method, settling_fields, settling_table, sync)


def make_batch(n: int, in_channels: int, min_size: int, max_size: int, step: int, skew: float,
               seed: int, device: torch.device) -> list[torch.Tensor]:
    from .data.varres import sample_sizes
    gen = torch.Generator().manual_seed(seed)
    sizes = sample_sizes(n, min_size, max_size, step, skew, 2.0, gen)
    return [torch.rand(in_channels, h, w, generator=gen).to(device) for h, w in sizes]


def model_overrides(max_size: int, max_seq_len: int, patch_size: int = 4, depth: int = 0) -> dict:
    """The NaViT config of this benchmark's batches: greyscale images up to ``max_size`` px,
    absolute position slots for all of them, 10 classes; ``depth`` 0 keeps the variant's."""
    out = {"input_size": max_size, "max_seq_len": max_seq_len, "max_grid": max_size // patch_size,
           "patch_size": patch_size, "in_channels": 1, "num_classes": 10}
    if depth:
        out["depth"] = depth
    return out


def build_arms(variant: str, overrides: dict, arms: dict[str, dict], device: torch.device,
               seed: int) -> dict:
    """One model per arm, all with the weights of the first (the arms add no parameters)."""
    from . import registry
    models, state = {}, None
    for name, extra in arms.items():
        model, _ = registry.build(variant, {**overrides, **extra}, device=device, seed=seed)
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        models[name] = model
    return models


def time_arms(models: dict, images: list[torch.Tensor], labels: torch.Tensor, train: bool,
              warmup: int, steps: int, device: torch.device, settle: int = 0,
              faults: dict | None = None, bf16: bool = False,
              log=None) -> dict[str, list[float]]:
    """Seconds per step of each arm; timed steps alternate between arms, every other
    round in reverse order, once the heap the arms share has settled (``alternate``'s
    ``settle`` and ``faults``); ``bf16``: forward and loss under bf16 autocast.  ``log``:
    called with each arm's first warm-up step's time (where compiled blocks compile)."""
    steps_fn = {}
    for name, model in models.items():
        if train:
            model.train()
            optim = adamw(model.parameters(), device)  # the studies' and bench_peer's optimiser

            def step(model=model, optim=optim):
                optim.zero_grad(set_to_none=True)
                with autocast(device, bf16):
                    loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optim.step()
        else:
            model.eval()

            def step(model=model):
                with torch.inference_mode(), autocast(device, bf16):
                    model(images)
        steps_fn[name] = step
    if warmup and log:  # the first warm-up step of each arm, timed for the log
        for name, step in steps_fn.items():
            t0 = time.perf_counter()
            step()
            sync(device)
            log(f"{name} {'train' if train else 'infer'}: first step {time.perf_counter() - t0:.1f} s")
        warmup -= 1
    return alternate(steps_fn, device, warmup, rounds=steps, abba=True, settle=settle,
                     faults=faults)


def pack_arms(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """The pack arms' configurations: ``pack``; with ``--paths`` one per attention path
    (``pack_<path>``); with ``--call-costs`` one grouped arm per cost, in their order
    (``pack_cost<C>``, whose model ``run`` gives that cost)."""
    if args.paths:
        from variants.navit import flex_available
        impls = ["grouped", "loop", "dense_mask"] + (["flex"] if flex_available(device) else [])
        return {f"pack_{i}": {"batching": "pack", "attn_impl": i} for i in impls}
    if args.call_costs:
        return {f"pack_cost{c}": {"batching": "pack", "attn_impl": "grouped"} for c in args.call_costs}
    return {"pack": {"batching": "pack"}}


def check_args(args: argparse.Namespace) -> None:
    """ConfigError for a variant that is not NaViT or a count out of range, before any work."""
    from . import registry
    from .errors import ConfigError, check_counts
    if registry.get(args.variant).family != "navit":
        valid = ", ".join(v.name for v in registry.list_variants(family="navit"))
        raise ConfigError(f"--variant {args.variant}: bench-packing times NaViT batching; "
                          f"valid: {valid}")
    check_counts(("--processes", args.processes, 1), ("--steps", args.steps, 1),
                 ("--warmup", args.warmup, 0), ("--batch-size", args.batch_size, 1),
                 ("--settle", args.settle, 0))
    if args.call_costs is not None:
        if args.paths:
            raise ConfigError("--paths and --call-costs each choose the pack arms: give one")
        if not args.call_costs or min(args.call_costs) < 0 or \
                len(set(args.call_costs)) < len(args.call_costs):
            raise ConfigError(f"--call-costs {' '.join(map(str, args.call_costs))}: expected "
                              "one or more distinct costs >= 0 (units of n^2 attention work "
                              "per image; 0 = one call per image length)")
    cpu_mkl.check()  # HARNESS_CPU_MKL bad, or asked for and not in effect
    if args.compile_blocks:
        check_compile_supported("--compile-blocks", "leave out --compile-blocks", args.device)


def run(args: argparse.Namespace) -> dict:
    """One measurement in this process (``main`` has checked ``args``)."""
    device = torch.device(args.device)
    t_start = time.perf_counter()

    def log(msg: str) -> None:  # progress on stderr: a run cut short still says where it was
        print(f"[bench-packing {time.perf_counter() - t_start:.0f}s] {msg}", file=sys.stderr,
              flush=True)

    malloc = cpu_malloc.tune() if device.type == "cpu" else ""  # both arms alike
    if args.threads:
        set_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = model_overrides(args.max_size, args.max_seq_len, args.patch_size, args.depth)
    if args.compile_blocks:
        overrides["compile_blocks"] = True
    images = make_batch(args.batch_size, 1, args.min_size, args.max_size, args.size_step,
                        args.skew, args.seed, device)
    labels = torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(1)).to(device)
    load_start = os.getloadavg()[0]
    pack = pack_arms(args, device)
    models = build_arms(args.variant, overrides, {**pack, "pad": {"batching": "pad"}}, device, args.seed)
    for name, cost in zip(pack, args.call_costs or []):  # --call-costs: one arm per cost, in order
        models[name].group_call_cost = cost
    pack_name = "pack" if "pack" in models else next(iter(models))

    # token accounting from one eval forward per arm
    stats = {}
    for name, model in models.items():
        model.eval()
        model.extra_metrics()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(images)
        sync(device)
        log(f"{name}: first forward {time.perf_counter() - t0:.1f} s (token accounting)")
        stats[name] = model.extra_metrics()
    real = stats["pad"]["real_tokens"]
    ideal = stats["pad"]["tokens_per_real_token"]  # (real + padded tokens of pad) / real
    out = {"bench": "packing", "variant": args.variant, "device": str(device),
           "batch_size": args.batch_size, "skew": args.skew, "min_size": args.min_size,
           "max_size": args.max_size, "patch_size": args.patch_size,
           "max_seq_len": args.max_seq_len, "depth": models["pad"].cfg.depth,
           "hidden_size": models["pad"].cfg.hidden_size, "threads": torch.get_num_threads(),
           "warmup_steps": args.warmup, "timed_steps": args.steps, "settle": args.settle,
           "precision": "bf16 autocast" if args.bf16 else "fp32",
           "compile_blocks": bool(args.compile_blocks),
           "real_tokens_per_image": real / args.batch_size,
           "pack_attn_path": models[pack_name].tags()["attn_path"],
           "pack_padding_fraction": stats[pack_name]["padding_fraction"],
           "pack_images_per_pack": stats[pack_name]["images_per_pack"],
           "pad_padding_fraction": stats["pad"]["padding_fraction"],
           "ideal_speedup": ideal}
    for name in models:  # the grouped path's attention calls per block, where it ran
        if "attn_calls_per_block" in stats[name]:
            out[f"{name}_attn_calls_per_block"] = stats[name]["attn_calls_per_block"]
    for mode in ("train", "infer"):
        faults: dict = {}
        with OtherLoad() as other:
            times = time_arms(models, images, labels, mode == "train", args.warmup, args.steps,
                              device, args.settle, faults, args.bf16, log)
        out.update(settling_fields(faults, mode))
        if math.isfinite(other.cores):
            out[f"{mode}_other_cpu_cores"] = other.cores
        med = {name: statistics.median(t) for name, t in times.items()}
        log(f"{mode}: " + ", ".join(f"{n} {m * 1e3:.1f} ms" for n, m in med.items()) + " per step")
        for name, t in times.items():
            out[f"{name}_{mode}_step_ms_median"] = med[name] * 1e3
            out[f"{name}_{mode}_step_ms_min"] = min(t) * 1e3
            out[f"{name}_{mode}_step_ms_max"] = max(t) * 1e3
            out[f"{name}_{mode}_images_per_s"] = args.batch_size / med[name]
        for name in models:
            if name != "pad":
                speedup = med["pad"] / med[name]
                out[f"{name}_{mode}_speedup"] = speedup
                out[f"{name}_{mode}_fraction_of_ideal"] = speedup / ideal
                # from the fastest steps: less sensitive to other processes' bursts
                out[f"{name}_{mode}_speedup_best"] = min(times["pad"]) / min(times[name])
    # a busy machine inflates step times, pack's (many small kernels) more than pad's
    out["load_avg_1m"] = max(load_start, os.getloadavg()[0])
    out["cpu_count"] = os.cpu_count() or 1
    out["malloc"] = malloc
    return out


def timed_arms(r: dict) -> list[str]:
    """The arm names of a ``run()`` record, sorted, numbers by value (pack_cost2048 before
    pack_cost16384)."""
    return sorted({k[:-len("_train_step_ms_median")] for k in r if k.endswith("_train_step_ms_median")},
                  key=lambda a: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", a)])


def per_process(r: dict) -> list[str]:
    """Each process's fraction of the ideal, per arm and mode, where several processes ran."""
    if r.get("processes", 1) <= 1:
        return []
    out = []
    for mode in ("train", "infer"):
        for a in timed_arms(r):
            each = r.get(f"{a}_{mode}_fraction_of_ideal_per_process")
            if each:
                out.append(f"{a} {mode}: " + ", ".join(f"{x:.0%}" for x in each))
    return out


def attn_calls(r: dict) -> str:
    """'arm n, ...': the grouped path's attention calls per block of each arm that ran it."""
    return ", ".join(f"{a} {r[f'{a}_attn_calls_per_block']:g}" for a in timed_arms(r)
                     if f"{a}_attn_calls_per_block" in r)


def render(r: dict) -> str:
    arms = timed_arms(r)
    lines = [f"bench-packing: {r['variant']} (depth {r['depth']}, width {r['hidden_size']}) on "
             f"{r['device']}, {r['threads']} threads; {r['batch_size']} images, sides "
             f"{r['min_size']}-{r['max_size']} px (skew {r['skew']}), patch {r['patch_size']}, "
             f"max_seq_len {r['max_seq_len']}, {r.get('precision', 'fp32')}"
             + (", compiled blocks" if r.get("compile_blocks") else ""),
             f"  real tokens/image {r['real_tokens_per_image']:.1f}; padding: pack "
             f"{r['pack_padding_fraction']:.1%} ({r['pack_images_per_pack']:.1f} images/pack, "
             f"attention {r['pack_attn_path']}), pad {r['pad_padding_fraction']:.1%}",
             f"  ideal speedup (padded tokens / real tokens): {r['ideal_speedup']:.2f}x",
             *([f"  grouped attention calls per block: {calls}"] if (calls := attn_calls(r)) else []),
             *([f"  heap settled after {r['train_settle_rounds']:g} (train) / "
                f"{r['infer_settle_rounds']:g} (infer) untimed rounds; unsettled: "
                f"{r['train_unsettled']} / {r['infer_unsettled']}"] if "train_settle_rounds" in r else []),
             f"  {'arm':<16}{'mode':<7}{'ms/step (min-max)':>24}{'images/s':>11}{'speedup':>9}"
             f"{'of ideal':>10}{'best-step speedup':>19}"]
    for mode in ("train", "infer"):
        for a in arms:
            sp = r.get(f"{a}_{mode}_speedup")
            fr = r.get(f"{a}_{mode}_fraction_of_ideal")
            lines.append(
                f"  {a:<16}{mode:<7}{r[f'{a}_{mode}_step_ms_median']:>9.1f} "
                f"({r[f'{a}_{mode}_step_ms_min']:.1f}-{r[f'{a}_{mode}_step_ms_max']:.1f})"
                .ljust(47) + f"{r[f'{a}_{mode}_images_per_s']:>11.1f}"
                + (f"{sp:>8.2f}x{fr:>10.0%}{r[f'{a}_{mode}_speedup_best']:>18.2f}x"
                   if sp is not None else f"{'-':>9}{'-':>10}{'-':>19}"))
    if r.get("processes", 1) > 1:
        lines.append(f"  medians over {r['processes']} processes; of ideal per process:")
        lines += [f"    {line}" for line in per_process(r)]
    busy = other_load(r)
    if r["device"] == "cpu" and busy > BUSY_CORES:
        lines.append(f"  warning: other processes used {busy:.2f} cores while steps were timed: "
                     "step times are inflated, pack's more than pad's (more, smaller kernels); "
                     "rerun on a quiet machine or with --threads 1")
    return "\n".join(lines)


def other_load(r: dict) -> float:
    """The most CPU cores other processes used while either mode was timed (0 if unknown).
    (The load average is no guide here: this benchmark's own threads raise it to about the
    core count on a quiet machine.)"""
    return max(r.get("train_other_cpu_cores", 0.0), r.get("infer_other_cpu_cores", 0.0))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness bench-packing", description=__doc__.split("\n")[0],
                                allow_abbrev=False)  # processes.child_argv strips options by name
    p.add_argument("--variant", default="navit-ti", help="a navit-* variant (default navit-ti)")
    p.add_argument("--depth", type=int, default=4, help="override depth (0: the variant's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--skew", type=float, default=2.0, help="resolution skew (0: uniform sizes)")
    p.add_argument("--min-size", type=int, default=8)
    p.add_argument("--max-size", type=int, default=64)
    p.add_argument("--size-step", type=int, default=8, help="sides are multiples of this")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per pack")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--settle", type=int, default=10,
                   help="after the warm-up, up to this many untimed rounds more, until no step "
                        f"faults in more than {SETTLED_FAULTS} new pages of heap (0: none)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per arm (median)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the whole measurement in this many fresh processes, one after "
                        "another, and report medians over them with each process's figures")
    p.add_argument("--paths", action="store_true", help="also time each pack attention path")
    p.add_argument("--call-costs", type=int, nargs="+", default=None, metavar="C",
                   help="instead of pack: the grouped attention path at each of these call "
                        "costs (variants.navit.GROUP_CALL_COST), one arm each")
    p.add_argument("--bf16", action="store_true",
                   help="forward and loss under bf16 autocast (as the studies' bf16 option)")
    p.add_argument("--compile-blocks", action="store_true",
                   help="every arm's transformer blocks under torch.compile (NaViT's "
                        "compile_blocks; tokenizing and packing stay eager)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one flat JSON record")
    p.add_argument("--out", default="",
                   help="also write a report: this README.md (hardware, the matmul peak measured "
                        "in the same run, load, command) and results.json beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import HarnessError
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        check_args(args)
        if args.processes > 1:
            from .processes import merge_numbers, run_in_processes
            r = merge_numbers(run_in_processes("harness.bench_packing", argv, args.processes))
            r["processes"] = args.processes
        else:
            r = run(args)
    except HarnessError as e:
        print(f"harness bench-packing: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(r) if args.json else render(r))
    if args.out:
        from .bench_peer import hardware
        from .metrics.kernel_choice import kernel_env
        from .metrics.peak import measure_peak
        r.update(measure_peak(args.device), hardware=hardware(),
                 command=kernel_env() + "python -m harness.bench_packing " + " ".join(argv))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_report(r))
        (out.parent / "results.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
        print(f"report: {out}")
    return 0


def render_report(r: dict) -> str:
    """Markdown report of one bench-packing run (``--out``)."""
    from .bench_peer import software_detail
    hw = r["hardware"]
    peak = ", ".join(f"{d} {r[f'peak_{d}_tflops']:.3f} TFLOP/s ({r[f'peak_{d}_impl']}, "
                     f"{r[f'peak_{d}_size']}^3 GEMM)" for d in ("fp32", "bf16")
                     if f"peak_{d}_tflops" in r)
    rows = ["| arm | mode | ms/step median (min-max) | images/s | speedup vs pad | of ideal |",
            "|---|---|---:|---:|---:|---:|"]
    arms = timed_arms(r)
    for mode in ("train", "infer"):
        for a in arms:
            sp = r.get(f"{a}_{mode}_speedup")
            each = r.get(f"{a}_{mode}_fraction_of_ideal_per_process")
            spread = f" ({min(each):.0%}-{max(each):.0%})" if each else ""
            rows.append(f"| {a} | {mode} | {r[f'{a}_{mode}_step_ms_median']:.1f} "
                        f"({r[f'{a}_{mode}_step_ms_min']:.1f}-{r[f'{a}_{mode}_step_ms_max']:.1f}) | "
                        f"{r[f'{a}_{mode}_images_per_s']:.1f} | "
                        + (f"{sp:.2f}x | **{r[f'{a}_{mode}_fraction_of_ideal']:.0%}**{spread} |"
                           if sp is not None else "- | - |"))
    n = r.get("processes", 1)
    method = (f"{r['warmup_steps']} warm-up steps{settle_method(r.get('settle', 0))}, then "
              f"{r['timed_steps']} timed steps per arm, "
              "alternating arms (every other round in reverse order); median")
    if n > 1:
        method = (f"the whole measurement in {n} fresh processes, one after another, each: "
                  f"{method}; the table gives the median over the processes (step min-max: "
                  "over all of them; of ideal: its range over them in brackets)")
    tail = ["", "Of the ideal, per process in the order they ran:", "",
            *[f"- {line}" for line in per_process(r)], ""] if n > 1 else [""]
    return "\n".join([
        f"# Does packing pay? NaViT pack vs pad on {r['device']}", "",
        "Reproduce:", "", "```", r["command"], "```", "",
        f"- hardware: {hw['cpu']}, {hw['cpu_count']} CPUs, {r['threads']} torch threads, "
        f"{hw.get('gpu', 'no GPU')}; device `{r['device']}`",
        f"- software: torch {hw['torch']} ({software_detail(hw)}), Python {hw['python']}, "
        f"this code at git `{hw.get('git_sha', '?')}`; malloc `{r.get('malloc', '')}` (harness/metrics/cpu_malloc.py)",
        f"- dense matmul peak measured in the same run: {peak}",
        f"- load average (1 min, highest seen): {r['load_avg_1m']:.2f} on {r['cpu_count']} cores "
        f"(this benchmark's own threads included); other processes' CPU use while steps were "
        f"timed: train {r.get('train_other_cpu_cores', float('nan')):.2f} / infer "
        f"{r.get('infer_other_cpu_cores', float('nan')):.2f} cores (0 = a quiet machine; "
        f"the highest over the processes)",
        f"- model: {r['variant']}, depth {r['depth']}, width {r['hidden_size']}, same weights in "
        f"both arms; pack attention path `{r['pack_attn_path']}`; precision "
        f"{r.get('precision', 'fp32')}; blocks "
        f"{'compiled (torch.compile)' if r.get('compile_blocks') else 'eager'}",
        f"- images: {r['batch_size']} per step, sides {r['min_size']}-{r['max_size']} px "
        f"(skew {r['skew']}), patch {r['patch_size']}, max_seq_len {r['max_seq_len']}; real "
        f"tokens/image {r['real_tokens_per_image']:.1f}",
        f"- padding: pack {r['pack_padding_fraction']:.1%} ({r['pack_images_per_pack']:.1f} "
        f"images/pack), pad {r['pad_padding_fraction']:.1%}",
        *([f"- grouped attention calls per block (images of nearby lengths share one call "
           f"where that is cheaper, `variants.navit.GROUP_CALL_COST`): {calls}"]
          if (calls := attn_calls(r)) else []),
        f"- **ideal speedup** = (real + padded tokens of pad) / real tokens = "
        f"**{r['ideal_speedup']:.2f}x**; target: pack reaches at least 80% of it",
        f"- method: {method}; train = forward + cross entropy + backward + AdamW (fused where "
        "torch has it, lr 1e-4, no weight decay)", "",
        *rows, *settling_table([(r["variant"], r)], tuple(arms), n, first="variant"), *tail])


if __name__ == "__main__":
    sys.exit(main())
