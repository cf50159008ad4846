"""harness variants | bench | run | worker | report | ui

Every user error is a HarnessError: printed as one clear message, exit code 2, and
raised before any compute or any write to a store.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import ConfigError, HarnessError, check_counts
from .metrics import cpu_attention, cpu_gelu, cpu_malloc, cpu_matmul, cpu_mkl
from .metrics.kernel_choice import resolve_kernel_paths


def parse_sets(items: Sequence[str] | None) -> dict:
    """['k=v', ...] -> {k: 'v'}; values are typed later against the config."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set conditioning=adaln")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ConfigError(f"--set {item!r}: empty key")
        out[k.strip()] = v.strip()
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v)


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


# ------------------------------------------------------------------ variants

def cmd_variants(args) -> int:
    from . import registry
    from .metrics.flops import build_uninitialised, flops_of

    specs = registry.list_variants(*(args.pattern or []))
    if not specs:
        raise ConfigError(f"no variant matches {args.pattern!r}; try `harness variants` for all")
    rows = []
    for spec in specs:
        row = {"name": spec.name, "family": spec.family}
        if not args.no_flops:
            model, cfg = build_uninitialised(spec.name)
            f = flops_of(model)
            row.update(params_m=round(f["params_m"], 2), gflops_fwd=round(f["gflops_fwd"], 3))
        row["description"] = spec.doc.splitlines()[0] if spec.doc else ""
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, [c for c in ("name", "family", "params_m", "gflops_fwd", "description")
                           if c in rows[0]])
    return 0


# --------------------------------------------------------------------- bench

def cmd_bench(args) -> int:
    from . import registry
    from .metrics.flops import FLOP_CONVENTION, build_uninitialised, flops_of
    from .metrics.gemm_floor import add_mfu_at_floor
    from .metrics.peak import add_mfu, cached_peak, gemm_probe
    from .metrics.speed import SpeedOptions, check_attention, check_compile_supported, measure_speed
    from .sweep import resolve_device

    overrides = parse_sets(args.set)
    device = resolve_device(args.device)
    check_attention(args.attention, device, args.bf16)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.ops < 0:
        raise ConfigError("--batch-size and --steps must be >= 1, --warmup and --ops >= 0")
    if (args.ops or args.mfu or args.floor) and args.flops_only:
        raise ConfigError("--ops, --mfu and --floor time steps; they cannot go with --flops-only")
    specs = [registry.get(n) for n in args.names]
    cfgs = [s.config(**overrides) for s in specs]  # validate everything before compute
    for cfg in cfgs:
        registry.check_config_device(cfg, device)
    if args.compile:
        check_compile_supported("--compile", "leave out --compile", device)
    if args.alternate:
        return bench_alternate(args, specs, overrides, device)
    records = []
    for spec, cfg in zip(specs, cfgs):
        rec = {"name": spec.name, "family": spec.family}
        counted, _ = build_uninitialised(spec.name, overrides)
        f = flops_of(counted)
        del counted
        rec.update(params=f["params"], params_m=f["params_m"], gflops_fwd=f["gflops_fwd"],
                   gflops_attn_fwd=f["gflops_attn_fwd"], flop_convention=FLOP_CONVENTION)
        if not args.flops_only:
            model, _ = registry.build(spec.name, overrides, seed=0)
            opts = SpeedOptions(batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                                bf16=args.bf16, compile=args.compile, profile_ops=args.ops,
                                attention=args.attention, floor=args.floor)
            # --mfu: the peak first (for the probes timed next to each step), then once more
            probe = gemm_probe(cached_peak(device), device, args.bf16) if args.mfu else None
            rec.update(measure_speed(model, opts, device, probe=probe))
            if args.mfu:
                cached_peak(device, refresh=True)
                add_mfu(rec, device, args.bf16)
                add_mfu_at_floor(rec)  # the MFU the step would have as its GEMMs alone
            del model
        rec.update({f"config.{k}": v for k, v in registry.config_dict(cfg).items()})
        rec = {k: v for k, v in rec.items() if v is not None}
        records.append(rec)
    if args.json:
        print(json.dumps(records, indent=1, default=str))
    else:
        cols = ["name", "config.conditioning", "params_m", "gflops_fwd", "gflops_attn_fwd"]
        if not args.flops_only:
            cols += ["train_samples_per_s", "train_tokens_per_s", "infer_samples_per_s",
                     "train_step_ms_median", "peak_mem_mb"]
            if args.mfu:
                cols += ["train_mfu", "train_mfu_paired", "infer_mfu", "infer_mfu_paired",
                         "mfu_peak_tflops", "train_paired_peak_tflops"]
            if args.floor:
                cols += ["train_gemm_floor_ms", "train_gemm_share", "train_mfu_at_floor",
                         "infer_gemm_floor_ms", "infer_gemm_share", "infer_mfu_at_floor"]
        cols = [c for c in cols if any(c in r for r in records)]
        print_table(records, cols)
        print(f"\nFLOPs: {FLOP_CONVENTION}.")
        if not args.flops_only:
            r = records[0]
            print(f"Speed: device {r['device']}, batch {args.batch_size}, {args.warmup} warm-up + "
                  f"{args.steps} timed steps, median step; train = fwd + bwd + AdamW; "
                  f"attention kernel {r['attention']}; peak memory from {r['peak_mem_source']}.")
            if r["device"] == "cpu":
                why = cpu_mkl.why_not()  # why auto (or avx512) left MKL's own dispatch, if it did
                print(f"CPU kernels: Linear {cpu_matmul.path()}, GELU {cpu_gelu.path()}, short "
                      f"attention {cpu_attention.path()}, MKL dispatch {r.get('cpu_mkl', '?')}"
                      f"{f' ({why})' if why else ''}, "
                      f"malloc {r.get('malloc', '?')} (harness/metrics/cpu_*.py; "
                      f"HARNESS_CPU_* and HARNESS_MALLOC override them).")
            if args.mfu:
                print(f"MFU: 3 (train) or 1 (infer) x fwd MACs x 2 x samples/s / peak flop/s, peak = "
                      f"the best dense {r['mfu_peak']} GEMM measured in this process "
                      f"(mfu_peak_tflops); *_paired: per timed step against the GEMM rate probed "
                      f"just before and after it (the faster), median over steps.")
            if args.floor:
                print("GEMM floor: every matrix multiply of one step (SDPA's fused kernels "
                      "included), each re-run alone on this "
                      "machine, summed (harness/metrics/gemm_floor.py), in rounds with a step "
                      "timed between re-runs; *_gemm_share = the rounds' median floor / step; "
                      "*_mfu_at_floor = model FLOPs / floor / peak (= MFU x step / floor), the "
                      "MFU the step would have if it were its GEMMs alone.")
                for r in records:
                    for mode in ("train", "infer"):
                        for x in r.get(f"{mode}_gemm_in_step_only", []):
                            print(f"  {r['name']} {mode}: counted by its time in the step: {x}")
        for r in records:
            if r.get("train_ops"):
                print(f"\nWhere a {r['name']} train step's time goes (torch.profiler over {args.ops} "
                      "more steps, self time per op; the profiler itself slows the steps):")
                print_table([{"op": o["op"][:60], "ms/step": round(o["ms_per_step"], 1),
                              "share": f"{o['share']:.1%}", "calls/step": round(o["calls_per_step"], 1)}
                             for o in r["train_ops"]], ["op", "ms/step", "share", "calls/step"])
    return 0


ARMS = {"eager": "the model as built (fp32)",
        "compile": "torch.compile(model), one static full graph",
        "bf16": "bf16 autocast",
        "aten-gelu": "fp32, tanh-GELU on torch's own kernel (HARNESS_CPU_GELU=aten)",
        "sdpa-attn": "fp32, every attention call through SDPA (HARNESS_CPU_ATTENTION=sdpa)",
        "matmul-attn": "fp32, short attention as matmuls (HARNESS_CPU_ATTENTION=matmul)",
        "math-attn": "fp32, attention on SDPA's unfused math kernel",
        **{f"{p}-linear": f"fp32, Linear matmuls on the {p} path (HARNESS_CPU_LINEAR={p})"
           for p in cpu_matmul.CHOICES}}


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or len(arms) < 2 or len(set(arms)) != len(arms):
        raise ConfigError(f"--alternate {text!r}: give two or more distinct arms, comma-separated, "
                          f"from: {', '.join(ARMS)}" + (f" (unknown: {', '.join(bad)})" if bad else ""))
    return arms


def with_kernel_paths(step, gelu: str, attention: str, linear: str):
    """``step`` run with the tanh-GELU path ``gelu``, the CPU attention path ``attention``
    and the CPU linear path ``linear`` in force, all restored after."""
    def run():
        with cpu_gelu.using_path(gelu), cpu_attention.using_path(attention), \
                cpu_matmul.using_path(linear):
            step()
    return run


def _linear_arm(arm: str) -> str | None:
    """The CPU linear path an arm forces (``onednn-linear`` -> ``onednn``), else None."""
    return arm[:-len("-linear")] if arm.endswith("-linear") else None


def _attention_arm(arm: str) -> str | None:
    """The CPU attention path an arm forces (``sdpa-attn`` -> ``sdpa``), else None."""
    return {"sdpa-attn": "sdpa", "matmul-attn": "matmul"}.get(arm)


def bench_alternate(args, specs, overrides: dict, device) -> int:
    """Train steps of one model in several arms, alternated in rounds in one process."""
    import statistics

    import torch

    from . import registry
    from .metrics.speed import (adamw, alternate, check_compile_supported, compiled,
                                make_train_step, paired_ratios)
    arms = parse_arms(args.alternate)
    device = torch.device(device)
    if "compile" in arms:
        check_compile_supported("--alternate with compile", "leave out the compile arm", device)
    check_counts(("--rounds", args.rounds, 1))
    if args.flops_only or args.ops or args.mfu or args.floor:
        raise ConfigError("--alternate times train steps; it cannot go with --flops-only, --ops, "
                          "--mfu or --floor")
    for arm in arms:  # a linear path this torch build lacks stops here, before any work
        if _linear_arm(arm):
            cpu_matmul.check_path(_linear_arm(arm))
    per_round = max(1, -(-args.steps // args.rounds))
    records = []
    for spec in specs:
        model, _ = registry.build(spec.name, overrides, seed=0, device=device)
        model.train()
        inputs = model.example_inputs(args.batch_size, device=device,
                                      generator=torch.Generator().manual_seed(0))
        optim = adamw(model.parameters(), device)
        steps = {}
        for arm in arms:
            run = compiled(model, dynamic=False) if arm == "compile" else model
            attention = "math" if arm == "math-attn" else args.attention
            steps[arm] = with_kernel_paths(
                make_train_step(model, run, inputs, optim, device, bf16=arm == "bf16",
                                attention=attention),
                gelu="aten" if arm == "aten-gelu" else cpu_gelu.path(),
                attention=_attention_arm(arm) or cpu_attention.path(),
                linear=_linear_arm(arm) or cpu_matmul.path())
        times = alternate(steps, device, args.warmup, args.rounds, per_round, rewarm=True, abba=True)
        base = statistics.median(times[arms[0]])
        paired = {arm: paired_ratios(times[arms[0]], t, per_round) for arm, t in times.items()}
        rec = {"name": spec.name, "device": str(device), "batch_size": args.batch_size,
               "warmup_steps": args.warmup, "rounds": args.rounds,
               "timed_steps_per_round": per_round,
               "arms": {arm: {"step_ms_median": statistics.median(t) * 1e3,
                              "step_ms_min": min(t) * 1e3, "step_ms_max": max(t) * 1e3,
                              "samples_per_s": args.batch_size / statistics.median(t),
                              f"speed_vs_{arms[0]}": base / statistics.median(t),
                              f"paired_speed_vs_{arms[0]}": statistics.median(paired[arm]),
                              "paired_rounds_faster": sum(r > 1 for r in paired[arm])}
                        for arm, t in times.items()}}
        records.append(rec)
        del model, optim, steps
        if args.json:
            continue
        print(f"{spec.name}: train steps (fwd + bwd + AdamW), batch {args.batch_size} on "
              f"{device}, {args.warmup} warm-up steps per arm, then {args.rounds} rounds x "
              f"{per_round} timed steps per arm, arms alternated, every other round in reverse "
              f"(one untimed step opens each turn); paired: the median over rounds of "
              f"{arms[0]}'s time / the arm's time in the same round")
        print_table([{"arm": arm, "what": ARMS[arm], "ms/step median": round(a["step_ms_median"], 1),
                      "min": round(a["step_ms_min"], 1), "max": round(a["step_ms_max"], 1),
                      "samples/s": round(a["samples_per_s"], 2),
                      f"speed vs {arms[0]}": f"{a[f'speed_vs_{arms[0]}']:.3f}x",
                      "paired": f"{a[f'paired_speed_vs_{arms[0]}']:.3f}x",
                      "rounds faster": f"{a['paired_rounds_faster']}/{args.rounds}"}
                     for arm, a in rec["arms"].items()],
                    ["arm", "what", "ms/step median", "min", "max", "samples/s", f"speed vs {arms[0]}",
                     "paired", "rounds faster"])
    if args.json:
        print(json.dumps(records, indent=1))
    return 0


# ------------------------------------------------------------------- studies

def set_threads(n: int | None) -> None:
    if n is None:
        return
    if not 1 <= n <= (os.cpu_count() or 1) * 4:
        raise ConfigError(f"--threads {n}: valid 1..{(os.cpu_count() or 1) * 4}")
    from .metrics.speed import set_threads as set_torch_threads
    set_torch_threads(n)


def cmd_run(args) -> int:
    set_threads(args.threads)
    from .sweep import run_study
    return run_study(args.study, profile=args.profile, storage=args.storage,
                     tracking_uri=args.tracking_uri, n_trials=args.n_trials,
                     timeout=args.timeout, runs_dir=args.runs_dir, workers=args.workers,
                     device=args.device, quiet=args.quiet, argv=args.argv,
                     heartbeat=args.heartbeat)


def cmd_worker(args) -> int:
    set_threads(args.threads)
    from .sweep import run_worker
    return run_worker(args.study, profile=args.profile, storage=args.storage,
                      tracking_uri=args.tracking_uri, runs_dir=args.runs_dir,
                      device=args.device, quiet=args.quiet, argv=args.argv,
                      heartbeat=args.heartbeat)


def cmd_report(args) -> int:
    from .report import render_report
    out = render_report(args.study, profile=args.profile, tracking_uri=args.tracking_uri,
                        runs_dir=args.runs_dir, out_dir=args.out, command=args.command_line)
    print(f"report written to {out}/README.md")
    return 0


def cmd_ui(args) -> int:
    from .tracking import serve_ui
    return serve_ui(runs_dir=args.runs_dir, host=args.host, port=args.port,
                    backend_uri=args.tracking_uri)


def cmd_bench_packing(args, rest) -> int:
    from .bench_packing import main as bench_main
    return bench_main(rest)


def cmd_bench_peer(rest) -> int:
    from .bench_peer import main as peer_main
    return peer_main(rest)


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default=os.environ.get("HARNESS_RUNS_DIR", "runs"),
                   help="local folder of the embedded SQLite stores (default ./runs)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite under --runs-dir; MLFLOW_TRACKING_URI)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("variants", help="list registered variants (glob patterns)")
    v.add_argument("pattern", nargs="*", help="glob, e.g. 'dit-*'")
    v.add_argument("--json", action="store_true")
    v.add_argument("--no-flops", action="store_true", help="skip params/GFLOPs (faster)")
    v.set_defaults(fn=cmd_variants)

    b = sub.add_parser("bench", help="params, GFLOPs, throughput and memory of variants")
    b.add_argument("names", nargs="+", help="registered variant names")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    b.add_argument("--steps", type=int, default=10, help="timed steps")
    b.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
    b.add_argument("--bf16", action="store_true", help="bf16 autocast")
    b.add_argument("--compile", action="store_true", help="torch.compile")
    b.add_argument("--attention", default="auto", choices=("auto", "flash", "efficient", "cudnn", "math"),
                   help="SDPA kernel (auto: torch's pick, the fused flash kernel where it serves; "
                        "efficient / cudnn: CUDA only; math: the unfused reference)")
    b.add_argument("--flops-only", action="store_true")
    b.add_argument("--ops", type=int, default=0, metavar="N",
                   help="then profile N more train steps (torch.profiler) and print where the time goes")
    b.add_argument("--mfu", action="store_true",
                   help="measure the dense GEMM peak and print MFU, also paired: against a GEMM "
                        "probe timed next to each step")
    b.add_argument("--floor", action="store_true",
                   help="also each step's GEMM floor: its matrix multiplies re-run alone, "
                        "summed, and their share of the step (with --mfu: the MFU at the floor)")
    b.add_argument("--alternate", metavar="ARMS", default=None,
                   help="time train steps of each arm in alternating rounds, one process: "
                        "two or more of " + ", ".join(ARMS) + " (e.g. eager,compile)")
    b.add_argument("--rounds", type=int, default=4, help="--alternate: rounds (--steps split over them)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)

    r = sub.add_parser("run", help="run (or resume) a study")
    r.add_argument("study", help="path to a study YAML file")
    r.add_argument("--profile", default=None, help="smoke | cpu | gpu | any profile in the file")
    r.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite in --runs-dir)")
    r.add_argument("--n-trials", type=int, default=None, help="at most this many trials now")
    r.add_argument("--timeout", type=float, default=None, help="stop starting trials after S seconds")
    r.add_argument("--workers", type=int, default=1, help="local worker processes")
    r.add_argument("--device", default=None, help="override the study's device: auto | cpu | cuda")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; recorded as a tag)")
    r.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between a trial's heartbeats; dead after 4 missed (default 10)")
    add_store_args(r)
    r.set_defaults(fn=cmd_run)

    w = sub.add_parser("worker", help="join a shared study (PostgreSQL storage) as one worker")
    w.add_argument("study")
    w.add_argument("--profile", default=None)
    w.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by all workers (or HARNESS_STORAGE)")
    w.add_argument("--device", default=None)
    w.add_argument("--quiet", action="store_true")
    w.add_argument("--heartbeat", type=int, default=10)
    w.add_argument("--threads", type=int, default=None)
    add_store_args(w)
    w.set_defaults(fn=cmd_worker)

    rep = sub.add_parser("report", help="render reports/<study>/ from the study's MLflow runs")
    rep.add_argument("study", help="study YAML file (or a study name)")
    rep.add_argument("--profile", default=None)
    rep.add_argument("--out", default=None, help="output folder (default reports/<study>)")
    rep.add_argument("--command-line", dest="command_line", default=None,
                     help="the command to print in the report as how it was produced")
    add_store_args(rep)
    rep.set_defaults(fn=cmd_report)

    u = sub.add_parser("ui", help="serve the MLflow UI on the local store")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    add_store_args(u)
    u.set_defaults(fn=cmd_ui)

    bp = sub.add_parser("bench-packing", help="NaViT packing vs padding images/s (see --help)",
                        add_help=False)
    bp.set_defaults(fn=None)
    pp = sub.add_parser("bench-peer", help="ours vs vit-pytorch, same configs (see --help)",
                        add_help=False)
    pp.set_defaults(fn=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_malloc.tune()  # keep the CPU heap between steps (harness/metrics/cpu_malloc.py)
    parser = build_parser()
    try:
        resolve_kernel_paths()  # a bad HARNESS_CPU_LINEAR / _GELU / _ATTENTION fails here
        cpu_mkl.check()    # and a HARNESS_CPU_MKL that is bad or did not take effect
        if argv and argv[0] == "bench-packing":
            return cmd_bench_packing(None, argv[1:])
        if argv and argv[0] == "bench-peer":
            return cmd_bench_peer(argv[1:])
        args = parser.parse_args(argv)
        args.argv = argv
        return int(args.fn(args) or 0)
    except HarnessError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
