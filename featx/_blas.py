"""Which BLAS kernels the probe's scikit-learn heads compute with, and whether they fit the CPU.

The probe's logistic regression, MLP and k-NN spend most of their time in numpy's float32 matrix
products. OpenBLAS (numpy's and SciPy's wheels) picks its kernels when it is loaded, from the CPU or
from ``OPENBLAS_CORETYPE``. A pin to an AVX2 kernel set on a CPU with AVX-512 halves the speed of
the larger of those products (on an AMD EPYC with AVX-512, one thread, ``OPENBLAS_CORETYPE=Haswell`` against
OpenBLAS's own SkylakeX choice: a 1,280 -> 512 MLP layer over 60,000 rows 886 ms against 487 ms, a
2,000 x 60,000 x 1,280 k-NN product 2.9 s against 1.5 s; the main job's probe 1.25x slower,
``benchmarks/``). featx keeps a user's pin, and the kernels are part of what makes two runs' numbers
comparable, so both go into results.json, with a note when the kernels leave AVX-512 unused.
"""

from __future__ import annotations

#: OpenBLAS's x86-64 kernel sets that use AVX-512
AVX512_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
#: the AVX-512 subsets those kernels need
AVX512_SUBSETS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
CORETYPE_ENV = "OPENBLAS_CORETYPE"

_FLAGS: frozenset[str] | None = None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from Linux's ``/proc/cpuinfo`` (empty elsewhere). Read from the file,
    not from torch, so that a probe worker never has to import torch to ask."""
    global _FLAGS
    if _FLAGS is None:
        try:
            with open("/proc/cpuinfo") as f:
                line = next((line for line in f if line.startswith("flags")), "")
            _FLAGS = frozenset(line.partition(":")[2].split())
        except OSError:
            _FLAGS = frozenset()
    return _FLAGS


def native_bfloat16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): from /proc/cpuinfo, else
    torch's view if it is loaded (no import just to ask)."""
    import sys

    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    cpu = getattr(sys.modules.get("torch"), "cpu", None)
    check = getattr(cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def blas_in_use() -> dict:
    """The loaded BLAS libraries and kernel sets, the ``OPENBLAS_CORETYPE`` in force, and a note when
    OpenBLAS's kernels leave the CPU's AVX-512 unused."""
    import os

    import numpy  # noqa: F401  (its BLAS is the one reported: loaded before asking)
    from threadpoolctl import threadpool_info

    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    pinned = os.environ.get(CORETYPE_ENV)
    return {
        "libraries": sorted({" ".join(str(i.get(k)) for k in ("internal_api", "version", "architecture")
                                      if i.get(k)) for i in libs}),
        "openblas_coretype": pinned,
        "note": unused_avx512_note([i.get("architecture") for i in libs if i.get("internal_api") == "openblas"],
                                   cpu_flags(), pinned),
    }


def unused_avx512_note(openblas_cores, flags: frozenset[str], pinned: str | None) -> str | None:
    """What to tell a user whose OpenBLAS leaves the CPU's AVX-512 unused, or None."""
    slow = sorted({str(c) for c in openblas_cores if c and str(c).lower() not in AVX512_CORES})
    if not slow or not AVX512_SUBSETS <= flags:
        return None
    core = "Cooperlake" if "avx512_bf16" in flags else "SkylakeX"
    cause = (f"{CORETYPE_ENV}={pinned} pins them" if pinned
             else f"OpenBLAS chose them (it may not know this CPU; {CORETYPE_ENV}={core} selects AVX-512 kernels)")
    fix = f"; unset {CORETYPE_ENV} (or set it to {core}) for AVX-512 kernels" if pinned else ""
    return (f"OpenBLAS computes with its {', '.join(slow)} kernels, which do not use AVX-512, on a CPU that has "
            f"it: {cause}. Their float32 matrix products (k-NN's; the MLP's with --head-precision float32) run "
            f"about half as fast as they could{fix}.")
