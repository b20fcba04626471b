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


def test_official_container_written_by_training_carries_its_config(tmp_path):
    """What the weights cannot tell (the render volume and sampler) comes back from the ``ponder_config`` that
    training stores in model_last.pth; the authors' files (no such key) keep the inferred config."""
    import dataclasses
    import json

    from model.checkpoint import EMBEDDED_CONFIG, save_official
    from model.render import RenderHeadConfig

    folder = fixture_dir("ponder_render")
    inferred = load_checkpoint(folder / "checkpoint.pth")
    official = RenderHeadConfig.from_official(json.loads((folder / "model_config.json").read_text()))
    config = dataclasses.replace(inferred.config, render=dataclasses.replace(inferred.config.render, head=official))
    assert config.render.head != inferred.config.render.head  # else this test shows nothing
    path = save_official(inferred.inference_model, tmp_path / "model_last.pth", extra={EMBEDDED_CONFIG: config.to_dict()})
    assert torch.load(path, weights_only=True)[EMBEDDED_CONFIG]["kind"] == config.kind  # plain data, safe to load
    again = load_checkpoint(path)
    assert again.config == config
    for (k, a), (k2, b) in zip(inferred.inference_model.state_dict().items(), again.inference_model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    broken = torch.load(path, weights_only=True)
    broken[EMBEDDED_CONFIG] = {"kind": "no-such-kind"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="stored model config"):
        load_checkpoint(tmp_path / "broken.pth")


def test_saving_over_a_model_folder_changes_weights_and_config_together(tmp_path, monkeypatch):
    """A failure while writing leaves the old model whole; a success replaces both files, keeps other files in
    the folder, and leaves files readable by other users (umask 022: 0644), not safetensors' 0600."""
    import os
    import stat

    spunet = load_checkpoint(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth")
    ppt = load_checkpoint(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth")
    out = tmp_path / "model"
    old_mask = os.umask(0o022)
    try:
        save_checkpoint(spunet.inference_model, spunet.config, out)
        (out / "NOTES.txt").write_text("kept")
        before = {name: (out / name).read_bytes() for name in ("model.safetensors", "config.json")}

        def disk_full(self, path):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(type(ppt.config), "save", disk_full)
        with pytest.raises(OSError, match="No space"):
            save_checkpoint(ppt.inference_model, ppt.config, out)
        monkeypatch.undo()
        assert {name: (out / name).read_bytes() for name in before} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
        save_checkpoint(ppt.inference_model, ppt.config, out)
    finally:
        os.umask(old_mask)
    assert load_checkpoint(out).config.kind == ppt.config.kind and (out / "NOTES.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    for path in (out / "model.safetensors", out / "config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_convert_refuses_to_replace_a_model_unless_asked(tmp_path, capsys):
    from ponder.cli import main

    out = tmp_path / "conv"
    assert main(["convert", str(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth"), "-o", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert main(["convert", str(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth"), "-o", str(out)]) == 2
    assert "already holds a model" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == first
    assert main(["convert", str(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth"), "-o", str(out), "--overwrite"]) == 0
    assert load_checkpoint(out).config.kind == "ppt-segmentor"


class RunsACommand:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED-by-checkpoint",))


def test_a_pickle_that_would_run_code_is_named_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": RunsACommand()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"it stores (posix|os)\.system, which the safe loader refuses"):
        read_official(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED-by-checkpoint").exists()


def test_weights_with_nan_are_refused_naming_the_tensor(tmp_path):
    loaded = load_checkpoint(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth")
    state = {k: v.clone() for k, v in loaded.inference_model.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name].view(-1)[0] = float("nan")
    torch.save({"state_dict": state}, tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError, match=rf"1 weight tensor\(s\) hold NaN or inf: {name}"):
        load_checkpoint(tmp_path / "diverged.pth")
