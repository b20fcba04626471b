"""Does a long-lane job slow the fast lane afterwards? The in-process worker's encoder time per
``POST /v1/features`` of the ~130k-voxel room (published-size SpUNet-v1m1, random weights), before and after
one ``/v1/segment?mode=precise`` request (a long-lane job), for each ``long_torch_threads`` asked.

    .venv/bin/python bench/service_lanes.py [--long-threads 1 2] [--repeats 3] [--threads 2]

Each setting runs in a fresh `ponder serve` process (a real uvicorn on a loopback port). The encoder time is the
worker's own figure (``ponder_worker_duration_seconds`` from /metrics, per request); wall is the client's.
Why it matters: every thread that runs torch ops with more than one thread owns an OpenMP team, and while
libgomp manages more threads than there are cores it puts idle team threads to sleep at once instead of
spinning, so each of the forward's thousands of parallel regions waits for a wake-up. Each long job now runs
on a thread that ends with it (its team freed), so "after" should equal "before" for every setting; with a
long-lane thread that lived on, 2 long-job threads made every later fast-lane forward 1.65x slower.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import room_cloud, scaled_model  # noqa: E402  (bench/encoder.py)
from service_latency import free_port, start, stop  # noqa: E402  (bench/service_latency.py)

WORKER_SUM = re.compile(r'^ponder_worker_duration_seconds_sum\{worker="inprocess"\} (\S+)$', re.M)
WORKER_COUNT = re.compile(r'^ponder_worker_duration_seconds_count\{worker="inprocess"\} (\S+)$', re.M)


def npy(points: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, points.astype(np.float32))
    return buffer.getvalue()


def worker_seconds(client: httpx.Client) -> tuple[float, float]:
    """(sum, count) of the worker's duration histogram; (0, 0) before its first observation."""
    text = client.get("/metrics").text
    total, count = WORKER_SUM.search(text), WORKER_COUNT.search(text)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


def features(client: httpx.Client, body: bytes, repeats: int) -> tuple[list[float], list[float]]:
    """(worker seconds, wall seconds) of each request."""
    encoder, wall = [], []
    for _ in range(repeats):
        before, t = worker_seconds(client)[0], time.perf_counter()
        response = client.post("/v1/features", content=body, params={"output": "per_voxel"},
                               headers={"Content-Type": "application/vnd.ponder.npy", "Accept": "application/x-npz"})
        response.raise_for_status()
        wall.append(time.perf_counter() - t)
        encoder.append(worker_seconds(client)[0] - before)
    return encoder, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the fast lane's torch threads")
    args = parser.parse_args()

    from model.checkpoint import save_checkpoint
    from model.config import BackboneConfig, ModelConfig

    config = ModelConfig(kind="segmentor", backbone=BackboneConfig(type="SpUNet-v1m1", num_classes=20))
    cloud = room_cloud(1300.0)
    room = npy(np.concatenate([cloud.coord, cloud.color], axis=1))
    small = npy(np.concatenate([cloud.coord, cloud.color], axis=1)[::40])  # the long job: 13 passes of 4k points
    print(f"room: {len(cloud.coord):,} points; fast lane {args.threads} torch threads; load {os.getloadavg()[0]:.2f}")
    print(f"{'long_torch_threads':>18} {'phase':<13} {'encoder s (median)':>18} {'wall s (median)':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(scaled_model(config), config, Path(tmp) / "published-size")
        for long_threads in args.long_threads:
            port = free_port()
            env = {"PONDER_TORCH_THREADS": str(args.threads), "PONDER_LONG_TORCH_THREADS": str(long_threads)}
            process = start([sys.executable, "-m", "ponder", "serve", "--checkpoint", str(checkpoint), "--port",
                             str(port)], env, f"http://127.0.0.1:{port}/readyz", Path(tmp) / f"serve-{long_threads}.log")
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                    features(client, room, 1)  # warm-up
                    phases = {"before": features(client, room, args.repeats)}
                    t = time.perf_counter()
                    client.post("/v1/segment", content=small, params={"mode": "precise"},
                                headers={"Content-Type": "application/vnd.ponder.npy"}).raise_for_status()
                    long_job = time.perf_counter() - t
                    phases["after long job"] = features(client, room, args.repeats)
            finally:
                stop(process)
            for phase, (encoder, wall) in phases.items():
                print(f"{long_threads:>18} {phase:<13} {statistics.median(encoder):>18.2f} {statistics.median(wall):>16.2f}")
            ratio = statistics.median(phases["after long job"][0]) / statistics.median(phases["before"][0])
            print(f"{long_threads:>18} after/before encoder time {ratio:.2f}x; the long job took {long_job:.2f} s")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
