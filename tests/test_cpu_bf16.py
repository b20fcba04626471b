"""``--precision bf16`` is refused where oneDNN has no bf16 kernels (a reference loop, ~70x slower than fp32)
and warned about where bf16 is only emulated; the CLI says which, on the machine the tests run on."""

from __future__ import annotations

import subprocess
import warnings

import pytest

from conftest import PONDER, fixture_dir
from model.engine.cpu_bf16 import bf16_support, check_cpu_bf16, cpu_flags, onednn_has_bf16


def test_support_levels_from_onednn_and_flags():
    assert bf16_support(False, frozenset({"avx512_bf16", "amx_bf16"})) == "none"  # no kernels: flags do not help
    assert bf16_support(True, frozenset({"avx512f", "avx512bw"})) == "emulated"
    assert bf16_support(True, frozenset({"avx512f", "avx512_bf16"})) == "native"
    assert bf16_support(True, frozenset({"amx_bf16"})) == "native"
    assert bf16_support(True, frozenset({"fp", "asimd", "bf16"})) == "native"  # Arm's feature name


def test_check_refuses_none_warns_emulated_and_passes_native():
    with pytest.raises(ValueError, match="no bfloat16 matrix kernels.*--precision fp32"):
        check_cpu_bf16("none")
    with pytest.warns(UserWarning, match="emulates"):
        check_cpu_bf16("emulated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_cpu_bf16("native")


def test_cpu_flags_read_from_proc():
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    assert any(flag in flags for flag in ("sse2", "fp", "asimd"))  # every x86-64 / Armv8 CPU has one of these


def test_cli_bf16_matches_this_cpu(tmp_path):
    folder = fixture_dir("spunet_v1m1_seg")
    out = tmp_path / "f.npy"
    result = subprocess.run([PONDER, "features", str(folder / "input.npz"), "-o", str(out), "--checkpoint",
                             str(folder / "checkpoint.pth"), "--precision", "bf16"],
                            capture_output=True, text=True, timeout=300)
    support = bf16_support(onednn_has_bf16(), cpu_flags())
    if support == "none":
        assert result.returncode == 2 and "no bfloat16 matrix kernels" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not out.exists()
    else:
        assert result.returncode == 0, result.stderr
        assert out.exists() and ("emulates" in result.stderr) == (support == "emulated")
