"""``--engine X.onnx`` is checked against the checkpoint it runs with: an export stores the sha256 of the
weights (``ponder.weights_sha256``) and another checkpoint's engine is refused, never run into silently wrong
features; an engine from before the digest is compared by grid size, input features and conditions."""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest

from conftest import PONDER, fixture_dir
from export.backends import check_engine_matches
from export.onnxrt import OnnxRunner
from export.onnx_export import ponder_metadata, weights_digest
from model.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("engines")
    paths = {}
    for name in ("spunet_v1m1_seg", "ppt_v1m3_seg"):
        paths[name] = folder / f"{name}.onnx"
        done = subprocess.run([PONDER, "export", "onnx", str(fixture_dir(name) / "checkpoint.pth"), "-o",
                               str(paths[name]), "--features-only"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    return paths


def _without_digest(path, out):
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != "ponder.weights_sha256"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(out))
    return out


def test_export_stores_the_weights_digest(engines):
    loaded = load_checkpoint(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth")
    meta = ponder_metadata(onnx.load(str(engines["spunet_v1m1_seg"])))
    assert meta["weights_sha256"] == weights_digest(loaded.state_dict())
    assert meta["weights_sha256"] != ponder_metadata(onnx.load(str(engines["ppt_v1m3_seg"])))["weights_sha256"]


def test_cli_runs_the_matching_engine_and_refuses_another_checkpoints(engines, tmp_path):
    folder = fixture_dir("spunet_v1m1_seg")
    base = [PONDER, "features", str(folder / "input.npz"), "--checkpoint", str(folder / "checkpoint.pth"),
            "--backend", "onnxruntime"]
    good = subprocess.run(base + ["-o", str(tmp_path / "good.npy"), "--engine", str(engines["spunet_v1m1_seg"])],
                          capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stderr
    expected = np.load(folder / "expected.npz")["backbone_feat"]
    assert np.abs(np.load(tmp_path / "good.npy") - expected).max() <= 1e-4
    wrong = subprocess.run(base + ["-o", str(tmp_path / "wrong.npy"), "--engine", str(engines["ppt_v1m3_seg"])],
                           capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "exported from other weights than the checkpoint" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr and not (tmp_path / "wrong.npy").exists()


def test_engines_without_a_digest_are_compared_by_their_settings(engines, tmp_path):
    spunet = load_checkpoint(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth")
    with pytest.warns(UserWarning, match="without a weights digest"):
        check_engine_matches(OnnxRunner(_without_digest(engines["spunet_v1m1_seg"], tmp_path / "old.onnx")), spunet)
    with pytest.raises(ValueError, match="does not fit the checkpoint.*conditions"):
        check_engine_matches(OnnxRunner(_without_digest(engines["ppt_v1m3_seg"], tmp_path / "old_ppt.onnx")), spunet)
