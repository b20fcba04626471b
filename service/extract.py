"""Batch feature extraction through a gateway: ``ponder extract INPUT... --server URL -o OUT_DIR``.

Inputs are a directory (every supported point-cloud file under it), a glob, a text file listing paths,
or plain file paths. A Pointcept scene folder (``coord.npy`` beside ``color.npy``/``normal.npy``/labels) is
one scene, uploaded as one NPZ; a ``.npy`` that is not an (N, >=3) float cloud (labels, a lone colour array)
is left out with the reason, listed in the summary. Each input gets one ``OUT_DIR/<relative path>.npy``
(or ``.parquet``) of per-point features, written atomically (temporary file + rename), so a killed run loses nothing it finished and
a rerun skips every input whose output exists. Uploads run ``concurrency`` at a time; 5xx answers,
429 and connection errors are retried with backoff or the server's Retry-After (the client's tenacity policy,
``service.client.retrying_answers``), other 4xx answers are reported and skipped.
"""

from __future__ import annotations

import asyncio
import glob
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tenacity import RetryCallState

from model.files import replaced_on_success
from model.pointcloud.readers import SUPPORTED_FORMATS, format_from_name
from service.client import NPY, PonderError, load_npy, raise_for_problem, retrying_answers

TMP_SUFFIX = ".ponder-tmp"
SCENE_PARTS = ("coord", "color", "normal")  # the Pointcept arrays a scene folder's upload carries
EXTRACT_RETRY_STATUSES = (429, *range(500, 600))  # retried; other 4xx are the input's fault


class InputList(list):
    """The inputs to extract, plus ``ignored``: files left out and why (shown in the run's summary)."""

    def __init__(self, paths: list[Path], ignored: dict[Path, str]) -> None:
        super().__init__(paths)
        self.ignored = ignored


@dataclass
class ExtractOptions:
    server: str
    out_dir: Path
    concurrency: int = 4
    out_format: str = "npy"  # or "parquet"
    model: str | None = None
    condition: str | None = None
    grid_size: float | None = None
    dtype: str = "float32"
    api_key: str | None = None
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 600.0
    progress: bool = True


@dataclass
class ExtractReport:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    ignored: dict[Path, str] = field(default_factory=dict)  # not point clouds (see expand_inputs)
    points: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.points / self.seconds if self.seconds > 0 else 0.0
        lines = [f"extracted {len(self.done)}, skipped {len(self.skipped)} (output present), "
                 f"failed {len(self.failed)}; {self.points} points in {self.seconds:.1f} s ({rate:,.0f} points/s)"]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} file(s) that are not point clouds:")
            lines += [f"  ignored {path}: {reason}" for path, reason in self.ignored.items()]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed.items()]
        return "\n".join(lines)


def is_scene_folder(path: Path) -> bool:
    """A Pointcept-layout scene: a folder holding coord.npy (with color.npy, normal.npy, labels beside it)."""
    return path.is_dir() and (path / "coord.npy").is_file()


def not_a_cloud(path: Path) -> str | None:
    """Why a .npy file is no point cloud (None when it is one): it must be an (N, >=3) float array."""
    if path.suffix.lower() != ".npy":
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        return None if "pickle" not in str(exc) else "an object array, not a point cloud"  # the server reports
    if array.ndim != 2 or array.shape[1] < 3:
        return f"shape {array.shape} is not an (N, >=3) point cloud"
    if not np.issubdtype(array.dtype, np.floating):
        return f"{array.dtype} values (labels or colours?) are not an (N, >=3) float point cloud"
    return None


def _walk(folder: Path, ignored: dict[Path, str]) -> list[Path]:
    """Scene folders and point-cloud files under ``folder``; the arrays inside scene folders are parts of
    their scene, not inputs of their own."""
    if is_scene_folder(folder):
        return [folder]
    scenes = sorted(p.parent for p in folder.rglob("coord.npy") if is_scene_folder(p.parent))
    found: list[Path] = list(scenes)
    scene_set = set(scenes)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and format_from_name(p.name)):
        if not scene_set.isdisjoint(path.parents):  # an array inside a scene folder
            continue
        reason = not_a_cloud(path)
        if reason:
            ignored[path.resolve()] = reason
        else:
            found.append(path)
    return found


def expand_inputs(specs: list[str]) -> InputList:
    """Files and scene folders named by directories, globs, list files (.txt/.lst with one path a line) or
    paths; ``.ignored`` lists the .npy files left out because they are not point clouds."""
    files: list[Path] = []
    ignored: dict[Path, str] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files += _walk(path, ignored)
        elif any(ch in spec for ch in "*?["):
            files += sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        elif path.is_file() and (path.suffix.lower() in (".lst", ".list")
                                 or (path.suffix.lower() == ".txt" and _looks_like_list(path))):
            base = path.parent
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line)
                    files.append(entry if entry.is_absolute() else base / entry)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"input {spec!r} is not a file, directory, glob or list file")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise ValueError(f"no point-cloud files found in {', '.join(specs)} "
                         f"(supported suffixes: {', '.join(SUPPORTED_FORMATS)})"
                         + (f"; {len(ignored)} .npy file(s) are not (N, >=3) clouds" if ignored else ""))
    return InputList(unique, ignored)


def scene_npz(folder: Path) -> bytes:
    """A scene folder's coord/color/normal arrays as one NPZ upload (Pointcept keys)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in SCENE_PARTS
                        if (folder / f"{name}.npy").is_file()})
    return buffer.getvalue()


def _looks_like_list(path: Path) -> bool:
    """A .txt input is a list of paths when its first non-empty line names an existing file."""
    with path.open(errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                entry = Path(line)
                return (entry if entry.is_absolute() else path.parent / entry).is_file()
    return False


def output_paths(inputs: list[Path], out_dir: Path, suffix: str) -> dict[Path, Path]:
    """Each input's output: its path relative to the inputs' common folder, suffix replaced; inputs that
    would collide (a.ply and a.las) keep their own suffix too (a.ply.npy, a.las.npy)."""
    root = Path(os.path.commonpath([p.parent for p in inputs]))
    plain = {p: p.relative_to(root).with_suffix(suffix) for p in inputs}
    counts: dict[Path, int] = {}
    for rel in plain.values():
        counts[rel] = counts.get(rel, 0) + 1
    return {p: out_dir / (rel if counts[rel] == 1 else p.relative_to(root).with_name(p.name + suffix))
            for p, rel in plain.items()}


def write_atomic(array: np.ndarray, target: Path, out_format: str) -> None:
    """The temporary name carries the pid, so `remove_stale_temporaries` can tell a killed run's leftovers."""
    with replaced_on_success(target, target.with_name(f".{target.name}.{os.getpid()}{TMP_SUFFIX}"),
                             fsync=True) as tmp:
        if out_format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            flat = pa.array(np.ascontiguousarray(array).reshape(-1))
            column = pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
            pq.write_table(pa.table({"features": column}), tmp)
        else:
            with tmp.open("wb") as handle:
                np.save(handle, array, allow_pickle=False)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files of killed runs (their process is gone) are removed; live runs' are kept."""
    for tmp in out_dir.rglob(f"*{TMP_SUFFIX}"):
        pid = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _extract_one(client: httpx.AsyncClient, path: Path, target: Path, opts: ExtractOptions) -> int:
    """Upload one file and write its features; returns its point count. Raises PonderError on failure."""
    if path.is_dir():  # a scene folder: one NPZ of its arrays
        data, name = await asyncio.to_thread(scene_npz, path), f"{path.name}.npz"
    else:
        data, name = await asyncio.to_thread(path.read_bytes), path.name
    params = {"output": "per_point", "dtype": opts.dtype, "filename": name}
    params.update({k: str(v) for k, v in (("model", opts.model), ("condition", opts.condition),
                                          ("grid_size", opts.grid_size)) if v is not None})
    headers = {"Accept": NPY, "Content-Type": "application/octet-stream"}
    retrying = retrying_answers(opts.retries, opts.backoff_s, EXTRACT_RETRY_STATUSES, asynchronous=True,
                                retry_error_callback=_gave_up)
    response = await retrying(client.post, "/v1/features", content=data, params=params, headers=headers)
    raise_for_problem(response)  # other 4xx: the input is at fault, retrying cannot help
    features = load_npy(response.content)
    await asyncio.to_thread(write_atomic, features, target, opts.out_format)
    return len(features)


def _gave_up(state: RetryCallState) -> httpx.Response:
    """PonderError naming the last answer or connection error once the retries have run out."""
    outcome = state.outcome
    if outcome.failed:
        exc, status = outcome.exception(), 0
        error = f"{type(exc).__name__}: {exc}"
    else:
        response = outcome.result()
        status, error = response.status_code, f"HTTP {response.status_code}: {response.text[:300]}"
    raise PonderError(status, f"{error} (after {state.attempt_number} attempts)")


async def extract(inputs: list[Path], opts: ExtractOptions) -> ExtractReport:
    from tqdm import tqdm

    if opts.out_format == "parquet":
        import pyarrow.parquet  # noqa: F401 - fail before any upload when parquet cannot be written
    report = ExtractReport(ignored=dict(getattr(inputs, "ignored", {})))
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(opts.out_dir)
    targets = output_paths(inputs, opts.out_dir, "." + opts.out_format)
    todo = []
    for path, target in targets.items():
        (report.skipped if target.exists() else todo).append(path)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="file", disable=not opts.progress, dynamic_ncols=True)
    semaphore = asyncio.Semaphore(opts.concurrency)
    headers = {"X-API-Key": opts.api_key} if opts.api_key else {}
    limits = httpx.Limits(max_connections=opts.concurrency)
    async with httpx.AsyncClient(base_url=opts.server.rstrip("/"), timeout=opts.timeout_s, headers=headers,
                                 limits=limits) as client:

        async def one(path: Path) -> None:
            async with semaphore:
                try:
                    # not `report.points += await ...`: that reads the total before the await and loses the
                    # counts other uploads add meanwhile
                    points = await _extract_one(client, path, targets[path], opts)
                    report.points += points
                    report.done.append(path)
                except (PonderError, OSError, ValueError) as exc:
                    report.failed[path] = str(exc)
                    bar.write(f"failed: {path}: {exc}")
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{report.points / max(elapsed, 1e-9):,.0f} points/s", refresh=False)
                bar.update(1)

        await asyncio.gather(*(one(p) for p in todo))
    bar.close()
    report.seconds = time.perf_counter() - start
    return report
