"""Ablation harness for the transformer designs behind video generation."""
__version__ = "0.1.0"

# HARNESS_CPU_MKL=avx512 must act before torch loads MKL (harness/metrics/cpu_mkl.py); a
# no-op otherwise, and it never raises here: the CLI reports a failure before any work.
from .metrics import cpu_mkl as _cpu_mkl  # noqa: E402  (stdlib only)

_cpu_mkl.preload()
