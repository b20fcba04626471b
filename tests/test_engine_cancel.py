"""The CPU engine gives its thread back between encoder blocks when the active cancel token says so (the
service's request deadline / disconnect, `model.cancel`), and a batch stops only once none of its requests
still waits (`AllCancelled`)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_dir, random_room
from model.cancel import AllCancelled, Cancelled, CancelToken, active
from model.checkpoint import read_official
from model.engine.unet import SpUNetEngine
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import voxelize

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


class CancelledAfter(CancelToken):
    """A token that reads as cancelled from its ``after``-th look on, counting the looks."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.looks = after, 0

    @property
    def cancelled(self) -> bool:
        self.looks += 1
        return self.looks >= self.after


@pytest.fixture(scope="module")
def engine_and_scene():
    engine = SpUNetEngine.from_state_dict(read_official(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth"),
                                          formulation="pairs")
    scene = voxelize(PointCloud(**random_room(6000, seed=3)).validate(), 0.02, ("color", "normal"))
    return engine, scene


def test_a_cancelled_request_stops_the_encoder_at_the_next_block(engine_and_scene):
    engine, scene = engine_and_scene
    token = CancelledAfter(3)
    with active(token), pytest.raises(Cancelled):
        engine.run(scene.feat, scene.grid_coord)
    assert token.looks == 3  # stopped at its third block, not at the end of the forward
    counting = CancelledAfter(10**9)
    with active(counting):
        engine.run(scene.feat, scene.grid_coord)
    assert counting.looks >= 2 * (engine.num_levels - 1) + 3  # every down, up and block looks once


def test_a_batch_stops_only_when_none_of_its_requests_waits(engine_and_scene):
    engine, scene = engine_and_scene
    expected = engine.run(scene.feat, scene.grid_coord)["backbone_feat"]
    waiting, gone = CancelToken(), CancelToken()
    gone.cancel("the client left")
    with active(AllCancelled([waiting, gone])):
        np.testing.assert_array_equal(engine.run(scene.feat, scene.grid_coord)["backbone_feat"], expected)
    waiting.cancel("deadline passed")
    with active(AllCancelled([waiting, gone])), pytest.raises(Cancelled, match="deadline passed; the client left"):
        engine.run(scene.feat, scene.grid_coord)


def test_the_exported_formulation_has_no_checkpoints(engine_and_scene):
    """The gather formulation is traced into ONNX: a Python-level check would not survive export anyway."""
    _, scene = engine_and_scene
    gather = SpUNetEngine.from_state_dict(read_official(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth"))
    token = CancelledAfter(1)
    with active(token):
        gather.run(scene.feat, scene.grid_coord)
    assert token.looks == 0
