"""Rendering pre-training: configs, the sample pipeline (cameras follow the augmented points), collation,
block masking, decreasing loss, bit-exact resume, and the official ScanNet hyper-parameters."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.synthetic import SceneConfig, generate_dataset
from training.engine import Trainer, step_generator
from training.pretrain.config import ConfigError, PretrainConfig, load_config
from training.pretrain.dataset import PretrainDataset, collate
from training.pretrain.task import PretrainTask, block_mask, build_pretrain_model

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def tiny_config(root: Path, **train) -> dict:
    """A model small enough for a handful of CPU steps in seconds; the official pipeline and losses."""
    return {
        "model": {
            "backbone": {"type": "SpUNet-v1m1", "base_channels": 8, "channels": [8, 8, 16, 16, 16, 8, 8, 8],
                         "layers": [1] * 8},
            "conditions": ["ScanNet"],
            "render": {"semantic": False, "head": {
                "projection": {"in_channels": 8, "out_channels": 8, "f_maps": [8, 16]},
                "field": {"hidden_size": 16, "geo_dim": 8},
                "sampler": {"num_samples": 8, "num_samples_importance": 4},
                "loss": {"semantic_loss": 0.0}, "grid_shape": [24, 24, 16], "ray_nsample": 32}},
        },
        "data": {"root": str(root), "num_cameras": 3, "frames": {"start": 0, "stop": None, "step": 2}},
        "eval": {"frames": {"start": 1, "stop": None, "step": 2}, "scenes": 1, "views": 1},
        "train": {"epochs": 1, "batch_size": 1, "seed": 0, "log_every": 100,
                  "optim": {"optimizer": "adamw", "lr": 0.005, "pct_start": 0.2}, **train},
    }


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def make_data(root: Path) -> Path:
    """One small generated room (2.5 x 2.5 m, 6 frames of 40 x 30 pixels) in the real layouts."""
    generate_dataset(root, 1, 0, SceneConfig(num_frames=6, image_downscale=16, points_per_m2=400,
                                             room_x=(2.5, 2.5), room_y=(2.5, 2.5)),
                     splits=(("train", 1.0),), progress=False)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("pretrain-data"))


@pytest.fixture(scope="module")
def cfg(data_root) -> PretrainConfig:
    return PretrainConfig.from_dict(tiny_config(data_root))


def test_official_scannet_config_has_the_published_hyper_parameters():
    c = load_config(CONFIGS / "pretrain-scannet.yaml")
    head = c.head
    assert c.model.backbone.type == "SpUNet-v1m1" and c.model.backbone.channels == (32, 64, 128, 256, 256, 128, 96, 96)
    assert c.model.conditions == ("ScanNet",) and len(c.model.vocabulary) == 20 and c.semantic
    assert head.grid_shape == (128, 128, 32) and head.ray_nsample == 256 and head.val_ray_split == 10240
    proj = head.projection
    assert (proj.in_channels, proj.out_channels, proj.f_maps) == (96, 128, (32, 64, 128, 256))
    assert (head.sampler.num_samples, head.sampler.num_samples_importance, head.sampler.base_variance) == (96, 36, 64)
    f = head.field
    assert (f.sdf_decoder.in_dim, f.rgb_decoder.in_dim, f.semantic_decoder.in_dim) == (64, 134, 131)
    loss = head.loss
    weights = (loss.depth_loss, loss.rgb_loss, loss.semantic_loss, loss.free_space_loss, loss.sdf_loss)
    assert weights == (1.0, 10.0, 0.1, 1.0, 10.0) and loss.eikonal_loss == 0.01
    assert loss.sensor_depth_truncation == 0.05 and loss.temperature == 0.01
    o = c.train.optim
    assert (o.optimizer, o.lr, o.weight_decay, o.nesterov, o.pct_start, o.div_factor, o.final_div_factor, o.amp) \
        == ("sgd", 0.002, 1e-4, True, 0.05, 10.0, 1e4, True)
    assert c.train.batch_size == 32 and c.data.num_cameras == 5 and c.data.dropout == 0.8
    assert (c.data.frames.start, c.data.frames.stop, c.data.frames.step) == (40, -60, 10)
    small = load_config(CONFIGS / "pretrain-small-cpu.yaml")
    assert small.model.kind == "pretrain" and small.train.device == "cpu"


def test_config_errors_name_the_problem(data_root):
    bad = tiny_config(data_root)
    bad["data"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        PretrainConfig.from_dict(bad)
    sem = tiny_config(data_root)
    sem["model"]["render"]["head"]["loss"] = {"semantic_loss": 0.1}
    with pytest.raises(ConfigError, match="semantic"):
        PretrainConfig.from_dict(sem)
    wrong = tiny_config(data_root)
    wrong["model"]["render"]["head"]["projection"]["in_channels"] = 16
    with pytest.raises(ConfigError, match="channels"):
        PretrainConfig.from_dict(wrong)


def _depth_agreement(s: dict) -> list[float]:
    """Per view: the share of points in front of the camera and inside the image whose camera z matches the
    sensor depth at their pixel within 5 cm (points hidden behind others make up the rest)."""
    n = len(s["coord"])
    homo = np.c_[s["coord"].astype(np.float64), np.ones(n)]
    out = []
    for v in range(len(s["extrinsic"])):
        cam = (homo @ s["extrinsic"][v].T)[:, :3]  # camera coordinates stay metric under every transform
        uv = cam @ s["intrinsic"][v][:3, :3].T
        front = cam[:, 2] > 0.1
        px = np.rint(uv[front, :2] / uv[front, 2:]).astype(int)
        h, w = s["depth"].shape[1:]
        inside = (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
        sensor = s["depth"][v][px[inside, 1], px[inside, 0]] * 0.001
        out.append(float(np.mean(np.abs(sensor - cam[front][inside, 2]) < 0.05)))
    return out


def test_augmented_sample_keeps_cameras_on_the_points(cfg):
    """After dropout, rotations, scale, flips, grid sampling and shifts, every view sees the points at their
    sensor depth as often as without augmentation: the extrinsics followed each point transform."""
    plain_cfg = copy.deepcopy(cfg.data)
    plain_cfg.augment, plain_cfg.dropout = False, 0.0
    plain, augmented = PretrainDataset(plain_cfg), PretrainDataset(cfg.data)
    scales = []
    for seed in range(4):
        s = augmented.load(0, np.random.default_rng(seed))
        ref = plain.load(0, np.random.default_rng(seed))  # same seed: the same views are drawn first
        assert np.array_equal(s["frame_ids"], ref["frame_ids"])
        n = len(s["coord"])
        assert s["feat"].shape == (n, 6) and s["grid_coord"].shape == (n, 3) and s["grid_coord"].min() == 0
        assert s["rgb"].shape[0] == 3 and s["extrinsic"].shape == (3, 4, 4) and n < 0.5 * len(ref["coord"])
        got, want = _depth_agreement(s), _depth_agreement(ref)
        assert min(want) > 0.25 and all(g > w - 0.1 for g, w in zip(got, want)), (got, want)
        scales.append(s["depth_scale"] / 0.001)
    assert all(0.9 <= x <= 1.1 for x in scales) and len(set(scales)) == 4


def test_collate_concatenates_points_and_stacks_views(cfg):
    ds = PretrainDataset(cfg.data)
    samples = [ds.load(0, np.random.default_rng(i)) for i in range(2)]
    b = collate(samples)
    n0, n1 = len(samples[0]["coord"]), len(samples[1]["coord"])
    assert b["offset"].tolist() == [n0, n0 + n1] and b["batch"].bincount().tolist() == [n0, n1]
    assert b["rgb"].shape[:2] == (2, 3) and b["rgb"].dtype == torch.uint8 and b["depth_scale"].shape == (2,)
    assert b["condition"] == "ScanNet"
    assert len(collate(samples, max_points=n0)["offset"]) == 1  # the second scene would exceed max_points
    other = copy.deepcopy(samples[1])
    other["condition"] = "S3DIS"
    with pytest.raises(ValueError, match="one condition"):
        collate([samples[0], other])


def test_block_mask_replaces_the_features_of_dropped_blocks():
    g = torch.Generator().manual_seed(0)
    axes = torch.meshgrid(torch.arange(8), torch.arange(8), torch.arange(2), indexing="ij")
    grid = torch.stack(axes, -1).reshape(-1, 3)
    grid = torch.cat([grid, grid])
    batch = torch.cat([torch.zeros(128, dtype=torch.long), torch.ones(128, dtype=torch.long)])
    feat = torch.randn(256, 6, generator=g)
    token = torch.full((1, 6), 7.0)
    out = block_mask(feat, grid, batch, ratio=0.75, size=4, mtoken=token, generator=g)
    masked = (out == 7.0).all(dim=1)
    assert torch.equal(out[~masked], feat[~masked])
    for b in (0, 1):  # 4 blocks of 4x4x2 voxels per scene; round(4 · 0.25) = 1 kept
        rows = batch == b
        assert int((~masked[rows]).sum()) == 32
        kept_blocks = {tuple((grid[i] // 4).tolist()) for i in torch.nonzero(rows & ~masked)[:, 0]}
        assert len(kept_blocks) == 1


def test_masked_pretraining_trains_the_mask_token(data_root):
    """With block masking (spec §5.3) the forward replaces dropped blocks by ``mtoken``, which gets a gradient."""
    raw = tiny_config(data_root)
    raw["model"]["render"]["mask_channels"] = 6
    raw["mask"] = {"ratio": 0.5, "size": 8}
    c = PretrainConfig.from_dict(raw)
    task, model = PretrainTask(c), build_pretrain_model(c)
    assert model.mtoken.shape == (1, 6) and float(model.mtoken.abs().max()) <= 0.02
    batch = task.collate([task.load_sample(0, np.random.default_rng(0))])
    out = task.losses(model, batch, step_generator(torch.device("cpu"), 1))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and float(model.mtoken.grad.abs().sum()) > 0
    raw["model"]["render"]["mask_channels"] = 0
    with pytest.raises(ConfigError, match="mask_channels"):
        PretrainConfig.from_dict(raw)


def _loss_on(model, batch, seed=123) -> float:
    model.train()
    with torch.no_grad():
        return float(model(batch, step_generator(torch.device("cpu"), seed))["loss"])


def test_small_cpu_config_lowers_the_loss_on_the_same_rays(data_root, tmp_path):
    """The shipped small CPU model and optimiser, 10 steps on one tiny generated room: the loss of a fixed batch
    (same sample RNG, same rays and samples) ends well below where it started."""
    c = load_config(CONFIGS / "pretrain-small-cpu.yaml")
    c.data.root, c.data.generate = str(data_root), None
    c.train.epochs, c.train.steps_per_epoch, c.train.log_every = 1, 10, 100
    c.train.optim.pct_start = 0.2  # OneCycleLR needs at least two warm-up steps
    task = PretrainTask(c)
    model = build_pretrain_model(c)
    batch = task.collate([task.load_sample(0, np.random.default_rng(99))])
    before = _loss_on(model, batch)
    history = Trainer(model, task, c.train, tmp_path / "run").fit(resume=False)
    after = _loss_on(model, batch)
    assert len(history) == 10 and all(np.isfinite(h["loss"]) for h in history)
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "run" / "model" / "model_last.pth").exists()


def test_resume_through_the_pretrain_task_is_bit_exact(cfg, tmp_path):
    c = copy.deepcopy(cfg)
    c.train.epochs, c.train.steps_per_epoch, c.train.save_every = 2, 2, 1
    straight = Trainer(build_pretrain_model(c), PretrainTask(c), c.train, tmp_path / "straight")
    straight.fit(resume=False)
    first = Trainer(build_pretrain_model(c), PretrainTask(c), c.train, tmp_path / "resumed")
    first.total_steps = 3  # interrupted after step 3 (a checkpoint is written at every step)
    first.fit(resume=False)
    resumed = Trainer(build_pretrain_model(c), PretrainTask(c), c.train, tmp_path / "resumed")
    resumed.fit(resume=True)
    assert resumed.step == straight.step == 4
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for (k, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k
