"""Detection training: targets follow the augmented boxes, a tiny run lowers the loss and yields a working
checkpoint, encoders load from any checkpoint, a frozen backbone stays frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import fixture_dir
from model.checkpoint import load_checkpoint
from model.detection import detect, points_in_boxes
from model.inference import Predictor
from ponder.cli import main
from training.data.classes import DETECTION_NAMES
from training.data.synthetic import SceneConfig, generate_dataset
from training.detect.config import AugmentConfig, ConfigError, DetectConfig
from training.detect.dataset import DetectionSamples, DetectionScenes, find_scene_dirs, voxel_targets
from training.detect.task import DetectorTrainer, DetectTask, build_detector
from training.engine import Trainer
from training.train_config import OptimConfig, TrainConfig

SMALL_BACKBONE = {"type": "SpUNet-v1m1", "in_channels": 6, "base_channels": 16,
                  "channels": [16, 24, 32, 48, 48, 32, 24, 24], "layers": [1, 1, 1, 1, 1, 1, 1, 1]}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("det-train")
    cfg = SceneConfig(room_x=(3.0, 3.5), room_y=(3.0, 3.5), num_frames=0, points_per_m2=300)
    generate_dataset(root, 2, seed=11, config=cfg, splits=(("train", 0.5), ("val", 0.5)), progress=False)
    return root


def _config(root, **train) -> dict:
    return {
        "model": {"name": "tiny-detector", "backbone": SMALL_BACKBONE, "grid_size": 0.1,
                  "head": {"hidden_channels": 32, "num_layers": 1}},
        "data": {"root": str(root), "train_split": "train", "val_split": "val"},
        "augment": {"quarter_turns": False, "rotate_deg": 5.0, "color": False, "jitter": 0.0},
        "eval": {"score_threshold": 0.05},
        "train": {"epochs": 1, "batch_size": 1, "seed": 0, "log_every": 1000,
                  "optim": {"optimizer": "adamw", "lr": 0.01, "pct_start": 0.1, "clip_grad": 10.0}, **train},
    }


def test_voxel_targets_follow_the_augmented_boxes(data_root):
    scenes = DetectionScenes(find_scene_dirs(data_root, "train"), DETECTION_NAMES)
    samples = DetectionSamples(scenes, 0.05, ("color", "normal"), AugmentConfig(rotate_deg=40.0, scale=(0.8, 1.2), jitter=0.0))
    for seed in range(3):
        sample = samples.load(0, np.random.default_rng(seed))
        t = sample["targets"]
        assert t.foreground.any() and (~t.foreground).any()
        fg = np.flatnonzero(t.foreground)
        pos = sample["position"][fg].astype(np.float64)
        # The box each voxel votes for, rebuilt from its targets, must contain the voxel (within float error).
        yaw = np.arctan2(t.yaw[fg, 0], t.yaw[fg, 1]) / 4
        boxes = np.c_[pos + t.offset[fg], np.exp(t.log_size[fg]) + 1e-4, yaw]
        inside = [points_in_boxes(p[None], b[None])[0, 0] for p, b in zip(pos, boxes)]
        assert np.mean(inside) == 1.0
        assert np.all(np.abs(yaw) <= np.pi / 4 + 1e-6)
        np.testing.assert_allclose(t.weight[fg].mean(), 1.0, rtol=1e-5)


def test_targets_without_instance_labels_use_the_smallest_containing_box():
    # A chair (small box) pushed under a table (large box): the voxel inside both belongs to the chair.
    boxes = np.array([[0, 0, 0.4, 2, 1, 0.8, 0], [0.5, 0, 0.3, 0.5, 0.5, 0.6, 0]])
    positions = np.array([[0.5, 0, 0.3], [-0.8, 0, 0.3], [5, 5, 5]])
    t = voxel_targets(positions, boxes, np.array([4, 2]), None, None)
    assert t.foreground.tolist() == [True, True, False]
    assert t.label.tolist() == [2, 4, -1]
    np.testing.assert_allclose(t.offset[:2], [[0, 0, 0], [0.8, 0, 0.1]], atol=1e-6)
    np.testing.assert_allclose(np.exp(t.log_size[0]), [0.5, 0.5, 0.6], rtol=1e-6)
    empty = voxel_targets(positions, np.zeros((0, 7)), np.zeros(0, int), None, None)
    assert not empty.foreground.any() and (empty.label == -1).all()


def test_config_errors_name_the_problem(data_root):
    with pytest.raises(ConfigError, match="unknown data keys"):
        DetectConfig.from_dict({**_config(data_root), "data": {"rooot": "x"}})
    with pytest.raises(ConfigError, match="label_fraction"):
        DetectConfig.from_dict({**_config(data_root), "data": {"label_fraction": 0.0}})
    with pytest.raises(ConfigError, match="ScanNet-20"):
        DetectConfig.from_dict({**_config(data_root), "data": {"class_names": ["spaceship"]}})


def test_tiny_run_lowers_the_loss_and_saves_a_working_detector(tmp_path, data_root, capsys):
    cfg_file = tmp_path / "detect.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(data_root, epochs=30)))
    out = tmp_path / "run"
    assert main(["train", "detect", "--config", str(cfg_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and (out / "metrics.json").is_file()          # evaluated on the val split

    history = torch.load(out / "model" / "model_last.pth", weights_only=True)["history"]
    losses = [h["loss"] for h in history]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses

    loaded = load_checkpoint(out / "final")
    keys = loaded.model.state_dict().keys()
    assert any(k.startswith("detector.") for k in keys) and any(k.startswith("backbone.") for k in keys)
    assert loaded.config.grid_size == 0.1 and loaded.config.detection.class_names == tuple(DETECTION_NAMES)
    scene = DetectionScenes(find_scene_dirs(data_root, "train"), DETECTION_NAMES)
    result = detect(Predictor(loaded), scene.cloud(0), score_threshold=0.0)
    assert result.boxes.shape[1] == 7 and len(result.scores) == len(result.labels) == len(result.boxes)
    assert np.all(np.diff(result.scores) <= 0)


def test_encoder_comes_from_an_official_checkpoint_and_can_stay_frozen(tmp_path, data_root):
    fixture = fixture_dir("spunet_v1m1_seg")
    cfg = DetectConfig.from_dict(_config(data_root))
    cfg.model.init, cfg.model.freeze_backbone = str(fixture / "checkpoint.pth"), True
    model, model_cfg = build_detector(cfg)
    official = load_checkpoint(fixture / "checkpoint.pth").model.state_dict()
    state = model.state_dict()
    encoder = [k for k in state if not k.startswith("detector.")]
    assert encoder and all(torch.equal(state[k], official[k]) for k in encoder)
    assert "backbone.final.weight" not in state and model_cfg.backbone.channels == (16, 24, 32, 48, 48, 32, 24, 24)

    before = {k: v.clone() for k, v in state.items()}
    trainer_model = DetectorTrainer(model, cfg.loss, None, freeze_backbone=True)
    train_cfg = TrainConfig(epochs=1, batch_size=1, steps_per_epoch=2, log_every=1000,
                            optim=OptimConfig(optimizer="adamw", lr=0.01))
    Trainer(trainer_model, DetectTask(cfg, model_cfg), train_cfg, tmp_path / "frozen").fit()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in encoder)           # weights and BatchNorm statistics
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("detector."))
