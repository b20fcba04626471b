"""Checkpoint loading: every full-size official key listing builds and loads strictly; bad checkpoints are
refused with messages that name the problem."""

from __future__ import annotations

import pytest
import torch

from conftest import KEYS, fixture_dir
from model.build import build_model
from model.checkpoint import CheckpointError, load_checkpoint, load_state_strict, read_official, save_checkpoint
from model.infer_config import infer_config

SEMSEG_LISTINGS = ["semseg-spunet-v1m1-0-base.tsv", "semseg-ppt-v1m1-0-sc-s3-st-spunet-lovasz-ft.tsv"]
PRETRAIN_LISTINGS = ["pretrain-ponder-spunet-v1m1-0-base.tsv", "pretrain-ponder-ppt-v1m1-0-sc-s3-st-spunet.tsv",
                     "pretrain-ponder-ppt-v1m1-0-sc-s3-st-spunet.70e8ead.tsv"]


def read_listing(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    path = KEYS / name
    if not path.exists():
        pytest.skip(f"key listings not found at {KEYS}")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:]]
    return [(k, () if s == "scalar" else tuple(int(x) for x in s.split("x")), d) for k, s, d in rows]


def state_from_listing(rows) -> dict[str, torch.Tensor]:
    """Shapes only (uninitialised storage): enough to infer, build and strictly load."""
    return {k.removeprefix("module."): torch.empty(shape, dtype=getattr(torch, dtype)) for k, shape, dtype in rows}


@pytest.mark.parametrize("engine", [False, True], ids=["spconv", "engine-backed"])
@pytest.mark.parametrize("listing", SEMSEG_LISTINGS + PRETRAIN_LISTINGS)
def test_full_size_listing_builds_and_loads_strictly(listing, engine):
    """Both module trees (spconv; engine-backed, what inference loads) have the official layout."""
    rows = read_listing(listing)
    state = state_from_listing(rows)
    config = infer_config(state)
    model = build_model(config, engine=engine)
    own = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in own.items()] == [(k.removeprefix("module."), s) for k, s, _ in rows]
    load_state_strict(model, state, listing)


def test_inferred_architecture_of_the_ppt_listing():
    config = infer_config(state_from_listing(read_listing(SEMSEG_LISTINGS[1])))
    assert config.kind == "ppt-segmentor"
    assert config.backbone.type == "SpUNet-v1m3"
    assert config.backbone.channels == (32, 64, 128, 256, 256, 128, 96, 96)
    assert config.backbone.layers == (2, 3, 4, 6, 2, 2, 2, 2)
    assert config.conditions == ("Structured3D", "ScanNet", "S3DIS")
    assert config.backbone.conditions == ("ScanNet", "S3DIS", "Structured3D")
    assert len(config.class_names["ScanNet"]) == 20 and len(config.class_names["S3DIS"]) == 13


@pytest.mark.parametrize("engine", [False, True], ids=["spconv", "engine-backed"])
def test_mismatching_state_dict_names_keys_and_shapes(engine):
    rows = read_listing(SEMSEG_LISTINGS[0])
    state = state_from_listing(rows)
    model = build_model(infer_config(state), engine=engine)
    del state["backbone.enc.0.block0.conv1.weight"]
    state["backbone.extra.weight"] = torch.zeros(1)
    state["backbone.final.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        load_state_strict(model, state, "ckpt.pth")
    message = str(err.value)
    assert "missing keys: backbone.enc.0.block0.conv1.weight" in message
    assert "unexpected keys: backbone.extra.weight" in message
    assert "backbone.final.bias: checkpoint (7,) vs model (20,)" in message


class NotAllowed:  # a class the safe unpickler must refuse
    def __init__(self):
        self.value = 1


def test_untrusted_pickle_is_refused_unless_trusted(tmp_path):
    folder = fixture_dir("spunet_v1m1_seg")
    payload = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=False)
    payload["extra"] = NotAllowed()
    path = tmp_path / "unsafe.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="trust-checkpoint"):
        read_official(path)
    assert len(read_official(path, trust=True)) == 224


def test_garbage_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(empty_dir)


def test_official_numpy_scalar_is_allow_listed():
    folder = fixture_dir("ppt_v1m3_seg")
    state = read_official(folder / "checkpoint.pth")  # best_metric_value is a numpy.float64
    assert "logit_scale" in state and state["class_embedding"].shape == (36, 512)


def test_our_format_round_trip(tmp_path):
    folder = fixture_dir("spunet_v1m1_seg")
    loaded = load_checkpoint(folder / "checkpoint.pth")
    save_checkpoint(loaded.model, loaded.config, tmp_path / "ours")
    again = load_checkpoint(tmp_path / "ours")
    assert again.config == loaded.config
    for (k, a), (k2, b) in zip(loaded.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_pretrain_listings_keep_every_weight_and_know_their_era():
    head = infer_config(state_from_listing(read_listing(PRETRAIN_LISTINGS[1]))).render
    old = infer_config(state_from_listing(read_listing(PRETRAIN_LISTINGS[2]))).render
    assert head.proj_head and not old.proj_head
    assert head.head.field.share_volume is False and old.head.field.share_volume is True
