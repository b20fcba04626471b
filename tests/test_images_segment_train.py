"""Segmentation fine-tuning from posed images on generated rooms: the shipped config parses, a batch carries the
labelled points, resume through the segment task is bit-exact, a pre-trained image model starts the trunk, and
the held-out rooms are scored per point beside the point-cloud model on the same rooms."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from model.images import ImageModelConfig, ImageRenderModel
from model.images.checkpoint import save_image_model
from model.images.segment import load_image_segment_model
from training.data.synthetic import SceneConfig, generate_dataset
from training.engine import Trainer
from training.images.segment import (ConfigError, ImageSegmentTask, ImageSegmentTrainConfig, build_segmenter,
                                     evaluate_image_segment, load_segment_config)

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "model" / "default_model"
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
TINY_MODEL = {"backbone": {"width": 8}, "lift": {"dim": 4},
              "render": {"projection": {"out_channels": 8, "f_maps": [8, 16]},
                         "field": {"hidden_size": 16, "geo_dim": 8}, "grid_shape": [16, 16, 8]}}


def tiny_config(root: Path) -> dict:
    return {"model": TINY_MODEL,
            "data": {"root": str(root), "input_views": 2, "frames": {"start": 0, "stop": None, "step": 1}},
            "eval": {"split": "val", "scenes": 1, "input_views": 3},
            "train": {"epochs": 1, "batch_size": 1, "seed": 0, "log_every": 100,
                      "optim": {"optimizer": "adamw", "lr": 0.005, "pct_start": 0.2}}}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Three small generated rooms (2 train, 1 val; 5 frames of 40 x 30 pixels) in the real layouts."""
    root = tmp_path_factory.mktemp("images-segment-data")
    generate_dataset(root, 3, 1, SceneConfig(num_frames=5, image_downscale=16, points_per_m2=400,
                                             room_x=(2.5, 3.0), room_y=(2.5, 3.0)),
                     splits=(("train", 0.67), ("val", 0.33)), progress=False)
    return root


@pytest.fixture(scope="module")
def cfg(data_root) -> ImageSegmentTrainConfig:
    return ImageSegmentTrainConfig.from_dict(tiny_config(data_root))


def test_shipped_config_parses_and_bad_keys_are_refused():
    small = load_segment_config(CONFIGS / "segment-images-small-cpu.yaml")
    assert small.model.render.grid_shape == (48, 48, 16) and len(small.class_names) == 20
    assert small.eval.split == "val" and small.data.generate is not None
    with pytest.raises(ConfigError, match="bogus"):
        ImageSegmentTrainConfig.from_dict({**tiny_config(Path(".")), "bogus": 1})
    with pytest.raises(ConfigError, match="input_views"):
        ImageSegmentTrainConfig.from_dict({**tiny_config(Path(".")), "data": {"input_views": 1}})


def test_a_batch_holds_views_and_labelled_points(cfg):
    task = ImageSegmentTask(cfg)
    assert task.num_samples() == 2
    batch = task.collate([task.load_sample(0, np.random.default_rng(0))])
    assert batch["images"].shape == (1, 2, 30, 40, 3) and batch["w2c"].shape == (1, 2, 4, 4)
    assert len(batch["coord"][0]) == len(batch["segment"][0]) > 100
    assert (batch["segment"][0] >= 0).any()
    losses = build_segmenter(cfg)(batch)
    assert torch.isfinite(losses["loss"]) and 0 <= float(losses["voxel_acc"]) <= 1


@pytest.mark.slow
def test_resume_through_the_segment_task_is_bit_exact(cfg, tmp_path):
    c = copy.deepcopy(cfg)
    c.train.epochs, c.train.steps_per_epoch, c.train.save_every = 2, 2, 1
    straight = Trainer(build_segmenter(c), ImageSegmentTask(c), c.train, tmp_path / "straight")
    straight.fit(resume=False)
    first = Trainer(build_segmenter(c), ImageSegmentTask(c), c.train, tmp_path / "resumed")
    first.total_steps = 3
    first.fit(resume=False)
    resumed = Trainer(build_segmenter(c), ImageSegmentTask(c), c.train, tmp_path / "resumed")
    resumed.fit(resume=True)
    assert resumed.step == straight.step == 4
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for (k, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_init_from_a_pretrained_image_model_then_train_and_score_beside_the_point_model(cfg, tmp_path):
    torch.manual_seed(3)
    pre = ImageRenderModel(ImageModelConfig.from_dict(TINY_MODEL))
    c = copy.deepcopy(cfg)
    c.init = str(save_image_model(pre, tmp_path / "pre"))
    c.train.epochs = 2
    model = build_segmenter(c)
    for key, value in pre.state_dict().items():
        assert torch.equal(model.trunk.state_dict()[key], value), key
    trainer = Trainer(model, ImageSegmentTask(c), c.train, tmp_path / "run", save_fn=save_image_model)
    history = trainer.fit(resume=False)
    assert all(np.isfinite(h["loss"]) for h in history)
    trained = load_image_segment_model(tmp_path / "run" / "final")
    scores = evaluate_image_segment(trained, c, DEFAULT_MODEL)
    assert len(scores["rooms"]) == 1
    for who in ("images", "point_cloud"):
        for points in ("all_points", "seen_points"):
            s = scores[who][points]
            assert 0 <= s["mIoU"] <= 1 and s["points"] > 0
    assert scores["images"]["seen_points"]["points"] <= scores["images"]["all_points"]["points"]
    assert scores["point_cloud"]["all_points"]["points"] == scores["images"]["all_points"]["points"]
