"""Start-up cost of one `ponder features` call: the default backend (torch engine, no spconv) vs
``--backend spconv``, on a generated 20k-point room, each a fresh process (what a CLI user pays per call).

    .venv/bin/python bench/startup.py [--points 20000] [--repeats 3] [--threads N]

Prints per backend the wall time of each call (runs interleaved, so load drift hits both alike), their
best and median, the same-run ratio, a floor (``python -c "import torch"``), and from ``python -X importtime``
the cumulative import time of the modules that matter. The machine's load average is printed before and
after: on a shared machine the absolute seconds move with it, the ratio much less.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ("torch", "spconv.pytorch", "model.checkpoint", "model.build", "model.backbones.engine_backed",
           "model.engine.encoder", "model.inference", "export.backends", "model.pointcloud.readers", "ponder.cli")


def room(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A room corner: floor, two walls and a table top, with colours and normals (n points)."""
    rng = np.random.default_rng(seed)
    k = n // 4
    parts = [np.c_[rng.uniform(0, 4, k), rng.uniform(0, 3, k), np.zeros(k)],
             np.c_[np.zeros(k), rng.uniform(0, 3, k), rng.uniform(0, 2.5, k)],
             np.c_[rng.uniform(0, 4, k), np.zeros(k), rng.uniform(0, 2.5, k)],
             np.c_[rng.uniform(1, 2, n - 3 * k), rng.uniform(1, 1.8, n - 3 * k), np.full(n - 3 * k, 0.75)]]
    normals = [np.tile(v, (len(p), 1)) for v, p in zip(([0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]), parts)]
    colors = [np.clip(np.tile(c, (len(p), 1)) + rng.integers(-12, 12, (len(p), 3)), 0, 255)
              for c, p in zip(([120, 100, 80], [200, 200, 190], [180, 190, 200], [90, 60, 40]), parts)]
    return {"coord": np.concatenate(parts).astype(np.float32), "color": np.concatenate(colors).astype(np.uint8),
            "normal": np.concatenate(normals).astype(np.float32)}


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def timed_run(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def import_times(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Cumulative import seconds of the WATCHED modules (first occurrence) in one run under -X importtime."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    found: dict[str, float] = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if match and match.group(2) in WATCHED and match.group(2) not in found:
            found[match.group(2)] = int(match.group(1)) / 1e6
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's own choice)")
    opts = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    backends = {"default": [], "spconv": ["--backend", "spconv"]}
    with tempfile.TemporaryDirectory() as tmp:
        cloud = Path(tmp) / "room.npz"
        np.savez(cloud, **room(opts.points))
        print(f"ponder features on {opts.points:,} points, {opts.repeats} fresh processes per backend, "
              f"threads={opts.threads or 'default'}; load average before: {load_average()}")
        command = {name: ["-m", "ponder", "features", str(cloud), "-o", str(Path(tmp) / f"{name}.npy"), *extra]
                   for name, extra in backends.items()}
        floor: list[float] = []
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(opts.repeats):
            floor.append(timed_run([sys.executable, "-c", "import torch"], env))
            for name in backends:
                times[name].append(timed_run([sys.executable, *command[name]], env))
        a, b = np.load(Path(tmp) / "default.npy"), np.load(Path(tmp) / "spconv.npy")
        imports = {name: import_times(command[name], env) for name in backends}
    print(f"{'':>12} {'runs (s)':>24} {'best':>7} {'median':>7}")
    for name, values in [("import torch", floor), *times.items()]:
        print(f"{name:>12} {' '.join(f'{v:6.2f}' for v in values):>24} {min(values):7.2f} "
              f"{statistics.median(values):7.2f}")
    print(f"spconv / default: best {min(times['spconv']) / min(times['default']):.2f}x, median "
          f"{statistics.median(times['spconv']) / statistics.median(times['default']):.2f}x; "
          f"max |feature difference| {np.abs(a - b).max():.2e}")
    print("cumulative import time (s) under -X importtime, one run each:")
    print(f"{'module':>32} {'default':>8} {'spconv':>8}")
    for module in WATCHED:
        cells = [f"{imports[n][module]:8.2f}" if module in imports[n] else f"{'-':>8}" for n in backends]
        print(f"{module:>32} {' '.join(cells)}")
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
