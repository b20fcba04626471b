"""/v1/detect and /v1/render against a real uvicorn process serving a detector trained here for three steps
("det") and the official PonderIndoor-v2 render fixture converted to our format ("render"); every answer is
compared with ``detect()`` / ``render_scene()`` called directly in this process. An in-process app with the
Triton worker (no Triton behind it) shows both routes answer 501 there."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import (FIXTURES, free_port, look_at, png_bytes, render_planes,  # noqa: E402
                              start_gateway, write_format)

RENDER = FIXTURES / "ponder_render"
MAX_RENDER_PIXELS = 600
NPZ_TYPE = {"Content-Type": "application/octet-stream"}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def train_detector(base: Path) -> tuple[Path, Path]:
    """Three steps of ``ponder train detect`` on one generated room: (checkpoint folder, scene folder)."""
    from ponder.cli import main
    from training.data.synthetic import SceneConfig, generate_dataset

    root = base / "data"
    generate_dataset(root, 1, seed=11, config=SceneConfig(room_x=(3.0, 3.5), room_y=(3.0, 3.5), num_frames=0,
                                                          points_per_m2=300),
                     splits=(("train", 1.0),), progress=False)
    backbone = {"type": "SpUNet-v1m1", "in_channels": 6, "base_channels": 16,
                "channels": [16, 24, 32, 48, 48, 32, 24, 24], "layers": [1, 1, 1, 1, 1, 1, 1, 1]}
    # seed_threshold 0: a barely trained head still proposes boxes, so the answers carry real numbers
    cfg = {"model": {"name": "det", "backbone": backbone, "grid_size": 0.1,
                     "head": {"hidden_channels": 16, "num_layers": 1,
                              "decode": {"seed_threshold": 0.0, "max_proposals": 16}}},
           "data": {"root": str(root), "train_split": "train", "val_split": None},
           "augment": {"quarter_turns": False, "rotate_deg": 0.0, "color": False, "jitter": 0.0},
           "eval": {"after_train": False},
           "train": {"epochs": 3, "batch_size": 1, "seed": 0, "log_every": 1000,
                     "optim": {"optimizer": "adamw", "lr": 0.01, "pct_start": 0.1}}}
    (base / "detect.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "detect", "--config", str(base / "detect.yaml"), "--out", str(base / "run")]) == 0
    return base / "run" / "final", root / "train" / "scene0000_00"


def convert_render_fixture(out: Path) -> Path:
    """The official checkpoint with its real render settings (grid_shape etc. from the official config),
    saved once in our format, which records them."""
    from model.checkpoint import load_checkpoint, read_official, save_checkpoint
    from model.infer_config import infer_config
    from model.render import RenderHeadConfig

    config = infer_config(read_official(RENDER / "checkpoint.pth"))
    official = RenderHeadConfig.from_official(json.loads((RENDER / "model_config.json").read_text()))
    config = dataclasses.replace(config, render=dataclasses.replace(config.render, head=official))
    loaded = load_checkpoint(RENDER / "checkpoint.pth", config=config)
    return save_checkpoint(loaded.model, loaded.config, out)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not (RENDER / "checkpoint.pth").exists():
        pytest.skip(f"render fixture not found under {RENDER} (the shared/ folder beside the repo)")
    from model.checkpoint import load_checkpoint
    from model.inference import Predictor

    base = tmp_path_factory.mktemp("detect-render")
    logs = tmp_path_factory.mktemp("logs")
    models = base / "models"
    models.mkdir()
    det_dir, scene_dir = train_detector(base / "det")
    (models / "det").symlink_to(det_dir)
    convert_render_fixture(models / "render")
    env = {"PONDER_MODELS_DIR": str(models), "PONDER_DEFAULT_MODEL": "det", "PONDER_TORCH_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PONDER_MAX_RENDER_PIXELS": str(MAX_RENDER_PIXELS),
           "PONDER_RENDER_CHUNK": "7"}  # several chunks per 8x6 view: answers must equal one-chunk renders
    server = start_gateway(env, logs)
    try:
        det = load_checkpoint(models / "det")
        render = load_checkpoint(models / "render")
        yield {"server": server.wait_ready(), "det": det, "render": render, "det_predictor": Predictor(det),
               "scene_dir": scene_dir}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def url(stack) -> str:
    return stack["server"].url


@pytest.fixture(scope="module")
def room(stack):
    from model.pointcloud.cloud import PointCloud

    folder = stack["scene_dir"]
    return PointCloud(np.load(folder / "coord.npy"), np.load(folder / "color.npy"), np.load(folder / "normal.npy"),
                      source="room.npz")


def npz(cloud) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, coord=cloud.coord, color=cloud.color, normal=cloud.normal)
    return buffer.getvalue()


def assert_same_detections(got: list[dict], expected: list[dict], shift=np.zeros(3)) -> None:
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert (g["label"], g["label_id"]) == (e["label"], e["label_id"])
        np.testing.assert_allclose(g["score"], e["score"], atol=1e-5)
        np.testing.assert_allclose(g["center"], np.add(e["center"], shift), atol=1e-4, rtol=0)
        np.testing.assert_allclose([*g["size"], g["yaw"]], [*e["size"], e["yaw"]], atol=1e-4)
        np.testing.assert_allclose(np.array(g["corners"]) - shift, e["corners"], atol=1e-4)


def test_models_say_what_each_can_do(url):
    listing = {m["name"]: m for m in httpx.get(url + "/v1/models").json()["models"]}
    assert set(listing["det"]["capabilities"]) == {"features", "detect"}
    assert "render" in listing["render"]["capabilities"] and "detect" not in listing["render"]["capabilities"]


def test_detect_equals_detect_called_directly(url, stack, room):
    from model.detection import detect
    from model.inference import Predictor

    answer = httpx.post(url + "/v1/detect", content=npz(room), headers=NPZ_TYPE, timeout=120,
                        params={"filename": "room.npz", "score_threshold": 0.0, "iou_threshold": 0.5})
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    expected = detect(stack["det_predictor"], room, score_threshold=0.0, iou_threshold=0.5).to_json("room.npz")
    assert {k: doc[k] for k in ("format", "source", "box_convention", "class_names")} == \
        {k: expected[k] for k in ("format", "source", "box_convention", "class_names")}
    assert (doc["model"], doc["num_points"], doc["grid_size"]) == ("det", len(room), 0.1)
    assert_same_detections(doc["detections"], expected["detections"])

    # a multipart 'file' part (PLY) gives the same boxes; ?grid_size= voxelises at that size
    ply = write_format(room, stack["scene_dir"].parent / "room.ply").read_bytes()
    multipart = httpx.post(url + "/v1/detect", files={"file": ("room.ply", ply)}, timeout=120,
                           params={"score_threshold": 0.0, "iou_threshold": 0.5})
    assert_same_detections(multipart.json()["detections"], expected["detections"])
    coarse = httpx.post(url + "/v1/detect", content=npz(room), headers=NPZ_TYPE, timeout=120,
                        params={"format": "npz", "grid_size": 0.15, "score_threshold": 0.0})
    loaded = stack["det"]
    at_015 = Predictor(dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, grid_size=0.15)))
    assert coarse.json()["grid_size"] == 0.15
    expected_015 = detect(at_015, room, score_threshold=0.0).to_json()["detections"]
    assert_same_detections(coarse.json()["detections"], expected_015)
    assert expected_015 != expected["detections"]  # the grid size did change the answer


def test_detect_boxes_of_georeferenced_las_are_in_world_coordinates(url, stack, room, tmp_path):
    from model.detection import detect
    from model.pointcloud.readers import read_point_cloud

    import laspy

    xyz = room.coord.astype(np.float64) + [512000.0, 5400000.0, 300.0]  # survey metres (float32 cannot hold them)
    header = laspy.LasHeader(point_format=2, version="1.2")
    header.scales, header.offsets = np.full(3, 1e-4), xyz.min(axis=0)
    las = laspy.LasData(header)
    las.x, las.y, las.z = xyz.T
    las.red, las.green, las.blue = (room.color[:, i].astype(np.uint16) * 257 for i in range(3))
    path = tmp_path / "survey.las"
    las.write(str(path))
    cloud = read_point_cloud(path)
    assert cloud.origin.max() > 1e5  # the reader moved the cloud near zero
    answer = httpx.post(url + "/v1/detect", content=path.read_bytes(), params={"format": "las", "score_threshold": 0},
                        headers=NPZ_TYPE, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["filled"] == ["normal"]
    from model.pointcloud.cloud import PointCloud

    shifted = PointCloud(cloud.coord, cloud.color, cloud.normal, source=cloud.source)  # same points, origin 0
    local = detect(stack["det_predictor"], shifted, score_threshold=0.0).to_json()["detections"]
    assert_same_detections(answer.json()["detections"], local, shift=cloud.origin)
    world = detect(stack["det_predictor"], cloud, score_threshold=0.0).to_json()["detections"]
    assert_same_detections(answer.json()["detections"], world)  # detect() itself answers in world coordinates
    assert answer.json()["detections"][0]["center"][1] > 5e6


def test_detect_takes_rgbd_views(url):
    K = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])
    pose = look_at(np.array([0.5, -1.0, 1.2]), np.array([2.0, 0.5, 0.3]))
    depth, color = render_planes(K, pose, 32, 24)
    cameras = {"views": {"0": {"K": K.tolist(), "world_to_camera": np.linalg.inv(pose).tolist()}}}
    answer = httpx.post(url + "/v1/detect", timeout=120, files={
        "depth_0": ("d.png", png_bytes(depth), "image/png"), "color_0": ("c.png", png_bytes(color), "image/png"),
        "cameras": ("cameras.json", json.dumps(cameras).encode(), "application/json")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["format"] == "ponder-detections/1" and answer.json()["source"].startswith("rgbd")


def test_detect_refuses_bad_requests_with_reasons(url, room):
    body = npz(room)

    def post(content=body, accept="application/json", **params):
        return httpx.post(url + "/v1/detect", content=content, params={"format": "npz", **params}, timeout=60,
                          headers={**NPZ_TYPE, "Accept": accept})

    cases = [
        (post(model="render"), 422, "cannot detect"),
        (post(score_threshold=1.5), 422, "score_threshold"),
        (post(iou_threshold=-0.1), 422, "iou_threshold"),
        (post(model="nope"), 404, "served models"),
        (post(condition="ScanNet"), 422, "takes no condition"),
        (post(content=b""), 400, "empty"),
        (post(content=b"not a zip archive at all"), 422, "npz"),
        (post(accept="image/png"), 406, "application/json"),
    ]
    for answer, status, words in cases:
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert words in answer.json()["detail"], answer.json()["detail"]
    assert "it can do: features, render" in cases[0][0].json()["detail"]


# ------------------------------------------------------------------------------------------------ render


@pytest.fixture(scope="module")
def scene_and_cameras(stack):
    """The fixture scene and two of its cameras at 8x6 pixels (intrinsics scaled with the image)."""
    from model.pointcloud.cloud import PointCloud
    from model.render import Camera

    data, cams = np.load(RENDER / "input.npz"), np.load(RENDER / "cameras.npz")
    cloud = PointCloud(data["coord"], data["color"], data["normal"], source="scene.npz")
    h, w = (int(v) for v in cams["image_hw"])
    s = 8 / w
    cameras = []
    for i in range(2):
        K = cams["intrinsic"][i][:3, :3].astype(np.float64)
        K[:2, :2] *= s
        K[:2, 2] = (K[:2, 2] + 0.5) * s - 0.5
        cameras.append(Camera(K=K, w2c=cams["extrinsic"][i], width=8, height=round(h * s)))
    return cloud, cameras


def post_render(url, cloud, cameras, accept: str | None = None, cameras_text: str | None = None, **params):
    text = cameras_text if cameras_text is not None else json.dumps([c.to_dict() for c in cameras])
    return httpx.post(url + "/v1/render", files={"file": ("scene.npz", npz(cloud))}, data={"cameras": text},
                      params={"model": "render", **params}, headers={"Accept": accept} if accept else {},
                      timeout=120)


def test_one_camera_answers_png_equal_to_render_scene(url, stack, scene_and_cameras):
    from model.novel_view import render_scene

    cloud, cameras = scene_and_cameras
    (view,) = render_scene(stack["render"], cloud, cameras[:1])
    color = post_render(url, cloud, cameras[:1])
    assert color.status_code == 200, color.text
    assert color.headers["content-type"] == "image/png" and color.headers["x-ponder-model"] == "render"
    image = np.asarray(Image.open(io.BytesIO(color.content)))
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(float) / 255 - view.rgb.numpy()).max() <= 1 / 255 + 1e-6
    assert image.std() > 0  # real pixels, not a blank image
    depth = post_render(url, cloud, cameras[:1], output="depth")
    assert depth.status_code == 200, depth.text
    mm = np.asarray(Image.open(io.BytesIO(depth.content)))
    assert mm.dtype == np.uint16 and mm.shape == (6, 8) and mm.max() > 0
    assert np.abs(mm.astype(float) - view.depth.numpy() * 1000).max() <= 0.5 + 1e-3


def test_several_cameras_answer_a_zip_of_colour_and_depth(url, stack, scene_and_cameras):
    from model.novel_view import render_scene
    from model.render import Camera

    cloud, cameras = scene_and_cameras
    views = render_scene(stack["render"], cloud, cameras)
    answer = post_render(url, cloud, cameras)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        names = set(archive.namelist())
        assert names == {f"{i}_{k}" for i in range(2) for k in ("color.png", "depth.png", "depth.npy")} | {"meta.json"}
        meta = json.loads(archive.read("meta.json"))
        for i, view in enumerate(views):
            color = np.asarray(Image.open(io.BytesIO(archive.read(f"{i}_color.png"))))
            depth = np.load(io.BytesIO(archive.read(f"{i}_depth.npy")), allow_pickle=False)
            mm = np.asarray(Image.open(io.BytesIO(archive.read(f"{i}_depth.png"))))
            assert np.abs(color.astype(float) / 255 - view.rgb.numpy()).max() <= 1 / 255 + 1e-6
            np.testing.assert_allclose(depth, view.depth.numpy(), atol=1e-5)
            assert np.array_equal(mm, np.clip(np.rint(depth * 1000), 0, 65535).astype(np.uint16))
            assert meta["views"][i]["hit_fraction"] == pytest.approx(float(view.hit.float().mean()))
    assert meta["model"] == "render" and meta["depth_png_units_per_metre"] == 1000

    # ?width= rescales the cameras (intrinsics with the image; pixel centres stay centres); the client's zip
    from service.client import PonderClient

    cam = cameras[0]
    K = cam.K.copy()
    K[:2, :2] /= 2
    K[:2, 2] = (K[:2, 2] + 0.5) / 2 - 0.5
    (small,) = render_scene(stack["render"], cloud, [Camera(K=K, w2c=cam.w2c, width=4, height=3)])
    with PonderClient(url) as client:
        (got,) = client.render(cloud, [cam], model="render", width=4)
    assert got.color.shape == (3, 4, 3)
    assert np.abs(got.color.astype(float) / 255 - small.rgb.numpy()).max() <= 1 / 255 + 1e-6
    np.testing.assert_allclose(got.depth, small.depth.numpy(), atol=1e-5)


def test_render_up_keeps_cameras_in_the_input_frame(url, scene_and_cameras):
    """A y-up copy of the scene with the same cameras expressed in the y-up frame renders the same views with
    ?up=y (through the client), as ``ponder render --up y`` does; the answer names the rotation it applied."""
    from model.pointcloud.cloud import PointCloud
    from model.render import Camera
    from service.client import PonderClient

    cloud, cameras = scene_and_cameras
    perm = [1, 2, 0]  # up=y's named rotation maps (y, z, x) rows back onto (x, y, z)
    y_cloud = PointCloud(cloud.coord[:, perm], cloud.color, cloud.normal[:, perm], source="y-up.npz")
    to_y = np.eye(4)
    to_y[:3, :3] = np.eye(3)[perm]  # p_y = to_y @ p_z
    y_cams = [Camera(K=c.K, w2c=c.w2c @ np.linalg.inv(to_y), width=c.width, height=c.height) for c in cameras]
    with PonderClient(url) as client:
        z_views = client.render(cloud, cameras, model="render")
        y_views = client.render(y_cloud, y_cams, model="render", up="y")
        unrotated = client.render(y_cloud, y_cams, model="render")  # the y-up scene taken as z-up: other views
    for z, y in zip(z_views, y_views):
        assert np.abs(z.color.astype(int) - y.color.astype(int)).max() <= 1
        np.testing.assert_allclose(y.depth, z.depth, atol=1e-4)
    assert max(np.abs(z.depth - u.depth).max() for z, u in zip(z_views, unrotated)) > 0.01
    one = post_render(url, y_cloud, y_cams[:1], up="y")
    assert one.status_code == 200, one.text
    np.testing.assert_allclose(json.loads(one.headers["x-ponder-up-rotation"]), np.eye(3)[perm].T, atol=1e-9)
    assert "x-ponder-up-rotation" not in post_render(url, cloud, cameras[:1]).headers
    assert post_render(url, cloud, cameras[:1], up="w").status_code == 422


def test_render_refuses_bad_requests_with_reasons(url, scene_and_cameras):
    cloud, cameras = scene_and_cameras
    one = json.dumps(cameras[0].to_dict())
    no_k = {k: v for k, v in cameras[0].to_dict().items() if k != "K"}
    skewed = {**cameras[0].to_dict(), "world_to_camera": (np.diag([2.0, 1, 1, 1])).tolist()}
    cases = [
        (post_render(url, cloud, cameras, model="det"), 422, "cannot render"),
        (post_render(url, cloud, cameras, cameras_text="{not json"), 422, "not valid JSON"),
        (post_render(url, cloud, cameras, cameras_text=json.dumps([no_k])), 422, "camera 0"),
        (post_render(url, cloud, cameras, cameras_text=json.dumps(skewed)), 422, "rotation"),
        (post_render(url, cloud, cameras, cameras_text="[]"), 422, "no cameras"),
        (post_render(url, cloud, cameras, width=40), 413, "PONDER_MAX_RENDER_PIXELS"),
        (post_render(url, cloud, cameras, accept="image/png"), 406, "application/zip"),
        (post_render(url, cloud, cameras, output="normals"), 422, "output"),
        (httpx.post(url + "/v1/render", params={"model": "render"}, content=npz(cloud), headers=NPZ_TYPE), 415,
         "multipart"),
        (httpx.post(url + "/v1/render", params={"model": "render"}, files={"file": ("s.npz", npz(cloud))}), 400,
         "'cameras'"),
        (httpx.post(url + "/v1/render", params={"model": "render"}, files={"cameras": (None, one)}), 400, "'file'"),
        (httpx.post(url + "/v1/render", params={"model": "render"}, files={"file": ("s.npz", b"garbage")},
                    data={"cameras": one}), 422, "s.npz"),
    ]
    for answer, status, words in cases:
        assert answer.status_code == status, answer.text
        assert words in answer.json()["detail"], answer.json()["detail"]
    assert "it can do: features, detect" in cases[0][0].json()["detail"]


def test_triton_worker_answers_501_for_detect_render_and_precise_segmentation(scene_and_cameras):
    """In process (the refusal happens in the gateway before any Triton call; no Triton server runs)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    cloud, cameras = scene_and_cameras
    settings = ServiceSettings(worker="triton", triton_urls=[f"127.0.0.1:{free_port()}"], triton_startup_wait_s=0)
    with TestClient(create_app(settings)) as client:
        detect = client.post("/v1/detect", content=npz(cloud), headers=NPZ_TYPE, params={"format": "npz"})
        render = client.post("/v1/render", files={"file": ("scene.npz", npz(cloud))},
                             data={"cameras": json.dumps(cameras[0].to_dict())})
        precise = client.post("/v1/segment", content=npz(cloud), headers=NPZ_TYPE,
                              params={"format": "npz", "mode": "precise"})
    for answer in (detect, render, precise):
        assert answer.status_code == 501, answer.text
        assert "in-process worker" in answer.json()["detail"]
