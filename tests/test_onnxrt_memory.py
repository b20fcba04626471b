"""onnxruntime's memory (`export.ort_session`): the CPU arena gives its free memory back after each run (a
long-running gateway or Triton stub would otherwise keep the buffers of the largest scene it ever saw: 4.6 GB for
a 131k-voxel room at the published size; ~0.9 GB for the bundled model on its sample room), and nodes run in the
graph's order, so a run's peak holds one tap's gathered operand at a time, not a whole conv's."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.backends import exported_encoder
from export.onnxrt import OnnxRunner
from model.checkpoint import load_checkpoint
from model.inference import DEFAULT_MODEL_DIR, Predictor
from model.pointcloud.readers import read_point_cloud

ROOM = Path(__file__).resolve().parents[1] / "service" / "static" / "samples" / "room.npz"


def _rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**30


def _peak_rss_gib() -> float:
    """VmHWM: the most resident memory since the last reset (`_reset_peak`)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


@pytest.fixture(scope="module")
def room():
    loaded = load_checkpoint(DEFAULT_MODEL_DIR)
    return loaded, Predictor(loaded).prepare(read_point_cloud(ROOM))


def _export(folder: Path, loaded, node_order: bool = True) -> Path:
    """The bundled encoder exported into ``folder``; ``node_order=False``: listed as files exported before
    `export.node_order` existed (the exporter's own order)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("export.backends.CACHE", folder)
        if not node_order:
            patch.setattr("export.onnx_export.order_for_onnxruntime", lambda graph: 0)
        return exported_encoder(loaded)


@pytest.fixture(scope="module")
def exported(room, tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("onnx"), room[0])


def _peak_of_second_run(runner: OnnxRunner, voxels) -> float:
    runner.run_scenes([voxels])  # first run: onnxruntime's own one-time allocations
    _reset_peak()
    before = _rss_gib()
    runner.run_scenes([voxels])
    return _peak_rss_gib() - before


def test_a_run_leaves_little_memory_held(room, exported):
    loaded, voxels = room
    runner = OnnxRunner(exported, device="cpu", threads=1)
    runner.run_scenes([voxels])  # first run: onnxruntime's own one-time allocations
    before = _rss_gib()
    for _ in range(2):
        (out,) = runner.run_scenes([voxels])
    assert out["backbone_feat"].shape == (voxels.num_voxels, loaded.config.backbone.out_channels)
    assert _rss_gib() - before < 0.3  # with the arena kept: +0.87 GiB here


def test_ponder_sessions_run_an_older_export_one_gathered_operand_at_a_time(room, tmp_path):
    """A file listed in the exporter's order, run with ponder's session options (priority order)."""
    loaded, voxels = room
    runner = OnnxRunner(_export(tmp_path, loaded, node_order=False), device="cpu", threads=1)
    # 76k voxels: 0.12-0.13 GiB above the start in the graph's order; 0.45 GiB in onnxruntime's default order
    assert _peak_of_second_run(runner, voxels) < 0.25


def test_an_export_keeps_the_peak_low_in_onnxruntimes_default_order(room, exported):
    """What NVIDIA's onnxruntime backend does (no execution-order setting): plain session options. The export's
    node listing (`export.node_order`) alone keeps one gathered operand at a time."""
    import onnxruntime as ort

    loaded, voxels = room
    runner = OnnxRunner(exported, device="cpu", threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    runner.session = ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
    assert _peak_of_second_run(runner, voxels) < 0.25  # 0.45 GiB for the exporter's own listing
