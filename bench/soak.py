"""Soak test of the gateway: N clients for T minutes on mixed routes and sizes, then an overload phase.

    python bench/soak.py                                  # 8 clients x 5 min, then 32 clients x 1 min
    python bench/soak.py --clients 8 --minutes 1 --overload-clients 32 --overload-minutes 0.5
    python bench/soak.py --url http://127.0.0.1:8000      # a running gateway (loopback only)

Without ``--url`` it starts a real gateway (``uvicorn service.app:create_app`` on a free loopback port, the
bundled default models, a small queue so overload is refused early). Each client loops: pick a route
(features / segment / detect / render, weighted) and a size, send, record status and latency. Prints per
route p50/p95/p99 of the successful answers, errors by status, the gateway's RSS (sampled every 5 s:
start/middle/end), and the overload goodput (successful answers/s) against the N-client goodput.
Bounded: at most 60 minutes and 256 clients; loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZES = (2_000, 10_000, 40_000)
ROUTES = (("features", 5), ("segment", 3), ("detect", 1), ("render", 1))  # (route, weight)


@dataclass
class Phase:
    name: str
    clients: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # (route, status) of every non-200
    ok: int = 0
    elapsed: float = 0.0

    @property
    def goodput(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


def room(n: int, seed: int) -> bytes:
    """A box room of n points (floor, walls, a table) with colours and normals, as NPZ."""
    rng = np.random.default_rng(seed)
    coord = rng.uniform([0, 0, 0], [5, 4, 2.6], (n, 3)).astype(np.float32)
    normal = np.zeros((n, 3), np.float32)
    face = rng.integers(0, 3, n)
    coord[face == 0, 2] = 0.0
    coord[face == 1, 0] = 0.0
    coord[face == 2, 1] = 0.0
    normal[np.arange(n), 2 - face] = 1.0
    color = rng.integers(60, 200, (n, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, coord=coord, color=color, normal=normal)
    return buffer.getvalue()


def cameras(size: int) -> str:
    f = 0.8 * size
    pose = np.eye(4)
    pose[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float).T  # looking along +x, z up
    pose[:3, 3] = (0.5, 2.0, 1.3)
    return json.dumps({"width": size, "height": size, "fx": f, "fy": f, "cx": size / 2 - 0.5, "cy": size / 2 - 0.5,
                       "camera_to_world": pose.tolist()})


async def one_request(client: httpx.AsyncClient, route: str, body: bytes, rng: random.Random) -> int:
    if route == "render":
        size = rng.choice((8, 16, 24))
        files = {"file": ("room.npz", body), "cameras": ("cameras.json", cameras(size))}
        response = await client.post("/v1/render", files=files)
    elif route == "detect":
        response = await client.post("/v1/detect", content=body, params={"format": "npz"})
    else:
        response = await client.post(f"/v1/{route}", content=body, params={"format": "npz"},
                                     headers={"Accept": "application/x-npy"})
    return response.status_code


async def run_phase(url: str, phase: Phase, bodies: dict[int, bytes], timeout: float, seed: int) -> Phase:
    stop = time.monotonic() + phase.seconds
    weights = [w for _, w in ROUTES]

    async def client_loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            while time.monotonic() < stop:
                route = rng.choices([r for r, _ in ROUTES], weights)[0]
                size = rng.choice(SIZES[:2]) if route in ("detect", "render") else rng.choice(SIZES)
                start = time.perf_counter()
                try:
                    status = await one_request(client, route, bodies[size], rng)
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                elapsed = time.perf_counter() - start
                phase.statuses[status] += 1
                if status != 200:
                    phase.errors[f"{route} {status}"] += 1
                if status == 200:
                    phase.ok += 1
                    phase.latencies[f"{route} {size // 1000}k"].append(elapsed)
                elif status == 503:
                    await asyncio.sleep(0.2)  # honour the refusal a little, as a real client would

    start = time.monotonic()
    await asyncio.gather(*(client_loop(i) for i in range(phase.clients)))
    phase.elapsed = time.monotonic() - start
    return phase


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def sample_rss(pid: int | None, samples: list[tuple[float, float]], every: float = 5.0) -> None:
    if pid is None:
        return
    start = time.monotonic()
    while True:
        try:
            samples.append((time.monotonic() - start, rss_mib(pid)))
        except OSError:
            return
        await asyncio.sleep(every)


def report(phase: Phase) -> None:
    print(f"\n== {phase.name}: {phase.clients} clients, {phase.elapsed:.0f} s, {phase.ok} ok, "
          f"goodput {phase.goodput:.2f} answers/s")
    for key in sorted(phase.latencies):
        values = np.array(phase.latencies[key]) * 1000
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        print(f"  {key:<14} n={len(values):<5} p50 {p50:8.0f} ms  p95 {p95:8.0f} ms  p99 {p99:8.0f} ms")
    print(f"  statuses: {dict(sorted(phase.statuses.items(), key=str))}; errors by route: "
          f"{dict(sorted(phase.errors.items())) or 'none'}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PONDER_QUEUE_SIZE": str(args.queue_size), "PONDER_LONG_QUEUE_SIZE": "2",
           "PONDER_REQUEST_TIMEOUT_S": str(args.request_timeout), "PONDER_LOG_LEVEL": "WARNING",
           "PONDER_TORCH_THREADS": str(args.torch_threads)}
    command = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the gateway did not get ready within 300 s")


def loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return all(info[4][0].startswith("127.") or info[4][0] == "::1"
                   for info in socket.getaddrinfo(host, None))
    except socket.gaierror:
        return False


async def main_async(args: argparse.Namespace, url: str, pid: int | None) -> None:
    bodies = {n: room(n, n) for n in SIZES}
    samples: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_rss(pid, samples))
    steady = await run_phase(url, Phase("steady", args.clients, args.minutes * 60), bodies, args.timeout, 1)
    report(steady)
    if args.overload_clients:
        over = await run_phase(url, Phase("overload", args.overload_clients, args.overload_minutes * 60), bodies,
                               args.timeout, 2)
        report(over)
        ratio = over.goodput / steady.goodput if steady.goodput else float("nan")
        print(f"\noverload goodput / {args.clients}-client goodput: {ratio:.2f} "
              f"({over.goodput:.2f} vs {steady.goodput:.2f} answers/s)")
    sampler.cancel()
    if samples:
        mid = samples[len(samples) // 2]
        print(f"gateway RSS (MiB, every 5 s, {len(samples)} samples): start {samples[0][1]:.0f}, "
              f"middle {mid[1]:.0f} (t={mid[0]:.0f} s), end {samples[-1][1]:.0f}, max {max(s for _, s in samples):.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running gateway on loopback (default: start one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--overload-clients", type=int, default=32, help="0 = no overload phase")
    parser.add_argument("--overload-minutes", type=float, default=1.0)
    parser.add_argument("--queue-size", type=int, default=4, help="fast-lane queue of the started gateway")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request")
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 0 <= args.overload_clients <= 256):
        parser.error("clients must be 1..256 (overload 0..256)")
    if args.minutes + args.overload_minutes > 60:
        parser.error("the soak is bounded to 60 minutes in all")
    if args.url and not loopback(args.url):
        parser.error(f"{args.url} is not a loopback address")
    process = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                url, pid = args.url.rstrip("/"), None
            else:
                process, url = start_gateway(args, Path(tmp) / "gateway.log")
                pid = process.pid
            print(f"soak against {url}: {args.clients} clients x {args.minutes:g} min, then "
                  f"{args.overload_clients} clients x {args.overload_minutes:g} min; load {os.getloadavg()}")
            asyncio.run(main_async(args, url, pid))
        finally:
            if process is not None:
                process.terminate()
                process.wait(60)
                problems = [line for line in (Path(tmp) / "gateway.log").read_text().splitlines()
                            if '"level": "ERROR"' in line or "Traceback" in line]
                print(f"gateway log: {len(problems)} error line(s)" + "".join(f"\n  {p[:300]}" for p in problems[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
