"""Benchmark: a trial that only measures speed, so a speed comparison is an ordinary study.

No training: ``run(ctx)`` times train steps (forward, ``bench_loss``, backward, AdamW) and
inference, measures the machine's dense-matmul peak in the same process (once per
process), and returns throughput, memory and MFU (see ``harness.metrics.peak``):

    train_mfu = 3 x forward MACs/sample x 2 flops/MAC x samples/s / peak flop/s

What is timed (``inputs``):
    model  the model's own default input, ``model.example_inputs`` (DiT-S/2 on 4x32x32
           latents, ViViT on its clips), whatever the study's dataset: the study's ``data:``
           section is a formality and ``model_overrides`` returns {} so the variant keeps
           its own defaults (num_classes, in_channels, input_size)
    data   the first shuffled train batch of the study's dataset, passed as the forward's
           one argument (classifiers: ViT, ViViT, NaViT); the data fills the model's
           data-implied fields as in training.  How a dataset option (NaViT: ``data.skew``)
           changes speed becomes a sweep axis.

The forward MACs are counted on the very batch that is timed (fvcore, attention included,
``harness.metrics.flops``), per sample: for fixed-size inputs that equals ``gflops_fwd``;
for NaViT's variable-size images it is that batch's own mean, padding work included (what
the hardware computed), so compare packing arms by images/s, not by MFU.

Arms of a sweep run as separate trials, minutes apart, so on a shared machine their ratio
carries the drift between those minutes.  ``reference`` (model config overrides, e.g.
``{batching: pad}``) also builds that reference model (same weights where the parameters
match) and times it in turn with the trial's own on the same batch, round by round, in the
same process: ``train_speedup_vs_reference`` / ``infer_speedup_vs_reference`` are paired
ratios (``reference_ab``), what a study's ``ratios`` entry reads with ``paired``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError, TrialFailed
from .base import Task, TrialContext, register_task


@dataclass
class BenchmarkOptions:
    inputs: Literal["model", "data"] = "model"  # model: its own default input; data: 1st train batch
    batch_size: int = 8              # samples per timed step
    warmup: int = 3                  # untimed steps first (allocator, caches, compile)
    steps: int = 10                  # timed steps (median reported)
    bf16: bool = False               # bf16 autocast (MFU then against the bf16 peak)
    compile: bool = False            # torch.compile the model (inductor; CPU needs a C++ compiler)
    channels_last: bool = False      # conv weights and 4-D/5-D inputs channels-last
    attention: str = "auto"          # SDPA kernel: auto (torch's pick: flash where it serves) |
                                     # flash | efficient | cudnn (CUDA) | math (unfused)
    threads: int = 0                 # torch CPU threads for this trial (0: leave as is)
    train: bool = True               # time train steps
    infer: bool = True               # time inference
    measure_peak: bool = True        # measure the dense GEMM peak (once per process) for MFU
    peak_tflops: float | None = None  # datasheet dense peak in real TFLOP/s: used instead
    peak_sizes: tuple[int, ...] | None = None  # GEMM sides of the peak (None: per device)
    reference: dict | None = None    # model config overrides of a reference model (e.g.
                                     # {batching: pad}), timed in turn with this one on the
                                     # same batch, in this process: *_speedup_vs_reference
    reference_rounds: int = 0        # rounds of that alternation (0: steps)
    reference_settle: int = 10       # untimed rounds of it, at most, after the warm-up, until no
                                     # step grows the heap the two share (speed.alternate)
    floor: bool = False              # also each step's GEMM floor (its matrix multiplies re-run
                                     # alone, summed: harness.metrics.gemm_floor), its share of
                                     # the step, and the MFU at the floor

    def validate(self) -> None:
        if self.batch_size < 1 or self.steps < 1 or self.warmup < 0:
            raise ConfigError("batch_size and steps must be >= 1, warmup >= 0")
        from ..metrics.speed import check_attention_name
        check_attention_name(self.attention)
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if not (self.train or self.infer):
            raise ConfigError("train and infer are both false: nothing to time")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"peak_tflops must be > 0 (TFLOP/s, 2 flops per MAC), got "
                              f"{self.peak_tflops}")
        if self.peak_sizes is not None and (not self.peak_sizes or min(self.peak_sizes) < 16):
            raise ConfigError(f"peak_sizes must be GEMM sides >= 16, got {self.peak_sizes}")
        if self.reference is not None:
            if not self.reference or not all(isinstance(k, str) for k in self.reference):
                raise ConfigError(f"reference must map model config fields to values, e.g. "
                                  f"{{batching: pad}}; got {self.reference!r}")
            if self.compile:
                raise ConfigError("reference with compile=true is not supported (the "
                                  "alternation times eager models); drop one of them")
        if self.reference_rounds < 0:
            raise ConfigError(f"reference_rounds must be >= 0 (0: steps), got {self.reference_rounds}")
        if self.reference_settle < 0:
            raise ConfigError(f"reference_settle must be >= 0 (0: no settling rounds), got "
                              f"{self.reference_settle}")


def bench_inputs(ctx: TrialContext, opts: BenchmarkOptions) -> tuple:
    """The timed batch: the model's example inputs (seeded) or the first shuffled train batch."""
    if opts.inputs == "model":
        return ctx.model.example_inputs(opts.batch_size, device=ctx.device,
                                        generator=torch.Generator().manual_seed(ctx.seed))
    return data_batch(ctx.data, opts.batch_size, ctx.seed, ctx.device)


def data_batch(data, batch_size: int, seed: int, device: torch.device) -> tuple:
    """The first batch of ``data``'s train split shuffled with ``seed``, as the model's
    positional inputs (labels dropped): what an ``inputs=data`` trial times."""
    from .classify import to_device
    n = len(data.train)
    if n < batch_size:
        raise ConfigError(f"inputs=data: the train split has {n} samples, fewer than "
                          f"batch_size={batch_size}")
    loader = data.loader("train", batch_size, shuffle=True,
                         generator=torch.Generator().manual_seed(seed))
    x, _ = next(iter(loader))
    return (to_device(x, device),)


def build_reference(variant: str, model_cfg, model, reference: dict, seed: int,
                    device: torch.device):
    """``(reference model, weights)``: ``variant`` built from ``model_cfg`` with the
    ``reference`` overrides, carrying ``model``'s weights where the state dicts match (else its
    own init, and ``weights`` says so); None when the overrides leave the config as it is."""
    from .. import registry
    own_cfg = registry.config_dict(model_cfg)
    over = {**own_cfg, **reference}
    if over == own_cfg:
        return None
    ref, _ = registry.build(variant, over, device=device, seed=seed)
    try:
        ref.load_state_dict(model.state_dict())
        weights = "shared"
    except RuntimeError:  # the overrides change the parameters: the reference's own init
        weights = f"own init (seed {seed}): the parameters differ"
    return ref, weights


def ab_steps(models: dict, inputs: tuple, device: torch.device, o: BenchmarkOptions,
             mode: str) -> dict:
    """One ``mode`` ("train" or "infer") step function per model (name -> model), as a trial
    times them: each in that mode, its own AdamW for training, the options' bf16 and SDPA
    kernel."""
    from ..metrics.speed import adamw, make_infer_step, make_train_step
    steps = {}
    for name, m in models.items():
        if mode == "train":
            m.train()
            steps[name] = make_train_step(m, m, inputs, adamw(m.parameters(), device), device,
                                          o.bf16, o.attention)
        else:
            m.eval()
            steps[name] = make_infer_step(m, inputs, device, o.bf16, o.attention)
    return steps


def reference_ab(ctx: TrialContext, o: BenchmarkOptions, inputs: tuple) -> tuple[dict, dict]:
    """The trial's model against ``o.reference`` (its config with those overrides, the same
    weights where the state dicts match), on the same batch: warm-up steps each, then rounds
    that take the two in turn (every other round in reverse order), one step each.  Per mode,
    ``<mode>_speedup_vs_reference`` is the median over rounds of the reference's step time
    over this model's (> 1: this model is faster), taken within one round so the machine's
    drift cancels; the reference's family figures (``extra_metrics``) come as ``reference_*``.
    Nothing when the overrides leave the trial's config as it is."""
    import json
    import statistics

    from ..metrics.speed import (alternate, channels_last_model, paired_ratios, settle_method,
                                 settled_fields)
    built = build_reference(ctx.variant, ctx.model_cfg, ctx.model, o.reference, ctx.seed,
                            ctx.device)
    if built is None:
        return {}, {"bench.reference": "skipped: the trial's own config"}
    ref, weights = built
    device = ctx.device
    if o.channels_last:  # measure_speed already converted the trial's model
        inputs = channels_last_model(ref, inputs)
    out: dict = {}
    extra = getattr(ref, "extra_metrics", dict)
    extra()
    ref.eval()
    with torch.inference_mode():
        ref(*inputs)
    out.update({f"reference_{k}": float(v) for k, v in extra().items()})
    rounds = o.reference_rounds or o.steps
    models = {"own": ctx.model, "reference": ref}
    for mode in ("train", "infer"):
        if not getattr(o, mode):
            continue
        steps = ab_steps(models, inputs, device, o, mode)
        faults: dict = {}
        times = alternate(steps, device, o.warmup, rounds=rounds, abba=True,
                          settle=o.reference_settle, faults=faults)
        out.update(settled_fields(faults, f"{mode}_reference"))
        ratios = paired_ratios(times["reference"], times["own"])
        out[f"{mode}_speedup_vs_reference"] = statistics.median(ratios)
        out[f"{mode}_rounds_won_vs_reference"] = sum(r > 1 for r in ratios) / len(ratios)
        out[f"{mode}_ab_step_ms_median"] = statistics.median(times["own"]) * 1e3
        out[f"{mode}_reference_step_ms_median"] = statistics.median(times["reference"]) * 1e3
    getattr(ctx.model, "extra_metrics", dict)()  # the alternation's forwards are not the trial's
    tags = {"bench.reference": json.dumps(o.reference, sort_keys=True, default=str),
            "bench.reference_weights": weights,
            "bench.reference_rule": (f"{rounds} rounds, one step of each per round (every other "
                                     f"round reversed) after {o.warmup} warm-up steps each"
                                     f"{settle_method(o.reference_settle)}; median over rounds "
                                     "of reference step / own step")}
    return out, tags


def gmacs_per_sample(model, inputs: tuple, batch_size: int) -> float:
    """Forward GMACs per sample of exactly the timed batch (fvcore, attention included)."""
    from ..metrics.flops import count_flops
    return count_flops(model, inputs)["gflops_fwd"] / batch_size


@register_task
class BenchmarkTask(Task):
    name = "benchmark"
    Options = BenchmarkOptions
    intermediate_direction = "maximize"
    metrics = ("train_samples_per_s", "infer_samples_per_s", "train_tokens_per_s",
               "infer_tokens_per_s", "train_mfu", "infer_mfu", "train_model_tflops",
               "infer_model_tflops", "peak_fp32_tflops", "peak_fp32_tmacs", "peak_bf16_tflops",
               "peak_bf16_tmacs", "mfu_peak_tflops", "peak_mem_mb", "train_peak_mem_mb",
               "infer_peak_mem_mb", "train_step_ms_median", "train_step_ms_min",
               "peak_fp32_blas_tflops", "peak_fp32_onednn_tflops",
               "train_step_ms_max", "infer_step_ms_median", "infer_step_ms_min",
               "infer_step_ms_max", "gflops_fwd_timed", "bench_time_s", "threads",
               "train_mfu_paired", "infer_mfu_paired", "train_paired_peak_tflops",
               "infer_paired_peak_tflops",
               "other_cpu_cores", "train_speedup_vs_reference", "infer_speedup_vs_reference",
               "train_rounds_won_vs_reference", "infer_rounds_won_vs_reference",
               "train_ab_step_ms_median", "infer_ab_step_ms_median",
               "train_reference_step_ms_median", "infer_reference_step_ms_median",
               "train_reference_settle_rounds", "infer_reference_settle_rounds",
               "train_reference_unsettled", "infer_reference_unsettled",
               "train_gemm_floor_ms", "infer_gemm_floor_ms", "train_gemm_share",
               "infer_gemm_share", "train_gemm_calls", "infer_gemm_calls",
               "train_mfu_at_floor", "infer_mfu_at_floor", "train_gemm_step_ms",
               "infer_gemm_step_ms")
    metric_patterns = ("reference_*",)  # the reference model's family figures

    def related_models(self, options: BenchmarkOptions) -> dict[str, dict]:
        return {"reference": options.reference} if options.reference else {}

    def model_overrides(self, options, data_info, config_fields) -> dict:
        if options.inputs == "data":  # the data's channels / classes / size, as in training
            return super().model_overrides(options, data_info, config_fields)
        return {}  # the variant keeps its own default input (the data is not used)

    def speed_batch_size(self, options) -> int:
        return options.batch_size

    def check_device(self, options: BenchmarkOptions, device: str) -> None:
        from ..metrics.speed import check_attention, check_compile_supported
        check_attention(options.attention, device, options.bf16)
        if options.compile:
            check_compile_supported("compile=true", "set task.compile false", device)

    def run(self, ctx: TrialContext) -> dict:
        import time

        from ..metrics import cpu_attention, cpu_gelu
        from ..metrics.gemm_floor import add_mfu_at_floor
        from ..metrics.peak import (OtherLoad, cached_peak, gemm_probe, mfu_metrics,
                                    paired_mfu_metrics, peak_for)
        from ..metrics.speed import SpeedOptions, measure_speed, set_threads

        o: BenchmarkOptions = ctx.options
        t0 = time.perf_counter()
        # threads are set only when asked (speed.set_threads says why), and then restored:
        # otherwise later trials of a study would be timed unlike the first
        threads_before = set_threads(o.threads) if o.threads else torch.get_num_threads()
        try:
            device = ctx.device
            inputs = bench_inputs(ctx, o)
            gmacs = gmacs_per_sample(ctx.model, inputs, o.batch_size)
            extra = getattr(ctx.model, "extra_metrics", dict)
            extra()  # reset family counters (NaViT padding) touched by the counting forward
            measured = o.measure_peak and not o.peak_tflops
            # the peak is measured before the timing (once per process), for the probes timed
            # next to each step (paired MFU), and again after it: the best peak seen in the
            # process is the denominator of train_mfu, so a peak taken while something else
            # held the cores cannot inflate MFU
            probe = gemm_probe(cached_peak(device, o.peak_sizes), device, o.bf16) if measured else None
            with OtherLoad() as other:  # what other processes took from the cores meanwhile
                speed = measure_speed(ctx.model, SpeedOptions(
                    batch_size=o.batch_size, warmup=o.warmup, steps=o.steps, bf16=o.bf16,
                    compile=o.compile, channels_last=o.channels_last, attention=o.attention, train=o.train,
                    infer=o.infer, seed=ctx.seed, floor=o.floor), device, inputs, probe=probe)
                family = {k: float(v) for k, v in extra().items()}  # e.g. padding_fraction
                ab, ab_tags = reference_ab(ctx, o, inputs) if o.reference else ({}, {})
            peak = cached_peak(device, o.peak_sizes, refresh=True) if measured else {}
            threads = torch.get_num_threads()
        finally:
            set_threads(threads_before)
        out = {k: float(v) for k, v in speed.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("batch_size", "timed_steps", "warmup_steps")}
        out["gflops_fwd_timed"] = gmacs
        out.update(family)
        out.update(ab)
        out["threads"] = float(threads)
        if math.isfinite(other.cores):
            out["other_cpu_cores"] = other.cores  # > 0.2 or so on a small machine: noisy timing
        out.update({k: float(v) for k, v in peak.items() if k.endswith(("_tflops", "_tmacs"))})
        tags = {"bench.inputs": o.inputs, "bench.bf16": str(o.bf16).lower(), "bench.compile": str(o.compile).lower(),
                "bench.channels_last": str(o.channels_last).lower(), "bench.attention": o.attention,
                "bench.threads": str(threads), "bench.batch_size": str(o.batch_size),
                "bench.peak_mem_source": str(speed.get("peak_mem_source", "")),
                "bench.malloc": str(speed.get("malloc", "")),
                "bench.cpu_gelu": cpu_gelu.path() if torch.device(device).type == "cpu" else "n/a",
                "bench.cpu_attention": ("n/a" if torch.device(device).type != "cpu" else
                                        cpu_attention.path() if o.attention == "auto" else "sdpa"),
                "bench.flops": "fwd MACs of the timed batch per sample (fvcore, attention incl.)",
                **ab_tags}
        if peak or o.peak_tflops:
            peak_flops, which = peak_for(peak, device, o.bf16, o.peak_tflops)
            out.update(mfu_metrics(speed, gmacs, peak_flops))
            out["mfu_peak_tflops"] = peak_flops / 1e12
            out.update(paired_mfu_metrics(speed, gmacs, o.batch_size))
            tags["bench.mfu_peak"] = which if which == "override" else f"measured {which} GEMM"
            tags["bench.mfu_rule"] = "train = 3 x fwd MACs x 2 x samples/s / peak flop/s"
            if probe is not None:
                tags["bench.mfu_paired_rule"] = ("per timed step, against the GEMM rate probed "
                                                 "just before and after it (the faster); median")
            if peak:
                tags["bench.peak_method"] = peak.get("peak_method", "")
            add_mfu_at_floor(out)  # the MFU the step would have as its GEMMs alone
        if o.floor:
            tags["bench.gemm_floor"] = ("every matrix multiply of one step re-run alone, summed "
                                        "(harness.metrics.gemm_floor); *_mfu_at_floor = model "
                                        "FLOPs / floor / peak")
            skipped = [x for m in ("train", "infer") for x in speed.get(f"{m}_gemm_in_step_only", [])]
            if skipped:
                tags["bench.gemm_in_step_only"] = "; ".join(skipped)[:4000]
        out["bench_time_s"] = time.perf_counter() - t0
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise TrialFailed(f"benchmark produced non-finite {bad}")
        ctx.set_tags(tags)
        ctx.log_metrics(out, 0)
        return out
