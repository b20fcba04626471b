"""`ponder export onnx | triton-repo` are all-or-nothing and refuse bad input in one line (exit 2).

A failed `export triton-repo` (no TensorRT, a missing --plan, an ONNX file that is plain, truncated or not ONNX,
a failure half-way through the build) leaves an existing repository byte for byte as it was and no partial
repository in a new folder; a failed `export onnx` leaves an earlier .onnx as it was. Options, the output path
and the kind of checkpoint are checked before any heavy work, with messages that name the option or the path.
Run through the real `ponder` console script, as a user meets it; two failures that no input can cause on a
healthy machine (the ONNX checker refusing the export, a copy failing mid-build) are injected in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import PONDER, REPO, fixture_dir
from export.tensorrt import tensorrt_available

CHECKPOINT_FIXTURE = "spunet_v1m1_seg"
IMAGE_MODEL = REPO / "model" / "default_model" / "images"


def _ponder(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PONDER, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def _checkpoint() -> Path:
    return fixture_dir(CHECKPOINT_FIXTURE) / "checkpoint.pth"


def _assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with one ``ponder export: error: ...`` line naming ``needles``: no traceback, no bare errno."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "[Errno" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ponder export: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` -> its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One small exported model, shared by every test here (the only full export of the module)."""
    path = tmp_path_factory.mktemp("onnx") / "enc.onnx"
    result = _ponder("export", "onnx", _checkpoint(), "-o", path)
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def good_repo(tmp_path_factory, exported) -> Path:
    repo = tmp_path_factory.mktemp("repo") / "repo"
    result = _ponder("export", "triton-repo", exported, "-o", repo, "--kind", "python-onnxruntime")
    assert result.returncode == 0, result.stderr[-3000:]
    return repo


# --- export onnx ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, needle", [("--opset", "5", "--opset must be 9-"),
                                                   ("--opset", "99", "--opset must be 9-"),
                                                   ("--taps-per-matmul", "-2", "--taps-per-matmul must be 1-27"),
                                                   ("--taps-per-matmul", "0", "--taps-per-matmul must be 1-27")])
def test_onnx_bad_numeric_option_is_refused_and_keeps_the_old_file(tmp_path, exported, option, value, needle):
    out = tmp_path / "enc.onnx"
    shutil.copyfile(exported, out)
    before = out.read_bytes()
    _assert_clean_error(_ponder("export", "onnx", _checkpoint(), "-o", out, option, value), needle, value)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.onnx"]  # no temporary file left


def test_onnx_export_failing_the_checker_keeps_the_old_file(tmp_path, exported, monkeypatch):
    """The model is written to a temporary file, checked, and only then renamed over the output: a checker
    failure is a one-line error and leaves the earlier output and nothing else."""
    import torch

    from ponder.cli import main as ponder

    out = tmp_path / "enc.onnx"
    shutil.copyfile(exported, out)
    before = out.read_bytes()

    def fake_export(graph, args, f, **kwargs):  # the traced graph: the fixture's (the export itself is tested
        shutil.copyfile(exported, f)            # in tests/test_export_onnx.py; this test is about the write)

    def failing_check(model, full_check=False):
        raise onnx.checker.ValidationError("Mismatched attribute type in '/stem/Cast : to'")

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    assert ponder(["export", "onnx", str(_checkpoint()), "-o", str(out)]) == 2
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.onnx"]  # no invalid file, no temporary file


@pytest.mark.parametrize("target, needle", [("folder", "is a folder"), ("afile/x.onnx", "afile is a file"),
                                            ("enc.npy", "name the file enc.onnx")])
def test_onnx_output_is_checked_before_the_export(tmp_path, target, needle):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    _assert_clean_error(_ponder("export", "onnx", _checkpoint(), "-o", target, cwd=tmp_path), f"-o {target}", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]
    assert not any((tmp_path / "folder").iterdir())


def test_image_model_is_refused_in_one_line(tmp_path):
    if not (IMAGE_MODEL / "config.json").is_file():
        pytest.skip(f"no image model at {IMAGE_MODEL}")
    line = _assert_clean_error(_ponder("export", "onnx", IMAGE_MODEL, "-o", tmp_path / "img.onnx"),
                               "image model", "cannot be exported", "point-cloud")
    assert len(line) < 300 and "unknown config keys" not in line
    assert not any(tmp_path.iterdir())


# --- export triton-repo ---------------------------------------------------------------------------------------


def _bad_input(case: str, folder: Path, exported: Path) -> tuple[list[str], str]:
    """(command-line tail, expected words of the message) of one failing `export triton-repo`."""
    if case == "tensorrt-missing":
        return [str(exported), "--kind", "tensorrt"], "TensorRT is not installed"
    if case == "plan-missing":
        return [str(exported), "--kind", "tensorrt", "--plan", str(folder / "nonexistent.plan")], "--plan"
    if case == "plain-onnx":
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        onnx.save(onnx.helper.make_model(graph), str(folder / "plain.onnx"))
        return [str(folder / "plain.onnx")], "no ponder metadata"
    if case == "truncated-onnx":
        (folder / "trunc.onnx").write_bytes(exported.read_bytes()[:100_000])
        return [str(folder / "trunc.onnx")], "not a readable ONNX model"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["tensorrt-missing", "plan-missing", "plain-onnx", "truncated-onnx"])
def test_failed_triton_repo_leaves_existing_and_new_folders_alone(tmp_path, exported, good_repo, case):
    if case == "tensorrt-missing" and tensorrt_available():
        pytest.skip("TensorRT is installed here: --kind tensorrt without --plan would build an engine")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    tail, needle = _bad_input(case, inputs, exported)
    work = tmp_path / "work"
    work.mkdir()
    existing = work / "repo"
    shutil.copytree(good_repo, existing)
    before = _snapshot(existing)
    _assert_clean_error(_ponder("export", "triton-repo", *tail, "-o", existing), needle)
    assert _snapshot(existing) == before  # the working repository is byte for byte as it was
    _assert_clean_error(_ponder("export", "triton-repo", *tail, "-o", work / "fresh"), needle)
    assert sorted(p.name for p in work.iterdir()) == ["repo"]  # no partial repository, no staging folder


def test_reexport_replaces_the_model_folders_and_keeps_other_models(tmp_path, exported, good_repo):
    repo = tmp_path / "repo"
    shutil.copytree(good_repo, repo)
    (repo / "other_model" / "1").mkdir(parents=True)
    (repo / "other_model" / "config.pbtxt").write_text('name: "other_model"\n')
    result = _ponder("export", "triton-repo", exported, "-o", repo, "--kind", "onnxruntime")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (repo / "ponder_encoder" / "1").iterdir()) == ["model.onnx"]  # no stale script
    assert 'backend: "onnxruntime"' in (repo / "ponder_encoder" / "config.pbtxt").read_text()
    assert (repo / "other_model" / "config.pbtxt").read_text() == 'name: "other_model"\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_failure_midway_through_the_build_rolls_back(tmp_path, exported, good_repo, monkeypatch):
    """Everything checked, then the copy of the model fails: the old repository stays, a new one never appears."""
    import export.triton_repo as triton_repo
    from ponder.cli import main as ponder

    real_copy = shutil.copyfile

    def failing_copy(src, dst, *args, **kwargs):
        if Path(dst).name == "model.onnx":
            raise OSError(28, "No space left on device", str(dst))
        return real_copy(src, dst, *args, **kwargs)

    existing = tmp_path / "repo"
    shutil.copytree(good_repo, existing)
    before = _snapshot(existing)
    monkeypatch.setattr(triton_repo.shutil, "copyfile", failing_copy)
    for out in (existing, tmp_path / "fresh"):
        with pytest.raises(OSError, match="No space left"):
            ponder(["export", "triton-repo", str(exported), "-o", str(out), "--kind", "onnxruntime"])
    assert _snapshot(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_triton_repo_output_is_checked_before_exporting_a_checkpoint(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    _assert_clean_error(_ponder("export", "triton-repo", _checkpoint(), "-o", "afile", cwd=tmp_path),
                        "-o afile", "is a file")
    _assert_clean_error(_ponder("export", "triton-repo", _checkpoint(), "-o", "afile/repo", cwd=tmp_path),
                        "-o afile/repo", "afile is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
