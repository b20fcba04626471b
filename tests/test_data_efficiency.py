"""The data-efficient experiment script (training/experiments/data_efficiency.py) end to end in its --quick form
on tiny generated rooms: every (task, init, label share) cell is trained and scored, the two arms really differ
in their initialisation, detection keeps its own voxel size, finished runs are reused, bad arguments exit 2."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import fixture_dir
from model.inference import default_checkpoint
from training.data.synthetic import SceneConfig, generate_dataset
from training.experiments.data_efficiency import main

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

FRACTIONS = ["0.25", "1"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("efficiency")
    rooms = SceneConfig(room_x=(2.5, 3.0), room_y=(2.5, 3.0), points_per_m2=400.0, num_frames=0)
    generate_dataset(root / "data", 5, seed=3, config=rooms, splits=(("train", 0.8), ("val", 0.2)), progress=False)
    argv = ["--pretrained", str(default_checkpoint("render")), "--out", str(root / "out"), "--data",
            str(root / "data"), "--fractions", *FRACTIONS, "--quick", "--threads", "1"]
    assert main(argv) == 0
    return root, argv


def test_every_cell_is_trained_and_scored(experiment, capsys):
    root, _ = experiment
    results = json.loads((root / "out" / "results.json").read_text())
    cells = {(r["task"], r["metric"], r["init"], r["fraction"]) for r in results}
    assert cells == {(t, m, a, float(f)) for t, metrics in (("segmentation", ("mIoU", "allAcc")),
                                                            ("detection", ("mAP@0.25", "mAP@0.5")))
                     for m in metrics for a in ("pretrained", "random") for f in FRACTIONS}
    for r in results:
        assert r["value"] is not None and math.isfinite(r["value"]) and 0 <= r["value"] <= 1, r
    table = (root / "out" / "results.txt").read_text()
    for row in ("segmentation  mIoU      pretrained", "segmentation  allAcc    random",
                "detection     mAP@0.25  pretrained", "detection     mAP@0.5   random"):
        assert row in table
    assert "25% labels" in table and "100% labels" in table and "--quick" in table


def test_arms_differ_only_in_initialisation(experiment):
    root, _ = experiment
    pretrained = yaml.safe_load((root / "out" / "detect" / "pretrained-25%" / "experiment.yaml").read_text())
    random = yaml.safe_load((root / "out" / "detect" / "random-25%" / "experiment.yaml").read_text())
    assert pretrained["model"]["init"] == str(default_checkpoint("render"))
    assert random["model"]["init"] is None and random["model"]["backbone"]["num_classes"] == 0
    # detection trains at its config's voxel size (8 cm), not the 2 cm of the pre-training checkpoint
    assert pretrained["model"]["grid_size"] == random["model"]["grid_size"] == 0.08
    assert pretrained["data"]["label_fraction"] == 0.25


def test_finished_runs_are_reused(experiment, capsys):
    root, argv = experiment
    metrics = sorted((root / "out").glob("*/*/metrics.json"))
    assert len(metrics) == 2 * 2 * len(FRACTIONS)
    stamps = [m.stat().st_mtime_ns for m in metrics]
    assert main(argv) == 0
    assert [m.stat().st_mtime_ns for m in metrics] == stamps
    assert "detection     mAP@0.25  random" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--fractions", "0"], ["--fractions", "1.5"], ["--scenes", "1"]])
def test_bad_arguments_exit_2(tmp_path, extra):
    with pytest.raises(SystemExit) as exc:
        main(["--pretrained", str(default_checkpoint("render")), "--out", str(tmp_path), *extra])
    assert exc.value.code == 2


def test_detection_runs_share_one_step_budget(experiment, tmp_path):
    """Without --quick every detection share trains as many steps as the 100 % run (4 scenes, batch 2 -> 2 steps
    per epoch; --detect-steps 3 -> 2 epochs), so the one-scene run is not starved of optimisation."""
    root, _ = experiment
    argv = ["--pretrained", str(default_checkpoint("render")), "--out", str(tmp_path), "--data", str(root / "data"),
            "--fractions", *FRACTIONS, "--tasks", "detect", "--detect-steps", "3", "--threads", "1"]
    assert main(argv) == 0
    for share in ("25%", "100%"):
        for arm in ("pretrained", "random"):
            train = yaml.safe_load((tmp_path / "detect" / f"{arm}-{share}" / "experiment.yaml").read_text())["train"]
            assert (train["steps_per_epoch"], train["epochs"]) == (2, 2)


def test_bad_checkpoints_exit_2_with_a_message(tmp_path, capsys):
    render = str(default_checkpoint("render"))
    assert main(["--pretrained", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["--pretrained", f"a={render}", f"a={render}", "--out", str(tmp_path)]) == 2
    assert "distinct LABEL=PATH" in capsys.readouterr().err
    other = fixture_dir("spunet_v1m1_seg") / "checkpoint.pth"  # an official checkpoint of another size
    assert main(["--pretrained", f"a={render}", f"b={other}", "--out", str(tmp_path)]) == 2
    assert "one architecture" in capsys.readouterr().err


def test_labelled_checkpoints_are_arms_of_their_own(experiment, tmp_path, capsys):
    root, _ = experiment
    render = str(default_checkpoint("render"))
    argv = ["--pretrained", f"small={render}", f"again={render}", "--out", str(tmp_path), "--data",
            str(root / "data"), "--fractions", "1", "--tasks", "detect", "--quick", "--threads", "1"]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "detect").iterdir()) == [
        "pretrained-again-100%", "pretrained-small-100%", "random-100%"]
    out = capsys.readouterr().out
    assert "detection     mAP@0.25  pretrained-small" in out and "pretrained-again" in out
