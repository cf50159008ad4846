"""Which library runs the fp32 CPU matmuls of the models' ``Linear`` layers.

torch has two on CPU: ``F.linear`` / ``torch.mm`` go to its BLAS (MKL), and oneDNN ships
inside the same build.  Which is faster depends on the CPU's vendor, because MKL picks its
code path by vendor:

- **AMD**: MKL takes an AVX2 path, about half of what AVX-512 cores do; oneDNN runs AVX-512.
  Measured on an AMD EPYC (Zen 5), 2 cores: oneDNN 1.5-2.3x faster per DiT-S linear.
- **Intel**: MKL runs AVX-512 and is the faster one.  Measured on an Intel Xeon with
  AVX-512 / AMX, 2 cores, at DiT-S shapes (4096 rows): MKL 0.43-0.45 TFLOP/s forward and
  input gradient, 0.36-0.39 weight gradient; oneDNN 0.39-0.42 and 0.19-0.31.  A DiT-S/2
  training step: 7.3 samples/s with MKL, 6.0 with oneDNN (docs/speed.md).

So the default is ``onednn`` on non-Intel x86 CPUs (where the build has oneDNN) and
``aten`` (torch's own ``F.linear``) elsewhere: a fixed rule, not a per-process timing, so
the same machine always runs the same kernels.  ``HARNESS_CPU_LINEAR=aten|onednn``
overrides it; every benchmark trial records the path in force as a tag.  The engine only
holds the setting; ``variants.common.Linear`` obeys it.  CUDA, autocast and other dtypes
always take ``F.linear``.
"""
from __future__ import annotations

import functools
import platform

from .kernel_choice import KernelChoice

CHOICES = ("aten", "onednn")
ENV = "HARNESS_CPU_LINEAR"


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """``/proc/cpuinfo``'s vendor_id (``GenuineIntel``, ``AuthenticAMD``, ...), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_available() -> bool:
    import torch
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _rule() -> str:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and cpu_vendor() not in ("GenuineIntel", "") and onednn_available():
        return "onednn"
    return "aten"


def _unavailable(name: str) -> str | None:
    if name == "onednn" and not onednn_available():
        return "this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)"
    return None


_choice = KernelChoice(ENV, "CPU linear path", CHOICES, _rule, _unavailable)


def default_path() -> str:
    """The path by the rule in the module docstring, or ``$HARNESS_CPU_LINEAR``."""
    return _choice.resolve()


def path() -> str:
    """The fp32 CPU linear path in force in this process: ``aten`` or ``onednn``."""
    return _choice.get()


def set_path(name: str) -> str:
    """Force a path for this process (benchmarks that compare both); returns the old one."""
    return _choice.set(name)
