"""How much of a step is matrix multiplication: its GEMM floor.

``floor(step)`` runs ``step`` once under ``torch.profiler`` (shapes, strides, dtypes and
scalar arguments recorded), takes every call in it that carries the model's multiply-adds
(``GEMM_OPS``: matrix multiplies, convolutions, and SDPA's fused attention kernels, whose
matmuls are inside them; the outermost one where they nest), and re-runs each distinct
call alone, on fresh tensors of the same shapes, strides and dtype, with the same scalar
arguments: the median of ``repeats`` runs, times how often the step made it.  The sum is
what those calls take when nothing else runs, on this machine's own libraries: the step
cannot go faster without doing less multiplication.  The rest of a step (``step -
floor``) is everything else: normalisation, activations, an unfused softmax, copies, the
optimiser, Python, and what running between other kernels does to a GEMM's caches.  A
fused attention kernel's softmax is inside the floor; an unfused one (matmuls around a
softmax) is not, so two attention paths differ there by that much.

Two implementations of the same model run the same GEMMs (``harness.bench_peer`` checks
that: equal parameter counts, and ``--floor`` prints both floors), so the ratio of their
step times is bounded by how far each is from its floor: ``theirs_step / ours_floor`` is
the ratio ours would reach if it spent nothing outside its GEMMs.

The floor is measured, not modelled: no FLOP rate is assumed.  Calls the profiler
recorded with arguments that cannot be rebuilt (an unknown op, a string argument it did
not keep) are counted by their time inside the step and listed in ``in_step_only``.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Callable

import torch

from .speed import profiled, sync

# the ops that carry a model's multiply-adds, as the profiler names them: matrix multiplies,
# convolutions, and SDPA's fused attention kernels (their two matmuls are inside them, and
# harness.metrics.flops counts attention's multiply-adds); where one runs inside another (a
# convolution's GEMM, a fused kernel's inner call) only the outermost counts
GEMM_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
    "mkldnn::_linear_pointwise", "aten::convolution", "aten::convolution_backward",
    *(f"aten::_scaled_dot_product_{k}{d}" for k in (
        "flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention")
      for d in ("", "_backward")),
})

# arguments the profiler records without a value: the ones these ops take
_FIXED_ARGS = {"mkldnn::_linear_pointwise": {3: "none", 5: ""}}  # attr, algorithm
_DTYPES = {"float": torch.float32, "double": torch.float64, "c10::Half": torch.float16,
           "c10::BFloat16": torch.bfloat16, "long int": torch.int64, "int": torch.int32}


def _key(e) -> tuple:
    return (e.name, _frozen(e.structured_input_shapes), _frozen(e.structured_input_strides),
            tuple(e.input_dtypes), _frozen(e.concrete_inputs))


def _frozen(v):
    return tuple(_frozen(x) for x in v) if isinstance(v, (list, tuple)) else v


def _outermost(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name in GEMM_OPS:
            return False
        p = p.cpu_parent
    return True


def record(step: Callable[[], object], device: torch.device | str = "cpu") -> tuple[Counter, dict]:
    """(calls, in-step seconds per call): the GEMM calls of one ``step()``, counted by key
    (op, shapes, strides, dtypes, scalar arguments), and each key's summed time inside the
    step as the profiler saw it."""
    device = torch.device(device)
    with profiled(device, record_shapes=True) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    calls, in_step = Counter(), Counter()
    for e in prof.events():
        if e.name in GEMM_OPS and _outermost(e):
            k = _key(e)
            calls[k] += 1
            dev_us = getattr(e, "device_time_total", 0) if device.type == "cuda" else 0
            in_step[k] += (dev_us or e.cpu_time_total) * 1e-6
    return calls, dict(in_step)


def _args(key: tuple, device: torch.device) -> list:
    """The call's arguments rebuilt: tensors of the recorded shape, strides and dtype
    (random normal values), scalars and lists as recorded; ValueError where one cannot be."""
    name, shapes, strides, dtypes, concrete = key
    fixed = _FIXED_ARGS.get(name, {})
    out = []
    for i, dt in enumerate(dtypes):
        if i in fixed:
            out.append(fixed[i])
        elif dt in _DTYPES:
            storage = 1 + sum((n - 1) * s for n, s in zip(shapes[i], strides[i]) if n > 0)
            base = torch.randn(storage, device=device).to(_DTYPES[dt])
            out.append(base.as_strided(shapes[i], strides[i]))
        elif dt in ("Scalar", "ScalarList"):
            v = concrete[i]
            out.append(list(v) if isinstance(v, tuple) else v)
        elif dt == "":
            out.append(None)  # an optional tensor left out (or a string: then the call fails)
        else:
            raise ValueError(f"{name}: argument {i} of type {dt!r} cannot be rebuilt")
    return out


def _call(name: str, args: list) -> Callable[[], object]:
    """A call of op ``name`` on ``args`` as the profiler lists them (every argument in schema
    order, keyword-only ones too): the overload whose schema takes that many, bound."""
    ns, op = name.split("::")
    packet = getattr(getattr(torch.ops, ns), op)
    for overload in packet.overloads():
        fn = getattr(packet, overload)
        schema = fn._schema.arguments
        if len(schema) == len(args):
            pos = [a for a, s in zip(args, schema) if not s.kwarg_only]
            kw = {s.name: a for a, s in zip(args, schema) if s.kwarg_only}
            return lambda: fn(*pos, **kw)
    raise ValueError(f"{name}: no overload takes {len(args)} arguments")


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def replay_seconds(key: tuple, device: torch.device, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of one call of ``key``, alone."""
    fn = _call(key[0], _args(key, device))
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync(device)
        return statistics.median(_seconds(fn, device) for _ in range(repeats))


def floors(steps: dict[str, Callable[[], object]], device: torch.device | str = "cpu",
           rounds: int = 3) -> dict[str, dict]:
    """The GEMM floor of each of ``steps`` (module docstring), by name.

    One step of each is recorded; then ``rounds`` rounds each time one step of every entry
    and re-run every distinct call once: a small VM's speed drifts by tens of % within
    seconds, so a floor timed apart from its step could read more than the step itself
    (it did, on the Zen 4: 1.08x).  Per entry: ``floor_s`` and ``step_s`` (medians over
    the rounds), ``share`` (the median of the rounds' floor / step), ``other_s`` (the
    median of step - floor), ``per_round`` (each round's (step, floor) seconds),
    ``calls`` and ``distinct``, ``in_step_s`` (the recorded calls' time inside the
    profiled step: the profiler's own figure, which it inflates by amounts that vary
    between runs; used only as below), and ``in_step_only`` (calls that could not be
    re-run, counted in every round by their in-step time).  A call several entries make
    is re-run once per round and counts alike for all of them."""
    device = torch.device(device)
    recorded = {name: record(step, device) for name, step in steps.items()}
    fns: dict = {}
    for calls, _ in recorded.values():
        for key in calls:
            if key not in fns:
                try:
                    fns[key] = _call(key[0], _args(key, device))
                    with torch.no_grad():
                        fns[key]()  # warm, and a call that cannot run fails here
                except (ValueError, RuntimeError, TypeError, AttributeError) as e:
                    fns[key] = e
    runnable = {k: f for k, f in fns.items() if not isinstance(f, Exception)}
    per_round = {name: [] for name in steps}
    for _ in range(max(1, rounds)):
        step_s = {name: _seconds(step, device) for name, step in steps.items()}
        with torch.no_grad():
            alone = {key: _seconds(fn, device) for key, fn in runnable.items()}
        for name, (calls, in_step) in recorded.items():
            fl = sum(n * alone[k] if k in alone else in_step[k] for k, n in calls.items())
            per_round[name].append((step_s[name], fl))
    out = {}
    for name, (calls, in_step) in recorded.items():
        pairs = per_round[name]
        skipped = [f"{n} x {k[0]} {list(k[1])}: {type(fns[k]).__name__}: {fns[k]}"[:300]
                   for k, n in calls.items() if isinstance(fns[k], Exception)]
        out[name] = {"floor_s": statistics.median(f for _, f in pairs),
                     "step_s": statistics.median(t for t, _ in pairs),
                     "share": statistics.median(f / t for t, f in pairs),
                     "other_s": statistics.median(t - f for t, f in pairs),
                     "per_round": pairs, "in_step_s": sum(in_step.values()),
                     "calls": sum(calls.values()), "distinct": len(calls),
                     "in_step_only": skipped}
    return out


def mfu_at_floor(rec: dict, mode: str) -> float:
    """Model FLOPs / floor / peak: the MFU a step would have if it were its GEMMs alone,
    from a record with ``<mode>_mfu``, ``<mode>_step_ms_median`` and ``<mode>_gemm_floor_ms``
    (= MFU x step / floor: no step time is left in it, only the floor, the model's FLOPs and
    the peak).  Not MFU / share: the share is paired with the steps of the floor's own
    rounds, the MFU with the timed steps, and that mix read above 1 once."""
    return rec[f"{mode}_mfu"] * rec[f"{mode}_step_ms_median"] / rec[f"{mode}_gemm_floor_ms"]


def add_mfu_at_floor(rec: dict) -> None:
    """``<mode>_mfu_at_floor`` into a record, for each mode it has a floor and an MFU of."""
    for mode in ("train", "infer"):
        if f"{mode}_gemm_floor_ms" in rec and f"{mode}_mfu" in rec:
            rec[f"{mode}_mfu_at_floor"] = mfu_at_floor(rec, mode)


def as_metrics(prefix: str, f: dict) -> dict:
    """A ``floors`` entry as flat ``<prefix>_gemm_*`` figures (ms), with the calls that could
    not be re-run under ``<prefix>_gemm_in_step_only`` where there were any."""
    out = {f"{prefix}_gemm_floor_ms": f["floor_s"] * 1e3, f"{prefix}_gemm_calls": f["calls"],
           f"{prefix}_gemm_share": f["share"], f"{prefix}_gemm_step_ms": f["step_s"] * 1e3}
    if f["in_step_only"]:
        out[f"{prefix}_gemm_in_step_only"] = f["in_step_only"]
    return out


def floor(step: Callable[[], object], device: torch.device | str = "cpu", rounds: int = 3) -> dict:
    """``floors`` of one step."""
    return floors({"step": step}, device, rounds)["step"]
