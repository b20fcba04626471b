"""onnxruntime's memory (`export.ort_session`): the CPU arena gives its free memory back after each run (a
long-running gateway or Triton stub would otherwise keep the buffers of the largest scene it ever saw: 4.6 GB for
a 131k-voxel room at the published size; ~0.9 GB for the bundled model on its sample room), and nodes run in the
graph's order, so a run's peak holds one tap's gathered operand at a time, not a whole conv's."""

from __future__ import annotations

from pathlib import Path

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


def test_a_run_leaves_little_memory_held(tmp_path, monkeypatch):
    monkeypatch.setattr("export.backends.CACHE", tmp_path)
    loaded = load_checkpoint(DEFAULT_MODEL_DIR)
    voxels = Predictor(loaded).prepare(read_point_cloud(ROOM))
    runner = OnnxRunner(exported_encoder(loaded), device="cpu", threads=1)
    runner.run_scenes([voxels])  # first run: onnxruntime's own one-time allocations
    before = _rss_gib()
    for _ in range(2):
        (out,) = runner.run_scenes([voxels])
    assert out["backbone_feat"].shape == (voxels.num_voxels, loaded.config.backbone.out_channels)
    assert _rss_gib() - before < 0.3  # with the arena kept: +0.87 GiB here


def test_a_run_peaks_at_one_gathered_operand_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr("export.backends.CACHE", tmp_path)
    loaded = load_checkpoint(DEFAULT_MODEL_DIR)
    voxels = Predictor(loaded).prepare(read_point_cloud(ROOM))
    runner = OnnxRunner(exported_encoder(loaded), device="cpu", threads=1)
    runner.run_scenes([voxels])
    _reset_peak()
    before = _rss_gib()
    runner.run_scenes([voxels])
    # 76k voxels: 0.12-0.13 GiB above the start in the graph's order; 0.45 GiB in onnxruntime's default order
    assert _peak_rss_gib() - before < 0.25


def test_an_exported_file_keeps_the_peak_low_in_onnxruntimes_default_order(tmp_path, monkeypatch):
    """What NVIDIA's onnxruntime backend does (no execution-order setting): plain session options. The export's
    node listing (`export.node_order`) alone keeps one gathered operand at a time."""
    import onnxruntime as ort

    monkeypatch.setattr("export.backends.CACHE", tmp_path)
    loaded = load_checkpoint(DEFAULT_MODEL_DIR)
    voxels = Predictor(loaded).prepare(read_point_cloud(ROOM))
    runner = OnnxRunner(exported_encoder(loaded), device="cpu", threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    runner.session = ort.InferenceSession(str(runner.path), options, providers=["CPUExecutionProvider"])
    runner.run_scenes([voxels])
    _reset_peak()
    before = _rss_gib()
    runner.run_scenes([voxels])
    assert _peak_rss_gib() - before < 0.25  # 0.45 GiB for the exporter's own listing
