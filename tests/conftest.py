"""Shared test helpers: where the reference material lives, and small scene builders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PONDER_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "reference" / "fixtures"
KEYS = SHARED / "reference" / "keys"
PONDER = str(REPO / ".venv" / "bin" / "ponder") if (REPO / ".venv" / "bin" / "ponder").exists() else "ponder"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fixture_dir(name: str) -> Path:
    """A reference fixture folder, or skip the test with the reason."""
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"reference fixtures not found at {path} (the ../shared folder beside the repo)")
    return path


def random_room(n: int = 20000, seed: int = 0) -> dict[str, np.ndarray]:
    """A quick synthetic room-corner cloud: floor + two walls + a box, with colours and normals."""
    rng = np.random.default_rng(seed)
    parts = []
    k = n // 4
    floor = np.c_[rng.uniform(0, 3, k), rng.uniform(0, 2.5, k), np.zeros(k)]
    wall_x = np.c_[np.zeros(k), rng.uniform(0, 2.5, k), rng.uniform(0, 2.2, k)]
    wall_y = np.c_[rng.uniform(0, 3, k), np.zeros(k), rng.uniform(0, 2.2, k)]
    box = np.c_[rng.uniform(1, 1.8, n - 3 * k), rng.uniform(1, 1.6, n - 3 * k), np.full(n - 3 * k, 0.7)]
    normals = [np.tile(v, (len(p), 1)) for v, p in zip(([0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]),
                                                        (floor, wall_x, wall_y, box))]
    parts = [floor, wall_x, wall_y, box]
    colors = [np.tile(c, (len(p), 1)) + rng.integers(-10, 10, (len(p), 3))
              for c, p in zip(([120, 100, 80], [200, 200, 190], [180, 190, 200], [90, 60, 40]), parts)]
    coord = np.concatenate(parts).astype(np.float32)
    return {"coord": coord, "color": np.clip(np.concatenate(colors), 0, 255).astype(np.uint8),
            "normal": np.concatenate(normals).astype(np.float32)}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module that trains or renders: on a shared 2-core machine two threads spin-wait and
    were several times slower (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
