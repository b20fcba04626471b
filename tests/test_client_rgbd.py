"""PonderClient.render with camera files and PonderClient.rgbd against a real gateway started with
``ponder serve`` (the bundled default model, which has a render part)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest_service import PYTHON, Server, free_port, look_at, png_bytes, render_planes, scene
from service.client import PonderClient, cameras_json

K = np.array([[60.0, 0, 40.0], [0, 60.0, 30.0], [0, 0, 1]])
EYES = (np.array([0.5, -1.0, 1.5]), np.array([0.3, 1.2, 1.2]))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    folder = tmp_path_factory.mktemp("client-logs")
    command = [PYTHON, "-m", "ponder.cli", "serve", "--port", str(port)]
    env = {"PONDER_TORCH_THREADS": "2", "PONDER_MAX_JSON_VALUES": "100000"}  # a normal room is over it
    gateway = Server(command, env, "/readyz", port, folder / "gateway.log")
    try:
        yield gateway.wait_ready(240)
    finally:
        gateway.stop()
    assert f"serving at http://127.0.0.1:{port}" in gateway.log.read_text()  # announced after the bind


def _views():
    depth, color, cameras = [], [], []
    for eye in EYES:
        pose = look_at(eye, np.array([1.5, 0.0, 0.3]))
        d, c = render_planes(K, pose, 80, 60)
        depth.append(d)
        color.append(c)
        cameras.append({"K": K.tolist(), "world_to_camera": np.linalg.inv(pose).tolist()})
    return depth, color, cameras


def test_cameras_json_takes_paths_and_text(tmp_path: Path) -> None:
    doc = [{"K": K.tolist(), "world_to_camera": np.eye(4).tolist(), "width": 8, "height": 6}]
    path = tmp_path / "cams.json"
    path.write_text(json.dumps(doc))
    assert json.loads(cameras_json(str(path))) == doc == json.loads(cameras_json(path))
    assert json.loads(cameras_json(json.dumps(doc))) == doc
    with pytest.raises(FileNotFoundError, match="camera file"):
        cameras_json(str(tmp_path / "missing.json"))


def test_render_with_a_camera_file(server, tmp_path: Path) -> None:
    from model.render.cameras import Camera

    pose = look_at(np.array([0.0, 0.0, 1.5]), np.array([1.0, 0.0, 0.5]))
    camera = Camera(K=np.array([[20.0, 0, 16], [0, 20.0, 12], [0, 0, 1]]), w2c=np.linalg.inv(pose), width=32,
                    height=24)
    path = tmp_path / "cameras.json"
    path.write_text(json.dumps([camera.to_dict()]))
    with PonderClient(server.url, timeout=240) as client:
        from_file = client.render(scene(2000), str(path), model="default-render")
        from_objects = client.render(scene(2000), [camera], model="default-render")
    assert len(from_file) == 1 and from_file[0].color.shape[:2] == (24, 32)
    np.testing.assert_array_equal(from_file[0].color, from_objects[0].color)
    np.testing.assert_array_equal(from_file[0].depth, from_objects[0].depth)


def test_rgbd_features_and_segment_match_the_multipart_route(server, tmp_path: Path) -> None:
    depth, color, cameras = _views()
    files = {f"depth_{i}": (f"d{i}.png", png_bytes(d), "image/png") for i, d in enumerate(depth)}
    files.update({f"color_{i}": (f"c{i}.png", png_bytes(c), "image/png") for i, c in enumerate(color)})
    files["cameras"] = ("cameras.json", json.dumps({"views": cameras}).encode(), "application/json")
    raw = httpx.post(server.url + "/v1/features", files=files, headers={"Accept": "application/x-npy"}, timeout=240)
    assert raw.status_code == 200, raw.text
    expected = np.load(__import__("io").BytesIO(raw.content), allow_pickle=False)
    camera_file = tmp_path / "cams.json"
    camera_file.write_text(json.dumps({"views": cameras}))
    depth_files = []
    for i, d in enumerate(depth):
        depth_files.append(tmp_path / f"depth{i}.png")
        depth_files[-1].write_bytes(png_bytes(d))
    with PonderClient(server.url, timeout=240) as client:
        features = client.rgbd(depth, cameras, color=color)          # arrays + dicts
        from_files = client.rgbd(depth_files, camera_file, color={str(i): c for i, c in enumerate(color)})
        labels = client.rgbd(depth, json.dumps({"views": cameras}), color=color, task="segment")
        with pytest.raises(ValueError, match="task"):
            client.rgbd(depth, cameras, task="detect")
    np.testing.assert_array_equal(features, expected)
    np.testing.assert_array_equal(from_files, expected)
    assert labels.labels.shape == (len(expected),) and labels.class_names


# --- curl's default Accept (*/*) on a normal room ------------------------------------------------------------

def test_wildcard_accept_gets_binary_when_json_is_too_large(server) -> None:
    import io

    from conftest_service import npz_bytes

    room = npz_bytes(scene())
    url = server.url + "/v1/features"
    for accept in ("*/*", "text/html, application/*;q=0.8"):
        one = httpx.post(url, content=room, headers={"Accept": accept, "Content-Type": "application/x-npz"},
                         timeout=240)
        assert one.status_code == 200, one.text
        assert one.headers["content-type"] == "application/x-npy"
        hint = one.headers["x-ponder-hint"]  # names the formats that can carry it, and why not JSON
        assert "PONDER_MAX_JSON_VALUES" in hint and "application/json" not in hint.split("choose with Accept:")[1]
        assert np.load(io.BytesIO(one.content), allow_pickle=False).shape[0] == len(scene())
    several = httpx.post(url, content=room, params={"output": "per_voxel"}, timeout=240,
                         headers={"Accept": "*/*", "Content-Type": "application/x-npz"})
    assert several.status_code == 200 and several.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(several.content), allow_pickle=False) as archive:
        assert {"features", "point_to_voxel"} <= set(archive.files)
    explicit = httpx.post(url, content=room, timeout=240,
                          headers={"Accept": "application/json", "Content-Type": "application/x-npz"})
    assert explicit.status_code == 406 and "PONDER_MAX_JSON_VALUES" in explicit.json()["detail"]
    small = httpx.post(url, content=npz_bytes(scene(20)), timeout=240,
                       headers={"Accept": "*/*", "Content-Type": "application/x-npz"})
    assert small.status_code == 200 and small.headers["content-type"].startswith("application/json")
    assert "x-ponder-hint" not in small.headers


def test_no_accept_negotiates_like_a_wildcard() -> None:
    from service.encoding import OutputFormat, Payload, encode, negotiate

    assert negotiate(None) is negotiate("*/*") is OutputFormat.AUTO
    assert negotiate("application/json") is OutputFormat.JSON
    big = Payload(arrays={"labels": np.zeros(50, np.int32)})
    response = encode(big, negotiate(None), 10)
    assert response.media_type == "application/x-npy" and "x-ponder-hint" in response.headers
    assert encode(big, negotiate(""), 100).media_type == "application/json"


def test_client_passes_up_axis_and_invalid_policy(server) -> None:
    """A y-up copy of a room segmented with ``up="y"`` gets the z-up room's labels; a NaN row is dropped
    (label -1) by default and refused with ``invalid="error"``."""
    from model.pointcloud.cloud import PointCloud

    room = scene(4000)
    y_up = room.coord[:, [1, 2, 0]]  # the y-up frame whose named rotation (x<-z, y<-x, z<-y) gives the room back
    y_normal = room.normal[:, [1, 2, 0]]
    with PonderClient(server.url, timeout=240) as client:
        expected = client.segment(room).labels
        rotated = client.segment(PointCloud(coord=y_up, color=room.color, normal=y_normal, source="y-up"), up="y")
        np.testing.assert_array_equal(rotated.labels, expected)
        holed = room.coord.copy()
        holed[5] = np.nan
        cloud = PointCloud(coord=holed, color=room.color, normal=room.normal, source="holed")
        labels = client.segment(cloud).labels
        assert labels[5] == -1 and len(labels) == len(holed)
        with pytest.raises(Exception, match="(?i)nan|invalid|finite"):
            client.segment(cloud, invalid="error")
