"""Side by side with a peer implementation (lucidrains' vit-pytorch), and the engine's overhead.

    python -m harness.bench_peer [peer] [--models m2,m3,navit] [--rounds 7] [--processes 1]
                                 [--json] [--out reports/peer_vit_pytorch/README.md]
    python -m harness.bench_peer overhead [--seconds 60] [--json]
    harness bench-peer ...             (the same, through the CLI)

peer: our ViViT Model 2 (factorised encoder) and Model 3 (factorised self-attention) against
vit-pytorch's ``ViViT(variant='factorized_encoder' | 'factorized_self_attention')``, and our
packed NaViT against its ``NaViT``, at identical configurations verified by equal parameter
counts (both are built, their counts compared, and a mismatch stops the run).  Train steps
(forward, cross entropy, backward, AdamW) and inference are timed in one process, ours and
theirs alternating within each round, every other round in reverse order (so background
load hits both alike); medians per arm; ``ratio = ours samples/s / theirs samples/s`` (> 1:
ours is faster), and the paired ratio (the median of the within-round ratios) with the
rounds ours won.  ``--processes N`` runs all that in N fresh processes, one after another,
and reports the median over them with every process's ratio: the ratio moves between
processes by more than between rounds (``run_processes``).

vit-pytorch is an optional peer (``pip install --no-deps vit-pytorch einops``): its package
``__init__`` imports torchvision, so its ``vivit.py`` and ``na_vit.py`` are loaded by file
path; none of its code is copied here.  Where the two designs differ in parameters, theirs
is adjusted by module surgery on the built instance (``match_vivit``, ``match_navit`` say
exactly how), never by changing what ours computes.

overhead: one classify trial of about ``--seconds`` of training through the real engine
(Optuna, MLflow, FLOP counting, the per-trial speed probe) into a temporary runs folder,
and the breakdown of its wall time: everything that is not the task's own work, as a
fraction of the trial (the target: <= 5% for a one-minute trial).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import cpu_attention, cpu_gelu, cpu_malloc, cpu_matmul, cpu_mkl, gemm_floor
from .metrics.kernel_choice import kernel_env
from .metrics.peak import OtherLoad
from .metrics.speed import (SETTLED_FAULTS, adamw, alternate, paired_ratios, set_threads,
                            settle_method, settling_fields, settling_table)
from .processes import interval_reads, merge_numbers, ratio_interval, run_in_processes
from .tracking import cpu_model, git_sha

PEER = "vit-pytorch"


# ------------------------------------------------------------------ the peer's modules

def peer_module(name: str):
    """``vit_pytorch/<name>.py`` loaded by path (the package __init__ needs torchvision)."""
    from .errors import ConfigError
    spec = importlib.util.find_spec("vit_pytorch")  # locates, does not import, the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the peer needs vit-pytorch: pip install --no-deps vit-pytorch einops")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{name}.py"
    if not path.exists():
        raise ConfigError(f"vit-pytorch has no {name}.py at {path}")
    key = f"_peer_vit_pytorch_{name}"
    if key in sys.modules:
        return sys.modules[key]
    mspec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[key] = mod
    mspec.loader.exec_module(mod)
    return mod


def peer_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("vit-pytorch")
    except metadata.PackageNotFoundError:
        return "not installed"


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _linear_with_bias(lin: nn.Linear) -> nn.Linear:
    return nn.Linear(lin.in_features, lin.out_features, bias=True)


class WithPositions(nn.Module):
    """Learned positions (1, L, D) added in front of a transformer, as our ``Encoder`` does."""

    def __init__(self, inner: nn.Module, length: int, dim: int):
        super().__init__()
        self.inner = inner
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)

    def forward(self, x, mask=None):
        return self.inner(x + self.pos, mask=mask)


class ResidualMlp(nn.Module):
    """o + mlp(norm(o)): the MLP half of our MAP pooling head (big_vision's MAPHead), built
    from plain torch layers (it is theirs now)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


# ------------------------------------------------------------------ ViViT

def vivit_pair(model: int, *, frames: int, image: int, tubelet: tuple[int, int, int],
               dim: int, heads: int, depth: int, temporal_depth: int, classes: int,
               device: torch.device) -> tuple[nn.Module, nn.Module, dict]:
    """(ours, theirs, config) for ViViT Model 2 or 3, parameter counts matched."""
    from . import registry
    t, h, _ = tubelet
    ours_cfg = {"model": model, "num_frames": frames, "input_size": image, "hidden_size": dim,
                "num_heads": heads, "depth": depth, "temporal_layers": temporal_depth,
                "tubelet_size": list(tubelet), "num_classes": classes, "in_channels": 3,
                "pooling": "mean"}
    ours, _ = registry.build("vivit-s", ours_cfg, device=device, seed=0)
    mod = peer_module("vivit")
    torch.manual_seed(0)
    theirs = mod.ViViT(image_size=image, image_patch_size=h, frames=frames, frame_patch_size=t,
                       num_classes=classes, dim=dim, spatial_depth=depth,
                       temporal_depth=temporal_depth if model == 2 else depth, heads=heads,
                       mlp_dim=4 * dim, pool="mean", channels=3, dim_head=dim // heads,
                       variant="factorized_encoder" if model == 2 else "factorized_self_attention")
    match_vivit(theirs, model, frames // t, (image // h) ** 2, dim)
    return ours, theirs.to(device), {"ours": ours_cfg, "theirs_variant": theirs.variant}


def vivit_case(model: int, args, device: torch.device, gen: torch.Generator):
    """(ours, theirs, config, clips): the ViViT pair at the bench's arguments (``args``, as
    ``parser()`` gives them) and a batch of random clips drawn from ``gen``."""
    ours, theirs, cfg = vivit_pair(model, frames=args.frames, image=args.image_size,
                                   tubelet=tuple(args.tubelet), dim=args.dim, heads=args.heads,
                                   depth=args.depth, temporal_depth=args.temporal_depth,
                                   classes=args.classes, device=device)
    x = torch.randn(args.batch_size, 3, args.frames, args.image_size, args.image_size,
                    generator=gen).to(device)
    return ours, theirs, cfg, x


def step_labels(classes: int, batch: int, device: torch.device) -> torch.Tensor:
    """The class labels every timed training step uses (the same for both arms)."""
    return torch.randint(0, classes, (batch,),
                         generator=torch.Generator().manual_seed(1)).to(device)


def match_vivit(theirs: nn.Module, model: int, nt: int, ns: int, dim: int) -> None:
    """Make vit-pytorch's ViViT the design ours is, in place (how is part of the report):
    - no LayerNorms around the patch projection (ours: the tubelet Conv3d alone);
    - qkv projections with bias (ours, like ViT / Scenic);
    - tanh-approximated GELU in the MLPs (ours, like Scenic / flax; theirs: the erf GELU),
      on torch's own kernel (``nn.GELU(approximate="tanh")``);
    - Model 2: one spatial position table shared by all frames and a temporal table in front
      of the temporal transformer (ours, like Scenic), instead of one (nt, ns) table.
    Mean pooling on both sides (so neither has CLS tokens)."""
    emb = theirs.to_patch_embedding
    emb[1], emb[3] = nn.Identity(), nn.Identity()
    for m in theirs.modules():
        if hasattr(m, "to_qkv"):
            m.to_qkv = _linear_with_bias(m.to_qkv)
        for name, child in m.named_children():
            if type(child) is nn.GELU:
                setattr(m, name, nn.GELU(approximate="tanh"))
    if model == 2:
        theirs.pos_embedding = nn.Parameter(torch.randn(1, 1, ns, dim) * 0.02)
        theirs.temporal_transformer = WithPositions(theirs.temporal_transformer, nt, dim)


# ------------------------------------------------------------------ NaViT

def navit_pair(*, dim: int, heads: int, depth: int, patch: int, max_size: int, seq_len: int,
               classes: int, device: torch.device) -> tuple[nn.Module, nn.Module, dict]:
    from . import registry
    grid = max_size // patch
    ours_cfg = {"hidden_size": dim, "num_heads": heads, "depth": depth, "patch_size": patch,
                "input_size": max_size, "max_grid": grid, "max_seq_len": seq_len,
                "num_classes": classes, "in_channels": 3, "batching": "pack",
                "packing": "next_fit", "pos_emb": "additive", "pos_coords": "absolute",
                "pooling": "attention", "mlp_ratio": 4.0}
    ours, _ = registry.build("navit-ti", ours_cfg, device=device, seed=0)
    mod = peer_module("na_vit")
    torch.manual_seed(0)
    theirs = mod.NaViT(image_size=max_size, patch_size=patch, num_classes=classes, dim=dim,
                       depth=depth, heads=heads, mlp_dim=4 * dim, channels=3,
                       dim_head=dim // heads)
    match_navit(theirs, mod, dim)
    return ours, theirs.to(device), {"ours": ours_cfg}


def match_navit(theirs: nn.Module, mod, dim: int) -> None:
    """Make vit-pytorch's NaViT the design ours is, in place:
    - LayerNorms with a bias (theirs: gain only) and no q/k RMS norms (ours has none);
    - q, kv and output projections with bias; no LayerNorms around the patch projection;
    - the pooling probe's query is not normalised, and the pooled vector goes through our
      MAP head's residual MLP before a biased classifier (theirs: LayerNorm + Linear).
    Same packing (next-fit into rows of max_seq_len), absolute factorised x/y embeddings."""
    def swap_norms(m: nn.Module) -> None:
        for name, child in m.named_children():
            if isinstance(child, mod.LayerNorm):
                setattr(m, name, nn.LayerNorm(child.gamma.numel()))
            elif isinstance(child, mod.RMSNorm):
                setattr(m, name, nn.Identity())
            else:
                swap_norms(child)

    swap_norms(theirs)
    for m in theirs.modules():
        if isinstance(m, mod.Attention):
            m.to_q, m.to_kv = _linear_with_bias(m.to_q), _linear_with_bias(m.to_kv)
            m.to_out[0] = _linear_with_bias(m.to_out[0])
    emb = theirs.to_patch_embedding
    emb[0], emb[2] = nn.Identity(), nn.Identity()
    theirs.attn_pool.norm = nn.Identity()
    head = theirs.mlp_head[1]
    theirs.mlp_head = nn.Sequential(ResidualMlp(dim, 4 * dim),
                                    nn.Linear(head.in_features, head.out_features, bias=True))


class PeerNaViT(nn.Module):
    """Their NaViT called the way ours is: a list of images, packed by its own grouping."""

    def __init__(self, model: nn.Module, seq_len: int):
        super().__init__()
        self.model, self.seq_len = model, seq_len

    def forward(self, images):
        return self.model(images, group_images=True, group_max_seq_len=self.seq_len)


# ------------------------------------------------------------------ timing

def make_step(model: nn.Module, inputs: tuple, labels: torch.Tensor, train: bool):
    if train:
        model.train()
        optim = adamw(model.parameters(), labels.device)  # the same optimiser for both

        def step():
            optim.zero_grad(set_to_none=True)
            F.cross_entropy(model(*inputs).float(), labels).backward()
            optim.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                model(*inputs)
    return step


def race(arms: dict[str, nn.Module], inputs: tuple, labels: torch.Tensor, train: bool,
         warmup: int, rounds: int, device: torch.device, settle: int = 0,
         faults: dict | None = None) -> dict[str, list[float]]:
    """Seconds per step of each arm; every round runs each arm once, in alternating order,
    once the shared heap has settled (``alternate``'s ``settle`` and ``faults``)."""
    steps = {name: make_step(m, inputs, labels, train) for name, m in arms.items()}
    return alternate(steps, device, warmup, rounds, abba=True, settle=settle, faults=faults)


def compare(label: str, ours: nn.Module, theirs: nn.Module, inputs: tuple, batch: int,
            classes: int, args, device: torch.device, config: dict) -> dict:
    po, pt = n_params(ours), n_params(theirs)
    if po != pt:
        from .errors import ConfigError
        raise ConfigError(f"{label}: parameter counts differ (ours {po:,}, theirs {pt:,}): "
                          "the configurations are not identical")
    labels = step_labels(classes, batch, device)
    row = {"model": label, "params": po, "batch_size": batch, "config": config}
    for mode in ("train", "infer"):
        faults: dict = {}
        with OtherLoad() as other:
            times = race({"ours": ours, "theirs": theirs}, inputs, labels, mode == "train",
                         args.warmup, args.rounds, device, args.settle, faults)
        row[f"{mode}_other_cpu_cores"] = other.cores
        row.update(settling_fields(faults, mode))
        paired = paired_ratios(times["theirs"], times["ours"])  # > 1: ours faster that round
        row[f"{mode}_paired_ratio"] = statistics.median(paired)
        row[f"{mode}_rounds_faster"] = sum(p > 1 for p in paired)
        for who, t in times.items():
            med = statistics.median(t)
            row[f"{who}_{mode}_step_ms_median"] = med * 1e3
            row[f"{who}_{mode}_step_ms_min"] = min(t) * 1e3
            row[f"{who}_{mode}_step_ms_max"] = max(t) * 1e3
            row[f"{who}_{mode}_samples_per_s"] = batch / med
        row[f"{mode}_ratio"] = row[f"ours_{mode}_samples_per_s"] / row[f"theirs_{mode}_samples_per_s"]
        if args.floor:
            row.update(floors_of(mode, {"ours": ours, "theirs": theirs}, inputs, labels, device))
    return row


def floors_of(mode: str, arms: dict[str, nn.Module], inputs: tuple, labels: torch.Tensor,
              device: torch.device) -> dict:
    """``--floor``: the GEMM floor of each arm's step (``harness.metrics.gemm_floor``: both
    arms' steps and the re-run calls interleaved in rounds; a GEMM both make is timed once
    for both), after one unrecorded step each, as ``<arm>_<mode>_gemm_*`` keys, and the
    ratio ceiling: the median over rounds of theirs' step / ours' floor."""
    steps = {who: make_step(m, inputs, labels, mode == "train") for who, m in arms.items()}
    for step in steps.values():
        step()
    f = gemm_floor.floors(steps, device)
    out = {f"{mode}_ratio_ceiling": statistics.median(
        t / fl for (t, _), (_, fl) in zip(f["theirs"]["per_round"], f["ours"]["per_round"]))}
    for who, g in f.items():
        out.update(gemm_floor.as_metrics(f"{who}_{mode}", g))
        out[f"{who}_{mode}_gemm_other_ms"] = g["other_s"] * 1e3
    return out


def hardware() -> dict:
    out = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "git_sha": git_sha(),
           "mkl": cpu_mkl.mode()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def software_detail(hw: dict) -> str:
    """torch's CPU capability, and MKL's dispatch where the record has it (harness/metrics/cpu_mkl.py)."""
    mkl = f", MKL dispatch `{hw['mkl']}`" if hw.get("mkl") else ""
    return f"{hw['cpu_capability']}{mkl}"


PEER_MODELS = ("m2", "m3", "navit")


def peer_models(text: str) -> list[str]:
    """``--models``' comma list, checked (ConfigError before any work)."""
    from .errors import ConfigError
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in wanted if m not in PEER_MODELS]
    if bad or not wanted:
        raise ConfigError(f"--models {text!r}: unknown {', '.join(bad) or '(empty)'}; "
                          f"valid: {', '.join(PEER_MODELS)}")
    return wanted


def check_args(args) -> None:
    """ConfigError for a bad model list, a missing peer or a count out of range, before any work."""
    from .errors import check_counts
    check_counts(("--processes", args.processes, 1), ("--rounds", args.rounds, 1),
                 ("--warmup", args.warmup, 0), ("--settle", args.settle, 0))
    cpu_mkl.check()  # HARNESS_CPU_MKL bad, or asked for and not in effect
    for name in {"na_vit" if m == "navit" else "vivit" for m in peer_models(args.models)}:
        peer_module(name)  # vit-pytorch installed?


def run_peer(args) -> dict:
    check_args(args)
    if args.processes > 1:
        return run_processes(args)
    device = torch.device(args.device)
    malloc = cpu_malloc.tune() if device.type == "cpu" else ""  # both arms alike
    if args.threads:
        set_threads(args.threads)
    if args.linear != "auto":
        cpu_matmul.set_path(args.linear)
    if args.gelu != "auto":
        cpu_gelu.set_path(args.gelu)
    if args.attn != "auto":
        cpu_attention.set_path(args.attn)
    load_before = os.getloadavg()
    rows = []
    wanted = peer_models(args.models)
    gen = torch.Generator().manual_seed(0)
    for m in wanted:
        if m in ("m2", "m3"):
            model = int(m[1])
            ours, theirs, cfg, x = vivit_case(model, args, device, gen)
            rows.append(compare(f"ViViT Model {model}", ours, theirs, (x,), args.batch_size,
                                args.classes, args, device, cfg))
        elif m == "navit":
            ours, theirs, cfg = navit_pair(dim=args.navit_dim, heads=args.navit_heads,
                                           depth=args.navit_depth, patch=args.patch,
                                           max_size=args.max_size, seq_len=args.max_seq_len,
                                           classes=args.classes, device=device)
            sizes = ours.example_sizes(args.images, torch.Generator().manual_seed(0))
            images = [torch.rand(3, h, w, generator=gen).to(device) for h, w in sizes]
            cfg["images"] = f"{args.images} images, sides {min(min(s) for s in sizes)}-" \
                            f"{max(max(s) for s in sizes)} px (skew 2), patch {args.patch}"
            rows.append(compare("NaViT (packed)", ours, PeerNaViT(theirs, args.max_seq_len),
                                (images,), args.images, args.classes, args, device, cfg))
    return {"bench": "peer", "peer": PEER, "peer_version": peer_version(), "device": str(device),
            "rounds": args.rounds, "warmup": args.warmup, "settle": args.settle,
            "load_avg_before": load_before,
            "ours_cpu_linear": cpu_matmul.path(), "ours_cpu_gelu": cpu_gelu.path(),
            "ours_cpu_attention": cpu_attention.path(), "malloc": malloc,
            "load_avg_after": os.getloadavg(), "hardware": hardware(), "rows": rows,
            "command": kernel_env() + "python -m harness.bench_peer " + " ".join(args.argv)}


def run_processes(args) -> dict:
    """The whole comparison once in each of ``args.processes`` fresh processes, one after
    another (``harness.processes``), merged per model.  On the same quiet machine the train
    ratio moves between processes, for reasons not pinned down (each has its own heap and
    addresses): in two five-process runs on the Zen 4 of docs/speed.md, ViViT Model 2's ran
    from 1.004 to 1.056, its median 1.02 in one run and 1.04 in the other.  So one process
    is one sample of the ratio, not the ratio, and the report gives the interval the
    processes put the ratio in (``merge_processes``)."""
    runs = run_in_processes("harness.bench_peer", args.argv, args.processes)
    merged = merge_processes(runs)
    merged["command"] = kernel_env() + "python -m harness.bench_peer " + " ".join(args.argv)
    return merged


def merge_processes(runs: list[dict]) -> dict:
    """One record from several processes' records: each model's row merged by
    ``harness.processes.merge_numbers`` (medians over the processes, every process's ratios
    and median step times kept as ``<key>_per_process``, rounds won summed), plus each
    ratio's geometric mean over the processes and its 95% interval
    (``<mode>_ratio_gmean``, ``_ci95_low``, ``_ci95_high``; ``processes.ratio_interval``)."""
    rows = [merge_numbers([r["rows"][i] for r in runs]) for i in range(len(runs[0]["rows"]))]
    for row in rows:
        for mode in ("train", "infer"):
            g, lo, hi = ratio_interval(row[f"{mode}_ratio_per_process"])
            row.update({f"{mode}_ratio_gmean": g, f"{mode}_ratio_ci95_low": lo,
                        f"{mode}_ratio_ci95_high": hi})
    return {**runs[0], "rows": rows, "processes": len(runs),
            "load_avg_after": runs[-1]["load_avg_after"]}


def render_peer(r: dict) -> str:
    hw = r["hardware"]
    la, lb = r["load_avg_before"], r["load_avg_after"]
    n = r.get("processes", 1)
    rounds = r["rounds"] * n
    many = n > 1
    settle = settle_method(r.get("settle", 0))
    method = (f"{r['warmup']} warm-up steps each{settle}, then {r['rounds']} rounds alternating "
              "ours and theirs (every other round in reverse order); median step time")
    if many:
        method = (f"the whole comparison in {n} fresh processes, one after another, each: "
                  f"{method}; the table gives the median over the processes, the ratio's range "
                  "over them in brackets")
    lines = [f"# Ours vs {r['peer']} {r['peer_version']}", "",
             "Reproduce:", "", "```", r["command"], "```", "",
             f"- hardware: {hw['cpu']}, {hw['cpu_count']} CPUs, {hw['torch_threads']} torch threads, "
             f"{hw.get('gpu', 'no GPU')}; device `{r['device']}`",
             f"- software: torch {hw['torch']} ({software_detail(hw)}), Python {hw['python']}, "
             f"this code at git `{hw.get('git_sha', '?')}`; our "
             f"fp32 CPU Linear path: `{r.get('ours_cpu_linear', '?')}` (theirs: torch's `F.linear`); "
             f"our tanh-GELU path: `{r.get('ours_cpu_gelu', '?')}` (theirs: torch's kernel); "
             f"our CPU attention path: `{r.get('ours_cpu_attention', 'sdpa')}` (theirs: "
             "`F.scaled_dot_product_attention`); "
             f"malloc: `{r.get('malloc', '?')}` for both (harness/metrics/cpu_malloc.py)",
             f"- load average (1/5/15 min) before: {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}, after: "
             f"{lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f}",
             f"- method: {method}; train = forward + cross entropy + backward + AdamW; "
             "ratio = ours samples/s / theirs samples/s (> 1: ours faster); paired = the median "
             "over rounds of theirs' step time / ours in the same round, with the rounds ours "
             f"won out of {rounds}; other procs = CPU cores other processes used while train / "
             "inference were timed (0 = a quiet machine)", "",
             "| model | params (both) | batch | train ms ours | train ms theirs | train ratio | "
             "train paired (rounds won) | infer ms ours | infer ms theirs | infer ratio | "
             "infer paired (rounds won) | other procs (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(row, key):
        text = f"**{row[key]:.2f}**"
        if many:
            vals = row[f"{key}_per_process"]
            text += f" ({min(vals):.2f}-{max(vals):.2f})"
        return text

    def paired(row, mode):
        if f"{mode}_paired_ratio" not in row:  # a record from before the paired figures
            return "-"
        return f"{row[f'{mode}_paired_ratio']:.3f} ({row[f'{mode}_rounds_faster']}/{rounds})"

    for row in r["rows"]:
        lines.append(
            f"| {row['model']} | {row['params']:,} | {row['batch_size']} | "
            f"{row['ours_train_step_ms_median']:.1f} | {row['theirs_train_step_ms_median']:.1f} | "
            f"{ratio(row, 'train_ratio')} | {paired(row, 'train')} | "
            f"{row['ours_infer_step_ms_median']:.1f} | {row['theirs_infer_step_ms_median']:.1f} | "
            f"{ratio(row, 'infer_ratio')} | {paired(row, 'infer')} | "
            f"{row['train_other_cpu_cores']:.2f} / {row['infer_other_cpu_cores']:.2f} |")
    if many:
        lines += ["", "Per process, in the order they ran: train ratio (ours / theirs median ms), "
                  "infer ratio:", ""]
        for row in r["rows"]:
            each = zip(row["train_ratio_per_process"],
                       row.get("ours_train_step_ms_median_per_process", [float("nan")] * n),
                       row.get("theirs_train_step_ms_median_per_process", [float("nan")] * n),
                       row["infer_ratio_per_process"])
            lines.append(f"- {row['model']}: " + ", ".join(
                f"{t:.3f} ({o:.0f} / {th:.0f}) / {i:.3f}" for t, o, th, i in each))
        lines += render_between(r["rows"], n)
    lines += settling_table([(row["model"], row) for row in r["rows"]], ("ours", "theirs"), n)
    lines += render_floor(r["rows"])
    lines += ["", "Configurations (ours; theirs adjusted to the same design, see "
              "`harness/bench_peer.py` `match_vivit` / `match_navit`):", ""]
    for row in r["rows"]:
        lines.append(f"- {row['model']}: `{json.dumps(row['config'], sort_keys=True)}`")
    lines += ["", "Parameter counts are equal by construction and checked before timing.", ""]
    return "\n".join(lines)


def render_between(rows: list[dict], n: int) -> list[str]:
    """The ratio over processes as an interval and what it shows, against the target
    (ours / theirs >= 1.0); computed from the per-process ratios, so a record from before
    the interval renders it too."""
    lines = ["", f"Between processes: each process is one sample of the ratio, so the {n} "
             "give its geometric mean and 95% interval (Student t over the log ratios, "
             "`harness.processes.ratio_interval`). An interval above 1.0 shows ours faster, "
             "below 1.0 theirs; one that holds 1.0 shows no difference at this many processes.",
             "", "| model | train ratio (95% interval) | train: what it shows | "
             "infer ratio (95% interval) | infer: what it shows |", "|---|---:|---|---:|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(interval_cells(row)) + " |")
    return lines


def interval_cells(row: dict) -> list[str]:
    """Train and inference: the ratio over the row's processes with its 95% interval, and
    what that shows (one process: the ratio alone)."""
    cells = []
    for mode in ("train", "infer"):
        g, lo, hi = ratio_interval(row.get(f"{mode}_ratio_per_process", [row[f"{mode}_ratio"]]))
        cells += ([f"{g:.3f}", "one process: no interval"] if math.isnan(lo) else
                  [f"{g:.3f} ({lo:.3f}-{hi:.3f})", interval_reads(lo, hi, "ours faster",
                                                                   "theirs faster")])
    return cells


def render_floor(rows: list[dict]) -> list[str]:
    """``--floor``'s table (nothing where the record has no floors)."""
    have = [(row, mode) for row in rows for mode in ("train", "infer")
            if f"ours_{mode}_gemm_floor_ms" in row]
    if not have:
        return []
    lines = ["", "Where the step goes (`--floor`, `harness/metrics/gemm_floor.py`): every call "
             "of one step that carries the model's multiply-adds (mm, addmm, bmm, oneDNN "
             "linear, convolution, SDPA's fused attention kernels), re-run alone on this "
             "machine and summed: the step's GEMM floor. It is timed in rounds, each a step "
             "of ours, one of theirs, and every call once (a call both sides make, once for "
             "both), so the machine's drift hits step and floor alike; medians over the "
             "rounds. Other = step - floor (norms, activations, an unfused softmax, copies, "
             "the optimiser, Python, and GEMMs slower between other kernels than alone); "
             "ceiling = theirs' step / ours' floor, the ratio ours would reach if its step "
             "were its GEMMs alone.",
             "", "| model | mode | side | step ms (these rounds) | GEMMs alone ms (calls) | "
             "other ms | other / step | ceiling |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for row, mode in have:
        for who in ("ours", "theirs"):
            k = f"{who}_{mode}_gemm"
            ceiling = f"{row[f'{mode}_ratio_ceiling']:.2f}" if who == "ours" else ""
            lines.append(f"| {row['model']} | {mode} | {who} | {row[f'{k}_step_ms']:.1f} | "
                         f"{row[f'{k}_floor_ms']:.1f} ({row[f'{k}_calls']:.0f}) | "
                         f"{row[f'{k}_other_ms']:.1f} | {1 - row[f'{k}_share']:.0%} | {ceiling} |")
    skipped = [f"{who} {mode}: {x}" for row, mode in have for who in ("ours", "theirs")
               for x in row.get(f"{who}_{mode}_gemm_in_step_only", [])]
    if skipped:
        lines += ["", "Counted by their time inside the step (could not be re-run alone):", ""]
        lines += [f"- {x}" for x in skipped]
    return lines


# ------------------------------------------------------------------ engine overhead

OVERHEAD_STUDY = """\
name: overhead_probe
question: How much of a one-minute trial is not the task's own work?
task:
  name: classify
  options: {{lr: 1.0e-3, batch_size: 64, eval_batch_size: 512, log_every: 10}}
data: {{name: digits, options: {{image_size: 8}}}}
model: {{variant: vit-digits, config: {{}}}}
repeats: {trials}
budget: {{steps: 1000000, eval_every: {eval_every}, max_time_s: {seconds}, speed_steps: 3}}
objectives:
  - {{metric: accuracy, direction: maximize}}
pruner: {{name: none}}
device: cpu
"""


OVERHEAD_KEYS = ("trial_time_s", "task_time_s", "flops_time_s", "speed_time_s",
                 "tracking_time_s", "optuna_in_task_s", "task_bookkeeping_s", "overhead_time_s",
                 "overhead_frac", "train_time_s", "train_steps")


def run_overhead(args) -> dict:
    """``trials`` classify trials of ~``seconds`` each, one after another in one worker
    process, through the real engine; each one's wall-time breakdown. The record's top level
    is the first trial's (the one that also pays the process's first use of the model's
    kernels); ``trials`` holds every trial's."""
    import tempfile

    from .errors import check_counts
    from .studies import MAX_REPEATS, load_study
    from .sweep import Runner, check_storage_url, default_storage
    from .tracking import default_tracking_uri

    check_counts(("--trials", args.trials, 1, MAX_REPEATS))  # the study's `repeats` limit
    with tempfile.TemporaryDirectory(prefix="harness-overhead-") as tmp:
        runs = Path(tmp) / "runs"
        study_file = Path(tmp) / "overhead_probe.yaml"
        study_file.write_text(OVERHEAD_STUDY.format(seconds=args.seconds, trials=args.trials,
                                                    eval_every=args.eval_every))
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        study = load_study(study_file, allowed_roots=[Path(tmp).resolve(), Path.cwd().resolve()])
        runner = Runner(study, check_storage_url(default_storage(runs)),
                        default_tracking_uri(runs), runs, "cpu", quiet=True)
        rc = runner.run()
        wall = time.perf_counter() - t0
        if rc != 0 or len(runner.finished) != args.trials:
            from .errors import TrialFailed
            raise TrialFailed(f"the overhead trials did not all finish: {runner.failures}")
    trials = [{k: float(m[k]) for k in OVERHEAD_KEYS if k in m} for m in runner.finished]
    out = {"bench": "overhead", **trials[0], "trials": trials,
           "command_wall_s": wall,
           "outside_trial_s": wall - sum(t["trial_time_s"] for t in trials),
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
           "hardware": hardware()}
    out["command_overhead_frac"] = (wall - sum(t["task_time_s"] for t in trials)) / wall
    return out


def render_overhead(r: dict) -> str:
    t = r["trial_time_s"]
    trials = r["trials"]

    def pct(x):
        return f"{x:7.2f} s  {x / t:6.1%}"
    la = r["load_avg_before"]
    first = "the first trial: " if len(trials) > 1 else ""
    lines = [f"engine overhead of {first}one classify trial (vit-digits, "
             f"{r.get('train_steps', 0):.0f} steps in {r.get('train_time_s', 0):.1f} s of "
             f"training); load average before "
             f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}, {r['hardware']['torch_threads']} torch threads",
             f"  trial wall time          {t:7.2f} s  100.0%",
             f"  task (train + evaluate)  {pct(r['task_time_s'])}",
             f"  FLOP counting            {pct(r['flops_time_s'])}",
             f"  speed probe              {pct(r['speed_time_s'])}",
             f"  MLflow logging (all)     {pct(r.get('tracking_time_s', 0.0))}",
             f"  Optuna reports in task   {pct(r.get('optuna_in_task_s', 0.0))}",
             f"  everything but the task  {pct(r['overhead_time_s'])}   <- target <= 5%"]
    if len(trials) > 1:
        lines += ["every trial, one after another in this one worker process "
                  "(seconds; % of that trial's wall time):",
                  "  trial  wall s  steps   FLOPs s  probe s  MLflow s  not task"]
        for i, x in enumerate(trials):
            lines.append(f"  {i:5d}  {x['trial_time_s']:6.2f}  {x.get('train_steps', 0):5.0f}  "
                         f"{x['flops_time_s']:7.2f}  {x['speed_time_s']:7.2f}  "
                         f"{x.get('tracking_time_s', 0.0):8.2f}  {x['overhead_frac']:7.1%}")
        later = [x["overhead_frac"] for x in trials[1:]]
        lines.append(f"  the later trials' not-task share: {min(later):.1%} to {max(later):.1%} "
                     f"(median {statistics.median(later):.1%})")
    lines.append(f"  whole command (stores, study, {len(trials)} trial(s), close): "
                 f"{r['command_wall_s']:.2f} s; outside the trials {r['outside_trial_s']:.2f} s; "
                 f"not-task share of the command {r['command_overhead_frac']:.1%}")
    return "\n".join(lines)


def render_overhead_md(r: dict, argv: list[str]) -> str:
    hw, n = r["hardware"], len(r["trials"])
    what = ("one `classify` trial" if n == 1 else
            f"{n} `classify` trials (seeds 0-{n - 1}), one after another in one worker process,")
    return "\n".join([
        "# Engine overhead of a one-minute trial", "", "Reproduce:", "", "```",
        "python -m harness.bench_peer " + " ".join(argv), "```", "",
        f"- hardware: {hw['cpu']}, {hw['cpu_count']} CPUs, {hw['torch_threads']} torch threads; "
        f"torch {hw['torch']}, Python {hw['python']}, this code at git `{hw.get('git_sha', '?')}`",
        f"- what runs: {what} of vit-digits through the real "
        "engine (Optuna on embedded SQLite, MLflow on embedded SQLite, FLOP counting, the "
        "per-trial speed probe, metric logging every evaluation), in a temporary runs folder",
        "- overhead = trial wall time - the task's own training and evaluation; target <= 5%", "",
        "```", render_overhead(r), "```", ""])


# ------------------------------------------------------------------ CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness bench-peer", description=__doc__.split("\n")[0],
                                allow_abbrev=False)  # processes.child_argv strips options by name
    p.add_argument("what", nargs="?", default="peer", choices=("peer", "overhead"))
    p.add_argument("--models", default="m2,m3,navit", help="comma list of m2, m3, navit")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each: ours and theirs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--settle", type=int, default=10,
                   help="after the warm-up, up to this many untimed rounds more, until no step "
                        f"faults in more than {SETTLED_FAULTS} new pages of heap (0: none)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the whole comparison in this many fresh processes, one after "
                        "another, and report medians over them (the ratio moves by a few %% "
                        "between processes)")
    p.add_argument("--batch-size", type=int, default=8, help="ViViT clips per step")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--tubelet", type=int, nargs=3, default=[2, 16, 16], metavar=("T", "H", "W"))
    p.add_argument("--dim", type=int, default=384, help="ViViT width (ViViT-S: 384)")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--depth", type=int, default=12, help="ViViT layers (Model 2: spatial)")
    p.add_argument("--temporal-depth", type=int, default=4, help="Model 2 temporal layers")
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--images", type=int, default=64, help="NaViT images per step")
    p.add_argument("--navit-dim", type=int, default=192, help="NaViT width (NaViT-Ti: 192)")
    p.add_argument("--navit-heads", type=int, default=3)
    p.add_argument("--navit-depth", type=int, default=12)
    p.add_argument("--patch", type=int, default=4, help="NaViT patch")
    p.add_argument("--max-size", type=int, default=64, help="NaViT largest image side")
    p.add_argument("--max-seq-len", type=int, default=256, help="NaViT tokens per pack")
    p.add_argument("--seconds", type=float, default=60.0, help="overhead: training seconds")
    p.add_argument("--eval-every", type=int, default=0, help="overhead: budget.eval_every")
    p.add_argument("--trials", type=int, default=1,
                   help="overhead: this many trials (seeds 0..N-1), one after another in one "
                        "worker process; the report gives each one's breakdown, so the first "
                        "trial's one-off costs (the process's first use of the kernels) show "
                        "apart from what every later trial pays")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--linear", default="auto", choices=("auto", *cpu_matmul.CHOICES),
                   help="our fp32 CPU Linear path (auto: harness.metrics.cpu_matmul's rule for this CPU)")
    p.add_argument("--gelu", default="auto", choices=("auto", "fused", "aten"),
                   help="our tanh-GELU path (auto: harness.metrics.cpu_gelu's rule)")
    p.add_argument("--attn", default="auto", choices=("auto", "matmul", "sdpa"),
                   help="our CPU attention path for short sequences (auto: "
                        "harness.metrics.cpu_attention's default)")
    p.add_argument("--floor", action="store_true",
                   help="also measure each step's GEMM floor, ours and theirs: every matmul "
                        "of one step re-run alone (harness/metrics/gemm_floor.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.add_argument("--out", default=None, help="also write a Markdown report here and its JSON beside it")
    p.add_argument("--render", nargs="+", default=None, metavar="RECORD",
                   help="time nothing: render a saved peer record (a report's results.json) "
                        "with this code's report, or of several records one summary of "
                        "their ratios' intervals, to stdout or --out (Markdown only)")
    return p


def load_record(path: str) -> dict:
    """``--render``: a saved peer record, or ConfigError saying what is wrong with the file."""
    from .errors import ConfigError
    try:
        r = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--render {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"--render {path}: not JSON ({e})") from None
    if not isinstance(r, dict) or r.get("bench") != "peer" or not isinstance(r.get("rows"), list):
        raise ConfigError(f"--render {path}: not a bench-peer record (a peer report's "
                          "results.json, with \"bench\": \"peer\" and its rows)")
    return r


def render_saved(args, argv: list[str]) -> str:
    """``--render``: every record read and checked first (ConfigError, before anything is
    written), then one record's report, or several records' summary."""
    from .errors import ConfigError
    if args.what != "peer":
        raise ConfigError("--render renders peer records; the overhead report has no "
                          "saved-record renderer")
    records = [(path, load_record(path)) for path in args.render]
    if len(records) == 1:
        return render_peer(records[0][1])
    return render_summary(records, "python -m harness.bench_peer " + " ".join(argv))


def render_summary(records: list[tuple[str, dict]], command: str) -> str:
    """Several saved peer records side by side: per record and model, each ratio's
    geometric mean over the processes with its 95% interval and what it shows."""
    lines = ["# Ours vs vit-pytorch: the ratio over processes, run by run", "",
             "Rendered from saved records (no timing):", "", "```", command, "```", "",
             "Each run's processes are its samples of the ratio (ours / theirs samples/s, "
             "> 1: ours faster): the geometric mean over them and its 95% Student-t interval "
             "(`harness.processes.ratio_interval`). An interval above 1.0 shows ours faster, "
             "below 1.0 theirs; one that holds 1.0 shows no difference at that many "
             "processes. A one-process run has no interval. Each run's own report (beside its "
             "record) gives the machine's load, the kernel paths and every process's ratio.", "",
             "| record | machine | code | processes | model | train ratio (95% interval) | "
             "train: what it shows | infer ratio (95% interval) | infer: what it shows |",
             "|---|---|---|---:|---|---:|---|---:|---|"]
    for path, r in records:
        hw = r.get("hardware", {})
        # the instruction set torch runs: one CPU model can be lent with AVX-512 or without it
        isa = f" ({hw['cpu_capability']})" if hw.get("cpu_capability") else ""
        machine = hw.get("cpu", "?") + isa + (f", {hw['gpu']}" if hw.get("gpu") else "")
        n = r.get("processes", 1)
        for row in r["rows"]:
            lines.append(f"| `{path}` | {machine} | `{hw.get('git_sha', '?')[:7]}` | {n} | "
                         f"{row['model']} | " + " | ".join(interval_cells(row)) + " |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    from .errors import HarnessError
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        if args.render:  # saved records: Markdown only, no record written
            text = render_saved(args, argv)
            print(text)
            if args.out:
                write_out(args.out, text)
            return 0
        r = run_overhead(args) if args.what == "overhead" else run_peer(args)
    except HarnessError as e:
        print(f"harness bench-peer: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps(r, default=str))
    elif args.what == "overhead":
        print(render_overhead(r))
    else:
        print(render_peer(r))
    if args.out:
        write_out(args.out, render_peer(r) if args.what == "peer" else render_overhead_md(r, argv), r)
    return 0


def write_out(path: str, text: str, record: dict | None = None) -> None:
    """``--out``: the Markdown report, and the record, if any, as JSON beside it
    (``results.json`` beside a ``README.md``, else ``<stem>.json``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if record is not None:
        name = "results.json" if out.name == "README.md" else f"{out.stem}.json"
        (out.parent / name).write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
