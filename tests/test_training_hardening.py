"""Training-side CLI hardening (audit of ``ponder train``/``ponder evaluate``): settings are checked before the
run folder exists, a diverging run or a damaged/incompatible ``--resume`` ends in one line (exit 2) and leaves
the run as it was, the official container carries the model config, and outputs are checked up front."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from model.checkpoint import CheckpointError
from model.config import ModelConfig
from ponder.cli import main
from test_engine import Regression
from test_pretrain import make_data, tiny_config
from test_segment_train import TINY_BACKBONE
from training.cli_common import write_json
from training.data.synthetic import SceneConfig, generate_dataset
from training.engine import ResumeError, Trainer, TrainingDiverged
from training.train_config import OptimConfig, TrainConfig
from training.pretrain.config import PretrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _write(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def _err(capsys) -> str:
    """stderr of the last command, which must be one error line."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def pretrain_root(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("hardening") / "rooms")


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, pretrain_root) -> tuple[Path, Path]:
    """(config, run folder) of a finished one-step ``ponder train pretrain`` run."""
    work = tmp_path_factory.mktemp("pt-run")
    cfg = _write(work / "pt.yaml", tiny_config(pretrain_root))
    assert main(["train", "pretrain", "--config", str(cfg), "--out", str(work / "run")]) == 0
    return cfg, work / "run"


# ------------------------------------------------------------------------------------------ #3, #12, #14: settings


@pytest.mark.parametrize("train, message", [
    ({"epochs": 0}, "train.epochs must be >= 1, got 0"),
    ({"steps_per_epoch": -3}, "train.steps_per_epoch must be >= 0, got -3"),
    ({"batch_size": 0}, "train.batch_size must be >= 1, got 0"),
    ({"num_workers": -1}, "train.num_workers must be >= 0, got -1"),
    ({"log_every": 0}, "train.log_every must be >= 1, got 0"),
    ({"device": "tpu"}, "train.device: unknown device 'tpu'; use cpu or cuda"),
    ({"optim": {"optimizer": "lion"}}, "train.optim.optimizer must be one of ['sgd', 'adamw'], got 'lion'"),
    ({"optim": {"lr": float("nan")}}, "train.optim.lr must be a finite number > 0, got nan"),
    ({"optim": {"weight_decay": -1.0}}, "train.optim.weight_decay must be a finite number >= 0"),
    ({"optim": {"clip_grad": 0.0}}, "train.optim.clip_grad"),
])
def test_train_section_is_validated_before_the_run_folder_exists(tmp_path, pretrain_root, capsys, train, message):
    cfg = _write(tmp_path / "c.yaml", tiny_config(pretrain_root, **train))
    assert main(["train", "pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert message in _err(capsys)
    assert not (tmp_path / "run").exists()


def test_every_task_config_validates_its_train_section():
    from training.detect.config import DetectConfig
    from training.images.config import ImagePretrainConfig
    from training.images.segment import ImageSegmentTrainConfig
    from training.segment.config import config_from_dict

    bad = {"epochs": 0}
    loaders = [lambda: config_from_dict({"train": bad}),
               lambda: DetectConfig.from_dict({"model": {"backbone": TINY_BACKBONE}, "train": bad}),
               lambda: ImagePretrainConfig.from_dict({"model": {}, "train": bad}),
               lambda: ImageSegmentTrainConfig.from_dict({"train": bad})]
    for load in loaders:
        with pytest.raises(ValueError, match=r"train.epochs must be >= 1, got 0"):
            load()


def test_steps_per_epoch_zero_means_derived_from_the_data(tmp_path):
    train = TrainConfig(epochs=2, steps_per_epoch=0, batch_size=8)
    assert Trainer(nn.Linear(4, 1), Regression(), train, tmp_path).total_steps == 2 * 64 // 8


def test_threads_and_eval_counts_are_validated(tmp_path, pretrain_root, capsys):
    for extra, message in (({"threads": -3}, "threads must be >= 1, got -3"),
                           ({"eval": {"scenes": 0}}, "eval.scenes must be >= 1, got 0"),
                           ({"eval": {"views": -1}}, "eval.views must be >= 1, got -1")):
        cfg = _write(tmp_path / "c.yaml", {**tiny_config(pretrain_root), **extra})
        assert main(["train", "pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
        assert message in _err(capsys)
    assert not (tmp_path / "run").exists()


def test_epochs_flag_takes_positive_integers(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "segment", "--config", str(tmp_path / "c.yaml"), "--epochs", "-5"])
    assert exit_info.value.code == 2
    assert "--epochs: must be at least 1, got -5" in capsys.readouterr().err


def test_evaluate_detect_iou_must_lie_strictly_between_0_and_1(tmp_path, capsys):
    for iou in ("0", "1"):
        assert main(["evaluate", "detect", "--data", str(tmp_path), "--checkpoint", str(tmp_path), "--iou", iou]) == 2
        assert "--iou thresholds must lie in (0, 1)" in _err(capsys)


# ------------------------------------------------------------------------------------------ #13: files


def test_config_file_errors_are_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    (tmp_path / "bin.yaml").write_bytes(b"\xc4\x80\xff\xfe binary")
    for name, message in (("bad.yaml", "bad.yaml: not valid YAML (while parsing a flow sequence"),
                          ("bin.yaml", "bin.yaml: not a text (UTF-8) file"),
                          (".", ": is a folder, not a config file")):
        assert main(["train", "pretrain", "--config", str(tmp_path / name)]) == 2
        assert message in _err(capsys)


def test_out_must_be_a_folder(tmp_path, pretrain_root, capsys):
    cfg = _write(tmp_path / "c.yaml", tiny_config(pretrain_root))
    (tmp_path / "afile").write_text("x")
    assert main(["train", "pretrain", "--config", str(cfg), "--out", str(tmp_path / "afile")]) == 2
    assert "--out must be a folder" in _err(capsys)


def test_json_destination_is_checked_before_the_work_and_written_atomically(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for target, message in ((tmp_path, "is a folder; give a file name"),
                            (tmp_path / "afile" / "m.json", "is a file, not a folder")):
        # the checkpoint does not exist: the --json check must come first
        assert main(["evaluate", "detect", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "none"),
                     "--json", str(target)]) == 2
        assert message in _err(capsys)
    write_json(tmp_path / "new" / "m.json", {"a": 1})
    assert json.loads((tmp_path / "new" / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["m.json"]  # no .partial left


# ------------------------------------------------------------------------------------------ #4: divergence


class NanGradient(Regression):
    """A finite loss whose gradient is infinite (sqrt at 0): the step makes the weights non-finite."""

    def losses(self, model, batch, generator):
        x, _ = batch
        return {"loss": torch.sqrt((model(x) * 0).abs()).mean()}


def _sgd(lr: float, clip: float | None = None, epochs: int = 1) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=8, log_every=1000,
                       optim=OptimConfig(optimizer="sgd", lr=lr, clip_grad=clip))


def test_a_diverging_loss_stops_with_a_hint(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: loss became (inf|nan); lower "
                                               r"train.optim.lr or set train.optim.clip_grad"):
        Trainer(nn.Linear(4, 1), Regression(), _sgd(1e12, epochs=2), tmp_path).fit()


def test_non_finite_weights_stop_the_run_before_the_next_step(tmp_path):
    trainer = Trainer(nn.Linear(4, 1), NanGradient(), _sgd(0.1), tmp_path)
    with pytest.raises(TrainingDiverged, match="at step 1: the weights became non-finite after the optimizer step"):
        trainer.fit()
    assert not trainer.last_path.exists()  # NaN weights are never saved


def test_a_diverging_pretrain_run_is_one_line_exit_2(tmp_path, pretrain_root, capsys):
    cfg = _write(tmp_path / "c.yaml", tiny_config(pretrain_root, steps_per_epoch=3,
                                                  optim={"optimizer": "adamw", "lr": 1e30}))
    assert main(["train", "pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = _err(capsys)
    assert "training diverged at step" in err and "lower train.optim.lr" in err


# ------------------------------------------------------------------------------------------ #5, #6, #14: resume


def _finished(tmp_path: Path, cfg: TrainConfig, model: nn.Module | None = None) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(model or nn.Linear(4, 1), Regression(), cfg, tmp_path / "run")
    trainer.fit()
    return trainer


def test_resume_refuses_a_damaged_or_incompatible_run(tmp_path):
    base = _sgd(0.01, epochs=2)
    first = _finished(tmp_path, base)
    data = first.last_path.read_bytes()

    def resume(cfg: TrainConfig, model: nn.Module | None = None) -> None:
        Trainer(model or nn.Linear(4, 1), Regression(), cfg, tmp_path / "run").resume()

    first.last_path.write_bytes(data[:2000])
    with pytest.raises(CheckpointError, match="model_last.pth: not a readable (PyTorch )?checkpoint"):
        resume(base)
    first.last_path.write_bytes(data)
    with pytest.raises(ResumeError, match=r"shape mismatches: weight: checkpoint \(1, 4\) vs model \(2, 4\)"):
        resume(base, nn.Linear(4, 2))
    adamw = copy.deepcopy(base)
    adamw.optim.optimizer = "adamw"
    with pytest.raises(ResumeError, match="optimizer changed from sgd to adamw"):
        resume(adamw)
    longer = _sgd(0.01, epochs=3)
    with pytest.raises(ResumeError, match=r"--resume needs the schedule the run started with \(16 steps\); this "
                                          r"config gives 24"):
        resume(longer)
    assert Trainer(nn.Linear(4, 1), Regression(), base, tmp_path / "run").resume()  # the same config resumes


def test_resume_failure_leaves_config_yaml_untouched(tmp_path, pretrain_run, pretrain_root, capsys):
    _, run = pretrain_run
    run_copy = shutil.copytree(run, tmp_path / "run")
    before = (run_copy / "config.yaml").read_text()
    longer = _write(tmp_path / "c.yaml", tiny_config(pretrain_root, epochs=3))
    assert main(["train", "pretrain", "--config", str(longer), "--out", str(run_copy), "--resume"]) == 2
    assert "--resume needs the schedule the run started with (1 step); this config gives 3" in _err(capsys)
    assert (run_copy / "config.yaml").read_text() == before


def test_resume_without_a_run_says_it_starts_from_scratch(tmp_path, caplog):
    from training.cli_common import open_run

    class Args:
        out, resume = tmp_path / "typo", True

    class Cfg:
        train, out_dir = TrainConfig(), "unused"

    with caplog.at_level(logging.WARNING):
        open_run(Args(), Cfg())
    assert "holds no run yet" in caplog.text and "starting from scratch" in caplog.text


# ------------------------------------------------------------------------------------------ #2: official container


def test_official_container_carries_the_model_config_and_evaluates_like_final(pretrain_run, capsys):
    cfg_path, run = pretrain_run
    ckpt = torch.load(run / "model" / "model_last.pth", map_location="cpu", weights_only=True)
    expected = PretrainConfig.from_dict(yaml.safe_load(cfg_path.read_text())).model
    assert ModelConfig.from_dict(ckpt["ponder_config"]) == expected
    capsys.readouterr()
    scores = []
    for checkpoint in (run / "final", run / "model" / "model_last.pth"):
        assert main(["evaluate", "pretrain", "--config", str(cfg_path), "--checkpoint", str(checkpoint)]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["psnr_db"])
    assert scores[0] == scores[1]


# ------------------------------------------------------------------------------------------ #10: labels


@pytest.fixture(scope="module")
def point_rooms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg-hardening") / "rooms"
    rooms = SceneConfig(room_x=(2.5, 2.5), room_y=(2.5, 2.5), points_per_m2=200.0, num_frames=0)
    generate_dataset(root, 2, seed=3, config=rooms, splits=(("train", 1.0),), progress=False)
    return root


def test_segmentation_without_labelled_points_is_refused(tmp_path, point_rooms, capsys):
    data = shutil.copytree(point_rooms, tmp_path / "unlabelled")
    for scene in (data / "train").iterdir():
        labels = np.load(scene / "segment20.npy")
        np.save(scene / "segment20.npy", np.full_like(labels, -1))
    cfg = _write(tmp_path / "seg.yaml", {
        "model": {"head": "linear", "backbone": TINY_BACKBONE},
        "data": {"root": str(data), "augment": "none", "point_max": 2000}, "evaluate": {"mode": "none"},
        "train": {"epochs": 1, "batch_size": 1, "optim": {"optimizer": "adamw", "lr": 0.01}}})
    assert main(["train", "segment", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "no labelled points in the training split" in _err(capsys)
    assert not (tmp_path / "run").exists()


def test_detection_label_fraction_says_how_many_scenes_it_keeps(point_rooms, caplog):
    from training.detect.cli import _report_label_fraction
    from training.detect.config import DetectConfig

    cfg = DetectConfig.from_dict({"model": {"backbone": TINY_BACKBONE},
                                  "data": {"root": str(point_rooms), "label_fraction": 1e-9}})
    with caplog.at_level(logging.INFO):
        _report_label_fraction(cfg, 1)
    assert "label fraction 1e-09 keeps 1 of 2 training scenes" in caplog.text
