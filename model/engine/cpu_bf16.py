"""Whether this CPU runs bfloat16 GEMMs fast enough for ``--precision bf16`` to be worth asking for.

oneDNN (behind torch's CPU matmuls) has three cases. CPUs with AMX-BF16 or AVX512-BF16 multiply bf16
natively: the engine's bf16 mode is 2.5-4× faster than fp32 there (README, Results). CPUs with plain AVX-512
(BW/VL/DQ) convert and multiply in fp32: correct, speed not measured here, likely no gain. CPUs without
AVX-512 (AVX2 only) have no oneDNN bf16 kernels at all and torch falls back to a reference loop: measured on
an AMD EPYC with AVX2 (2 threads), the published-size encoder on the 131k-voxel room took 166 s in bf16
against 2.25 s in fp32 (74× slower). So bf16 is refused there, and warned about on the middle case.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import torch

NATIVE_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})  # x86 flags in /proc/cpuinfo; "bf16": Arm's feature


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def onednn_has_bf16() -> bool:
    """torch's own test for oneDNN bf16 kernels on this CPU (AVX-512 BW/VL/DQ or newer on x86)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else True  # no probe: let the flags decide
    except RuntimeError:
        return False


def bf16_support(onednn: bool, flags: frozenset[str]) -> str:
    """"native" (bf16 instructions), "emulated" (oneDNN kernels through fp32) or "none" (reference loops)."""
    if not onednn:
        return "none"
    return "native" if flags & NATIVE_FLAGS else "emulated"


def check_cpu_bf16(support: str | None = None) -> None:
    """ValueError where bf16 would crawl (no oneDNN bf16 kernels); a warning where it is only emulated."""
    support = support or bf16_support(onednn_has_bf16(), cpu_flags())
    capability = torch.backends.cpu.get_cpu_capability()
    if support == "none":
        raise ValueError(f"--precision bf16: this CPU ({capability}) has no bfloat16 matrix kernels (they need "
                         "AVX-512, best with AVX512-BF16 or AMX); bf16 would run ~70x slower than fp32 here. "
                         "Use --precision fp32 (the default)")
    if support == "emulated":
        warnings.warn(f"--precision bf16: this CPU ({capability}) has no bfloat16 instructions (AVX512-BF16/AMX); "
                      "oneDNN emulates them and bf16 may be no faster than fp32", stacklevel=2)
