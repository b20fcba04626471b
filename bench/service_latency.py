"""Gateway latency and throughput against the raw model, in-process worker vs Triton worker.

    python bench/service_latency.py --checkpoint CKPT [--sizes 10000 100000 1000000] [--repeats 5 3 2]
                            [--workers inprocess triton] [--concurrency 4] [--json out.json]

Both gateways (real uvicorn processes; the Triton one in front of ``ponder worker --triton``) run side by
side. For each cloud size, back to back: the raw model time (Predictor.prepare + encode in this process, in
a dedicated thread with the same thread count, as the in-process worker runs it), then p50/p95 latency of
sequential ``POST /v1/features`` (NPZ upload, NPY answer) through each gateway, and throughput with
``--concurrency`` clients in flight (sizes up to 100k). Overhead ratio = gateway p50 / raw p50. Clouds are
tiles of the fixture room (one point per 2 cm voxel), so voxels ~ points.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURE_SCENE = REPO.parent / "shared" / "reference" / "fixtures" / "spunet_v1m1_seg" / "input.npz"
THREADS = 2


def make_cloud(n: int, seed: int = 0):
    """n points tiled from the fixture room (shifted copies side by side), colours and normals kept."""
    from model.pointcloud.cloud import PointCloud

    data = np.load(FIXTURE_SCENE)
    coord, color, normal = data["coord"], data["color"], data["normal"]
    span = coord.max(0) - coord.min(0) + 0.1
    tiles = int(np.ceil(n / len(coord)))
    side = int(np.ceil(np.sqrt(tiles)))
    parts = [coord + np.array([span[0] * (t % side), span[1] * (t // side), 0], np.float32) for t in range(tiles)]
    rows = np.random.default_rng(seed).permutation(tiles * len(coord))[:n]
    return PointCloud(coord=np.concatenate(parts)[rows], color=np.tile(color, (tiles, 1))[rows],
                      normal=np.tile(normal, (tiles, 1))[rows], source=f"bench-{n}")


def npz_bytes(cloud) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, coord=cloud.coord, color=cloud.color, normal=cloud.normal)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], ready_url: str, log: Path, timeout: float = 300) -> subprocess.Popen:
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[2]} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"not ready after {timeout} s: {ready_url}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"p50": statistics.median(ordered), "p95": pick(0.95), "n": len(ordered)}


class RawModel:
    """The model alone, run the way the in-process worker runs it: loaded and run on one dedicated thread with
    the same thread count, freed memory reused (a second multi-threaded OpenMP team, e.g. loading on this
    process's main thread, would slow every forward on 2 cores: see service/workers/inprocess.py)."""

    def __init__(self, checkpoint: Path) -> None:
        from model.engine.memory import reuse_freed_memory

        reuse_freed_memory()
        self.thread = ThreadPoolExecutor(max_workers=1)
        self.predictor = self.thread.submit(self._load, checkpoint).result()

    @staticmethod
    def _load(checkpoint: Path):
        from model.devices import use_torch_threads
        from model.inference import load_predictor

        use_torch_threads(THREADS)
        return load_predictor(checkpoint)

    def _once(self, cloud) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        voxels = self.predictor.prepare(cloud)
        t1 = time.perf_counter()
        self.predictor.encode([voxels])
        return t1 - t0, time.perf_counter() - t1, voxels.num_voxels

    def measure(self, n: int, cloud, repeats: int) -> dict:
        runs = [self.thread.submit(self._once, cloud).result() for _ in range(repeats)]
        entry = {"prepare_p50": statistics.median(r[0] for r in runs),
                 "encode_p50": statistics.median(r[1] for r in runs),
                 **percentiles([r[0] + r[1] for r in runs]), "voxels": runs[0][2]}
        print(f"raw       {n:>8} pts: p50 {entry['p50']:.3f} s (prepare {entry['prepare_p50']:.3f}, encode "
              f"{entry['encode_p50']:.3f}), {entry['voxels']} voxels", flush=True)
        return entry


def through_gateway(client: httpx.Client, n: int, body: bytes, repeats: int, concurrency: int, label: str) -> dict:
    def call(_: int = 0) -> float:
        t0 = time.perf_counter()
        response = client.post("/v1/features", content=body)
        elapsed = time.perf_counter() - t0
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return elapsed

    entry = percentiles([call() for _ in range(repeats)])
    if n <= 100_000 and concurrency > 1:
        total = concurrency * max(2, repeats)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(call, range(total)))
        wall = time.perf_counter() - t0
        entry["throughput_rps"] = total / wall
    else:
        entry["throughput_rps"] = 1 / entry["p50"]
    entry["throughput_pts_s"] = entry["throughput_rps"] * n
    print(f"{label:<9} {n:>8} pts: p50 {entry['p50']:.3f} s, p95 {entry['p95']:.3f} s, "
          f"{entry['throughput_pts_s']:,.0f} points/s", flush=True)
    return entry


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, nargs="+", default=[10, 5, 2])
    parser.add_argument("--workers", nargs="+", choices=("inprocess", "triton"), default=["inprocess", "triton"])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a killed bench still stops its servers
    repeats = dict(zip(args.sizes, args.repeats + [args.repeats[-1]] * len(args.sizes)))
    clouds = {n: make_cloud(n, seed=n) for n in args.sizes}
    bodies = {n: npz_bytes(c) for n, c in clouds.items()}
    report: dict = {"sizes": args.sizes, "threads": THREADS, "raw": {}, **{w: {} for w in args.workers}}
    gateway_env = {"PONDER_TORCH_THREADS": str(THREADS), "PONDER_REQUEST_TIMEOUT_S": "900",
                   "PONDER_LOG_LEVEL": "WARNING", "PONDER_MAX_UPLOAD_BYTES": str(1 << 30)}
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            clients = {}
            for worker in args.workers:  # both gateways run side by side, idle while the other is measured
                env = dict(gateway_env)
                if worker == "triton":  # the exported ensemble in the tritonserver binary, as operators run it
                    repo = Path(tmp) / "repo"
                    subprocess.run([sys.executable, "-m", "ponder", "export", "triton-repo", str(args.checkpoint),
                                    "-o", str(repo), "--name", "bench", "--kind", "python-onnxruntime"], check=True)
                    grpc, http, metrics = free_port(), free_port(), free_port()
                    processes.append(start(
                        [sys.executable, "-m", "ponder", "worker", "--triton", "--repo", str(repo),
                         "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)],
                        {"OMP_NUM_THREADS": str(THREADS)}, f"http://127.0.0.1:{http}/v2/health/ready",
                        Path(tmp) / "triton.log"))
                    env |= {"PONDER_WORKER": "triton", "PONDER_TRITON_URLS": f"127.0.0.1:{grpc}"}
                else:
                    env |= {"PONDER_CHECKPOINT": str(args.checkpoint)}
                port = free_port()
                processes.insert(0, start(
                    [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
                     "--port", str(port)], env, f"http://127.0.0.1:{port}/readyz", Path(tmp) / f"{worker}.log"))
                clients[worker] = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900, headers={
                    "Accept": "application/x-npy", "Content-Type": "application/octet-stream"})
            raw = RawModel(args.checkpoint)
            warm = min(args.sizes)
            raw.measure(warm, clouds[warm], 1)
            for worker in args.workers:
                through_gateway(clients[worker], warm, bodies[warm], 1, 1, f"(warm-up {worker})")
            # Per size: raw, then each worker, back to back, so a change in machine load hits all alike.
            for n in args.sizes:
                report["raw"][n] = raw.measure(n, clouds[n], repeats[n])
                for worker in args.workers:
                    report[worker][n] = through_gateway(clients[worker], n, bodies[n], repeats[n], args.concurrency,
                                                        worker)
        finally:
            for process in processes:
                stop(process)
    print("\n| points | raw p50 (s) | worker | p50 (s) | p95 (s) | overhead (p50/raw) | throughput (points/s) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n in args.sizes:
        raw = report["raw"][n]["p50"]
        for worker in args.workers:
            entry = report[worker][n]
            entry["overhead"] = entry["p50"] / raw
            print(f"| {n:,} | {raw:.3f} | {worker} | {entry['p50']:.3f} | {entry['p95']:.3f} | "
                  f"{entry['overhead']:.2f} | {entry['throughput_pts_s']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
