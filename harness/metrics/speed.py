"""Throughput and peak memory of a variant: train steps and inference, measured apart.

Warm-up steps first, then N timed steps, each closed by a device synchronisation;
we report the median step time with min and max, samples/s and tokens/s from the
median, and peak memory.  On CUDA, peak memory is ``max_memory_allocated``; on CPU it
is the peak growth of the bytes malloc has handed out (glibc ``mallinfo2``), or where that
is missing of the resident set, sampled every millisecond over one extra step after the
timed ones (sampling the timed steps would slow them);
``peak_mem_source`` says which.  CPU timings run with the malloc settings of
``harness.metrics.cpu_malloc`` (applied by ``measure_speed``; ``HARNESS_MALLOC=system``
keeps glibc's defaults) and record the mode as ``malloc``.

``attention`` picks the kernel behind every ``F.scaled_dot_product_attention`` call while
timing (``ATTENTION_BACKENDS``): ``auto`` lets torch choose (the fused flash kernel
wherever it serves the call; short fp32 CPU sequences go through matmuls where
``harness.metrics.cpu_attention`` says so), the others force one backend for every call,
``math`` being the unfused reference.  ``check_attention`` refuses a backend the device does not have before any work.
"""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ConfigError
from . import cpu_attention, cpu_malloc, cpu_mkl
from .kernel_choice import cpu_compile_available, resolve_kernel_paths

# harness name -> torch.nn.attention.SDPBackend member
ATTENTION_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                      "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
CPU_ATTENTION = ("auto", "flash", "math")  # torch's CPU SDPA has a flash kernel and the math path


@dataclass
class SpeedOptions:
    batch_size: int = 8
    warmup: int = 3          # untimed steps (allocator, caches, autotuning, compile)
    steps: int = 10          # timed steps
    bf16: bool = False       # torch.autocast(dtype=bfloat16)
    compile: bool = False    # torch.compile the model first
    channels_last: bool = False  # model and 4-D/5-D inputs in channels-last memory format
    train: bool = True       # time forward + backward + AdamW step
    infer: bool = True       # time forward under inference_mode
    seed: int = 0
    profile_ops: int = 0     # then this many more train steps under torch.profiler (0: none)
    attention: str = "auto"  # SDPA backend while timing: auto | flash | efficient | cudnn | math
    floor: bool = False      # then each step's GEMM floor (harness.metrics.gemm_floor)


def set_threads(n: int) -> int:
    """``torch.set_num_threads(n)`` unless ``n`` threads are already in force; returns the
    count before.  Calling it at all, even with the count in force, makes the CPU
    flash-attention kernel's small calls about twice as slow for the rest of the process
    (measured on the 2-core Zen 3 of docs/speed.md: 1.1 -> 2.4 ms for 64 x 6 heads x 16
    tokens), so a process that wants the default count leaves it alone."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    return before


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones
    (CPU micro-benchmarks; device work is not synchronised)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples ``read()`` (default: resident memory) in a thread; ``peak - baseline`` in bytes."""

    def __init__(self, interval: float = 0.001, read=_rss_bytes):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.read = read

    def __enter__(self):
        self.base = self.peak = self.read()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.read())

    @property
    def delta(self) -> int:
        return self.peak - self.base


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that gets ``peak_mem_mb`` and ``peak_mem_source`` on exit."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_mem_source"] = "cuda_max_allocated"
    else:
        malloc = cpu_malloc.in_use_bytes() is not None
        with _PeakRSS(read=cpu_malloc.in_use_bytes if malloc else _rss_bytes) as p:
            yield out
        out["peak_mem_mb"] = p.delta / 2**20
        out["peak_mem_source"] = "cpu_malloc_in_use" if malloc else "cpu_rss_growth"


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Run ``step()`` warmup + steps times; seconds of each timed step."""
    return alternate({"step": step}, device, warmup, rounds=1, per_round=steps)["step"]


# a step that faults in more new pages than this (1 MiB of 4 KiB pages) is still growing
# the heap: ``alternate(settle=...)`` keeps warming up until no arm's step does
SETTLED_FAULTS = 256


def minor_faults() -> int:
    """This process's minor page faults so far (all threads); 0 where there is no
    ``resource`` module (not Unix), so that settling ends after one round there."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternate(steps: dict, device: torch.device, warmup: int, rounds: int, per_round: int = 1,
              rewarm: bool = False, abba: bool = False, settle: int = 0,
              faults: dict | None = None) -> dict[str, list[float]]:
    """Seconds per step of each arm (name -> step function), timed in ``rounds`` that take
    the arms in turn, ``per_round`` timed steps each, so a slow minute on a shared machine
    hits every arm alike.  ``rewarm``: one untimed step opens each turn (the caches the
    previous arm left are not this arm's).  ``abba``: every other round in reverse order.

    ``settle``: after the ``warmup`` steps, up to that many untimed rounds more, until one
    in which no arm's step faulted in more than ``SETTLED_FAULTS`` new pages.  Arms that
    share a process share its heap, and it goes on growing for some steps after the first
    (glibc places each step's blocks a little differently); a step that grows it pays a
    page fault per 4 KiB, and the arm whose step peaks higher pays more of them
    (docs/speed.md, "Heap settling before the timed rounds").  ``faults``, a dict, receives
    each timed step's page faults per arm (``per_step``), the settling rounds run
    (``settle_rounds``) and whether the last of them was quiet (``settled``; True where
    ``settle`` is 0)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    names = list(steps)

    def order(r: int) -> list[str]:
        return names[::-1] if abba and r % 2 else names

    settled, used = settle == 0, 0
    while used < settle and not settled:
        worst = 0
        for name in order(used):
            before = minor_faults()
            steps[name]()
            sync(device)
            worst = max(worst, minor_faults() - before)
        used += 1
        settled = worst <= SETTLED_FAULTS
    times: dict[str, list[float]] = {name: [] for name in steps}
    per_step: dict[str, list[int]] = {name: [] for name in steps}
    count = minor_faults if faults is not None else (lambda: 0)  # a syscall only where asked
    for r in range(rounds):
        for name in order(r):
            step = steps[name]
            if rewarm:
                step()
                sync(device)
            for _ in range(per_round):
                before = count()
                t0 = time.perf_counter()
                step()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                per_step[name].append(count() - before)
    if faults is not None:
        faults.update(per_step=per_step, settle_rounds=used, settled=settled)
    return times


def settled_fields(faults: dict, prefix: str) -> dict:
    """From ``alternate(..., faults=)``: ``<prefix>_settle_rounds``, the settling rounds run
    (kept per process when merged), and ``<prefix>_unsettled``, 1 where the rounds ran out
    (summed over processes)."""
    return {f"{prefix}_settle_rounds": faults["settle_rounds"],
            f"{prefix}_unsettled": int(not faults["settled"])}


def settling_fields(faults: dict, mode: str) -> dict:
    """A record's fields for one mode's ``alternate(..., faults=)``: ``settled_fields`` and
    each arm's page faults per timed step, ``<arm>_<mode>_faults_median`` and ``_max``."""
    out = settled_fields(faults, mode)
    for arm, each in faults["per_step"].items():
        out[f"{arm}_{mode}_faults_median"] = statistics.median(each)
        out[f"{arm}_{mode}_faults_max"] = max(each)
    return out


def settle_method(settle: int) -> str:
    """The method line's clause for ``settle`` rounds ('' for none)."""
    return (f", then up to {settle} untimed rounds more until no step faulted in more than "
            f"{SETTLED_FAULTS * 4 // 1024} MiB of new pages (the shared heap settled)"
            if settle else "")


def settling_table(rows: list[tuple[str, dict]], arms: tuple[str, ...], n: int,
                   first: str = "model") -> list[str]:
    """Markdown lines: per (label, record) and mode, the settling rounds, the processes left
    unsettled and each arm's page faults per timed step, median (most); nothing where no
    record has them (one from before ``settle``)."""
    have = [(label, row) for label, row in rows if "train_settle_rounds" in row]
    if not have:
        return []
    where = f" (per process: median, and how many of the {n} ran out of rounds unsettled)" \
        if n > 1 else ""
    lines = ["", f"Heap settling{where}, and the minor page faults per timed step, median "
             "(most): a step that grows the heap pays one per 4 KiB page.", "",
             f"| {first} | mode | settling rounds | unsettled | "
             + " | ".join(f"faults {a}" for a in arms) + " |",
             "|---|---|---:|---:|" + "---:|" * len(arms)]
    for label, row in have:
        for mode in ("train", "infer"):
            lines.append(
                f"| {label} | {mode} | {row[f'{mode}_settle_rounds']:g} | "
                f"{row[f'{mode}_unsettled']} | " + " | ".join(
                    f"{row[f'{a}_{mode}_faults_median']:g} ({row[f'{a}_{mode}_faults_max']})"
                    for a in arms) + " |")
    return lines


def paired_ratios(base: list[float], times: list[float], per_round: int = 1) -> list[float]:
    """Per round, the base arm's median step time over this arm's: a speed ratio taken
    within one round, so the machine's drift between rounds cancels."""
    return [statistics.median(base[i:i + per_round]) / statistics.median(times[i:i + per_round])
            for i in range(0, len(times), per_round)]


def time_steps_probed(step, device: torch.device, warmup: int, steps: int,
                      probe) -> tuple[list[float], list[float]]:
    """``time_steps`` with ``probe()`` (the machine's GEMM rate now, ``peak.gemm_probe``)
    called, untimed, before the first timed step and after each one; per step, the faster
    of the probes on either side of it."""
    for _ in range(warmup):
        step()
    sync(device)
    rates, times = [probe()], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        rates.append(probe())
    return times, [max(a, b) for a, b in zip(rates, rates[1:])]


def time_and_memory(step, device: torch.device, warmup: int, steps: int,
                    probe=None) -> tuple[list[float], dict, list[float]]:
    """Timed steps, the peak memory of a step, and (with ``probe``) the GEMM rate probed
    next to each timed step (else []).  On CPU the memory sampler (a thread
    reading malloc's counters every millisecond) would slow the steps it watches (~7% on 2
    cores, measured), so it watches one extra, untimed step after the timed ones; CUDA's
    counter costs nothing and watches the timed steps.  Tiny steps are repeated for 20 ms
    under the sampler, which reads every millisecond."""
    def timed() -> tuple[list[float], list[float]]:
        if probe is None:
            return time_steps(step, device, warmup, steps), []
        return time_steps_probed(step, device, warmup, steps, probe)

    if device.type == "cuda":
        with peak_memory(device) as mem:
            times, rates = timed()
        return times, mem, rates
    times, rates = timed()
    with peak_memory(device) as mem:  # >= 20 ms of steps, so the 1 ms sampler sees the peak
        t0 = time.perf_counter()
        for _ in range(100):
            step()
            if time.perf_counter() - t0 > 0.02:
                break
    return times, mem, rates


# what torch's Kineto writes to fd 2 at every profiler start and stop, whatever its log level
# ("STAGE:... Completed Stage: Warm Up", "USDT:... profiler_start" / "profiler_stop")
_KINETO_LINE = re.compile(r"^(STAGE|USDT):\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \S+\.cpp:\d+\] ")


@contextlib.contextmanager
def _kineto_lines_dropped():
    """fd 2 (C++ code writes there, not to ``sys.stderr``) captured for the block, then
    written back without Kineto's start/stop lines: anything else still reaches stderr."""
    import sys
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not _KINETO_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def profiled(device: torch.device, **kw):
    """``torch.profiler.profile`` over the CPU (and CUDA on a GPU) for the block, without
    the two lines its Kineto backend prints to stderr at every start and stop (the block's
    own output is not touched: only starting and stopping are captured)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts, **kw)
    with _kineto_lines_dropped():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _kineto_lines_dropped():
            prof.__exit__(None, None, None)


def op_profile(step, device: torch.device, steps: int, top: int = 15) -> list[dict]:
    """Where a step's time goes: self time per op (torch.profiler) over ``steps`` more steps,
    the ``top`` largest, each with its share of the summed self time (about the step's wall
    time: an op's OpenMP workers run while it waits).  Untimed: the profiler slows steps."""
    with profiled(device) as prof:
        for _ in range(steps):
            step()
        sync(device)

    def self_us(e) -> float:
        if device.type == "cuda":
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    return [{"op": e.key, "ms_per_step": self_us(e) / 1e3 / steps, "share": self_us(e) / total,
             "calls_per_step": e.count / steps}
            for e in sorted(events, key=self_us, reverse=True)[:top]]


def floor_metrics(prefix: str, step, device: torch.device) -> dict:
    """``<prefix>_gemm_floor_ms`` (the step's matrix multiplies, each re-run alone, summed:
    ``harness.metrics.gemm_floor``, in rounds with steps timed between them),
    ``<prefix>_gemm_share`` (the rounds' median floor / step), the step's median in those
    rounds, and the calls."""
    from .gemm_floor import as_metrics, floor
    return as_metrics(prefix, floor(step, device))


def summarise(prefix: str, times: list[float], batch_size: int, tokens_per_sample: int) -> dict:
    med = statistics.median(times)
    return {
        f"{prefix}_step_ms_median": med * 1e3,
        f"{prefix}_step_ms_min": min(times) * 1e3,
        f"{prefix}_step_ms_max": max(times) * 1e3,
        f"{prefix}_samples_per_s": batch_size / med,
        f"{prefix}_tokens_per_s": batch_size * tokens_per_sample / med,
    }


def adamw(params, device: torch.device, **kw) -> torch.optim.Optimizer:
    """AdamW (lr 1e-4, no weight decay), fused into one kernel per step where torch has it
    (CUDA; CPU from torch 2.4): the per-parameter for-loop costs a few % of a step."""
    params = list(params)
    kw = {"lr": 1e-4, "weight_decay": 0.0, **kw}
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # older torch: no fused CPU AdamW
            pass
    return torch.optim.AdamW(params, **kw)


def to_channels_last(x):
    """4-D tensors to channels_last, 5-D to channels_last_3d; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if isinstance(x, torch.Tensor) and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def check_attention_name(name: str) -> None:
    """ConfigError unless ``name`` is one of ``ATTENTION_BACKENDS`` (any device)."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention {name!r}: valid: {', '.join(ATTENTION_BACKENDS)}")


def check_compile_supported(setting: str, unset: str, device: str | None = None) -> None:
    """ConfigError unless torch.compile runs on this Python/torch, and on ``device`` (where
    given): on a CPU inductor builds C++ kernels, so a C++ compiler must be there
    (``setting``: the option as given, e.g. ``compile=true``; ``unset``: what to do instead,
    e.g. ``set task.compile false``)."""
    from torch._dynamo import is_dynamo_supported
    if not is_dynamo_supported():
        raise ConfigError(f"{setting}: torch.compile is not supported on this Python/torch; "
                          f"{unset}")
    if device is not None and torch.device(device).type == "cpu" and not cpu_compile_available():
        raise ConfigError(f"{setting} on cpu: torch.compile cannot build CPU kernels here (no C++ "
                          f"compiler: $CXX, g++, c++ or clang++ on the PATH); install one, or "
                          f"{unset}")


# compiled graphs a timed function may hold: a study's trials share one process, and dynamo
# keys its cache on the code object, so every arm, grad mode and shape adds to one count
RECOMPILE_LIMIT = 64

# the backend of every timed compile; the tests that only count dynamo's graphs and breaks
# (the backend's input, alike under any backend) set "aot_eager" to skip inductor's codegen
COMPILE_BACKEND = "inductor"


def compiled(fn, dynamic: bool | None = None):
    """``torch.compile(fn)`` for a timed path, which runs compiled or fails, never falls back
    to eager unseen: ``fullgraph`` makes a graph break an error, and past dynamo's limit of
    cached graphs per code object (raised to ``RECOMPILE_LIMIT`` for this process: 8 was
    spent after five trials of the packing study) a call fails instead of running eager.
    ``dynamic=False``: a graph per input shape, so a timed fixed batch gets its own static
    graph whichever shapes ran before it in the process (by default a second shape makes
    dynamo recompile with symbolic sizes, for inputs that vary from call to call)."""
    resolve_kernel_paths()  # a traced call cannot resolve one (it reads files: a graph break)
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=COMPILE_BACKEND)


class DispatchCount(TorchDispatchMode):
    """Counts the ops torch dispatches inside ``with DispatchCount() as ops:`` by name
    (``ops.names``); ``ops.kernels`` leaves out the views and aliases, which run no kernel
    (``detach`` among them, an alias: a NaViT training step's backward dispatches it 179
    times).  On a GPU each of the others is a launch."""
    VIEWS = frozenset({"view", "_unsafe_view", "unsqueeze", "expand", "unbind", "t", "unfold",
                       "slice", "select", "permute", "alias", "as_strided", "reshape",
                       "squeeze", "transpose", "detach"})

    def __init__(self):
        super().__init__()
        self.names: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for k, n in self.names.items() if k not in self.VIEWS)


def check_attention(name: str, device: str | torch.device, bf16: bool) -> None:
    """ConfigError unless the SDPA backend ``name`` exists for this device, dtype and torch."""
    check_attention_name(name)
    kind = torch.device(device).type
    if kind == "cpu" and name not in CPU_ATTENTION:
        raise ConfigError(f"attention {name!r} is a CUDA kernel; on cpu valid: {', '.join(CPU_ATTENTION)}")
    if kind == "cuda" and name in ("flash", "cudnn") and not bf16:
        raise ConfigError(f"attention {name!r} on cuda runs only 16-bit inputs; set bf16 true, or "
                          f"use attention auto, efficient or math")
    member = ATTENTION_BACKENDS[name]
    if member is not None:
        try:
            from torch.nn.attention import SDPBackend
        except ImportError:
            raise ConfigError(f"attention {name!r} needs torch.nn.attention (torch >= 2.3); "
                              f"this torch is {torch.__version__}: use attention auto") from None
        if not hasattr(SDPBackend, member):
            raise ConfigError(f"attention {name!r}: torch {torch.__version__} has no SDPBackend."
                              f"{member}; use attention auto")


def attention_backend(name: str):
    """A context in which SDPA uses only the backend ``name`` (``auto``: torch's choice, and
    short CPU sequences on ``harness.metrics.cpu_attention``'s path).  A forced backend also
    takes the short sequences through SDPA."""
    member = ATTENTION_BACKENDS[name]
    if member is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    stack = contextlib.ExitStack()
    stack.enter_context(cpu_attention.using_path("sdpa"))  # every call through SDPA
    stack.enter_context(sdpa_kernel(getattr(SDPBackend, member)))
    return stack


def make_train_step(model: nn.Module, run, inputs: tuple, optim, device: torch.device, bf16: bool,
                    attention: str = "auto"):
    """One train step: forward through ``run`` (the model, or its compiled form), the
    model's ``bench_loss``, backward, optimiser step; SDPA on the backend ``attention``."""
    def train_step():
        optim.zero_grad(set_to_none=True)
        with attention_backend(attention):
            with autocast(device, bf16):
                loss = model.bench_loss(run(*inputs))
            loss.backward()
        optim.step()
    return train_step


def make_infer_step(run, inputs: tuple, device: torch.device, bf16: bool, attention: str = "auto"):
    """One inference step: the forward of ``run`` under ``inference_mode``."""
    def infer_step():
        with torch.inference_mode(), attention_backend(attention), autocast(device, bf16):
            run(*inputs)
    return infer_step


def channels_last_model(model: nn.Module, inputs: tuple) -> tuple:
    """The model's conv weights (4-D / 5-D) to channels-last, in place; the inputs converted
    alike are returned (everything else is unchanged)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = to_channels_last(t.data)
    return tuple(to_channels_last(x) for x in inputs)


def measure_speed(model: nn.Module, opts: SpeedOptions | None = None,
                  device: str | torch.device = "cpu", inputs: tuple | None = None,
                  probe=None) -> dict:
    """Flat dict of train_* and infer_* timings plus peak memory, for one variant.

    ``inputs``: the forward's positional args for a batch of ``opts.batch_size`` (default:
    ``model.example_inputs``, seeded by ``opts.seed``).  ``probe``: a callable giving the
    machine's GEMM rate now (``peak.gemm_probe``), timed next to every step; then the dict
    also holds ``{train,infer}_step_s`` and ``{train,infer}_probe_flops`` (lists, one per
    timed step) for ``peak.paired_mfu``."""
    opts = opts or SpeedOptions()
    device = torch.device(device)
    check_attention(opts.attention, device, opts.bf16)
    if device.type == "cpu":
        cpu_malloc.tune()
    model = model.to(device)
    if inputs is None:
        gen = torch.Generator().manual_seed(opts.seed)
        inputs = model.example_inputs(opts.batch_size, device=device, generator=gen)
    if opts.channels_last:
        inputs = channels_last_model(model, inputs)
    run = compiled(model, dynamic=False) if opts.compile else model  # the batch is fixed
    out: dict = {"batch_size": opts.batch_size, "bf16": opts.bf16, "compile": opts.compile,
                 "channels_last": opts.channels_last, "attention": opts.attention,
                 "malloc": cpu_malloc.mode() if device.type == "cpu" else "",
                 "cpu_mkl": cpu_mkl.mode() if device.type == "cpu" else "",
                 "device": str(device), "timed_steps": opts.steps, "warmup_steps": opts.warmup}
    peaks = []
    if opts.train:
        model.train()
        optim = adamw(model.parameters(), device)
        train_step = make_train_step(model, run, inputs, optim, device, opts.bf16, opts.attention)
        times, mem, rates = time_and_memory(train_step, device, opts.warmup, opts.steps, probe)
        out.update(summarise("train", times, opts.batch_size, model.tokens_per_sample()))
        if rates:
            out.update(train_step_s=times, train_probe_flops=rates)
        out["train_peak_mem_mb"] = mem["peak_mem_mb"]
        peaks.append(mem)
        if opts.profile_ops:
            out["train_ops"] = op_profile(train_step, device, opts.profile_ops)
        if opts.floor:
            out.update(floor_metrics("train", train_step, device))
        del optim
    if opts.infer:
        model.eval()

        infer_step = make_infer_step(run, inputs, device, opts.bf16, opts.attention)
        times, mem, rates = time_and_memory(infer_step, device, opts.warmup, opts.steps, probe)
        out.update(summarise("infer", times, opts.batch_size, model.tokens_per_sample()))
        if rates:
            out.update(infer_step_s=times, infer_probe_flops=rates)
        out["infer_peak_mem_mb"] = mem["peak_mem_mb"]
        peaks.append(mem)
        if opts.floor:
            out.update(floor_metrics("infer", infer_step, device))
    out["peak_mem_mb"] = max(p["peak_mem_mb"] for p in peaks) if peaks else 0.0
    out["peak_mem_source"] = peaks[0]["peak_mem_source"] if peaks else ""
    return out
