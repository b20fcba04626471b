"""Hostile camera documents: malformed or numerically extreme cameras get 422 naming the field from every route
that takes cameras (a real uvicorn gateway on the bundled models: /v1/render with a point cloud or with posed
images and 'novel' cameras, /v1/features and /v1/segment with posted images, RGB-D views), never a 500 from the
JSON decoder or from the renderer's float32 maths; the 1024-camera limit covers the 'novel' part; and
``ponder render`` refuses oversized views, a file as its output folder and a folder as its cameras file with
exit 2 before any model work, and drops NaN points with a warning unless ``--strict``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_room  # noqa: E402
from conftest_service import gateway, look_at, png_bytes, render_planes  # noqa: E402

from model.images import ImageInputError, parse_bounds  # noqa: E402
from model.render.cameras import CameraError, cameras_from_document, load_camera_json  # noqa: E402
from service.rgbd import RGBDError, parse_cameras as parse_rgbd_cameras  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

I4 = np.eye(4).tolist()
BIG_INT = "1" + "0" * 4999  # more digits than Python's int <-> str limit: json.loads raises a plain ValueError
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads
W, H = 40, 30
K = [[32.0, 0.0, (W - 1) / 2], [0.0, 32.0, (H - 1) / 2], [0.0, 0.0, 1.0]]
BOUNDS = [[0.0, -1.5, 0.0], [2.2, 1.5, 1.5]]


def camera(**changes) -> dict:
    cam = {"width": 4, "height": 3, "fx": 3.0, "fy": 3.0, "cx": 1.5, "cy": 1.0, "world_to_camera": I4}
    return {**cam, **changes}


def translated(offset: float) -> list[list[float]]:
    pose = np.eye(4)
    pose[:3, 3] = offset
    return pose.tolist()


def nerfstudio(**top) -> str:
    return json.dumps({"w": 16, "h": 12, "fl_x": 10.0, **top, "frames": [{"transform_matrix": I4}]})


# name -> (cameras JSON text, text the error must contain)
RENDER_CASES = {
    "width NaN": (json.dumps(camera(width=float("nan"))), "'width'"),
    "width 1e400": (json.dumps(camera()).replace('"width": 4', '"width": 1e400'), "'width'"),
    "5000-digit integer": (json.dumps(camera()).replace('"fx": 3.0', f'"fx": {BIG_INT}'), "not valid JSON"),
    "nesting 100000 deep": (DEEP, "not valid JSON"),
    "nerfstudio camera_angle_x 0": (json.dumps({"w": 16, "h": 12, "camera_angle_x": 0,
                                                "frames": [{"transform_matrix": I4}]}), "camera_angle_x"),
    "nerfstudio k1 'abc'": (nerfstudio(k1="abc"), "'k1'"),
    "nerfstudio k1 [1]": (nerfstudio(k1=[1]), "'k1'"),
    "nerfstudio w 1e400": (nerfstudio(w=16).replace('"w": 16', '"w": 1e400'), "'w'"),
    "fx 1e-300": (json.dumps(camera(fx=1e-300)), "'fx'"),
    "translated by 1e300": (json.dumps(camera(world_to_camera=translated(1e300))), "translation"),
    "camera_to_world translated by 1e9": (json.dumps({**{k: v for k, v in camera().items() if k != "world_to_camera"},
                                                      "camera_to_world": translated(1e9)}), "translation"),
}


# ------------------------------------------------------------------------------------------ parsers (fast)


@pytest.mark.parametrize("case", sorted(RENDER_CASES))
def test_every_bad_camera_document_is_a_camera_error_naming_the_field(case):
    text, message = RENDER_CASES[case]
    with pytest.raises(CameraError, match=message.replace("[", r"\[")):
        cameras_from_document(load_camera_json(text))


def test_numbers_at_the_documented_limits_are_accepted():
    edge = camera(fx=1e-3, fy=1e7, cx=-1e7, cy=1e7, world_to_camera=translated(1e8))  # 1e8 m: UTM and ECEF fit
    (cam,) = cameras_from_document(load_camera_json(json.dumps(edge)))
    assert cam.K[0, 0] == 1e-3 and cam.w2c[0, 3] == 1e8
    for bad in (camera(fx=9e-4), camera(fy=1.1e7), camera(cx=-1.1e7), camera(world_to_camera=translated(1.1e8))):
        with pytest.raises(CameraError):
            cameras_from_document(bad)


def test_bounds_and_rgbd_cameras_share_the_limits():
    with pytest.raises(ImageInputError, match="within"):
        parse_bounds([[-1e300] * 3, [1e300] * 3])
    with pytest.raises(ImageInputError, match="longest side"):
        parse_bounds([[0, 0, 0], [1e-9, 1e-9, 1e-9]])
    assert parse_bounds(BOUNDS).shape == (2, 3)
    for text, message in ((DEEP, "not valid JSON"), ('{"0": {"fx": %s, "fy": 1, "cx": 1, "cy": 1}}' % BIG_INT,
                                                     "not valid JSON"),
                          (json.dumps({"0": {"fx": 1e-300, "fy": 1, "cx": 1, "cy": 1}}), "'fx'"),
                          (json.dumps({"depth_scale": 1e400, "0": {"fx": 1, "fy": 1, "cx": 1, "cy": 1}}
                                      ).replace("Infinity", "1e400"), "depth_scale")):
        with pytest.raises(RGBDError, match=message):
            parse_rgbd_cameras(text)


# ------------------------------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def server():
    with gateway({"PONDER_TORCH_THREADS": "1"}) as running:
        yield running


def npz_cloud(n: int = 2000) -> bytes:
    import io

    room = random_room(n)
    buffer = io.BytesIO()
    np.savez(buffer, coord=room["coord"], color=room["color"], normal=room["normal"])
    return buffer.getvalue()


def image_views(n: int = 3) -> tuple[list[bytes], list[dict]]:
    """Colour views of the analytic test room and their cameras (as tests/test_images_service.py)."""
    target = np.array([1.5, 0.0, 0.4])
    eyes = [np.array([0.2, -1.2, 1.3]), np.array([0.1, 1.1, 1.2]), np.array([-0.4, 0.0, 1.4])]
    images, cams = [], []
    for i in range(n):
        pose = look_at(eyes[i], target)
        _, color = render_planes(np.asarray(K), pose, W, H)
        images.append(png_bytes(color))
        cams.append({"image": str(i), "width": W, "height": H, "K": K, "camera_to_world": pose.tolist()})
    return images, cams


def post_images(server, route: str, cameras_text: str, novel_text: str | None = None) -> httpx.Response:
    images, _ = image_views()
    files = [(f"image_{i}", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    files.append(("cameras", ("cameras.json", cameras_text.encode(), "application/json")))
    if novel_text is not None:
        files.append(("novel", ("novel.json", novel_text.encode(), "application/json")))
    accept = "application/zip" if route == "/v1/render" else "application/x-npz"
    return httpx.post(server.url + route, files=files, headers={"Accept": accept}, timeout=300)


def assert_problem(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/problem+json")
    assert message in response.json()["detail"], response.json()["detail"]


def test_render_cameras_get_422_naming_the_problem(server):
    cloud = npz_cloud()
    for case, (text, message) in RENDER_CASES.items():
        response = httpx.post(server.url + "/v1/render", files={"file": ("room.npz", cloud)},
                              data={"cameras": text}, timeout=120)
        assert_problem(response, 422, message)
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def image_cameras_cases() -> dict[str, tuple[str, str]]:
    _, cams = image_views()

    def doc(**change) -> str:
        changed = [dict(c) for c in cams]
        changed[1].update(change)
        return json.dumps({"cameras": changed, "bounds": BOUNDS})

    frames = [{"file_path": f"{c['image']}.png",
               "transform_matrix": (np.asarray(c["camera_to_world"]) @ np.diag([1.0, -1, -1, 1])).tolist()}
              for c in cams]
    return {
        "width NaN": (doc(width=float("nan")), "'width'"),
        "width inf": (doc(width=float("inf")), "'width'"),
        "nerfstudio camera_angle_x 0": (json.dumps({"w": W, "h": H, "camera_angle_x": 0, "frames": frames}),
                                        "camera_angle_x"),
        "bounds of 1e300": (json.dumps({"cameras": cams, "bounds": [[-1e300] * 3, [1e300] * 3]}), "bounds"),
        "camera translated by 1e300": (doc(camera_to_world=translated(1e300)), "translation"),
        "camera with fx 1e-300 (frusta reach 1e300 m)": (json.dumps({"cameras": [
            {**c, "K": [[1e-300, 0, 19.5], [0, 1e-300, 14.5], [0, 0, 1]]} for c in cams]}), "'fx'"),
        "5000-digit integer": (doc(width=0).replace('"width": 0', f'"width": {BIG_INT}'), "not valid JSON"),
    }


@pytest.mark.parametrize("route", ["/v1/features", "/v1/segment"])
def test_image_upload_cameras_get_422(server, route):
    for case, (text, message) in image_cameras_cases().items():
        assert_problem(post_images(server, route, text), 422, message)


def test_novel_cameras_get_422(server):
    _, cams = image_views()
    cameras_text = json.dumps({"cameras": cams, "bounds": BOUNDS})
    for text, message in ((json.dumps(camera(width=float("nan"))), "'width'"),
                          (json.dumps({"w": 16, "h": 12, "camera_angle_x": 0, "frames": [{"transform_matrix": I4}]}),
                           "camera_angle_x"),
                          (json.dumps(camera(fx=1e-300)), "'fx'"),
                          (DEEP, "not valid JSON")):
        assert_problem(post_images(server, "/v1/render", cameras_text, text), 422, message)


def test_novel_cameras_obey_the_1024_camera_limit(server):
    _, cams = image_views()
    cameras_text = json.dumps({"cameras": cams, "bounds": BOUNDS})
    many = json.dumps([camera(width=1, height=1, cx=0.0, cy=0.0)] * 1500)
    assert_problem(post_images(server, "/v1/render", cameras_text, many), 413, "1500 cameras exceed the limit of 1024")


def test_resized_cameras_leaving_the_limits_get_422(server):
    # ?width= shrinking a camera's focal length below the limit is the client's error too
    tiny = json.dumps(camera(width=1000, height=1000, fx=2e-3, fy=2e-3, cx=500.0, cy=500.0))
    response = httpx.post(server.url + "/v1/render", params={"width": 1}, files={"file": ("room.npz", npz_cloud())},
                          data={"cameras": tiny}, timeout=120)
    assert_problem(response, 422, "'fx'")


def test_rgbd_cameras_get_422(server):
    depth = png_bytes(np.full((12, 16), 1500, np.uint16))
    for text, message in ((DEEP, "not valid JSON"),
                          ('{"0": {"fx": %s, "fy": 10, "cx": 8, "cy": 6}}' % BIG_INT, "not valid JSON"),
                          (json.dumps({"0": {"fx": 1e-300, "fy": 10, "cx": 8, "cy": 6}}), "'fx'")):
        response = httpx.post(server.url + "/v1/features", files={"depth_0": ("d.png", depth, "image/png"),
                                                                  "cameras": ("c.json", text.encode())},
                              headers={"Accept": "application/x-npz"}, timeout=120)
        assert_problem(response, 422, message)


# ------------------------------------------------------------------------------------------ ponder render


def run_cli(capsys, *argv) -> tuple[int, str]:
    from ponder.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def room_ply(tmp_path):
    from model.pointcloud.cloud import PointCloud
    from model.pointcloud.readers import write_point_cloud

    room = random_room(3000)
    return write_point_cloud(PointCloud(room["coord"], room["color"], room["normal"]), tmp_path / "room.ply")


def test_render_cli_refuses_before_any_model_work(tmp_path, capsys, room_ply, monkeypatch):
    import model.checkpoint

    def no_model(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the input was refused")

    monkeypatch.setattr(model.checkpoint, "load_checkpoint", no_model)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps(camera(width=100000, height=100000, cx=5e4, cy=5e4)))
    small = tmp_path / "small.json"
    small.write_text(json.dumps(camera()))
    existing = tmp_path / "taken.txt"
    existing.write_text("not a folder")
    for argv, message in (
            (["--cameras", huge, "-o", tmp_path / "o"], "10000000000 pixels in all exceed the limit of 4194304"),
            (["--cameras", small, "-o", tmp_path / "o", "--max-pixels", "9"], "12 pixels in all exceed the limit of 9"),
            (["--cameras", small, "-o", existing], "exists and is not a folder"),
            (["--cameras", small, "-o", existing / "sub"], "exists and is not a folder"),
            (["--cameras", tmp_path, "-o", tmp_path / "o"], "is a folder, not a cameras file"),
            (["--cameras", tmp_path / "nan.json", "-o", tmp_path / "o"], "'width'")):
        (tmp_path / "nan.json").write_text('{"width": NaN, "height": 3, "fx": 1, "fy": 1, "cx": 1, "cy": 1}')
        code, err = run_cli(capsys, "render", room_ply, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert existing.read_text() == "not a folder" and not (tmp_path / "o").exists()


def test_render_cli_drops_nan_points_with_a_warning_unless_strict(tmp_path, capsys):
    from model.pointcloud.cloud import PointCloud
    from model.pointcloud.readers import write_point_cloud

    room = random_room(3000)
    coord = room["coord"].copy()
    coord[::10] = np.nan
    ply = write_point_cloud(PointCloud(coord, room["color"], room["normal"]), tmp_path / "holes.ply")
    cams = tmp_path / "cams.json"
    pose = look_at(np.array([1.5, -1.0, 1.5]), np.array([1.5, 1.25, 0.5]))
    cams.write_text(json.dumps({"width": 8, "height": 6, "fx": 6.0, "fy": 6.0, "cx": 3.5, "cy": 2.5,
                                "camera_to_world": pose.tolist()}))
    code, err = run_cli(capsys, "render", ply, "--cameras", cams, "-o", tmp_path / "views")
    assert code == 0, err
    assert "dropped 300 of 3,000 points" in err and "--strict" in err
    assert (tmp_path / "views" / "0_color.png").is_file()
    code, err = run_cli(capsys, "render", ply, "--cameras", cams, "-o", tmp_path / "strict", "--strict")
    assert code == 2 and "NaN" in err and not (tmp_path / "strict").exists()


def test_render_route_drops_nan_points_unless_invalid_error(server):
    """/v1/render takes the holes of an organised scan like the other routes: dropped (and counted) by default,
    refused with ``invalid=error``."""
    import io

    room = random_room(2000)
    coord = room["coord"].copy()
    coord[::10] = np.nan
    buffer = io.BytesIO()
    np.savez(buffer, coord=coord, color=room["color"], normal=room["normal"])
    files = {"file": ("room.npz", buffer.getvalue())}
    cameras = json.dumps(camera())
    answer = httpx.post(server.url + "/v1/render", files=files, data={"cameras": cameras}, timeout=300)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.headers["x-ponder-dropped-points"] == "200" and answer.headers["x-ponder-num-points"] == "1800"
    refused = httpx.post(server.url + "/v1/render", files=files, data={"cameras": cameras},
                         params={"invalid": "error"}, timeout=300)
    assert_problem(refused, 422, "NaN")
