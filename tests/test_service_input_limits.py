"""The hostile inputs of tests/test_reader_limits.py sent to a real uvicorn gateway on the bundled default
model: each gets a 4xx problem answer (413 too large / 422 malformed) well within the client timeout, the
server's peak RSS stays within 2 GB of its idle size, and the server still answers afterwards."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import gateway  # noqa: E402
from test_reader_limits import (MiB, depth_png, las_with_count, npy_with_shape, npz_bomb,  # noqa: E402
                                pcd_huge_count, ply_ascii_huge_vertex, ply_list_before_vertex, ply_negative_vertex,
                                rgbd_cameras, small_cloud)

CLIENT_TIMEOUT = 10.0  # a hang fails the test instead of stalling it
RSS_BOUND = 2 << 30


def _proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.fixture(scope="module")
def server():
    with gateway({}) as running:
        yield running


def _cloud_cases(tmp: Path) -> dict[str, tuple[bytes, str, int]]:
    """name -> (body, format, expected status)."""
    return {
        "pcd COUNT 1e11": (pcd_huge_count(), "pcd", 422),
        "ply 2e8 list rows before vertex": (ply_list_before_vertex(), "ply", 422),
        "ascii ply 1e12 vertices": (ply_ascii_huge_vertex(), "ply", 422),
        "ply 1e12 list rows before vertex": (ply_list_before_vertex(10**12), "ply", 422),
        "ply vertex -5": (ply_negative_vertex(), "ply", 422),
        "npz 230x bomb": (npz_bomb(), "npz", 413),
        "npy shape 1e12": (npy_with_shape("(1000000000000, 3)"), "npy", 422),
        "las count 2^32-1": (las_with_count(small_cloud(), tmp, "las", 2**32 - 1), "las", 422),
    }


def _rgbd_cases() -> dict[str, tuple[dict, int]]:
    """Constant fx = fy = 1 depth views (a few KB each) of more pixels than PONDER_RGBD_MAX_PIXELS: every
    pixel would become a point and the fusion alone would take GBs."""
    cases = {}
    for side, views in ((2000, 1), (2000, 2), (1400, 4)):
        png = depth_png(side)
        files = {f"depth_{i}": (f"d{i}.png", png, "image/png") for i in range(views)}
        files["cameras"] = ("cameras.json", rgbd_cameras(views, 1.0, side).encode(), "application/json")
        cases[f"rgbd {views}x{side}^2 fx=1"] = (files, 413)
    # Inside the pixel limit, but fx = 1 spreads its 1.96 M pixels into as many isolated voxels: refused by the
    # voxel limit right after fusion, before normals, kernel maps or the encoder.
    files = {"depth_0": ("d0.png", depth_png(1400), "image/png"),
             "cameras": ("cameras.json", rgbd_cameras(1, 1.0, 1400).encode(), "application/json")}
    cases["rgbd 1x1400^2 fx=1"] = (files, 413)
    return cases


def test_hostile_inputs_get_4xx_without_the_memory_they_claim(server):
    pid = server.process.pid
    # Warm up (model loaded, first request served), then measure the idle size and reset the peak.
    cloud = small_cloud(2000)
    warm = httpx.post(server.url + "/v1/features", params={"format": "npy"}, timeout=120,
                      content=_npy(np.hstack([cloud.coord, cloud.color.astype(np.float32), cloud.normal])),
                      headers={"Accept": "application/x-npy"})
    assert warm.status_code == 200, warm.text
    idle = _proc_status(pid, "VmRSS")
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS
    except OSError:
        pytest.skip("cannot reset the server's peak-RSS counter")

    with tempfile.TemporaryDirectory() as tmp:
        cloud_cases = _cloud_cases(Path(tmp))
    answers, seconds = {}, {}
    for name, (body, fmt, status) in cloud_cases.items():
        response = httpx.post(server.url + "/v1/features", params={"format": fmt}, content=body,
                              timeout=CLIENT_TIMEOUT)
        answers[name], seconds[name] = (response.status_code, response.json().get("detail", ""), status), \
            response.elapsed.total_seconds()
    for name, (files, status) in _rgbd_cases().items():
        response = httpx.post(server.url + "/v1/features", files=files, timeout=CLIENT_TIMEOUT)
        answers[name], seconds[name] = (response.status_code, response.json().get("detail", ""), status), \
            response.elapsed.total_seconds()

    for name, (got, detail, expected) in answers.items():
        assert got == expected, f"{name}: {got} {detail}"
        assert detail and len(detail) < 2000, name
    assert "limit of 5000000" in answers["npz 230x bomb"][1]
    assert "PONDER_RGBD_MAX_PIXELS" in answers["rgbd 1x2000^2 fx=1"][1]
    assert "PONDER_MAX_VOXELS" in answers["rgbd 1x1400^2 fx=1"][1]

    growth = _proc_status(pid, "VmHWM") - idle
    print(f"server idle RSS {idle / MiB:.0f} MiB, peak growth {growth / MiB:.0f} MiB; seconds per answer:",
          {name: round(s, 3) for name, s in seconds.items()})
    assert growth < RSS_BOUND, f"the server's peak RSS grew {growth / MiB:.0f} MiB above idle"
    assert httpx.get(server.url + "/healthz", timeout=CLIENT_TIMEOUT).status_code == 200


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()
