"""Every fenced shell command in README.md is run (issue 12.7), so the README cannot drift from the CLI.

Each ```bash/sh/shell/console fence is one case, run command by command in a fresh folder that mirrors the repo's
top level through symlinks (the README's repo-relative paths such as `training/configs/...` resolve, and what the
commands write stays there), with the repo's `.venv/bin` first on PATH. A command passes when it exits 0 and what
it names with `-o`/`--out` exists (plus the few output checks in ``check_outputs``).

How a command as written becomes one that runs, all visible here:
* `[optional parts]` are kept (the fullest form runs) and `a|b|c` inside them takes the first choice;
* the placeholders in ``PLACEHOLDERS`` name the bundled model, and the inputs a reader brings (``scene.ply``,
  ``scan.ply``, ``cams.json``) are written into the folder first by ``write_inputs``;
* `a && b` runs as two commands; a `\\` continuation joins lines; `# comments` are dropped;
* `ponder serve` runs as a real process on a free port (`--port` appended) until `/healthz` answers, then stops.

What does not run here is said, never silently dropped: a `<!-- not-run: reason -->` comment right before a fence
skips the whole fence (pytest shows the reason), and a command matching ``NOT_RUN`` is skipped with its reason
(reported as a warning in pytest's summary). A fence with a command matching ``SLOW`` is marked slow as a whole
(later commands use earlier outputs): `.venv/bin/python -m pytest -m slow tests/test_readme_commands.py`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO, random_room

README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin"
SHELL_FENCES = {"bash", "sh", "shell", "console"}
NOT_RUN_MARK = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")

# (pattern searched in the command as written, reason): the command is not run
NOT_RUN: tuple[tuple[str, str], ...] = (
    (r"^\./setup\.sh\b", "re-installs the project into .venv with pip (needs the package index); the commands "
                         "after it run with the existing .venv"),
    (r"\s-m pytest\b", "the test suite itself, which holds this test"),
    (r"^ponder export tensorrt\b", "needs TensorRT and a GPU"),
    (r"^ponder worker --triton\b", "starts a Triton server; tests/test_service_triton.py runs that path end to end"),
    (r"PONDER_WORKER=triton\b", "needs the Triton worker of the line above"),
)
# (pattern, reason): the whole fence is marked slow
SLOW: tuple[tuple[str, str], ...] = (
    (r"^ponder train\b", "trains for minutes"),
    (r"^ponder datasets generate\b.*--frames [1-9]", "ray-casts RGB-D frames for many rooms"),
    (r"^ponder export onnx\b", "exports the full graph and runs it in onnxruntime (~50 s with the machine loaded)"),
    (r"^ponder export triton-repo CKPT", "exports the ONNX graph from a checkpoint first (~20 s)"),
)
# placeholders the README uses for the reader's own files → what runs here (relative to the run folder)
PLACEHOLDERS: tuple[tuple[str, str], ...] = (
    (r"\bCKPT_OR_ENCODER\.onnx\b", "model/default_model"),
    (r"\bCKPT\b", "model/default_model"),
)
SCAN_POINTS = 4000
COMMAND_TIMEOUT_S = 3600
SERVE_START_TIMEOUT_S = 180


@dataclass
class Command:
    text: str  # as written, continuations joined, comment dropped
    line: int  # README line number


@dataclass
class Fence:
    line: int
    section: str  # the heading above it, as a test id
    commands: list[Command] = field(default_factory=list)
    not_run: str | None = None  # reason from a marker comment before the fence


def readme_fences(text: str) -> list[Fence]:
    """The shell fences of a markdown text with their commands (a `<!-- not-run -->` marker may sit on one of the
    blank-or-comment lines right before a fence)."""
    lines = text.splitlines()
    fences: list[Fence] = []
    section, i = "top", 0
    while i < len(lines):
        heading = re.match(r"^#+\s+(.*)", lines[i])
        if heading:
            section = re.sub(r"[^a-z0-9]+", "-", heading.group(1).lower()).strip("-")
        opening = re.match(r"^\s*```+\s*(\w*)", lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
        if opening.group(1).lower() in SHELL_FENCES:
            fence = Fence(line=i + 1, section=section, not_run=_marker_before(lines, i))
            fence.commands = _commands(lines[i + 1:end], first_line=i + 2)
            fences.append(fence)
        i = end + 1
    return fences


def _marker_before(lines: list[str], index: int) -> str | None:
    j = index - 1
    while j >= 0 and (not lines[j].strip() or lines[j].strip().startswith("<!--")):
        found = NOT_RUN_MARK.search(lines[j])
        if found:
            return found.group(1) or "marked not-run"
        j -= 1
    return None


def _commands(body: list[str], first_line: int) -> list[Command]:
    commands: list[Command] = []
    pending, start = "", 0
    for offset, raw in enumerate(body):
        if not pending:
            start = first_line + offset
        text = _drop_comment(raw).rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text = (pending + text).strip()
        pending = ""
        for part in (p.strip() for p in text.split("&&")):
            if part:
                commands.append(Command(text=re.sub(r"\s+", " ", part), line=start))
    return commands


def _drop_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` outside quotes that starts a word)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k]
    return line


def not_run_reason(command: str) -> str | None:
    return next((reason for pattern, reason in NOT_RUN if re.search(pattern, command)), None)


def slow_reason(fence: Fence) -> str | None:
    return next((reason for c in fence.commands for pattern, reason in SLOW if re.search(pattern, c.text)), None)


def runnable(command: str) -> str:
    """The command as it runs here: optional groups kept (first choice of `a|b`), placeholders resolved."""
    def keep(group: re.Match) -> str:
        return " ".join(word.split("|")[0] for word in group.group(1).split())

    text = re.sub(r"\[([^\[\]]*)\]", keep, command)
    for pattern, value in PLACEHOLDERS:
        text = re.sub(pattern, value, text)
    return re.sub(r"\s+", " ", text).strip()


def _fence_cases() -> list:
    cases, seen = [], set()
    for fence in readme_fences(README.read_text()):
        name = fence.section if fence.section not in seen else f"{fence.section}-line{fence.line}"
        seen.add(name)
        marks = []
        if fence.not_run:
            marks.append(pytest.mark.skip(reason=f"README line {fence.line}: not-run: {fence.not_run}"))
        elif slow_reason(fence):  # each command has COMMAND_TIMEOUT_S; the fence as a whole more than the default
            marks += [pytest.mark.slow, pytest.mark.timeout(len(fence.commands) * COMMAND_TIMEOUT_S)]
        cases.append(pytest.param(fence, id=name, marks=marks))
    return cases


# ---- running -------------------------------------------------------------------------------------------------


def write_inputs(folder: Path) -> None:
    """The files the README's commands take as the reader's own: a scan (PLY with colours and normals, the same
    cloud under both names the README uses) and one small camera."""
    from plyfile import PlyData, PlyElement

    room = random_room(SCAN_POINTS, seed=7)
    vertex = np.empty(SCAN_POINTS, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                          ("blue", "u1"), ("nx", "f4"), ("ny", "f4"), ("nz", "f4")])
    for k, name in enumerate("xyz"):
        vertex[name] = room["coord"][:, k]
        vertex["n" + name] = room["normal"][:, k]
    for k, name in enumerate(("red", "green", "blue")):
        vertex[name] = room["color"][:, k]
    for name in ("scene.ply", "scan.ply"):
        PlyData([PlyElement.describe(vertex, "vertex")]).write(str(folder / name))
    # looking along +y from (1.5, -2, 1.2) at the room corner: OpenCV axes (x right, y down, z forward)
    camera_to_world = [[1, 0, 0, 1.5], [0, 0, 1, -2.0], [0, -1, 0, 1.2], [0, 0, 0, 1]]
    cams = [{"K": [[40, 0, 32], [0, 40, 24], [0, 0, 1]], "width": 64, "height": 48,
             "camera_to_world": camera_to_world}]
    (folder / "cams.json").write_text(json.dumps(cams))


def mirror_repo(folder: Path) -> None:
    """Symlink the repo's top-level entries into the run folder, so repo-relative paths resolve there."""
    for entry in REPO.iterdir():
        if entry.name not in {".git", "data", "runs", "outputs"}:
            (folder / entry.name).symlink_to(entry)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_command(command: str, folder: Path) -> None:
    if re.search(r"\bponder serve\b", command):
        serve(command, folder)
        return
    done = subprocess.run(["bash", "-c", command], cwd=folder, env=environment(), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    check_outputs(command, folder)


def serve(command: str, folder: Path) -> None:
    """A long-running `ponder serve`: started for real on a free port, healthy and announcing its URL, then stopped
    with SIGTERM (which must end it cleanly)."""
    port = free_port()
    log = folder / f"serve-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen(["bash", "-c", f"exec {command} --port {port}"], cwd=folder, env=environment(),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        healthy = False
        while time.monotonic() < deadline and process.poll() is None and not healthy:
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.5)
        assert healthy, f"`{command}` did not answer /healthz (exit {process.poll()}):\n{log.read_text()[-3000:]}"
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=10).status_code == 200
        assert f"http://127.0.0.1:{port}" in log.read_text(), "serve should print its URL"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode in (0, -signal.SIGTERM), f"serve exited {process.returncode}:\n{log.read_text()[-2000:]}"


def check_outputs(command: str, folder: Path) -> None:
    """What the README says a command writes: its `-o`/`--out` path exists; `features` gives N float32 rows for
    the N input points; a JSON output parses."""
    words = shlex.split(command)
    for flag in ("-o", "--out", "--output"):
        if flag in words[:-1]:
            target = folder / words[words.index(flag) + 1]
            assert folder.resolve() in target.resolve().parents, f"{target} is outside the run folder"
            assert target.exists(), f"`{command}` did not write {target.name}"
            if target.suffix == ".json":
                json.loads(target.read_text())
    if "features" in words and words[words.index("features") - 1].endswith("ponder"):
        out = np.load(folder / words[words.index("-o") + 1], allow_pickle=False)
        assert out.dtype == np.float32 and out.shape[0] == SCAN_POINTS and out.ndim == 2, out.shape


# ---- tests ---------------------------------------------------------------------------------------------------


def test_readme_has_shell_fences_and_the_rules_parse_them():
    fences = readme_fences(README.read_text())
    commands = [c.text for f in fences for c in f.commands]
    assert any(c.startswith("ponder ") for c in commands), commands
    assert all(not c.endswith("\\") and "#" not in c for c in commands), commands
    sample = readme_fences("<!-- not-run: needs a GPU -->\n```bash\nponder a \\\n  --b c   # note\nx && y\n```\n")
    assert sample[0].not_run == "needs a GPU"
    assert [(c.text, c.line) for c in sample[0].commands] == [("ponder a --b c", 3), ("x", 5), ("y", 5)]
    assert runnable("ponder export onnx CKPT -o e.onnx [--kind a|b] [--x]") == \
        "ponder export onnx model/default_model -o e.onnx --kind a --x"


@pytest.mark.parametrize("fence", _fence_cases())
def test_readme_fence_runs(fence: Fence, tmp_path: Path):
    mirror_repo(tmp_path)
    write_inputs(tmp_path)
    ran = 0
    for command in fence.commands:
        reason = not_run_reason(command.text)
        if reason:
            warnings.warn(f"README line {command.line}: not run ({reason}): {command.text}", stacklevel=1)
            continue
        run_command(runnable(command.text), tmp_path)
        ran += 1
    if not ran:
        pytest.skip(f"README line {fence.line}: no command of this fence runs here (reasons in the warnings)")
