"""Image pre-training through the shared engine: the configs parse, a tiny run lowers the loss, resume is
bit-exact, the trained folder loads, and held-out views are scored; plus ``ponder images train|evaluate``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from model.images import load_image_model
from ponder.cli import main
from training.data.synthetic import SceneConfig, generate_dataset
from training.engine import Trainer
from training.images.config import ConfigError, ImagePretrainConfig, load_config
from training.images.evaluate import evaluate_image_views
from training.images.task import ImagePretrainTask, build_image_model

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_config(root: Path) -> dict:
    return {
        "model": {"backbone": {"width": 8}, "lift": {"dim": 4},
                  "render": {"projection": {"out_channels": 8, "f_maps": [8, 16]},
                             "field": {"hidden_size": 16, "geo_dim": 8},
                             "sampler": {"num_samples": 8, "num_samples_importance": 4},
                             "loss": {"semantic_loss": 0.0}, "grid_shape": [16, 16, 8], "ray_nsample": 32}},
        "data": {"root": str(root), "input_views": 2, "target_views": 1, "frames": {"start": 0, "stop": None, "step": 2}},
        "eval": {"frames": {"start": 1, "stop": None, "step": 2}, "scenes": 1, "views": 1},
        "train": {"epochs": 1, "batch_size": 1, "seed": 0, "log_every": 100,
                  "optim": {"optimizer": "adamw", "lr": 0.005, "pct_start": 0.2}},
    }


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One small generated room (2.5 x 2.5 m, 6 frames of 40 x 30 pixels) in the real layouts."""
    root = tmp_path_factory.mktemp("images-data")
    generate_dataset(root, 1, 0, SceneConfig(num_frames=6, image_downscale=16, points_per_m2=400,
                                             room_x=(2.5, 2.5), room_y=(2.5, 2.5)),
                     splits=(("train", 1.0),), progress=False)
    return root


@pytest.fixture(scope="module")
def cfg(data_root) -> ImagePretrainConfig:
    return ImagePretrainConfig.from_dict(tiny_config(data_root))


def test_shipped_configs_parse():
    small = load_config(CONFIGS / "pretrain-images-small-cpu.yaml")
    assert small.model.render.projection.in_channels == small.model.lifted_channels == 33
    big = load_config(CONFIGS / "pretrain-images-scannet.yaml")
    assert big.model.backbone.width == 64 and big.train.device == "cuda"
    with pytest.raises(ConfigError, match="unknown"):
        ImagePretrainConfig.from_dict({**tiny_config(Path(".")), "bogus": 1})
    with pytest.raises(ConfigError, match="fusion"):
        ImagePretrainConfig.from_dict({**tiny_config(Path(".")), "model": {"lift": {"fusion": "max"}}})


def test_a_batch_holds_inputs_targets_and_bounds(cfg):
    task = ImagePretrainTask(cfg)
    batch = task.collate([task.load_sample(0, np.random.default_rng(0))])
    assert batch["images"].shape == (1, 2, 30, 40, 3) and batch["rgb"].shape == (1, 1, 30, 40, 3)
    assert batch["K"].shape == (1, 2, 3, 3) and batch["extrinsic"].shape == (1, 1, 4, 4)
    lo, hi = batch["bounds"][0]
    assert (hi - lo > 2.0).all()


def test_resume_through_the_image_task_is_bit_exact(cfg, tmp_path):
    c = copy.deepcopy(cfg)
    c.train.epochs, c.train.steps_per_epoch, c.train.save_every = 2, 2, 1
    straight = Trainer(build_image_model(c), ImagePretrainTask(c), c.train, tmp_path / "straight")
    straight.fit(resume=False)
    first = Trainer(build_image_model(c), ImagePretrainTask(c), c.train, tmp_path / "resumed")
    first.total_steps = 3  # interrupted after step 3 (a checkpoint is written at every step)
    first.fit(resume=False)
    resumed = Trainer(build_image_model(c), ImagePretrainTask(c), c.train, tmp_path / "resumed")
    resumed.fit(resume=True)
    assert resumed.step == straight.step == 4
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert all(np.isfinite(h["loss"]) for h in straight.history)
    for (k, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_cli_train_then_evaluate_held_out_views(cfg, data_root, tmp_path, capsys):
    doc = tiny_config(data_root)
    doc["train"].update(epochs=3)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    assert main(["images", "train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    model = load_image_model(tmp_path / "run" / "final")
    result = evaluate_image_views(model, cfg.data, cfg.eval)
    assert len(result.views) == 1 and np.isfinite(result.psnr) and np.isfinite(result.depth_mae)
    assert main(["images", "evaluate", "--config", str(tmp_path / "cfg.yaml"), "--checkpoint",
                 str(tmp_path / "run" / "final"), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["views"] == 1
    assert main(["images", "train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "--resume" in capsys.readouterr().err
