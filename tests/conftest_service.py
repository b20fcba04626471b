"""Helpers for the service tests: real server processes on free loopback ports, fixture scenes, and
writers for every input format (with the real libraries). Imported by tests/test_service_*.py."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PONDER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "reference" / "fixtures"
SPUNET = FIXTURES / "spunet_v1m1_seg" / "checkpoint.pth"
PPT = FIXTURES / "ppt_v1m3_seg" / "checkpoint.pth"
SCENE = FIXTURES / "spunet_v1m1_seg" / "input.npz"
PYTHON = sys.executable


def require_fixtures() -> None:
    if not (SPUNET.exists() and PPT.exists() and SCENE.exists()):
        pytest.skip(f"fixture checkpoints not found under {FIXTURES} (the shared/ folder beside the repo)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scene(n: int | None = None, seed: int = 0):
    """The fixture room (30,717 points, colours and normals), or a random subset of n points."""
    from model.pointcloud.cloud import PointCloud

    data = np.load(SCENE)
    coord, color, normal = data["coord"], data["color"], data["normal"]
    if n is not None and n < len(coord):
        rows = np.sort(np.random.default_rng(seed).choice(len(coord), n, replace=False))
        coord, color, normal = coord[rows], color[rows], normal[rows]
    return PointCloud(coord=coord, color=color, normal=normal, source="fixture")


def npz_bytes(cloud) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, coord=cloud.coord, color=cloud.color, normal=cloud.normal)
    return buffer.getvalue()


def write_format(cloud, path: Path) -> Path:
    """Write ``cloud`` in the format named by ``path``'s suffix with the format's own library."""
    fmt = path.suffix.lstrip(".")
    if fmt == "ply":
        from plyfile import PlyData, PlyElement

        rows = np.empty(len(cloud), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                            ("blue", "u1"), ("nx", "f4"), ("ny", "f4"), ("nz", "f4")])
        for i, axis in enumerate("xyz"):
            rows[axis] = cloud.coord[:, i]
            rows["n" + axis] = cloud.normal[:, i]
        for i, channel in enumerate(("red", "green", "blue")):
            rows[channel] = cloud.color[:, i]
        PlyData([PlyElement.describe(rows, "vertex")]).write(str(path))
    elif fmt in ("las", "laz"):
        import laspy

        header = laspy.LasHeader(point_format=2, version="1.2")
        header.scales = np.array([0.0001, 0.0001, 0.0001])
        header.offsets = cloud.coord.min(axis=0).astype(np.float64)
        las = laspy.LasData(header)
        las.x, las.y, las.z = (cloud.coord[:, i].astype(np.float64) for i in range(3))
        las.red, las.green, las.blue = (cloud.color[:, i].astype(np.uint16) * 257 for i in range(3))
        las.write(str(path))
    elif fmt == "pcd":
        from pypcd4 import PointCloud as PcdCloud

        rgb = PcdCloud.encode_rgb(cloud.color)
        fields = ("x", "y", "z", "rgb", "normal_x", "normal_y", "normal_z")
        array = np.column_stack([cloud.coord, rgb.astype(np.float32).reshape(-1, 1), cloud.normal]) \
            if rgb.dtype != np.float32 else np.column_stack([cloud.coord, rgb.reshape(-1, 1), cloud.normal])
        pcd = PcdCloud.from_points(array, fields, (np.float32,) * 7)
        pcd.save(str(path))
    elif fmt == "npy":
        np.save(path, np.column_stack([cloud.coord, cloud.color.astype(np.float32), cloud.normal]))
    elif fmt == "npz":
        path.write_bytes(npz_bytes(cloud))
    elif fmt in ("xyz", "txt"):
        np.savetxt(path, np.column_stack([cloud.coord, cloud.color]), fmt="%.6f %.6f %.6f %d %d %d")
    elif fmt == "bin":  # KITTI: float32 x, y, z, intensity
        np.column_stack([cloud.coord, np.ones(len(cloud), np.float32)]).astype(np.float32).tofile(path)
    else:
        raise ValueError(f"no writer for {fmt}")
    return path


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not ready at {url} after {timeout} s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Server:
    """A server process started on free loopback ports: ``url``, ``log`` (its output) and ``port``."""

    def __init__(self, command: list[str], env: dict[str, str], ready_path: str, port: int, log: Path) -> None:
        self.port, self.log, self.ready_path = port, log, ready_path
        self.url = f"http://127.0.0.1:{port}"
        with log.open("w") as sink:
            self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=sink,
                                            stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> "Server":
        _wait_ready(self.url + self.ready_path, self.process, self.log, timeout)
        return self

    def stop(self, grace: float = 30.0) -> None:
        _stop(self.process, grace)

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines


def start_gateway(env: dict[str, str], folder: Path) -> Server:
    """``python -m uvicorn service.app:create_app --factory`` on a free port with PONDER_* settings."""
    port = free_port()
    env = {"PONDER_TORCH_THREADS": "2", "PONDER_LOG_LEVEL": "INFO", **env}
    command = [PYTHON, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(port)]
    return Server(command, env, "/readyz", port, folder / f"gateway-{port}.log")


@contextmanager
def gateway(env: dict[str, str], timeout: float = 180.0) -> Iterator[Server]:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_gateway(env, Path(tmp))
        try:
            yield server.wait_ready(timeout)
        finally:
            server.stop()


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """camera_to_world (4, 4) of an OpenCV camera (x right, y down, z forward) at ``eye`` facing ``target``."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = eye
    return pose


# Analytic test room: floor z = 0 (red) and wall x = 2 (green).
PLANES = ((np.array([0.0, 0.0, 1.0]), 0.0, (200, 40, 40)), (np.array([1.0, 0.0, 0.0]), 2.0, (40, 200, 40)))


def render_planes(K: np.ndarray, camera_to_world: np.ndarray, width: int, height: int, depth_scale: float = 1000.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact depth (uint16, depth_scale units) and colour (uint8) images of the analytic room."""
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    rays_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u, dtype=float)], -1)
    rot, eye = camera_to_world[:3, :3], camera_to_world[:3, 3]
    rays = rays_cam @ rot.T  # world direction per pixel for unit camera z
    depth = np.full((height, width), np.inf)
    color = np.zeros((height, width, 3), np.uint8)
    for normal, offset, rgb in PLANES:
        denom = rays @ normal
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (offset - eye @ normal) / denom  # camera z of the hit (rays have unit camera z)
        hit = (z > 0) & (z < depth)
        depth[hit] = z[hit]
        color[hit] = rgb
    depth_units = np.where(np.isfinite(depth), np.rint(depth * depth_scale), 0).astype(np.uint16)
    return depth_units, color


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def start_triton_repo_worker(repo: Path, folder: Path, ports: tuple[int, int, int] | None = None
                             ) -> tuple[Server, tuple[int, int, int]]:
    """``ponder worker --triton --repo REPO`` (the console script) on free loopback ports, or on the given
    (http, grpc, metrics) ones to restart a worker where the gateway expects it. Returns (server, ports);
    ``server.url`` is Triton's HTTP endpoint, ready at /v2/health/ready."""
    http_port, grpc_port, metrics_port = ports or (free_port(), free_port(), free_port())
    ponder = Path(PYTHON).parent / "ponder"
    command = [str(ponder), "worker", "--triton", "--repo", str(repo), "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    server = Server(command, {"OMP_NUM_THREADS": "1"}, "/v2/health/ready", http_port,
                    folder / f"triton-repo-{http_port}-{time.monotonic_ns()}.log")
    return server, (http_port, grpc_port, metrics_port)


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains ``text`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text().splitlines()
            state = next((line for line in status if line.startswith("State:")), "")
        except OSError:
            continue
        if text in cmdline and "zombie" not in state:
            found.append((int(entry.name), cmdline.strip()))
    return found
