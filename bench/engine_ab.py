"""A/B of the CPU engine against its own code at another git revision, in one process, runs alternating.

Fresh processes run minutes apart on this shared machine differ by 5-10 % (and by far more between days), which
hides the 2-5 % that most engine changes are worth. Here ``model/engine`` as of ``--base`` is loaded as a second
package next to the working tree's, both engines are built from the same weights, and they run in turns on the
same input (the order flips every round), so drift hits both alike: a null A/B (``--base HEAD`` on a clean
tree) stayed within 2-3 % (medians 0.995 and 0.972 over 8 and 4 rounds). The base's engine runs on the
working tree's other packages (model.sparse, ...), so pick a base whose engine still fits them.

    .venv/bin/python bench/engine_ab.py [--base HEAD] [--threads 2] [--cloud room|1m] [--precision fp32] [--rounds 12]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from encoder import random_segmentor, room_cloud  # bench/encoder.py: the same model, room and 1M-point cloud
from model.engine.cpu_bf16 import check_cpu_bf16
from model.engine.encoder import EngineEncoder
from model.engine.memory import reuse_freed_memory
from model.inference import Predictor

REPO = Path(__file__).resolve().parents[1]
BASE_PACKAGE = "_engine_base"
DENSITY = {"room": 1300.0, "1m": 7700.0}  # points per m² of the generated room (see bench/encoder.py)


def export_engine(revision: str, into: Path) -> None:
    """``model/engine`` at ``revision`` as the package ``into/_engine_base`` (its own imports renamed)."""
    listed = subprocess.run(["git", "ls-tree", "--name-only", revision, "model/engine/"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    package = into / BASE_PACKAGE
    package.mkdir()
    for path in listed:
        if not path.endswith(".py"):
            continue
        text = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
        text = text.replace("from model.engine import", f"from {BASE_PACKAGE} import")
        (package / Path(path).name).write_text(text.replace("model.engine.", f"{BASE_PACKAGE}."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision of the other engine (default HEAD)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cloud", choices=sorted(DENSITY), default="room")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    if args.precision == "bf16":
        try:
            check_cpu_bf16()
        except ValueError as error:
            parser.error(str(error))
    reuse_freed_memory()
    torch.set_num_threads(args.threads)

    scratch = tempfile.TemporaryDirectory(prefix="engine_ab_")
    export_engine(args.base, Path(scratch.name))
    sys.path.insert(0, scratch.name)
    base_encoder = importlib.import_module(f"{BASE_PACKAGE}.encoder").EngineEncoder

    loaded = random_segmentor()
    voxels = Predictor(loaded).prepare(room_cloud(DENSITY[args.cloud]))
    work, base = "work tree", f"base {args.base}"
    encoders = {work: EngineEncoder.from_loaded(loaded, "cpu", precision=args.precision),
                base: base_encoder.from_loaded(loaded, "cpu", precision=args.precision)}
    outputs = {name: enc.encode([voxels], None)[0] for name, enc in encoders.items()}  # also the warm-up
    scale = float(np.abs(outputs[base]).max()) or 1.0
    print(f"{args.cloud}: {voxels.num_voxels:,} voxels, {args.threads} threads, {args.precision}; "
          f"max|work tree - base| / max = {float(np.abs(outputs[work] - outputs[base]).max()) / scale:.1e}")

    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    order = list(encoders.items())
    for round_ in range(args.rounds):
        for name, enc in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            enc.encode([voxels], None)
            seconds[name].append(time.perf_counter() - start)
        print(f"\rround {round_ + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for name, times in seconds.items():
        print(f"{name:<24} min {min(times):.3f} s  median {statistics.median(times):.3f} s")
    new, old = seconds[work], seconds[base]
    print(f"base / work tree: median {statistics.median(old) / statistics.median(new):.3f}, "
          f"min {min(old) / min(new):.3f} (> 1: the work tree is faster; a null A/B stayed within ~0.97-1.03)")
    scratch.cleanup()


if __name__ == "__main__":
    main()
