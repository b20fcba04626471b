"""Hardening of the training data path (audit findings 1, 7, 8, 11, 13, 14): the memory budget of a generated room,
atomic and non-mixing dataset generation, the completeness check of the automatic generation, and one-line errors
naming the file for damaged RGB-D frames, poses, .pth scenes and non-integer labels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ponder.cli import main
from training.data.formats import ALL_FRAMES, list_frames, load_rgbd_frames, load_scene
from training.data.synthetic import SceneConfig, generate_dataset, generate_scene
from training.data.synthetic import dataset as dataset_module
from training.data.synthetic.dataset import needs_generation
from training.data.synthetic.scene import room_estimate
from training.data.synthetic.writer import write_point_scene, write_rgbd_scene

SMALL = SceneConfig(room_x=(3.0, 3.5), room_y=(3.0, 3.5), points_per_m2=100.0, num_frames=0)
FAST = ["--frames", "0", "--points-per-m2", "100", "--quiet"]


def _generate(out: Path, *extra: str) -> int:
    return main(["datasets", "generate", "--out", str(out), *FAST, *extra])


# ------------------------------------------------------------------------------------------ 1: memory budget


@pytest.mark.parametrize("value", ["nan", "inf", "1e6"])
def test_points_per_m2_not_finite_or_huge_is_refused_naming_the_option(tmp_path, capsys, value):
    code = main(["datasets", "generate", "--out", str(tmp_path / "d"), "--scenes", "1", "--frames", "0",
                 "--points-per-m2", value])
    err = capsys.readouterr().err
    assert code == 2 and "ponder datasets: error: --points-per-m2 must be a finite number" in err
    assert "lam value" not in err and not (tmp_path / "d").exists()


def test_room_over_the_memory_budget_is_refused_before_generating(tmp_path, capsys):
    code = main(["datasets", "generate", "--out", str(tmp_path / "d"), "--scenes", "1", "--frames", "0",
                 "--points-per-m2", "60000"])
    err = capsys.readouterr().err
    assert code == 2 and "GiB of memory" in err and "million sampled points" in err and "--points-per-m2" in err
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="over the budget"):
        SceneConfig(num_frames=100_000)  # frames count too


def test_room_estimate_bounds_the_sampled_points():
    from training.data.synthetic import sampling

    counts = []
    original = sampling.sample_faces

    def counting(boxes, density, rng):
        result = original(boxes, density, rng)
        counts.append(len(result[0]))
        return result

    import training.data.synthetic.scene as scene_module

    scene_module.sample_faces = counting
    try:
        for seed in range(4):
            generate_scene(seed, SMALL)
    finally:
        scene_module.sample_faces = original
    points, _ = room_estimate(SMALL.points_per_m2, 3.5, 3.5, SMALL.room_z[1], 0, SMALL.image_downscale)
    assert max(counts) < points < 4 * max(counts)  # an upper bound, yet not absurdly loose


def test_training_config_density_is_checked_by_the_automatic_generation(tmp_path):
    from training.detect.cli import ensure_data

    gen = SimpleNamespace(scenes=1, seed=0, val_fraction=0.0, points_per_m2=float("nan"))
    cfg = SimpleNamespace(data=SimpleNamespace(root=str(tmp_path / "d"), generate=gen, train_split="train",
                                               val_split="val"))
    with pytest.raises(ValueError, match="points_per_m2 must be a finite number"):
        ensure_data(cfg)
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------ 7: interrupted runs


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    original, calls = dataset_module.generate_scene, []

    def interrupted(seed, config):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(seed, config)

    monkeypatch.setattr(dataset_module, "generate_scene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "d", 3, config=SMALL, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither d nor d.partial


def test_leftover_of_a_killed_generation_is_replaced(tmp_path):
    (tmp_path / "d.partial" / "train" / "scene0000_00").mkdir(parents=True)  # what a SIGKILL leaves
    generate_dataset(tmp_path / "d", 1, config=SMALL, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert json.loads((tmp_path / "d" / "synthetic.json").read_text())["num_scenes"] == 1


def test_a_foreign_partial_folder_is_never_deleted(tmp_path):
    (tmp_path / "d.partial").mkdir()
    (tmp_path / "d.partial" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a partial dataset"):
        generate_dataset(tmp_path / "d", 1, config=SMALL, progress=False)
    assert (tmp_path / "d.partial" / "notes.txt").read_text() == "mine" and not (tmp_path / "d").exists()


def test_needs_generation_refuses_partial_or_smaller_datasets(tmp_path):
    root = tmp_path / "d"
    assert needs_generation(root, 2)  # missing: generate
    generate_dataset(root, 2, config=SMALL, progress=False)
    assert not needs_generation(root, 2)
    with pytest.raises(ValueError, match="holds 2 generated scenes but data.generate.scenes asks for 3"):
        needs_generation(root, 3)
    (root / "synthetic.json").unlink()  # as an interrupted run of the old writer left it
    with pytest.raises(ValueError, match="incomplete synthetic dataset .*delete the folder"):
        needs_generation(root, 2)
    real = tmp_path / "scannet" / "train" / "scene0000_00"  # the user's own data: used as it is
    real.mkdir(parents=True)
    np.save(real / "coord.npy", np.zeros((3, 3), np.float32))
    assert not needs_generation(tmp_path / "scannet", 5)


def test_automatic_generation_refuses_partial_root_and_shows_progress(tmp_path, capsys):
    from training.detect.cli import ensure_data

    gen = SimpleNamespace(scenes=1, seed=0, val_fraction=0.0, points_per_m2=100.0)
    cfg = SimpleNamespace(data=SimpleNamespace(root=str(tmp_path / "d"), generate=gen, train_split="train",
                                               val_split="val"))
    ensure_data(cfg)
    assert "synthetic scenes" in capsys.readouterr().err  # the tqdm bar, on stderr
    assert (tmp_path / "d" / "synthetic.json").is_file()
    gen.scenes = 4
    with pytest.raises(ValueError, match="asks for 4"):
        ensure_data(cfg)


# ------------------------------------------------------------------------------------------ 8: existing --out


def test_generate_refuses_a_non_empty_out_and_overwrite_replaces_it_whole(tmp_path, capsys):
    out = tmp_path / "ds"
    assert _generate(out, "--scenes", "3", "--val-fraction", "0.34") == 0
    assert (out / "val" / "scene0002_00").is_dir()
    assert _generate(out, "--scenes", "2", "--seed", "7", "--val-fraction", "0") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 0  # untouched
    assert _generate(out, "--scenes", "2", "--seed", "7", "--val-fraction", "0", "--overwrite") == 0
    assert not (out / "val" / "scene0002_00").exists()  # no stale scene of the old dataset
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left


def test_generate_non_empty_out_message(tmp_path, capsys):
    out = tmp_path / "ds"
    assert _generate(out, "--scenes", "1") == 0
    capsys.readouterr()
    assert _generate(out, "--scenes", "1") == 2
    err = capsys.readouterr().err
    assert "ponder datasets: error: --out" in err and "already holds a dataset (synthetic.json)" in err
    assert "--overwrite" in err


def test_generate_out_must_be_a_folder_and_overwrite_keeps_foreign_folders(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _generate(afile, "--scenes", "1") == 2
    assert "--out must be a folder" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "photos").mkdir()
    assert _generate(other, "--scenes", "1", "--overwrite") == 2
    assert "not a generated dataset" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine" and (other / "photos").is_dir()


def test_generate_into_an_empty_existing_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    generate_dataset(out, 1, config=SMALL, progress=False)
    assert (out / "synthetic.json").is_file()


# ------------------------------------------------------------------------------------------ 11: RGB-D frames


@pytest.fixture(scope="module")
def rgbd_scene(tmp_path_factory) -> Path:
    scene = generate_scene(5, SceneConfig(room_x=(3.0, 3.5), room_y=(3.0, 3.5), points_per_m2=50.0, num_frames=3,
                                          image_downscale=16))
    return write_rgbd_scene(tmp_path_factory.mktemp("rgbd") / "scene0000_00", "scene0000_00", scene.frames)


@pytest.fixture
def rgbd(rgbd_scene, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(rgbd_scene, tmp_path / "scene0000_00"))


def test_rgbd_reads_when_intact(rgbd):
    frames = load_rgbd_frames(rgbd, list_frames(rgbd, ALL_FRAMES))
    assert frames["depth"].shape == (3, 30, 40)


def test_corrupt_depth_png_names_the_file(rgbd):
    (rgbd / "depth" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(ValueError, match=r"depth/1\.png: not a readable image"):
        load_rgbd_frames(rgbd, [0, 1, 2])


def test_truncated_color_jpg_names_the_file(rgbd):
    data = (rgbd / "color" / "2.jpg").read_bytes()
    (rgbd / "color" / "2.jpg").write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"color/2\.jpg: not a readable image"):
        load_rgbd_frames(rgbd, [0, 1, 2])


def test_wrong_size_frame_names_the_file_and_both_sizes(rgbd):
    Image.fromarray(np.ones((5, 5), np.uint16)).save(rgbd / "depth" / "2.png")
    with pytest.raises(ValueError, match=r"depth/2\.png: 5x5 pixels, but the first frame .*depth/0\.png\) is 40x30"):
        load_rgbd_frames(rgbd, [0, 1, 2])


def test_garbage_pose_names_the_file(rgbd):
    (rgbd / "pose" / "1.txt").write_text("1 garbage 0 0\n")
    with pytest.raises(ValueError, match=r"pose/1\.txt: not a 4x4 matrix of numbers"):
        load_rgbd_frames(rgbd, [0, 1, 2])


def test_corrupt_frame_through_the_cli_is_one_line(rgbd, capsys, monkeypatch):
    """The CLI shows these as one line with exit 2 (ValueError), not a traceback (OSError)."""
    (rgbd / "depth" / "0.png").write_bytes(b"not a png")
    import ponder.cli as cli

    def handler(args: argparse.Namespace) -> int:
        load_rgbd_frames(rgbd, [0])
        return 0

    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=handler, command="evaluate", verbose=False)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main([]) == 2
    assert "ponder evaluate: error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 13, 14: scenes


def test_truncated_pth_scene_is_called_corrupt_not_foreign(tmp_path):
    file = tmp_path / "scene.pth"
    torch.save({"coord": np.zeros((100, 3), np.float32), "semantic_gt20": np.zeros(100, np.int64)}, file)
    assert len(load_scene(file)["coord"]) == 100
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_scene(file)
    assert "objects other than tensors" not in str(info.value)


def test_pth_scene_with_a_foreign_object_is_still_refused_as_foreign(tmp_path):
    file = tmp_path / "scene.pth"
    torch.save({"coord": np.zeros((4, 3), np.float32), "extra": argparse.Namespace(a=1)}, file)
    with pytest.raises(ValueError, match="objects other than tensors"):
        load_scene(file)


def test_float_segment_labels_are_refused_naming_the_file(tmp_path):
    scene = write_point_scene(tmp_path / "s", generate_scene(1, SMALL))
    labels = np.load(scene / "segment20.npy").astype(np.float32)
    np.save(scene / "segment20.npy", labels)  # whole numbers stored as float: fine
    assert (load_scene(scene)["segment"] == labels.astype(np.int64)).all()
    labels[3] = 3.5
    np.save(scene / "segment20.npy", labels)
    with pytest.raises(ValueError, match=r"segment20\.npy: labels must be whole numbers, found 3\.5"):
        load_scene(scene)


def test_float_labels_in_a_pth_scene_are_refused(tmp_path):
    file = tmp_path / "scene.pth"
    torch.save({"coord": np.zeros((4, 3), np.float32), "semantic_gt20": np.array([0, 1.5, 2, 3])}, file)
    with pytest.raises(ValueError, match=r"scene\.pth \['semantic_gt20'\]: labels must be whole numbers"):
        load_scene(file)


def test_a_data_folder_given_with_data_is_used_with_the_scenes_it_has(tmp_path):
    """``ponder train detect --data DIR``: the user's folder, however many scenes it holds (data.generate only
    sizes the config's own root); an incomplete one is still refused."""
    from training.detect.cli import ensure_data
    from training.detect.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / "detect-small-cpu.yaml")
    root = tmp_path / "mine"
    generate_dataset(root, 2, config=SMALL, progress=False)
    cfg.data.root = str(root)
    assert cfg.data.generate.scenes > 2
    ensure_data(cfg, given_root=True)  # used as it is
    with pytest.raises(ValueError, match="holds 2 generated scenes"):
        ensure_data(cfg)  # the config's own root must have what it asks for
    (root / "synthetic.json").unlink()
    with pytest.raises(ValueError, match="incomplete synthetic dataset"):
        ensure_data(cfg, given_root=True)
