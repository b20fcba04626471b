"""Segmentation fine-tuning end to end on tiny generated rooms: training lowers the loss, checkpoints reload,
evaluation (fast and precise) scores every point, and initialisation from an official checkpoint loads it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import fixture_dir
from model.checkpoint import LoadedModel, load_checkpoint
from model.inference import Predictor
from model.pointcloud.cloud import PointCloud
from ponder.cli import main
from training.data.classes import SCANNET20_NAMES
from training.data.formats import load_scene
from training.data.synthetic import SceneConfig, generate_dataset
from training.segment.config import config_from_dict
from training.segment.dataset import SegmentDataset, choose_scenes, collate, sparse_labels
from training.segment.task import build_segment_model, fine_tune, read_pretrained

TINY_BACKBONE = {"type": "SpUNet-v1m1", "base_channels": 8, "channels": [8, 16, 16, 16, 16, 16, 16, 16],
                 "layers": [1, 1, 1, 1, 1, 1, 1, 1]}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("segdata")
    rooms = SceneConfig(room_x=(2.5, 3.0), room_y=(2.5, 3.0), points_per_m2=400.0, num_frames=0)
    generate_dataset(root, 3, seed=7, config=rooms, splits=(("train", 2 / 3), ("val", 1 / 3)), progress=False)
    return root


def _config(data, **data_overrides) -> dict:
    return {"model": {"head": "linear", "backbone": TINY_BACKBONE},
            "data": {"root": str(data), "augment": "none", "point_max": 6000, **data_overrides},
            "evaluate": {"mode": "fast"},
            "train": {"epochs": 12, "batch_size": 1, "seed": 0, "log_every": 100,
                      "optim": {"optimizer": "adamw", "lr": 0.02, "pct_start": 0.1}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One run through the CLI: ``ponder train segment --config CFG --out DIR``."""
    work = tmp_path_factory.mktemp("segrun")
    (work / "cfg.yaml").write_text(yaml.safe_dump(_config(data)))
    assert main(["train", "segment", "--config", str(work / "cfg.yaml"), "--out", str(work / "run")]) == 0
    return work / "run"


def test_training_lowers_the_loss_and_saves_both_formats(trained):
    ckpt = torch.load(trained / "model" / "model_last.pth", map_location="cpu", weights_only=True)
    losses = [h["loss"] for h in ckpt["history"]]
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    assert all(k.startswith("module.backbone.") for k in ckpt["state_dict"])   # the official container
    loaded = load_checkpoint(trained / "final")                                 # our format, strict
    assert loaded.config.kind == "segmentor"
    assert loaded.config.class_names == {"default": SCANNET20_NAMES}
    assert loaded.config.backbone.num_classes == 20
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"]["module." + key])


def test_evaluate_fast_and_precise_through_the_cli(trained, data, tmp_path, capsys):
    val = load_scene(data / "val" / "scene0002_00")
    labelled = int((val["segment"] != -1).sum())
    scores = {}
    for mode in ("fast", "precise"):
        args = ["evaluate", "segment", "--data", str(data), "--checkpoint", str(trained / "final"),
                "--json", str(tmp_path / f"{mode}.json")] + (["--precise"] if mode == "precise" else [])
        assert main(args) == 0
        out = capsys.readouterr().out
        assert f"{mode} evaluation" in out and "mIoU/mAcc/allAcc" in out and "refridgerator" in out
        scores[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
        assert scores[mode]["scenes"] == 1 and 0 <= scores[mode]["mIoU"] <= 1
        assert sum(c["points"] for c in scores[mode]["per_class"].values()) == labelled  # every labelled point
    # the evaluation after training used the same model and the same fast protocol
    assert json.loads((trained / "metrics.json").read_text())["mIoU"] == pytest.approx(scores["fast"]["mIoU"])
    assert scores["fast"]["allAcc"] > 0.3 and scores["precise"]["allAcc"] > 0.3


def test_init_from_the_official_fixture_loads_every_tensor(data):
    folder = fixture_dir("ppt_v1m3_seg")
    source = read_pretrained(folder / "checkpoint.pth")
    cfg = config_from_dict({"model": {"head": "language"}, "data": {"root": str(data)}})
    model_cfg, net, report = build_segment_model(cfg, source)
    assert model_cfg.kind == "ppt-segmentor"
    assert (len(report.loaded), len(report.missing), len(report.unexpected), len(report.mismatched)) == (671, 0, 0, 0)
    assert "backbone 666" in report.summary() and "class_embedding 1" in report.summary()
    # the loaded model reproduces the official logits
    inputs, expected = np.load(folder / "input.npz"), np.load(folder / "expected_scannet.npz")
    predictor = Predictor(LoadedModel(model_cfg, net, "fixture"))
    logits = predictor.segment(PointCloud(inputs["coord"], inputs["color"], inputs["normal"]), "ScanNet").logits
    assert np.abs(logits - expected["seg_logits"]).max() < 1e-4

    # PPT backbone mode: the official module. -> module.backbone. remap; `final` is new, the text parts unused
    cfg = config_from_dict({"model": {"head": "linear"}, "data": {"root": str(data)}})
    model_cfg, net, report = build_segment_model(cfg, source)
    assert model_cfg.kind == "ppt-backbone-segmentor"
    assert len(report.loaded) == 667 and sorted(report.missing) == ["backbone.backbone.final.bias",
                                                                   "backbone.backbone.final.weight"]
    assert sorted(report.unexpected) == ["backbone.class_embedding", "backbone.logit_scale",
                                         "backbone.proj_head.bias", "backbone.proj_head.weight"]


def test_fine_tune_from_the_fixture_runs_and_reloads(data, tmp_path):
    cfg = config_from_dict({**_config(data), "model": {"head": "language"},
                            "init": {"checkpoint": str(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth")},
                            "evaluate": {"mode": "none"}})
    cfg.train.epochs, cfg.train.steps_per_epoch = 1, 3
    result = fine_tune(cfg, tmp_path / "run")
    assert len(result.history) == 3 and all(np.isfinite(h["loss"]) for h in result.history)
    assert result.init is not None and len(result.init.loaded) == 671
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.config.kind == "ppt-segmentor" and loaded.config.class_names == {"ScanNet": SCANNET20_NAMES}
    assert torch.equal(loaded.model.class_embedding, result.model.class_embedding)


def test_label_fraction_keeps_a_fixed_seeded_subset(data):
    segment = np.r_[np.full(50, -1), np.arange(950) % 20]
    kept = sparse_labels(segment, 0.05, seed=3, name="scene")
    assert (kept != -1).sum() == round(0.05 * 950)
    assert np.array_equal(kept[kept != -1], segment[kept != -1])
    assert np.array_equal(kept, sparse_labels(segment, 0.05, seed=3, name="scene"))
    assert not np.array_equal(kept, sparse_labels(segment, 0.05, seed=4, name="scene"))
    assert (sparse_labels(segment, 1e-6, 0, "s") != -1).sum() == 1
    assert choose_scenes(10, 0.05, 0).tolist() == choose_scenes(10, 0.05, 0).tolist()
    assert len(choose_scenes(10, 0.05, 0)) == 1 and len(choose_scenes(10, 0.25, 0)) == 3

    cfg = config_from_dict(_config(data, label_fraction=0.01))
    dataset = SegmentDataset(cfg.data, 0.02)
    scene = dataset.scene(0)
    full = load_scene(dataset.scenes[0])["segment"]
    assert (scene["segment"] != -1).sum() == round(0.01 * (full != -1).sum())
    sample = dataset.sample(0, np.random.default_rng(0))
    assert sample["feat"].shape[1] == 6 and len(sample["feat"]) <= 6000
    assert len(SegmentDataset(config_from_dict(_config(data, label_fraction=0.5, label_mode="scenes")).data,
                              0.02)) == 1


def test_mix3d_collate_overlays_scene_pairs():
    def sample(n: int, mix: float) -> dict:
        return {"feat": np.zeros((n, 6), np.float32), "grid_coord": np.zeros((n, 3), np.int32),
                "segment": np.zeros(n, np.int64), "condition": "ScanNet", "mix": mix}

    samples = [sample(2, 0.1), sample(3, 0.9), sample(1, 0.5)]
    assert collate(samples, mix_prob=0.8)["batch"].tolist() == [0, 0, 0, 0, 0, 1]
    assert collate(samples, mix_prob=0.0)["batch"].tolist() == [0, 0, 1, 1, 1, 2]


def test_cli_reports_bad_settings(data, tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_config(data)))
    assert main(["train", "segment", "--config", str(tmp_path / "cfg.yaml"), "--label-fraction", "0"]) == 2
    assert "label_fraction must lie in (0, 1]" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**_config(data), "model": {"heads": "linear"}}))
    assert main(["train", "segment", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown config.model keys: ['heads']" in capsys.readouterr().err
    assert main(["evaluate", "segment", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
