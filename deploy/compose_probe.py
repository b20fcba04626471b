"""Probe a running compose stack (gateway -> Triton worker, Prometheus): used by deploy/check_compose.sh.

    python deploy/compose_probe.py --gateway http://127.0.0.1:18000 --scene input.npz --reference ref.npy
        [--prometheus http://127.0.0.1:19090] [--requests 8] [--concurrency 2]

Waits for the gateway's /readyz, POSTs the scene to /v1/features and compares the answer with ``--reference``
(the in-process features of the same file, `ponder features`), then measures one worker's throughput: the
scene ``--requests`` times one after another, and again with ``--concurrency`` clients in flight. With
``--prometheus``, waits until Prometheus has scraped the gateway and the worker and prints each target's
health. Prints ``compose: KEY VALUE`` lines; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

HEADERS = {"Accept": "application/x-npy", "Content-Type": "application/octet-stream"}


def say(key: str, value: object) -> None:
    print(f"compose: {key} {value}", flush=True)


def wait_ready(url: str, timeout_s: float) -> float:
    """Seconds until /readyz answered 200; TimeoutError with the last answer otherwise."""
    start, last = time.monotonic(), "no answer"
    while time.monotonic() - start < timeout_s:
        try:
            answer = httpx.get(url + "/readyz", timeout=5)
            if answer.status_code == 200:
                return time.monotonic() - start
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"{url}/readyz not 200 after {timeout_s:g} s: {last}")


def features(url: str, body: bytes) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    answer = httpx.post(url + "/v1/features", content=body, headers=HEADERS, timeout=300)
    elapsed = time.perf_counter() - start
    if answer.status_code != 200:
        raise RuntimeError(f"/v1/features answered {answer.status_code}: {answer.text[:500]}")
    return np.load(io.BytesIO(answer.content), allow_pickle=False), elapsed


def throughput(url: str, body: bytes, requests: int, concurrency: int) -> float:
    """Requests per second with ``concurrency`` clients in flight."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: features(url, body), range(requests)))
    return requests / (time.perf_counter() - start)


def scrape_health(url: str, jobs: set[str], timeout_s: float) -> dict[str, str]:
    """Prometheus target health per job once every job in ``jobs`` has been scraped (or at the timeout)."""
    deadline, health = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            targets = httpx.get(url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            health = {t["labels"]["job"]: f"{t['health']} {t.get('lastError') or ''}".strip() for t in targets}
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if jobs <= health.keys() and all(not h.startswith("unknown") for h in health.values()):
            break
        time.sleep(2)
    return health


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--scene", required=True, help="point cloud file to POST")
    parser.add_argument("--reference", required=True, help=".npy of the in-process features of --scene")
    parser.add_argument("--prometheus", default=None)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--ready-timeout", type=float, default=300)
    args = parser.parse_args(argv)

    say("gateway_ready_after_s", f"{wait_ready(args.gateway, args.ready_timeout):.1f}")
    models = httpx.get(args.gateway + "/v1/models", timeout=10).json()
    say("default_model", models.get("default_model"))
    body = open(args.scene, "rb").read()
    got, first_s = features(args.gateway, body)
    reference = np.load(args.reference, allow_pickle=False)
    error = float(np.abs(got - reference).max()) if got.shape == reference.shape else float("inf")
    ok = error <= 1e-4
    say("request", f"POST /v1/features {len(body)} bytes -> {got.shape} {got.dtype} in {first_s:.2f} s")
    say("max_abs_diff_vs_in_process", f"{error:.2e} ({'ok' if ok else 'FAILED'}, tolerance 1e-4)")

    latencies = [features(args.gateway, body)[1] for _ in range(args.requests)]
    points = len(got)
    p50 = statistics.median(latencies)
    say("sequential", f"{args.requests} requests of {points} points: p50 {p50:.2f} s, {1 / p50:.2f} req/s, "
        f"{points / p50 / 1e3:.0f}k points/s")
    rate = throughput(args.gateway, body, args.requests, args.concurrency)
    say("concurrent", f"{args.requests} requests, {args.concurrency} in flight: {rate:.2f} req/s, "
        f"{rate * points / 1e3:.0f}k points/s")

    if args.prometheus:
        health = scrape_health(args.prometheus, {"ponder-gateway", "triton-worker"}, 90)
        for job, state in sorted(health.items()):
            say(f"prometheus_{job}", state)
        ok = ok and health.get("ponder-gateway", "").startswith("up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
