"""``ponder images features|render`` on posed images, and every bad input the issue names: a clear message and
exit code 2 (views without poses, non-rigid poses, image sizes that disagree with the intrinsics, one view,
views that see nothing of the volume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.images import ImageModelConfig, ImageRenderModel, save_image_model
from ponder.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
W, H, F = 40, 30, 30.0
TINY = {"backbone": {"width": 8}, "lift": {"dim": 4},
        "render": {"projection": {"out_channels": 8, "f_maps": [8, 16]}, "field": {"hidden_size": 16, "geo_dim": 8},
                   "sampler": {"num_samples": 8, "num_samples_importance": 4}, "grid_shape": [12, 12, 6]}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_image_model(ImageRenderModel(ImageModelConfig.from_dict(TINY)), tmp_path_factory.mktemp("img") / "m")


def look_at(position, target=(2.0, 2.0, 1.0)) -> np.ndarray:
    """World-to-camera of a camera at ``position`` looking at ``target`` (OpenCV axes, world z up)."""
    z = np.asarray(target, float) - np.asarray(position, float)
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, y, z], 1)
    c2w[:3, 3] = position
    return np.linalg.inv(c2w)


def write_views(folder: Path, n: int = 3, size=(W, H)) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cams = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
        angle = 2 * np.pi * i / max(n, 1)
        pos = [2 + 1.5 * np.cos(angle), 2 + 1.5 * np.sin(angle), 1.4]
        cams.append({"image": f"{i}.png", "width": W, "height": H, "fx": F, "fy": F, "cx": (W - 1) / 2,
                     "cy": (H - 1) / 2, "world_to_camera": look_at(pos).tolist()})
    return cams


def run(tmp_path: Path, checkpoint: Path, cams, *extra: str, bounds=((0, 0, 0), (4, 4, 2.5))) -> int:
    doc = {"cameras": cams, **({"bounds": [list(b) for b in bounds]} if bounds else {})}
    (tmp_path / "cams.json").write_text(json.dumps(doc))
    return main(["images", "features", "--images", str(tmp_path / "views"), "--cameras", str(tmp_path / "cams.json"),
                 "--checkpoint", str(checkpoint), "-o", str(tmp_path / "f.npz"), *extra])


def test_features_from_posed_images(tmp_path, checkpoint, capsys):
    cams = write_views(tmp_path / "views")
    assert run(tmp_path, checkpoint, cams) == 0
    with np.load(tmp_path / "f.npz", allow_pickle=False) as z:
        feats, centres, seen = z["features"], z["centres"], z["views_seeing"]
        assert feats.shape[1] == 8 and feats.shape[0] == centres.shape[0] == seen.shape[0] > 0
        assert seen.min() >= 1 and seen.max() <= 3 and np.isfinite(feats).all()
        assert tuple(z["lifted_grid_shape"]) == (12, 12, 6)
        assert (centres >= np.array([0, 0, 0]) - 0.3).all() and (centres <= np.array([4, 4, 2.5]) + 0.3).all()
    assert "3 views ->" in capsys.readouterr().out


def test_render_novel_views_from_images(tmp_path, checkpoint):
    cams = write_views(tmp_path / "views")
    (tmp_path / "cams.json").write_text(json.dumps({"cameras": cams, "bounds": [[0, 0, 0], [4, 4, 2.5]]}))
    novel = [{"width": 8, "height": 6, "fx": 6.0, "fy": 6.0, "cx": 3.5, "cy": 2.5,
              "world_to_camera": look_at([3.9, 0.2, 1.2]).tolist()}]
    (tmp_path / "novel.json").write_text(json.dumps(novel))
    assert main(["images", "render", "--images", str(tmp_path / "views"), "--cameras", str(tmp_path / "cams.json"),
                 "--novel", str(tmp_path / "novel.json"), "--checkpoint", str(checkpoint), "-o",
                 str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"0_color.png", "0_depth.png", "0_depth.npy"}
    assert np.load(tmp_path / "out" / "0_depth.npy").shape == (6, 8)


@pytest.mark.parametrize("case, message", [
    ("no pose", "give the pose"),
    ("non-rigid", "orthonormal"),
    ("size", "the image is 40x30 but its camera says 50x30"),
    ("one view", "at least 2 posed views"),
    ("sees nothing", "see nothing of the scene volume"),
    ("count", "holds 3 images but"),
])
def test_bad_inputs_exit_2_with_a_message(tmp_path, checkpoint, capsys, case, message):
    cams = write_views(tmp_path / "views", n=1 if case == "one view" else 3)
    if case == "no pose":
        del cams[1]["world_to_camera"]
    elif case == "non-rigid":
        cams[2]["world_to_camera"] = (np.diag([2.0, 2.0, 2.0, 1.0]) @ np.asarray(cams[2]["world_to_camera"])).tolist()
    elif case == "size":
        cams[0]["width"] = 50
    elif case == "sees nothing":
        cams[1]["world_to_camera"] = look_at([2.0, -20.0, 1.4], target=(2.0, -40.0, 1.4)).tolist()  # looks away
    elif case == "count":
        cams = [{k: v for k, v in c.items() if k != "image"} for c in cams[:2]]  # paired by order: 3 vs 2
    assert run(tmp_path, checkpoint, cams) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_missing_folder_and_bad_json_exit_2(tmp_path, checkpoint, capsys):
    (tmp_path / "cams.json").write_text("{not json")
    (tmp_path / "views").mkdir()
    assert main(["images", "features", "--images", str(tmp_path / "views"), "--cameras", str(tmp_path / "cams.json"),
                 "--checkpoint", str(checkpoint), "-o", str(tmp_path / "f.npz")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["images", "features", "--images", str(tmp_path / "nope"), "--cameras", str(tmp_path / "cams.json"),
                 "--checkpoint", str(checkpoint), "-o", str(tmp_path / "f.npz")]) == 2
    assert "no such image folder" in capsys.readouterr().err


def test_ponder_features_takes_images_too(tmp_path, checkpoint):
    """`ponder features --images DIR --cameras CAMS` is the same branch as `ponder images features`."""
    cams = write_views(tmp_path / "views")
    assert run(tmp_path, checkpoint, cams) == 0
    cams_file = tmp_path / "cams.json"
    out = tmp_path / "top.npz"
    assert main(["features", "--images", str(tmp_path / "views"), "--cameras", str(cams_file),
                 "--checkpoint", str(checkpoint), "-o", str(out)]) == 0
    with np.load(tmp_path / "f.npz", allow_pickle=False) as a, np.load(out, allow_pickle=False) as b:
        np.testing.assert_array_equal(a["features"], b["features"])
        np.testing.assert_array_equal(a["centres"], b["centres"])


@pytest.mark.parametrize("extra, needle", [((), "--images needs --cameras"),
                                           (("--cameras", "c.json", "cloud.ply"), "not both"),
                                           (("--cameras", "c.json", "--up", "y"), "apply to point clouds")])
def test_ponder_features_images_argument_errors(tmp_path, capsys, extra, needle):
    assert main(["features", "--images", str(tmp_path), "-o", str(tmp_path / "o.npz"), *extra]) == 2
    assert needle in capsys.readouterr().err


def test_ponder_features_needs_an_input(tmp_path, capsys):
    assert main(["features", "-o", str(tmp_path / "o.npy")]) == 2
    assert "give a point cloud INPUT" in capsys.readouterr().err


def test_bundled_image_model_serves_ponder_features(tmp_path):
    """Without --checkpoint, `ponder features --images` uses the bundled image model (model/default_model/images)."""
    from ponder.image_commands import DEFAULT_IMAGE_MODEL

    config = json.loads((DEFAULT_IMAGE_MODEL / "config.json").read_text())
    cams = write_views(tmp_path / "views")
    (tmp_path / "cams.json").write_text(json.dumps({"cameras": cams, "bounds": [[0, 0, 0], [4, 4, 2.5]]}))
    out = tmp_path / "f.npz"
    assert main(["features", "--images", str(tmp_path / "views"), "--cameras", str(tmp_path / "cams.json"),
                 "-o", str(out)]) == 0
    with np.load(out, allow_pickle=False) as z:
        assert z["features"].shape[1] == config["render"]["projection"]["out_channels"]
        assert tuple(z["lifted_grid_shape"]) == tuple(config["render"]["grid_shape"])
        assert len(z["features"]) > 0 and np.isfinite(z["features"]).all()


def test_default_model_folder_fits_its_size_budget():
    """The whole bundled default model (segmentation, detection, render, image parts) stays within 25 MB."""
    from model.inference import DEFAULT_MODEL_DIR

    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 25 * 1024 * 1024, f"{total / 2**20:.1f} MiB"
    assert (DEFAULT_MODEL_DIR / "images" / "model.safetensors").is_file()


def test_sixteen_bit_views_are_scaled_not_clipped_and_unused_images_are_named(tmp_path):
    """A 16-bit greyscale PNG decodes to the same 8-bit picture as its 8-bit twin (PIL's convert would turn
    every value above 255 white); an image no camera names is said, not dropped silently."""
    from model.images.inputs import read_image_folder, rgb_pixels

    cams = write_views(tmp_path / "views", n=2)
    grey8 = np.random.default_rng(1).integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "views" / "0.png")  # 16-bit, same picture
    Image.fromarray(grey8).save(tmp_path / "views" / "extra.png")
    (tmp_path / "cams.json").write_text(json.dumps({"cameras": cams}))
    with pytest.warns(UserWarning, match=r"1 image\(s\) .* named by no camera .*extra\.png"):
        views, _ = read_image_folder(tmp_path / "views", tmp_path / "cams.json")
    assert views.images.dtype == np.uint8
    assert np.array_equal(views.images[0], np.repeat(grey8[..., None], 3, axis=-1))
    with Image.open(tmp_path / "views" / "0.png") as im:
        assert im.mode.startswith("I")  # the case this guards: PIL opens it as 16-bit integers
        assert np.array_equal(rgb_pixels(im)[..., 0], grey8)
    Image.fromarray(grey8.astype(np.float32)).save(tmp_path / "float.tiff")
    with Image.open(tmp_path / "float.tiff") as im, pytest.raises(ValueError, match="floating-point"):
        rgb_pixels(im)


def test_an_image_in_another_format_under_a_png_name_is_refused(tmp_path):
    """Only the PNG and JPEG decoders run on a user's views, whatever the file is called."""
    from model.images.errors import ImageInputError
    from model.images.inputs import read_image_folder

    cams = write_views(tmp_path / "views", n=2)
    with Image.open(tmp_path / "views" / "1.png") as im:
        im.save(tmp_path / "views" / "1.png.tiff", format="TIFF")
    (tmp_path / "views" / "1.png.tiff").replace(tmp_path / "views" / "1.png")
    (tmp_path / "cams.json").write_text(json.dumps({"cameras": cams}))
    with pytest.raises(ImageInputError, match=r"1\.png: not a readable image"):
        read_image_folder(tmp_path / "views", tmp_path / "cams.json")
