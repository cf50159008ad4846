"""MKL's kernels on AMD CPUs with AVX-512: its own vendor dispatch, or its AVX-512 code.

torch's x86 builds link Intel MKL into ``libtorch_cpu.so``; ``torch.mm``, ``F.linear`` (on
the ``aten`` path), batched matmuls and the CPU flash-attention kernel's inner GEMMs call it.
MKL chooses its code path by CPU *vendor* before it looks at the instruction set: on an
AMD CPU it takes a generic dispatch (``mkl_serv_cpu_detect() == 0``, conditional-numerical-
reproducibility branch ``COMPATIBLE``) whose single-precision GEMM is AVX2 code, even on Zen 4
and Zen 5, which have AVX-512.  MKL asks one function whether the CPU is Intel's,
``mkl_serv_intel_cpu_true``, and ``libtorch_cpu.so`` exports it, so a library that defines
it to return 1 and is in the process's global symbol scope before torch loads makes MKL take
the code it runs on an Intel CPU with the same instructions (``mkl_serv_cpu_detect() == 7``,
branch ``AVX512_E1``).  This is the usual stand-in for ``MKL_DEBUG_CPU_TYPE=5``, which MKL
2020.1 stopped honouring.  The instruction set is still checked: the kernels are AVX-512
ones because the CPU has AVX-512F.

Measured on 2-core AMD EPYCs, torch 2.13.0+cpu, MKL's own dispatch -> its AVX-512 code
(``python -m harness.metrics.cpu_matmul``, DiT-S / ViT-S Linear shapes, ``torch.mm`` GFLOP/s):
Zen 4 (family 25) forward 95-168 -> 178-200, weight gradient 130-167 -> 156-195, oneDNN
162-205 either way; Zen 5 (family 26) forward 96-185 -> 233-445, weight gradient 104-188 ->
222-420, oneDNN forward 194-418 either way.  Whole train steps gained 1.04-1.24×
(docs/speed.md).

Modes (``HARNESS_CPU_MKL``):
    auto    (the default) ``avx512`` where it can act: a non-Intel x86-64 Linux CPU with
            AVX-512F, a C compiler, a writable cache, and harness imported before torch;
            anywhere else MKL's own dispatch, silently (``why_not()`` says why)
    vendor  MKL's own dispatch
    avx512  MKL's Intel code path, on an x86-64 Linux CPU with AVX-512F, or a clear error
            saying why not; on an Intel CPU that is MKL's own choice already, so there it
            changes nothing (mode ``vendor``)

It works by loading a one-function library built from ``SHIM_SOURCE`` with the system C
compiler (``$CC``, else ``cc``) into a cache folder (``$HARNESS_CACHE_DIR``, else
``$XDG_CACHE_HOME/sora-harness``, else ``~/.cache/sora-harness``) and loading it with
``RTLD_GLOBAL``.  That has to happen before ``import torch``: ``harness/__init__.py`` calls
``preload()``, so every ``harness`` command and ``python -m harness...`` gets it; a program
that imports torch before harness cannot, and with ``avx512`` asked for explicitly the CLI
then stops with that reason (``check()``) rather than run on the vendor path unawares.
``mode()`` reports what MKL actually chose (it asks MKL's dispatcher), and every trial
records it as the tag ``cpu_mkl``.  The results are those of MKL's AVX-512 kernels: equal to
the vendor path's to float rounding (tests/test_cpu_mkl.py), not bit for bit.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError
from . import cpu_matmul  # stdlib only at import: safe before torch

ENV = "HARNESS_CPU_MKL"
CHOICES = ("auto", "vendor", "avx512")
DEFAULT = "auto"
SHIM_SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
# MKL's own codes, as its dispatcher returns them (mkl_serv_cpu_detect)
AVX512_CODE = 7

_state: dict = {"ran": False, "loaded": None, "why": None}


def requested() -> str:
    """``$HARNESS_CPU_MKL``, lower-cased, ``DEFAULT`` when unset or empty; not validated."""
    return os.environ.get(ENV, "").strip().lower() or DEFAULT


def cache_dir() -> Path:
    if os.environ.get("HARNESS_CACHE_DIR"):
        return Path(os.environ["HARNESS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sora-harness"


def _not_here() -> str | None:
    """Why ``avx512`` cannot work on this machine at all (None: it can)."""
    if not sys.platform.startswith("linux") or not cpu_matmul.x86():
        return f"it needs x86-64 Linux (this is {sys.platform} on {platform.machine()})"
    if "avx512f" not in cpu_matmul.cpu_flags():
        return "this CPU has no AVX-512F (/proc/cpuinfo flags), so MKL has no AVX-512 code to run"
    return None


def build(directory: Path | None = None) -> Path:
    """The shim library, compiled once per source into ``directory`` (default ``cache_dir()``);
    ConfigError naming the compiler when it cannot be built."""
    directory = Path(directory) if directory else cache_dir()
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:12]
    out = directory / f"mkl_intel_cpu_true-{digest}.so"
    if out.is_file():
        return out
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc.split()[0]) is None:
        raise ConfigError(f"it builds a one-line C library, but there is no C compiler "
                          f"({cc!r} not on PATH; set CC, or install gcc)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src, lib = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
            src.write_text(SHIM_SOURCE)
            r = subprocess.run([*cc.split(), "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)],
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise ConfigError(f"{cc} could not build the MKL shim: "
                                  f"{(r.stderr or r.stdout).strip()[:400]}")
            os.replace(lib, out)  # atomic: parallel workers see a whole file or none
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{cc} took over 120 s to build the MKL shim") from None
    except OSError as e:
        raise ConfigError(f"cannot write the MKL shim to {directory}: {e}; "
                          f"set HARNESS_CACHE_DIR to a writable folder") from e
    return out


def preload() -> None:
    """Load the shim when ``$HARNESS_CPU_MKL`` is ``auto`` or ``avx512`` and torch is not yet
    imported; never raises (``harness`` is imported by tests and tools): why it did not load
    is kept, for ``check()`` to raise under ``avx512`` and for ``why_not()``."""
    if _state["ran"]:
        return
    _state["ran"] = True
    if requested() not in ("auto", "avx512"):
        return
    why = _not_here()
    if why is None and cpu_matmul.intel():
        return  # MKL's own dispatch already runs its Intel code here
    if why is None and "torch" in sys.modules:
        why = ("torch was imported before harness, too late to change MKL's dispatch; "
               "import harness first, or run a harness command")
    if why is None:
        try:
            ctypes.CDLL(str(build()), mode=ctypes.RTLD_GLOBAL)
            _state["loaded"] = True
        except (ConfigError, OSError) as e:
            why = str(e)
    _state["why"] = why


@functools.lru_cache(maxsize=1)  # MKL's choice is fixed once torch has loaded it
def _mkl_detect() -> int | None:
    """MKL's dispatcher's code for this CPU (on an AMD Zen 4: 0, generic, without the shim;
    7, AVX-512, with it), or None where this torch has no MKL or does not export it."""
    import torch
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        fn = ctypes.CDLL(str(lib)).mkl_serv_cpu_detect
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return int(fn())


def mode() -> str:
    """``avx512`` when MKL runs its Intel AVX-512 code on a non-Intel CPU because of the
    shim, else ``vendor`` (also on Intel CPUs, where that is MKL's own choice)."""
    if not _state["loaded"]:
        return "vendor"
    return "avx512" if (_mkl_detect() or 0) >= AVX512_CODE else "vendor"


def why_not() -> str | None:
    """Why ``auto`` or ``avx512`` left MKL on its own dispatch here (None: it did not, or
    ``vendor`` was asked for, or this is an Intel CPU, where that dispatch is Intel's code)."""
    if _state["loaded"] and mode() != "avx512":
        return (f"the shim loaded but MKL's dispatcher did not take its AVX-512 path "
                f"(mkl_serv_cpu_detect() = {_mkl_detect()}); this torch may not link MKL")
    return _state["why"]


def check() -> str:
    """The mode in force; ConfigError before any work when ``$HARNESS_CPU_MKL`` is not a
    choice, or asks for ``avx512`` and it did not take effect (and why).  ``auto`` never
    fails: where the AVX-512 code cannot be had it is MKL's own dispatch."""
    want = requested()
    if want not in CHOICES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: must be one of {', '.join(CHOICES)}")
    preload()  # a no-op if harness/__init__ already ran it
    why = why_not() if want == "avx512" and not cpu_matmul.intel() else None
    if why:
        raise ConfigError(f"{ENV}=avx512: {why}; use {ENV}=auto or vendor")
    return mode()
