"""``ponder detect`` / ``ponder evaluate detect``: valid JSON in the documented box convention, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.checkpoint import save_checkpoint
from model.config import BackboneConfig, ModelConfig
from model.detection import box_corners
from model.pointcloud.cloud import PointCloud
from model.pointcloud.readers import write_point_cloud
from ponder.cli import main
from training.data.classes import DETECTION_NAMES
from training.data.synthetic import SceneConfig, generate_dataset

SMALL = BackboneConfig(base_channels=16, channels=(16, 24, 32, 48, 48, 32, 24, 24), layers=(1, 1, 1, 1, 1, 1, 1, 1))


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _checkpoint(path, detection: bool = True, **decode):
    import torch

    from model.build import build_model

    torch.manual_seed(0)
    head = {"in_channels": 24, "class_names": list(DETECTION_NAMES), "hidden_channels": 16, "num_layers": 1,
            "decode": decode}
    cfg = ModelConfig(kind="encoder", backbone=SMALL, grid_size=0.1, detection=head if detection else {})
    return save_checkpoint(build_model(cfg), cfg, path)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("det-cli")
    cfg = SceneConfig(room_x=(3.0, 3.5), room_y=(3.0, 3.5), num_frames=0, points_per_m2=300)
    generate_dataset(root, 1, seed=5, config=cfg, splits=(("val", 1.0),), progress=False)
    return root


@pytest.fixture(scope="module")
def cloud_file(scene_dir):
    scene = scene_dir / "val" / "scene0000_00"
    cloud = PointCloud(np.load(scene / "coord.npy"), np.load(scene / "color.npy"), np.load(scene / "normal.npy"))
    return write_point_cloud(cloud, scene_dir / "room.ply")


def test_detect_writes_boxes_in_the_documented_convention(tmp_path, cloud_file, capsys):
    # An untrained head with every threshold at 0 still yields boxes, enough to check the document's shape.
    ckpt = _checkpoint(tmp_path / "ckpt", seed_threshold=0.0, score_threshold=0.0, max_proposals=16)
    out = tmp_path / "out" / "boxes.json"
    assert main(["detect", str(cloud_file), "-o", str(out), "--checkpoint", str(ckpt), "--score", "0"]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "ponder-detections/1"
    assert "counter-clockwise" in doc["box_convention"] and doc["class_names"] == list(DETECTION_NAMES)
    assert doc["detections"], "thresholds of 0 must give at least one box"
    scores = [d["score"] for d in doc["detections"]]
    assert scores == sorted(scores, reverse=True)
    for d in doc["detections"]:
        assert d["label"] == DETECTION_NAMES[d["label_id"]] and all(s > 0 for s in d["size"])
        box = np.array([*d["center"], *d["size"], d["yaw"]])
        np.testing.assert_allclose(np.array(d["corners"]), box_corners(box[None])[0], atol=1e-5)
    assert "wrote" in capsys.readouterr().out


def test_default_thresholds_of_an_untrained_head_give_an_empty_but_valid_document(tmp_path, cloud_file):
    ckpt = _checkpoint(tmp_path / "ckpt")
    out = tmp_path / "boxes.json"
    assert main(["detect", str(cloud_file), "-o", str(out), "-c", str(ckpt)]) == 0
    assert json.loads(out.read_text())["detections"] == []


def test_bad_input_errors(tmp_path, cloud_file, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"not a point cloud at all")
    cases = [
        (["detect", str(tmp_path / "missing.ply"), "-o", str(tmp_path / "a.json"), "-c", str(ckpt)], "missing.ply"),
        (["detect", str(garbage), "-o", str(tmp_path / "b.json"), "-c", str(ckpt)], "garbage.ply"),
        (["detect", str(cloud_file), "-o", str(tmp_path / "c.json"), "-c", str(ckpt), "--score", "1.5"], "--score"),
        (["detect", str(cloud_file), "-o", str(tmp_path), "-c", str(ckpt)], "folder"),
        (["detect", str(cloud_file), "-o", str(tmp_path / "d.json"), "-c", str(tmp_path / "nope")], "nope"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error" in err and needle in err, err
    assert not list(tmp_path.glob("*.json"))


def test_a_checkpoint_without_a_head_is_refused(tmp_path, cloud_file, capsys):
    ckpt = _checkpoint(tmp_path / "plain", detection=False)
    assert main(["detect", str(cloud_file), "-o", str(tmp_path / "x.json"), "-c", str(ckpt)]) == 2
    assert "no 3D detection head" in capsys.readouterr().err


def test_evaluate_prints_the_ap_table(tmp_path, scene_dir, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt", seed_threshold=0.0, max_proposals=16)
    report = tmp_path / "metrics.json"
    assert main(["evaluate", "detect", "--data", str(scene_dir), "--checkpoint", str(ckpt),
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "AP@0.25" in out and "AP@0.5" in out and "mAP" in out
    summary = json.loads(report.read_text())
    assert summary["scenes"] == 1 and "mAP@0.25" in summary and sum(summary["num_gt"]) > 0
    assert main(["evaluate", "detect", "--data", str(tmp_path / "none"), "--checkpoint", str(ckpt)]) == 2


def test_up_axis_boxes_come_back_in_the_input_frame(tmp_path, cloud_file):
    """A y-up copy of the room with ``--up y`` finds the z-up room's boxes, told in the y-up frame: corners are the
    z-up corners with the axes permuted back; size, yaw and scores are unchanged."""
    from model.pointcloud.readers import read_point_cloud

    ckpt = _checkpoint(tmp_path / "ckpt", seed_threshold=0.0, score_threshold=0.0, max_proposals=16)
    room = read_point_cloud(cloud_file)
    y_up = PointCloud(room.coord[:, [1, 2, 0]], room.color, room.normal[:, [1, 2, 0]])  # up=y maps it back exactly
    y_file = write_point_cloud(y_up, tmp_path / "y_up.ply")
    z_out, y_out = tmp_path / "z.json", tmp_path / "y.json"
    assert main(["detect", str(cloud_file), "-o", str(z_out), "--checkpoint", str(ckpt), "--score", "0"]) == 0
    assert main(["detect", str(y_file), "-o", str(y_out), "--checkpoint", str(ckpt), "--score", "0",
                 "--up", "y"]) == 0
    z_doc, y_doc = json.loads(z_out.read_text()), json.loads(y_out.read_text())
    assert len(y_doc["detections"]) == len(z_doc["detections"]) > 0
    assert "up_rotation" in y_doc and "up_rotation" not in z_doc
    for z_det, y_det in zip(z_doc["detections"], y_doc["detections"]):
        assert y_det["score"] == pytest.approx(z_det["score"], abs=1e-5)
        np.testing.assert_allclose(y_det["size"], z_det["size"], atol=1e-4)
        np.testing.assert_allclose(np.array(y_det["corners"]), np.array(z_det["corners"])[:, [1, 2, 0]], atol=1e-4)
