"""New-user audit of the CLI, run through the real ``ponder`` script: a voxel cap before the model, ``--up -y``
spaced, exit 2 with one sentence (CUDA, convert, output paths), suffixes that match the content, warnings on one
line, georeferenced ``--colored`` PLYs in double, and help texts that match the service's settings."""

from __future__ import annotations

import os
import re
import subprocess
import typing
from pathlib import Path

import numpy as np
import pytest

from conftest import PONDER, random_room

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The rotation line of --up -y (every command prints it with ponder.inference_commands.rotation_text).
UP_Y_LINE = ("up: rotated the input into z-up by [0.000000 0.000000 1.000000; -1.000000 0.000000 0.000000; "
             "0.000000 -1.000000 0.000000] (row-major, coord_z_up = R @ coord)")


def ponder(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PONDER, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)


def assert_refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the needles in the error line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error, result.stderr
    for needle in needles:
        assert needle in error[-1], (needle, result.stderr)
    return error[-1]


@pytest.fixture(scope="module")
def clouds(tmp_path_factory) -> dict[str, Path]:
    """Small scenes: a room in metres, the same room in millimetres, and one without normals with NaN rows."""
    root = tmp_path_factory.mktemp("hardening")
    room = random_room(3000)
    paths = {"room": root / "room.npz", "mm": root / "room_mm.npz", "holes": root / "holes.npz"}
    np.savez(paths["room"], **room)
    np.savez(paths["mm"], coord=room["coord"] * 1000, color=room["color"], normal=room["normal"])
    holes = room["coord"].copy()
    holes[:100] = np.nan
    np.savez(paths["holes"], coord=holes, color=room["color"])  # no normals: estimated, with a warning
    return paths


# --- 1. voxel cap and millimetre warning -----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["features", "segment", "detect"])
def test_voxel_cap_refuses_before_the_model_and_names_units(tmp_path, clouds, command):
    out = tmp_path / {"features": "f.npy", "segment": "s.npz", "detect": "b.json"}[command]
    result = ponder(command, clouds["mm"], "-o", out, "--max-voxels", 1000)
    line = assert_refused(result, "3,000 voxels", "cap of 1,000", "--max-voxels N", "units", "--grid-size")
    assert "room_mm.npz" in line
    assert any(w.startswith("warning:") and "millimetres" in w for w in result.stderr.splitlines()), result.stderr
    assert not out.exists()


def test_default_voxel_cap_is_the_services(clouds):
    from service.settings import ServiceSettings

    from ponder.inference_commands import DEFAULT_MAX_VOXELS

    assert DEFAULT_MAX_VOXELS == ServiceSettings.model_fields["max_voxels"].default
    assert "1,500,000" in " ".join(ponder("segment", "--help").stdout.split())


# --- 2. --up -y spaced ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["features", "segment", "detect", "render"])
def test_up_takes_a_negative_axis_after_a_space(tmp_path, command):
    extra = ("--cameras", tmp_path / "cams.json") if command == "render" else ()
    out = tmp_path / {"features": "f.npy", "segment": "s.npz", "detect": "b.json", "render": "views"}[command]
    result = ponder(command, tmp_path / "missing.ply", "--up", "-y", "-o", out, *extra)
    assert "expected one argument" not in result.stderr, result.stderr
    # parsed: the command got as far as its first input (render reads its cameras first)
    assert_refused(result, "cams.json" if command == "render" else "missing.ply")


# --- 3. tracebacks -> exit 2 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["features", "segment", "detect"])
def test_cuda_without_cuda_is_one_sentence(tmp_path, clouds, command):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / {"features": "f.npy", "segment": "s.npz", "detect": "b.json"}[command]
    assert_refused(ponder(command, clouds["room"], "--device", "cuda", "-o", out), "CUDA is not available",
                   "--device cpu")


def test_convert_onto_an_existing_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    assert_refused(ponder("convert", tmp_path / "any.pth", "-o", target), str(target), "not a folder")
    assert target.read_text() == "mine"


# --- 4. output paths checked before any model work ------------------------------------------------------------------

def test_output_paths_are_checked_first_and_named(tmp_path, clouds):
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    (tmp_path / "folder.npy").mkdir()
    cases = [(("features", clouds["room"], "-o", tmp_path / "folder.npy"), "is a folder"),
             (("features", clouds["room"], "-o", a_file / "f.npy"), "is a file, not a folder"),
             (("segment", clouds["room"], "-o", tmp_path / "s.npz", "--colored", tmp_path / "folder.npy"),
              "is a folder"),
             (("detect", clouds["room"], "-o", tmp_path / "b.json", "--ply", a_file / "b.ply"), "not a folder")]
    if Path("/proc/self").is_dir():
        cases += [(("features", clouds["room"], "-o", "/proc/ponder-test.npy"), "/proc/ponder-test.npy"),
                  (("segment", clouds["room"], "-o", tmp_path / "s.npz", "--colored", "/proc/ponder-test.ply"),
                   "cannot create files in /proc")]
    for args, needle in cases:
        result = ponder(*args)
        line = assert_refused(result, needle)
        assert ".partial" not in line
        assert "wrote" not in result.stderr  # refused before inference, nothing written
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "b.json").exists()


# --- 5. suffix and content agree ------------------------------------------------------------------------------------

def test_suffix_must_name_the_format_written(tmp_path, clouds):
    assert_refused(ponder("features", clouds["room"], "-o", tmp_path / "f.npz"), "f.npy")
    assert_refused(ponder("segment", clouds["room"], "-o", tmp_path / "x.npy"), "x.npz")
    assert_refused(ponder("features", "--images", tmp_path, "--cameras", tmp_path / "c.json", "-o",
                          tmp_path / "f.npy"), "f.npz")
    assert_refused(ponder("segment", clouds["room"], "-o", tmp_path / "s.npz", "--colored", tmp_path / "c.obj"),
                   "c.ply")
    assert not list(tmp_path.glob("*.np?"))


# --- 6. --grid-size 0 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-0.02", "nan", "inf"])
def test_grid_size_must_be_positive(tmp_path, clouds, value):
    result = ponder("features", clouds["room"], "-o", tmp_path / "f.npy", f"--grid-size={value}")
    assert result.returncode == 2 and "--grid-size" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "f.npy").exists()


# --- 7. a checkpoint that needs full unpickling ---------------------------------------------------------------------

def test_unpickling_refusal_is_clean(tmp_path):
    import argparse

    import torch

    from model.build import build_model
    from model.config import BackboneConfig, ModelConfig

    small = BackboneConfig(base_channels=8, channels=(8,) * 8, layers=(1,) * 8)
    model = build_model(ModelConfig(kind="encoder", backbone=small))
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    line = assert_refused(ponder("inspect", path), "pickled.pth", "argparse.Namespace", "--trust-checkpoint")
    assert "\x1b" not in line and "[1m" not in line and "trust=True" not in line
    assert ponder("inspect", path, "--trust-checkpoint").returncode == 0


# --- 8, 9, 11. one successful segment and detect: warnings, --colored, the rotation line ----------------------------

def test_segment_prints_real_path_one_line_warnings_and_left_out_points(tmp_path, clouds):
    from plyfile import PlyData

    out, colored = tmp_path / "out" / "x.npz", tmp_path / "c.ply"
    result = ponder("segment", clouds["holes"], "--up", "-y", "-o", out, "--colored", colored)
    assert result.returncode == 0, result.stderr
    err = result.stderr.splitlines()
    assert f"wrote {out}:" in result.stderr and out.is_file() and not Path(str(out) + ".npz").exists()
    assert UP_Y_LINE in err
    assert any(line.startswith("warning:") and "no normals" in line for line in err), result.stderr
    assert not [line for line in err if re.search(r"\.py:\d+", line) or line.startswith("  ")], result.stderr
    assert any("left out 100 of 3,000 points" in line for line in err), result.stderr
    vertex = PlyData.read(str(colored))["vertex"]
    assert vertex.count == 2900 and vertex["x"].dtype == np.float32  # no origin: float32 as before


def test_detect_prints_the_same_rotation_line(tmp_path, clouds):
    result = ponder("detect", clouds["room"], "--up", "-y", "-o", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    assert UP_Y_LINE in result.stderr.splitlines()


def test_colored_ply_of_georeferenced_input_is_world_double(tmp_path, clouds):
    laspy = pytest.importorskip("laspy")
    from plyfile import PlyData

    room = np.load(clouds["room"])
    offset = np.array([500123.25, 4000456.5, 120.0])
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales, header.offsets = [0.001] * 3, [500000.0, 4000000.0, 100.0]
    las = laspy.LasData(header)
    world = room["coord"].astype(np.float64) + offset
    las.x, las.y, las.z = world[:, 0], world[:, 1], world[:, 2]
    las.red, las.green, las.blue = (room["color"].astype(np.uint16) * 256).T
    las.write(str(tmp_path / "utm.las"))
    result = ponder("segment", tmp_path / "utm.las", "-o", tmp_path / "s.npz", "--colored", tmp_path / "c.ply")
    assert result.returncode == 0, result.stderr
    vertex = PlyData.read(str(tmp_path / "c.ply"))["vertex"]
    assert vertex["x"].dtype == np.float64
    written = np.stack([vertex["x"], vertex["y"], vertex["z"]], 1)
    assert np.abs(written - world).max() < 0.001  # the LAS scale; float32 would be off by up to 0.125 m


# --- 10, 12. help texts ---------------------------------------------------------------------------------------------

def test_serve_backend_choices_match_the_settings():
    from service.settings import ServiceSettings

    allowed = typing.get_args(ServiceSettings.model_fields["backend"].annotation)
    shown = re.search(r"--backend \{([^}]*)\}", ponder("serve", "--help").stdout)
    assert shown and set(shown.group(1).split(",")) == set(allowed)


@pytest.mark.parametrize("command", ["features", "segment", "detect"])
def test_input_has_help(command):
    text = ponder(command, "--help").stdout
    positional = text.split("positional arguments:")[1].split("options:")[0]
    assert re.search(r"input\s+point cloud", positional), positional


def test_inspect_names_a_detectors_head(capsys):
    """The bundled detector's kind is 'encoder'; inspect shows its detection head and classes (text and JSON)."""
    import json

    from ponder.cli import main

    detect = Path(__file__).resolve().parents[1] / "model" / "default_model" / "detect"
    assert main(["inspect", str(detect)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^detection +voting head, 18 classes: cabinet, bed", text, re.M), text
    assert main(["inspect", str(detect), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["detection"]["class_names"]) == 18
    assert main(["inspect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["detection"] is None


@pytest.mark.parametrize("folder, kind, classes", [("images", "image-render", 0), ("images-segment", "image-segment", 20)])
def test_inspect_describes_image_models(capsys, folder, kind, classes):
    """The bundled image models (``ponder images``) are folders inspect reads too, not 'invalid model config'."""
    import json

    from ponder.cli import main

    path = Path(__file__).resolve().parents[1] / "model" / "default_model" / folder
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^kind +{kind} ", text, re.M), text
    assert re.search(r"^backbone +ResNet-\d+ ", text, re.M), text
    assert re.search(r"^volume +\d+ x \d+ x \d+ cells of ", text, re.M), text
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == kind and len(info["class_names"]) == classes and info["parameters"] > 0


def test_inspect_render_head_is_one_line(capsys):
    from ponder.cli import main

    render = Path(__file__).resolve().parents[1] / "model" / "default_model" / "render"
    assert main(["inspect", str(render)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("render"))
    assert re.fullmatch(r"render +volume 48 x 48 x 16 cells of 0\.02 m, \d+ samples per ray, decoders: sdf, rgb", line)


def test_a_folder_without_config_json_is_said_aloud(tmp_path):
    """Weights without their config.json: the architecture is inferred (as for an official file) with a warning
    that class names / grid / inputs are defaults; weights that say nothing of an architecture: exit 2."""
    import shutil

    import torch
    from safetensors.torch import save_file

    bundled = Path(__file__).resolve().parents[1] / "model" / "default_model" / "model.safetensors"
    lost = tmp_path / "lost"
    lost.mkdir()
    shutil.copy(bundled, lost / "model.safetensors")
    result = ponder("inspect", lost)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "no config.json beside model.safetensors" in warning[0], result.stderr
    assert "kind segmentor" in warning[0] and "defaults" in warning[0]
    junk = tmp_path / "junk"
    junk.mkdir()
    save_file({"a": torch.zeros(3)}, str(junk / "model.safetensors"))
    assert_refused(ponder("inspect", junk), "no config.json", "cannot be inferred")


@pytest.mark.parametrize("command, wrong, right", [("features", "f.txt", ".npy"), ("segment", "s.txt", ".npz"),
                                                   ("detect", "b.txt", ".json")])
def test_an_output_suffix_that_does_not_match_is_refused_naming_the_right_one(tmp_path, clouds, command, wrong,
                                                                              right):
    assert_refused(ponder(command, clouds["room"], "-o", tmp_path / wrong), f"is written as {right}")
    assert not (tmp_path / wrong).exists()
