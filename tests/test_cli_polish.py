"""New-user polish of the CLI: one-line errors with exit 2, and files people can open (issue 12)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PONDER = [sys.executable, "-m", "ponder.cli"]


def ponder(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*PONDER, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def ponder_inprocess(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same entry point in this process (quicker than a subprocess for errors found before any model)."""
    from ponder.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("content", [b"hello world\n", bytes(range(256)) * 3, b"\x80\x02" + b"\x00" * 64,
                                     b"PK\x03\x04not really a zip"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_not_a_checkpoint_is_one_line(tmp_path: Path, capsys, content: bytes, command: str) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    extra = ["-o", str(tmp_path / "out")] if command == "convert" else []
    assert_one_line_error(ponder_inprocess(capsys, command, bad, *extra), str(bad))
    assert not (tmp_path / "out").exists()


def test_serve_missing_checkpoint_and_empty_models(tmp_path: Path) -> None:
    assert_one_line_error(ponder("serve", "--checkpoint", tmp_path / "missing.pth", "--port", "1"),
                          "missing.pth", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(ponder("serve", "--models", tmp_path / "empty", "--port", "1"), "holds no checkpoint")
    assert_one_line_error(ponder("serve", "--models", tmp_path / "nowhere", "--port", "1"), "does not exist")


def test_serve_busy_port_says_so_before_announcing() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = ponder("serve", "--port", port)
    assert_one_line_error(result, f"port {port} is in use")
    assert "serving at" not in result.stdout


# --- files people can open -------------------------------------------------------------------------------------------

def test_segment_colored_ply_matches_the_npz(tmp_path: Path, capsys) -> None:
    from plyfile import PlyData

    from conftest_service import SPUNET, require_fixtures, scene
    from model.pointcloud.palette import palette
    from model.pointcloud.readers import write_point_cloud
    from ponder.cli import main

    require_fixtures()
    cloud = write_point_cloud(scene(3000, seed=1), tmp_path / "room.ply")
    out, colored = tmp_path / "labels.npz", tmp_path / "view" / "colored.ply"
    assert main(["segment", str(cloud), "-o", str(out), "--checkpoint", str(SPUNET), "--colored", str(colored)]) == 0
    result = np.load(out, allow_pickle=False)
    vertex = PlyData.read(str(colored))["vertex"]
    assert vertex.count == 3000
    np.testing.assert_array_equal(vertex["label"], result["labels"])
    np.testing.assert_allclose(np.stack([vertex["x"], vertex["y"], vertex["z"]], 1), scene(3000, seed=1).coord)
    rgb = np.stack([vertex["red"], vertex["green"], vertex["blue"]], 1)
    np.testing.assert_array_equal(rgb, palette(len(result["class_names"]))[result["labels"]])


def test_palette_is_distinct_and_stable() -> None:
    from model.pointcloud.palette import palette

    big = palette(200)
    assert big.shape == (200, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(palette(13), big[:13])
    assert len({tuple(c) for c in big[:20]}) == 20


@pytest.fixture(scope="module")
def synthetic_scene(tmp_path_factory) -> Path:
    """One small synthetic room as a Pointcept-style scene folder (coord.npy, color.npy, normal.npy, ...)."""
    from training.data.synthetic import SceneConfig, generate_dataset

    root = tmp_path_factory.mktemp("polish-scene")
    cfg = SceneConfig(room_x=(3.0, 3.5), room_y=(3.0, 3.5), num_frames=0, points_per_m2=200)
    generate_dataset(root, 1, seed=3, config=cfg, splits=(("val", 1.0),), progress=False)
    return root / "val" / "scene0000_00"


def _detection_checkpoint(path: Path) -> Path:
    import torch

    from model.build import build_model
    from model.checkpoint import save_checkpoint
    from model.config import BackboneConfig, ModelConfig
    from training.data.classes import DETECTION_NAMES

    torch.manual_seed(0)
    small = BackboneConfig(base_channels=16, channels=(16, 24, 32, 48, 48, 32, 24, 24), layers=(1,) * 8)
    head = {"in_channels": 24, "class_names": list(DETECTION_NAMES), "hidden_channels": 16, "num_layers": 1,
            "decode": {"seed_threshold": 0.0, "score_threshold": 0.0, "max_proposals": 8}}
    cfg = ModelConfig(kind="encoder", backbone=small, grid_size=0.1, detection=head)
    return save_checkpoint(build_model(cfg), cfg, path)


def test_detect_ply_wireframes_match_the_json(tmp_path: Path, synthetic_scene: Path, capsys) -> None:
    import json

    from plyfile import PlyData

    from model.pointcloud.cloud import PointCloud
    from model.pointcloud.palette import BOX_EDGES, palette
    from model.pointcloud.readers import write_point_cloud
    from ponder.cli import main

    cloud = PointCloud(np.load(synthetic_scene / "coord.npy"), np.load(synthetic_scene / "color.npy"))
    room = write_point_cloud(cloud, tmp_path / "room.ply")
    ckpt = _detection_checkpoint(tmp_path / "ckpt")
    out, ply = tmp_path / "boxes.json", tmp_path / "boxes.ply"
    assert main(["detect", str(room), "-o", str(out), "--checkpoint", str(ckpt), "--score", "0",
                 "--ply", str(ply)]) == 0
    doc = json.loads(out.read_text())
    k = len(doc["detections"])
    assert k > 0
    data = PlyData.read(str(ply))
    vertex, edge = data["vertex"], data["edge"]
    assert vertex.count == 8 * k and edge.count == 12 * k
    corners = np.stack([vertex["x"], vertex["y"], vertex["z"]], 1).reshape(k, 8, 3)
    np.testing.assert_allclose(corners, [d["corners"] for d in doc["detections"]], atol=1e-5)
    labels = np.array([d["label_id"] for d in doc["detections"]])
    np.testing.assert_array_equal(vertex["label"].reshape(k, 8), np.repeat(labels[:, None], 8, 1))
    pairs = np.stack([edge["vertex1"], edge["vertex2"]], 1).reshape(k, 12, 2)
    np.testing.assert_array_equal(pairs - 8 * np.arange(k)[:, None, None], np.broadcast_to(BOX_EDGES, (k, 12, 2)))
    edge_rgb = np.stack([edge["red"], edge["green"], edge["blue"]], 1).reshape(k, 12, 3)
    np.testing.assert_array_equal(edge_rgb[:, 0], palette(len(doc["class_names"]))[labels])
    # every edge joins two corners that differ along exactly one box axis: a real wireframe, not a diagonal
    lengths = np.linalg.norm(corners[np.arange(k)[:, None], pairs[..., 0] - 8 * np.arange(k)[:, None]]
                             - corners[np.arange(k)[:, None], pairs[..., 1] - 8 * np.arange(k)[:, None]], axis=-1)
    sizes = np.array([d["size"] for d in doc["detections"]])
    np.testing.assert_allclose(np.sort(lengths, 1), np.sort(np.repeat(sizes, 4, 1), 1), rtol=1e-4, atol=1e-5)


# --- inputs people have: Pointcept scene folders ---------------------------------------------------------------------

def test_scene_folder_reads_as_one_scene(synthetic_scene: Path) -> None:
    from model.pointcloud.readers import read_point_cloud

    cloud = read_point_cloud(synthetic_scene)
    np.testing.assert_array_equal(cloud.coord, np.load(synthetic_scene / "coord.npy").astype(np.float32))
    np.testing.assert_array_equal(cloud.color, np.load(synthetic_scene / "color.npy"))
    assert cloud.normal is not None and len(cloud.normal) == len(cloud)


def test_scene_folder_errors_are_clear(tmp_path: Path, synthetic_scene: Path) -> None:
    from model.pointcloud.cloud import PointCloudError, PointCloudTooLarge
    from model.pointcloud.formats.limits import ReadLimits
    from model.pointcloud.readers import read_point_cloud

    coord = np.load(synthetic_scene / "coord.npy")
    cases = {"nothing": {}, "rows": {"coord": coord, "color": np.zeros((5, 3), np.uint8)},
             "shape": {"coord": coord[:, :2]}, "objects": {"coord": np.array([None] * 6).reshape(2, 3)}}
    needles = {"nothing": "without coord.npy", "rows": "has 5 rows", "shape": "shape (N, 3)",
               "objects": "pickled data is refused"}
    for case, arrays in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        for key, value in arrays.items():
            np.save(folder / f"{key}.npy", value, allow_pickle=True)
        with pytest.raises(PointCloudError, match=re.escape(needles[case])):
            read_point_cloud(folder)
    with pytest.raises(PointCloudTooLarge, match="limit"):
        read_point_cloud(synthetic_scene, limits=ReadLimits(max_points=100))


def test_features_and_detect_take_a_scene_folder(tmp_path: Path, synthetic_scene: Path, capsys) -> None:
    import json

    from ponder.cli import main

    ckpt = _detection_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "features.npy"
    assert main(["features", str(synthetic_scene), "-o", str(out), "--checkpoint", str(ckpt)]) == 0
    assert np.load(out).shape[0] == len(np.load(synthetic_scene / "coord.npy"))
    assert main(["detect", str(synthetic_scene), "-o", str(tmp_path / "b.json"), "--checkpoint", str(ckpt)]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["format"] == "ponder-detections/1"
    assert main(["features", str(tmp_path), "-o", str(out), "--checkpoint", str(ckpt)]) == 2
    assert "without coord.npy" in capsys.readouterr().err


def test_serve_refuses_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint\n")
    assert_one_line_error(ponder("serve", "--checkpoint", bad, "--port", "1"), "notes.pth", "not a PyTorch checkpoint")


def test_one_camera_file_reader_for_render_and_images(tmp_path: Path, capsys) -> None:
    """``model.render.cameras.read_cameras`` reads our camera JSON and transforms.json for ``ponder render`` and
    the image branch alike; its errors are one line (exit 2) in both commands."""
    from model.images.errors import ImageInputError
    from model.images.inputs import read_image_folder
    from model.render.cameras import CameraError, camera_image_names, read_camera_document, read_cameras

    ours = tmp_path / "cams.json"
    K = [[20.0, 0, 15.5], [0, 20.0, 11.5], [0, 0, 1]]
    pose = np.eye(4).tolist()
    ours.write_text(json.dumps({"cameras": [
        {"width": 32, "height": 24, "K": K, "world_to_camera": pose, "image": "a.png"},
        {"width": 32, "height": 24, "fx": 20, "fy": 20, "cx": 15.5, "cy": 11.5, "camera_to_world": pose}]}))
    cameras = read_cameras(ours)
    assert len(cameras) == 2 and np.allclose(cameras[0].K, cameras[1].K) and np.allclose(cameras[0].w2c, np.eye(4))
    assert camera_image_names(read_camera_document(ours)) == ["a.png", None]
    transforms = tmp_path / "transforms.json"
    transforms.write_text('{"fl_x": 20, "fl_y": 20, "cx": 16, "cy": 12, "w": 32, "h": 24, "frames": '
                          '[{"file_path": "images/0.png", "transform_matrix": [[1,0,0,0],[0,1,0,0],[0,0,1,2],[0,0,0,1]]}]}')
    (camera,) = read_cameras(transforms)
    assert np.allclose(camera.c2w[:3, 3], [0, 0, 2]) and camera.width == 32
    assert camera_image_names(read_camera_document(transforms)) == ["images/0.png"]

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CameraError, match="broken.json: not valid JSON"):
        read_cameras(broken)
    with pytest.raises(FileNotFoundError, match="no such cameras file"):
        read_cameras(tmp_path / "missing.json")
    (tmp_path / "images").mkdir()
    with pytest.raises(ImageInputError, match="broken.json: not valid JSON"):  # the image branch, same reader
        read_image_folder(tmp_path / "images", broken)
    cloud = tmp_path / "cloud.xyz"
    cloud.write_text("0 0 0\n1 0 0\n0 1 0\n")
    assert_one_line_error(ponder_inprocess(capsys, "render", cloud, "--cameras", broken, "-o", tmp_path / "out"),
                          "broken.json", "not valid JSON")


def test_images_refuses_too_many_input_pixels_before_decoding(tmp_path, capsys):
    """Sizes come from the headers: views over --max-input-pixels in all, or a header claiming a decompression bomb,
    are one-line errors before any pixel is decoded (the image models hold ~90 bytes per input pixel)."""
    from PIL import Image

    folder = tmp_path / "views"
    folder.mkdir()
    K = [[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]]
    cameras = [{"width": 64, "height": 48, "K": K, "camera_to_world": np.eye(4).tolist(), "image": f"{i}.png"}
               for i in range(3)]
    for i in range(3):
        Image.new("RGB", (64, 48), (i * 60, 80, 120)).save(folder / f"{i}.png")
    (tmp_path / "cams.json").write_text(json.dumps({"cameras": cameras}))
    result = ponder_inprocess(capsys, "images", "features", "--images", folder, "--cameras", tmp_path / "cams.json",
                              "-o", tmp_path / "f.npz", "--max-input-pixels", 9000)
    assert_one_line_error(result, "9,216 pixels in all", "--max-input-pixels 9,000")
    assert not (tmp_path / "f.npz").exists()
    bomb = Image.new("1", (20000, 10000))  # 200 MP in a few kB: over Pillow's bomb limit from its header
    bomb.save(folder / "1.png")
    result = ponder_inprocess(capsys, "images", "features", "--images", folder, "--cameras", tmp_path / "cams.json",
                              "-o", tmp_path / "f.npz")
    assert_one_line_error(result, "1.png: not a readable image", "decompression bomb")
