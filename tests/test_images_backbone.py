"""The 2D backbone: torchvision-layout ResNet state_dicts load from a local file (weights_only), strides and
channels are as documented, and a file that does not fit is refused with the keys named."""

from __future__ import annotations

import pytest
import torch

from model.images import ResNet, load_image_weights


def test_a_torchvision_layout_state_dict_loads_and_skips_the_classifier(tmp_path):
    torch.manual_seed(0)
    full = ResNet(18, 64, stages=4)
    state = dict(full.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # torchvision's classifier
    torch.save(state, tmp_path / "resnet18.pth")
    trunk = ResNet(18, 64, stages=3)
    skipped = load_image_weights(trunk, tmp_path / "resnet18.pth")
    assert "fc.weight" in skipped and any(k.startswith("layer4.") for k in skipped)
    assert torch.equal(trunk.layer3[1].conv2.weight, full.layer3[1].conv2.weight)
    maps = trunk.eval()(torch.rand(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6)]
    assert trunk.strides == [4, 8, 16]


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(ResNet(18, 32, stages=3).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="does not fit the image backbone"):
        load_image_weights(ResNet(18, 64, stages=3), tmp_path / "narrow.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a PyTorch checkpoint"):
        load_image_weights(ResNet(18, 64), tmp_path / "junk.pth")
    good = (tmp_path / "narrow.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 2])  # truncated: one line, no torch advice page
    with pytest.raises(ValueError, match=r"cut.pth: not a readable PyTorch checkpoint") as caught:
        load_image_weights(ResNet(18, 64), tmp_path / "cut.pth")
    assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value)
    with pytest.raises(FileNotFoundError):
        load_image_weights(ResNet(18, 64), tmp_path / "absent.pth")
