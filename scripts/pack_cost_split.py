"""Where does the packing study's pack step lose to its ideal on CPU? Per-op time, pack vs pad.

    python scripts/pack_cost_split.py [--study studies/speed_packing.yaml] [--profile cpu]
                                      [--skew 4] [--seed 0] [--rounds 10] [--profiled 4]
                                      [--top 8] [--out FILE.md]

Builds one cell of the study as its trial does (the study's model, data and batch for that
skew and seed; glibc malloc tuned as in a trial), a pad copy with the same weights (the
study's in-trial reference), and then:

1. times their train steps alternately (the warm-up, heap settling and rounds of the
   study's ``reference_ab``): pad step / pack step is the study's ``train_speedup_vs_reference``;
2. profiles a few steps of each, one of each arm in turn, takes each op's median over them
   and splits the self CPU time by kind of op; it counts each arm's op calls per step and
   lists the ops of the kinds that do not shrink with rows (calls and views, autograd,
   gathers, AdamW) that cost pack the most.

The ideal speedup is pad's rows over the images' real tokens.  Pack computes rows too: its
packs, each as long as the fullest one, padding included.  So a pack step whose cost followed
its rows would reach ``real / pack rows`` of the ideal, and each kind of op's pad / pack time
ratio, read against the row ratio, shows which kinds cost pack more per row than pad, and how
much of the step they are."""
import harness  # noqa: F401  (before torch)
import argparse
import re
import statistics
import sys
from pathlib import Path

import torch

from harness import registry
from harness.bench_peer import hardware, software_detail
from harness.data.base import build_dataset
from harness.errors import HarnessError, check_counts
from harness.metrics import cpu_malloc, speed
from harness.metrics.speed import alternate, paired_ratios
from harness.studies import cell_task_options, load_study, resolve_trial
from harness.tasks.benchmark import ab_steps, build_reference, data_batch

# the kinds whose time does not shrink with the rows a step computes (FIXED below)
GATHER, OPTIMISER, OTHER = ("gather, scatter, embeddings", "optimiser (AdamW)",
                            "calls, views, autograd")
# (kind, pattern on the op's name): the first match wins; the rest is OTHER
KINDS = [
    ("GEMM (Linear layers)", r"^aten::(mm|addmm|bmm|baddbmm)$"),
    ("attention (SDPA)", r"scaled_dot_product|flash_attention"),
    ("element-wise, norms, copies", r"^aten::(gelu|gelu_backward|native_layer_norm|"
     r"native_layer_norm_backward|add|add_|mul|mul_|sub|div|pow|sum|mean|copy_|cat|fill_|"
     r"zero_|clone|where|mse_loss|mse_loss_backward|sqrt|neg|softmax|_softmax|"
     r"_softmax_backward_data|stack|masked_fill|ones_like|zeros_like)$"),
    (GATHER, r"^aten::(index_select|index|index_add_|scatter_add_|"
     r"scatter_|gather|embedding|embedding_dense_backward|unfold|take)$"),
    (OPTIMISER, r"adamw|Optimizer"),
]
FIXED = (GATHER, OPTIMISER, OTHER)


def kind_of(name: str) -> str:
    return next((k for k, pat in KINDS if re.search(pat, name)), OTHER)


def split(step) -> dict[str, tuple[int, float]]:
    """One profiled ``step``: each op's (calls, self CPU ms), profiled as the bench profiles
    (``speed.profiled``, which keeps Kineto's start / stop lines off stderr)."""
    with speed.profiled(torch.device("cpu")) as prof:
        step()
    return {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}


def pack_cells(study) -> dict:
    """The study's pack cells by skew."""
    return {c.get("data.skew"): c for c in study.cells() if c.get("batching") == "pack"}


def measure(study, skew: float, seed: int, rounds: int, profiled: int) -> dict:
    """The pack cell at ``skew`` and its in-trial reference, as ``reference_ab`` builds it
    (the cell's config with the study's ``reference`` overrides, here ``batching: pad``; same
    weights, same batch): timed train steps, rows, and self CPU ms per step by kind of op."""
    trial = resolve_trial(study, pack_cells(study)[skew], seed)
    cpu_malloc.tune()
    device = torch.device("cpu")
    opts = trial.task_options
    inputs = data_batch(build_dataset(study.data, trial.data_options), opts.batch_size, seed,
                        device)  # the trial's batch
    pack, cfg = registry.build(trial.variant, trial.model_overrides, device=device, seed=seed)
    pad, weights = build_reference(trial.variant, cfg, pack, opts.reference, seed, device)
    if weights != "shared":
        raise HarnessError(f"the pad reference of skew {skew:g} does not take the pack cell's "
                           f"weights ({weights}): the two arms would not be the same model")
    models = {"pack": pack, "pad": pad}
    rows = {}
    for name, m in models.items():
        m.extra_metrics()  # the counts since the last call: this one forward's
        with torch.no_grad():
            m(*inputs)
        x = m.extra_metrics()
        rows[name], real = x["real_tokens"] + x["padded_tokens"], x["real_tokens"]
    steps = ab_steps(models, inputs, device, opts, "train")
    times = alternate(steps, device, opts.warmup, rounds=rounds, abba=True,
                      settle=opts.reference_settle)
    kinds, ops = profile_kinds(steps, profiled)
    return {"images": len(inputs[0]), "real": real, "rows": rows,
            "ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
            "speedup": statistics.median(paired_ratios(times["pad"], times["pack"])),
            "ideal": rows["pad"] / real,
            "kinds": kinds, "ops": ops}


def profile_kinds(steps: dict, profiled: int) -> tuple[dict, dict]:
    """Per arm, each op's median (calls, self CPU ms) over the profiled steps (0 in a step
    without it), and those summed by kind of op: one profiled step of each arm in turn (every
    other round reversed), so a slow spell or the profiler's own allocations fall on both arms
    alike, and the median keeps one stalled step out (with a mean of four, pad's AdamW once
    read 22.9 ms a step, where it took 1.4-1.6 ms in the two runs before)."""
    per_step: dict[str, list[dict]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(profiled):
        for name in (names[::-1] if r % 2 else names):
            per_step[name].append(split(steps[name]))
    ops = {name: {k: tuple(map(statistics.median, zip(*(s.get(k, (0, 0.0)) for s in profiles))))
                  for k in set().union(*profiles)}
           for name, profiles in per_step.items()}
    kinds: dict[str, dict[str, float]] = {name: {} for name in steps}
    for name, by_op in ops.items():
        for k, (_, ms) in by_op.items():
            kind = kind_of(k)
            kinds[name][kind] = kinds[name].get(kind, 0.0) + ms
    return kinds, ops


def top_fixed_ops(ops: dict[str, dict[str, tuple[float, float]]], top: int) -> list[str]:
    """Markdown rows: the ``top`` ops of the kinds that do not shrink with rows, by pack's self
    CPU ms per step, with their calls per step in each arm."""
    fixed = [k for k in ops["pack"] if kind_of(k) in FIXED]
    fixed.sort(key=lambda k: -ops["pack"][k][1])
    rows = ["| op | kind | pack calls | pack ms | pad calls | pad ms |",
            "|---|---|---|---|---|---|"]
    for k in fixed[:top]:
        (pn, pms), (qn, qms) = ops["pack"][k], ops["pad"].get(k, (0.0, 0.0))
        rows.append(f"| `{k}` | {kind_of(k)} | {pn:.0f} | {pms:.2f} | {qn:.0f} | {qms:.2f} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="studies/speed_packing.yaml")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--skew", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds of pack and pad")
    ap.add_argument("--profiled", type=int, default=4, help="profiled steps per arm, alternated")
    ap.add_argument("--top", type=int, default=8, help="list this many ops of the kinds that "
                    "do not shrink with rows, with their calls per step (0: none)")
    ap.add_argument("--out", help="also write what it prints to this file, with the command "
                    "and the machine")
    a = ap.parse_args(argv)
    try:
        check_counts(("--rounds", a.rounds, 1), ("--profiled", a.profiled, 1),
                     ("--seed", a.seed, 0), ("--top", a.top, 0))
        study = load_study(a.study, a.profile)
        if study.task != "benchmark" or study.data != "varres_digits":
            raise HarnessError(f"{a.study}: a {study.task} study of {study.data}; this reads a "
                               "benchmark study of varres_digits (pack cells, pad reference)")
        have = pack_cells(study)
        if a.skew not in have:
            skews = sorted(s for s in have if s is not None)
            raise HarnessError(f"--skew {a.skew:g}: {a.study} (profile {a.profile}) has no pack "
                               f"cell at that skew; its skews: {skews}")
        if cell_task_options(study, have[a.skew]).reference != {"batching": "pad"}:
            raise HarnessError(f"{a.study}: its pack cell at skew {a.skew:g} needs the task "
                               "option `reference: {batching: pad}` (the in-trial pad copy "
                               "this compares pack with)")
    except HarnessError as e:
        print(f"pack_cost_split: error: {e}", file=sys.stderr)
        return 2
    r = measure(study, a.skew, a.seed, a.rounds, a.profiled)
    rows, real, ms, ideal, kinds = r["rows"], r["real"], r["ms"], r["ideal"], r["kinds"]
    out = [f"{a.study} --profile {a.profile}, skew {a.skew:g}, seed {a.seed}: {r['images']} "
           f"images, {real:.0f} real tokens; pad {rows['pad']:.0f} rows, pack {rows['pack']:.0f} "
           f"rows ({rows['pack'] / real:.3f} per real token)",
           f"train step, median of {a.rounds} alternated rounds: pack {ms['pack']:.1f} ms, "
           f"pad {ms['pad']:.1f} ms; paired speedup {r['speedup']:.3f} against the ideal "
           f"{ideal:.3f} = {r['speedup'] / ideal:.1%} of it",
           f"if pack's cost followed its rows: {rows['pad'] / rows['pack']:.3f} "
           f"= {real / rows['pack']:.1%} of the ideal (pack's own padding is the rest)", "",
           f"self CPU time per train step, median of {a.profiled} profiled steps each, alternated "
           f"(row ratio pad / pack = {rows['pad'] / rows['pack']:.2f}):", "",
           "| kind of op | pack ms | pad ms | pad / pack | share of pack's step |",
           "|---|---|---|---|---|"]
    tot = {n: sum(k.values()) for n, k in kinds.items()}
    for k in [k for k, _ in KINDS] + [OTHER]:
        p, q = kinds["pack"].get(k, 0.0), kinds["pad"].get(k, 0.0)
        ratio = f"{q / p:.2f}" if p else "-"
        out.append(f"| {k} | {p:.1f} | {q:.1f} | {ratio} | {p / tot['pack']:.0%} |")
    out.append(f"| all | {tot['pack']:.1f} | {tot['pad']:.1f} | {tot['pad'] / tot['pack']:.2f} "
               "| 100% |")
    calls = {n: sum(c for c, _ in o.values()) for n, o in r["ops"].items()}
    out += ["", f"op calls per profiled step: pack {calls['pack']:.0f}, pad {calls['pad']:.0f}; "
            f"the profiled steps' self times sum to {tot['pack'] / ms['pack']:.2f} (pack) and "
            f"{tot['pad'] / ms['pad']:.2f} (pad) times the timed medians (above 1: the "
            "profiler's own cost per call, and any drift between timed and profiled rounds)"]
    if a.top:
        out += ["", f"the {a.top} ops of the kinds that do not shrink that took pack the most "
                "self CPU time, per profiled step:", "", *top_fixed_ops(r["ops"], a.top)]
    print("\n".join(out))
    if a.out:
        hw = hardware()
        head = [f"# Pack vs pad, op by op: skew {a.skew:g}, seed {a.seed}", "",
                "    " + " ".join(["python scripts/pack_cost_split.py",
                                      *(sys.argv[1:] if argv is None else argv)]), "",
                f"{hw['cpu']} ({hw['cpu_count']} CPUs, {hw['torch_threads']} torch threads), "
                f"torch {hw['torch']} ({software_detail(hw)}), commit {hw['git_sha']}", ""]
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(head + out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
