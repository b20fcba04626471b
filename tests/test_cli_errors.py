"""Bad input through the CLI: a message on stderr naming the problem and a non-zero exit code."""

from __future__ import annotations

import subprocess

import numpy as np

from conftest import PONDER, fixture_dir


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PONDER, *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_are_clear(tmp_path):
    ckpt = str(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth")
    cloud = tmp_path / "scene.npz"
    np.savez(cloud, coord=np.random.rand(500, 3).astype(np.float32),
             color=np.random.randint(0, 255, (500, 3)).astype(np.uint8),
             normal=np.tile([0, 0, 1], (500, 1)).astype(np.float32))
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"\x00\x01 definitely not a ply")
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[0, 0, 0], [np.nan, 0, 0]], np.float32))

    cases = [
        (("features", str(tmp_path / "missing.ply"), "-o", str(tmp_path / "o.npy"), "-c", ckpt), "missing.ply"),
        (("features", str(garbage), "-o", str(tmp_path / "o.npy"), "-c", ckpt), "garbage.ply"),
        (("features", str(nan), "-o", str(tmp_path / "o.npy"), "-c", ckpt, "--strict"), "NaN"),
        (("segment", str(cloud), "-o", str(tmp_path / "o.npz"), "-c", ckpt, "--condition", "Mars"), "'Mars'"),
        (("features", str(cloud), "-o", str(tmp_path / "o.npy"), "-c", str(garbage)), "garbage.ply"),
        (("inspect", str(tmp_path / "nope.pth")), "no such checkpoint"),
    ]
    for args, needle in cases:
        result = _run(*args)
        assert result.returncode != 0, args
        assert needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "o.npy").exists()
