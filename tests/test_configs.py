"""Every config goes through one typed loader (``model.config_io``): shipped task configs, the bundled model's
config.json files and the configs inferred from the reference checkpoints load into typed sections, and a bad
key or value is refused with an error that names it (exit 2 on the command line)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from model.config import DetectionConfig, ModelConfig
from model.config_io import ConfigError, dump
from model.images.config import ImageModelConfig, LiftConfig
from model.images.segment import ImageSegmentConfig
from model.render.config import RenderConfigError, RenderHeadConfig, RenderSection, head_field_config
from conftest import fixture_dir
from training.config_io import ConfigError as TrainingConfigError
from training.detect.config import load_config as load_detect
from training.images.config import load_config as load_images
from training.pretrain.config import load_config as load_pretrain
from training.segment.config import config_from_dict, config_to_dict
from training.segment.config import load_config as load_segment

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


def load_image_segment(path):
    from training.images.segment import load_segment_config

    return load_segment_config(path)


READERS = {"pretrain": load_pretrain, "segment": load_segment, "detect": load_detect,
           "pretrain-images": load_images, "segment-images": load_image_segment}
MODEL_CONFIGS = sorted((REPO / "model" / "default_model").rglob("config.json"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    task = "-".join(path.name.split("-", 2)[:2]) if path.name.split("-")[1] == "images" else path.name.split("-")[0]
    assert task in READERS, f"{path.name}: config names must start with one of {sorted(READERS)}"
    cfg = READERS[task](path)
    assert cfg.train.epochs >= 1 and cfg.train.batch_size >= 1
    assert isinstance(cfg.train.optim.lr, float)
    if path.stem.endswith("-cpu"):
        assert cfg.train.device == "cpu"
    if task == "pretrain":
        assert isinstance(cfg.model.render, RenderSection) and isinstance(cfg.head, RenderHeadConfig)


def test_one_error_type():
    assert TrainingConfigError is ConfigError and issubclass(ConfigError, ValueError)
    assert issubclass(RenderConfigError, ConfigError)


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: str(p.parent.name))
def test_bundled_model_configs_load_typed_and_write_back_unchanged(path, tmp_path):
    data = json.loads(path.read_text())
    if data.get("kind") == "image-render":  # the image model has its own config class (model.images.config)
        cfg = ImageModelConfig.load(path)
        assert isinstance(cfg.render, RenderHeadConfig) and isinstance(cfg.lift, LiftConfig)
        assert isinstance(cfg.render.projection.f_maps, tuple)
    elif data.get("kind") == "image-segment":  # the image segmenter: its trunk is an image model config
        cfg = ImageSegmentConfig.load(path)
        assert isinstance(cfg.trunk, ImageModelConfig) and isinstance(cfg.trunk.render, RenderHeadConfig)
        assert isinstance(cfg.class_names, tuple) and cfg.class_names
    else:
        cfg = ModelConfig.load(path)
        assert cfg.render is None or isinstance(cfg.render, RenderSection)
        assert cfg.detection is None or isinstance(cfg.detection, DetectionConfig)
        assert isinstance(cfg.backbone.channels, tuple) and all(isinstance(v, tuple) for v in cfg.class_names.values())
    assert cfg.to_dict() == data  # the file format is unchanged ("render": {} for no render head, lists, ...)
    cfg.save(tmp_path / "config.json")
    assert (tmp_path / "config.json").read_text() == path.read_text()  # to the byte, key order included
    assert type(cfg).load(tmp_path / "config.json") == cfg


def _image(mutate=lambda d: None, segment: bool = False) -> str:
    """The error of the bundled image (or image segmentation) config.json after ``mutate``."""
    folder = "images-segment" if segment else "images"
    data = json.loads((REPO / "model/default_model" / folder / "config.json").read_text())
    mutate(data)
    with pytest.raises(ConfigError) as info:
        (ImageSegmentConfig if segment else ImageModelConfig).from_dict(data)
    return str(info.value)


def test_image_config_errors_name_the_field():
    assert "unknown config keys: ['colour']" in _image(lambda d: d.update(colour=1))
    assert "unknown lift keys: ['width']" in _image(lambda d: d["lift"].update(width=3))
    assert "backbone.depth: Input should be a valid integer" in _image(lambda d: d["backbone"].update(depth="deep"))
    assert "render.grid_shape" in _image(lambda d: d["render"].update(grid_shape=[4, 4]))
    assert "unknown render.sampler keys: ['samples']" in _image(lambda d: d["render"]["sampler"].update(samples=3))
    assert "lift.fusion must be one of" in _image(lambda d: d["lift"].update(fusion="max"))
    assert "render.projection.in_channels must be 17 (lifted channels: lift.dim x 2 + 1), got 33" in _image(
        lambda d: d["lift"].update(dim=8))
    assert "not an image model config (kind 'encoder'" in _image(lambda d: d.update(kind="encoder"))
    assert "unknown render.field keys: ['width'] (known: ['geo_dim', 'hidden_size'])" in _image(
        lambda d: d["render"].update(field={"width": 3}))
    assert "needs an rgb_decoder" in _image(lambda d: d["render"]["field"].update(rgb_decoder=None))
    # the image segmenter: its own rules, and the trunk's errors under "trunk"
    assert "class_names must be a non-empty list" in _image(lambda d: d.update(class_names=[]), segment=True)
    assert "class_names[1]: Input should be a valid string" in _image(
        lambda d: d.update(class_names=["a", 2]), segment=True)
    assert "not an image segmentation config (kind 'image-render'" in _image(
        lambda d: d.update(kind="image-render"), segment=True)
    assert "unknown trunk.lift keys: ['width']" in _image(lambda d: d["trunk"]["lift"].update(width=3), segment=True)
    assert "trunk: lift.fusion must be one of" in _image(lambda d: d["trunk"]["lift"].update(fusion="max"),
                                                          segment=True)


def test_image_config_shortcuts():
    """``render.field`` as ``{hidden_size, geo_dim}`` (or absent): the HEAD layout without a semantic decoder;
    ``render.projection.in_channels`` defaults to the lifted channels."""
    cfg = ImageModelConfig.from_dict({"lift": {"dim": 8, "variance": False},
                                      "render": {"projection": {"out_channels": 16, "f_maps": [8, 16]},
                                                 "field": {"hidden_size": 32, "geo_dim": 8}}})
    assert cfg.render.projection.in_channels == cfg.lifted_channels == 9
    assert cfg.render.field == replace(head_field_config(16, 8, 32), semantic_decoder=None)
    default = ImageModelConfig.from_dict({})
    assert default == ImageModelConfig() and default.render.field.semantic_decoder is None
    assert default.render.projection.in_channels == LiftConfig().channels
    assert ImageModelConfig.from_dict(default.to_dict()) == default  # the written-out form reads back the same
    seg = ImageSegmentConfig.from_dict({"class_names": ["a", "b"]})
    assert seg.trunk == default and seg.num_classes == 2 and seg.name == "ponder-images-segment"
    with pytest.raises(ConfigError, match="lift.fusion"):
        ImageModelConfig(lift=LiftConfig(fusion="max"))  # direct construction is checked too


def test_bundled_sections_are_typed():
    assert isinstance(ModelConfig.load(REPO / "model/default_model/render/config.json").render.head, RenderHeadConfig)
    det = ModelConfig.load(REPO / "model/default_model/detect/config.json").detection
    assert det.decode.min_votes == 30.0 and det.class_names[0] == "cabinet"


@pytest.mark.parametrize("name", ["spunet_v1m1_seg", "ppt_v1m3_seg", "ponder_render"])
def test_configs_of_the_reference_checkpoints_round_trip(name):
    from model.checkpoint import read_official
    from model.infer_config import infer_config

    folder = fixture_dir(name)
    cfg = infer_config(read_official(folder / "checkpoint.pth"))
    if name == "ponder_render":
        official = json.loads((folder / "model_config.json").read_text())
        cfg = dataclasses.replace(cfg, render=dataclasses.replace(cfg.render,
                                                                  head=RenderHeadConfig.from_official(official)))
        assert cfg.render.head.grid_shape == tuple(official["grid_shape"]) and cfg.render.head.grid_size == 0.02
        assert dump(cfg.render)["head"]["grid_shape"] == list(cfg.render.head.grid_shape)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _bad(mutate) -> str:
    data = json.loads((REPO / "model/default_model/render/config.json").read_text())
    mutate(data)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    return str(info.value)


def test_unknown_and_mistyped_model_fields_are_named():
    assert "unknown config keys: ['colour']" in _bad(lambda d: d.update(colour=1))
    assert "unknown backbone keys: ['chanels']" in _bad(lambda d: d["backbone"].update(chanels=[1]))
    assert "backbone.channels[2]" in _bad(lambda d: d["backbone"]["channels"].__setitem__(2, "wide"))
    assert "grid_size" in _bad(lambda d: d.update(grid_size="fine"))
    assert "unknown render.head.sampler keys: ['samples']" in _bad(
        lambda d: d["render"]["head"]["sampler"].update(samples=3))
    assert "render.head.grid_shape" in _bad(lambda d: d["render"]["head"].update(grid_shape=[4, 4]))
    assert "sdf_decoder" in _bad(lambda d: d["render"]["head"]["field"]["sdf_decoder"].update(in_dim=5))
    assert "detection.class_names" in _bad(lambda d: d.update(detection={"in_channels": 8}))
    assert "unknown detection.decode keys: ['radius']" in _bad(
        lambda d: d.update(detection={"in_channels": 8, "class_names": ["chair"], "decode": {"radius": 1}}))


def test_direct_construction_validates_dict_sections():
    head = {"in_channels": 8, "class_names": ["chair", "table"], "decode": {"min_votes": 3}}
    cfg = ModelConfig(kind="encoder", detection=head)
    assert isinstance(cfg.detection, DetectionConfig) and cfg.detection.decode.min_votes == 3.0
    assert cfg.detection.class_names == ("chair", "table") and dump(cfg.detection)["class_names"] == ["chair", "table"]
    assert not hasattr(cfg.detection, "__getitem__") and not hasattr(cfg.render or cfg.detection, "get")
    assert ModelConfig(kind="encoder", detection={}).detection is None
    with pytest.raises(ConfigError, match="duplicate detection class names"):
        ModelConfig(kind="encoder", detection={"in_channels": 8, "class_names": ["a", "a"]})
    with pytest.raises(RenderConfigError, match="unknown loss keys"):
        RenderHeadConfig.from_dict({"loss": {"rgb": 1.0}})


def test_training_config_errors_name_the_key(tmp_path):
    raw = yaml.safe_load((CONFIGS / "segment-small-cpu.yaml").read_text())
    raw["train"]["optim"]["lr"] = "fast"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"bad.yaml: config.train.optim.lr: Input should be a valid number"):
        load_segment(path)
    raw["train"]["optim"] = {"lr": 0.1, "momentun": 0.9}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown config.train.optim keys: \['momentun'\] \(known: .*'momentum'"):
        load_segment(path)
    cfg = load_segment(CONFIGS / "segment-small-cpu.yaml")
    assert config_from_dict(config_to_dict(cfg)) == cfg and yaml.safe_dump(config_to_dict(cfg))


def test_detect_head_and_backbone_mappings_are_checked_on_load():
    from training.detect.config import DetectConfig

    raw = yaml.safe_load((CONFIGS / "detect-small-cpu.yaml").read_text())
    raw["model"]["head"]["decode"]["min_vote"] = 3
    with pytest.raises(ConfigError, match=r"unknown model.head.decode keys: \['min_vote'\]"):
        DetectConfig.from_dict(raw)
    raw = yaml.safe_load((CONFIGS / "detect-small-cpu.yaml").read_text())
    raw["model"]["backbone"]["layers"] = "deep"
    with pytest.raises(ConfigError, match="model.backbone.layers"):
        DetectConfig.from_dict(raw)


def test_cli_reports_a_bad_config_json_with_exit_2(tmp_path, capsys):
    from ponder.cli import main

    folder = tmp_path / "model"
    shutil.copytree(REPO / "model" / "default_model" / "detect", folder)
    data = json.loads((folder / "config.json").read_text())
    data["detection"]["decode"]["min_votes"] = "many"
    (folder / "config.json").write_text(json.dumps(data))
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "detection.decode.min_votes" in err and "Traceback" not in err
