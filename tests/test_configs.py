"""Every shipped task config (training/configs/<task>-*.yaml) loads and validates with its task's reader, so a
config named in the README or a docstring cannot rot unnoticed."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.detect.config import load_config as load_detect
from training.images.config import load_config as load_images
from training.pretrain.config import load_config as load_pretrain
from training.segment.config import load_config as load_segment

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
READERS = {"pretrain": load_pretrain, "segment": load_segment, "detect": load_detect,
           "pretrain-images": load_images}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    task = "pretrain-images" if path.name.startswith("pretrain-images-") else path.name.split("-", 1)[0]
    assert task in READERS, f"{path.name}: config names must start with one of {sorted(READERS)}"
    cfg = READERS[task](path)
    assert cfg.train.epochs >= 1 and cfg.train.batch_size >= 1
    if path.stem.endswith("-cpu"):
        assert cfg.train.device == "cpu"
