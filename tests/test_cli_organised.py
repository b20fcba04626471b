"""An organised (Kinect/stereo-style) PCD through the CLI: holes are dropped, outputs keep H x W (issue 12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_room

HEIGHT, WIDTH = 48, 64


def _write_organised_pcd(path: Path, holes: np.ndarray) -> np.ndarray:
    """A binary PCD with WIDTH x HEIGHT points and a packed float ``rgb`` field, as PCL writes a depth camera's
    frame; rows in ``holes`` are NaN (pixels without depth). Returns the (H*W, 3) coordinates written."""
    room = random_room(HEIGHT * WIDTH, seed=5)
    xyz = room["coord"].astype(np.float32)
    xyz[holes] = np.nan
    rgb = room["color"].clip(0, 255).astype(np.uint32)
    packed = ((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]).view(np.float32)
    rows = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
    rows["x"], rows["y"], rows["z"], rows["rgb"] = xyz[:, 0], xyz[:, 1], xyz[:, 2], packed
    header = (f"VERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\nWIDTH {WIDTH}\n"
              f"HEIGHT {HEIGHT}\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(xyz)}\nDATA binary\n").encode()
    path.write_bytes(header + rows.tobytes())
    return xyz


@pytest.fixture(scope="module")
def organised(tmp_path_factory) -> tuple[Path, np.ndarray]:
    holes = np.zeros(HEIGHT * WIDTH, bool)
    holes[np.random.default_rng(1).choice(HEIGHT * WIDTH, 700, replace=False)] = True
    holes[:WIDTH] = True  # a whole image row without depth, as at a sensor's edge
    path = tmp_path_factory.mktemp("kinect") / "frame.pcd"
    _write_organised_pcd(path, holes)
    return path, holes.reshape(HEIGHT, WIDTH)


def test_features_of_an_organised_pcd_keep_height_by_width(tmp_path: Path, organised, capsys) -> None:
    from ponder.cli import main

    path, holes = organised
    out = tmp_path / "features.npy"
    assert main(["features", str(path), "-o", str(out)]) == 0
    assert "dropped" in capsys.readouterr().err  # the warning names what happened to the holes
    features = np.load(out, allow_pickle=False)
    assert features.shape[:2] == (HEIGHT, WIDTH) and features.ndim == 3
    assert np.isnan(features[holes]).all()
    assert np.isfinite(features[~holes]).all()


def test_segment_of_an_organised_pcd_keeps_height_by_width(tmp_path: Path, organised) -> None:
    from ponder.cli import main

    path, holes = organised
    out = tmp_path / "labels.npz"
    assert main(["segment", str(path), "-o", str(out)]) == 0
    result = np.load(out, allow_pickle=False)
    labels, logits = result["labels"], result["logits"]
    assert labels.shape == (HEIGHT, WIDTH) and logits.shape[:2] == (HEIGHT, WIDTH)
    assert (labels[holes] == -1).all() and (labels[~holes] >= 0).all()
    assert np.isnan(logits[holes]).all() and np.isfinite(logits[~holes]).all()
    assert labels[~holes].max() < len(result["class_names"])


def test_strict_refuses_an_organised_pcd_with_holes(tmp_path: Path, organised, capsys) -> None:
    from ponder.cli import main

    path, _ = organised
    assert main(["features", str(path), "-o", str(tmp_path / "f.npy"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "Traceback" not in err
    assert not (tmp_path / "f.npy").exists()
