"""Batch feature extraction through a gateway: ``ponder extract INPUT... --server URL -o OUT_DIR``.

Inputs are a directory (every supported point-cloud file under it), a glob, a text file listing paths,
or plain file paths. A Pointcept scene folder (``coord.npy`` beside ``color.npy``/``normal.npy``/labels) is
one scene, uploaded as one NPZ; a ``.npy`` that is not a float (N, 3), (N, 6) or (N, 9) cloud (labels, a lone
colour array, another run's features) is left out with the reason, and files of other types under a folder or
glob are listed as left out. An output folder inside the input folder is never read as input.

Each input gets one ``OUT_DIR/<relative path>.npy`` (or ``.parquet``) of per-point features, written
atomically (temporary file + rename). Two inputs that would get the same output are refused before anything
runs. ``OUT_DIR/.ponder-extract.jsonl`` (:class:`Manifest`) records the options of the folder and, per
output, its source file (path, size, mtime) and the output's own size and mtime, written before the output
is renamed into place; a rerun skips an output only when that record matches, redoes outputs it has no
record of (made before the manifest existed, or by a run killed at that moment), and refuses (exit 2) other
options (model, condition, grid size, dtype, format) or an output that another existing input made.

Before the first upload the ``--server`` URL is checked and ``GET /v1/models`` must answer (the gateway is
reachable, the key accepted, ``--model`` served). Uploads run ``concurrency`` at a time; 408, 429, 500, 502,
503 and connection errors are retried with backoff or the server's Retry-After (the client's tenacity policy,
``service.client.retrying_answers``); other answers (4xx, 501, 504: each retry of a 504 would cost another
full deadline) are reported at once.
"""

from __future__ import annotations

import asyncio
import glob
import io
import json
import logging
import os
import sys
import threading
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
# retried: time-outs of the upload (408), a busy or restarting gateway; not 501 (the model cannot do it) or
# 504 (the request ran past the gateway's deadline: a retry costs the same deadline again and ends the same)
EXTRACT_RETRY_STATUSES = (408, 429, *(s for s in range(500, 600) if s not in (501, 504, 505)))
MANIFEST = ".ponder-extract.jsonl"
PREFLIGHT_TIMEOUT_S = 10.0
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".tar", ".tgz", ".rar")
SHOWN = 5  # left-out files named in the summary


class InputList(list):
    """The inputs to extract, plus ``ignored``: files left out and why (shown in the run's summary)."""

    def __init__(self, paths: list[Path], ignored: dict[Path, str],
                 unsupported: dict[Path, str] | None = None) -> None:
        super().__init__(paths)
        self.ignored = ignored
        self.unsupported = unsupported or {}  # files of no point-cloud type under a folder or glob


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
    overwrite: bool = False  # redo every output, whatever the manifest says, and adopt these options


@dataclass
class ExtractReport:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    ignored: dict[Path, str] = field(default_factory=dict)  # not point clouds (see expand_inputs)
    unsupported: dict[Path, str] = field(default_factory=dict)  # no point-cloud file type
    unrecorded: list[Path] = field(default_factory=list)  # outputs there with no manifest record: redone
    points: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """The run's totals; failures are printed as they happen (once) and only counted here."""
        rate = self.points / self.seconds if self.seconds > 0 else 0.0
        lines = [f"extracted {len(self.done)}, skipped {len(self.skipped)} (done earlier with these options), "
                 f"failed {len(self.failed)}; {self.points} points in {self.seconds:.1f} s ({rate:,.0f} points/s)"]
        if self.unrecorded:
            lines.append(f"redid {len(self.unrecorded)} output(s) that were there with no record in {MANIFEST} "
                         f"(from an older ponder or a killed run)")
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} .npy file(s) that are not point clouds:")
            lines += [f"  ignored {path}: {reason}" for path, reason in self.ignored.items()]
        if self.unsupported:
            shown = [f"{path.name} ({why})" if why else path.name for path, why in list(self.unsupported.items())[:SHOWN]]
            more = len(self.unsupported) - len(shown)
            lines.append(f"left out {len(self.unsupported)} file(s) of no point-cloud type: {', '.join(shown)}"
                         + (f" and {more} more" if more > 0 else ""))
        if self.failed:
            lines.append(f"{len(self.failed)} file(s) failed (listed above as they failed)")
        return "\n".join(lines)


def is_scene_folder(path: Path) -> bool:
    """A Pointcept-layout scene: a folder holding coord.npy (with color.npy, normal.npy, labels beside it)."""
    return path.is_dir() and (path / "coord.npy").is_file()


def not_a_cloud(path: Path) -> str | None:
    """Why a .npy file is no point cloud (None when it is one, or when only the server can tell): the server
    reads (N, 3), (N, 6) or (N, 9) arrays and structured ones; of those, integer arrays are labels or colours."""
    if path.suffix.lower() != ".npy":
        return None
    try:
        with path.open("rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                return None  # not an NPY file at all: uploaded, and the server says what is wrong
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        return None if "pickle" not in str(exc) else "an object array, not a point cloud"  # the server reports
    if array.dtype.names:
        return None  # fields by name (x, y, z, ...): the server reads those
    if array.ndim != 2 or array.shape[1] < 3:
        return f"shape {array.shape} is not an (N, >=3) point cloud"
    if array.shape[1] not in (3, 6, 9):
        return (f"shape {array.shape} is not an (N, 3), (N, 6) or (N, 9) point cloud (xyz, rgb, normal); "
                f"features of another run?")
    if not np.issubdtype(array.dtype, np.floating):
        return f"{array.dtype} values (labels or colours?) are not an (N, >=3) float point cloud"
    return None


def unsupported_reason(path: Path) -> str:
    """The note shown beside a left-out file of no point-cloud type ('' when there is nothing to add)."""
    if path.suffix.lower() in COMPRESSED:
        return "compressed: decompress it first"
    return ""


def _walk(folder: Path, ignored: dict[Path, str], unsupported: dict[Path, str]) -> list[Path]:
    """Scene folders and point-cloud files under ``folder``; the arrays inside scene folders are parts of
    their scene, not inputs of their own. Other files (not hidden ones) go to ``unsupported``."""
    if is_scene_folder(folder):
        return [folder]
    scenes = sorted(p.parent for p in folder.rglob("coord.npy") if is_scene_folder(p.parent))
    found: list[Path] = list(scenes)
    scene_set = set(scenes)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not scene_set.isdisjoint(path.parents):  # an array inside a scene folder
            continue
        if not format_from_name(path.name):
            if not path.name.startswith("."):
                unsupported[path.resolve()] = unsupported_reason(path)
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
    unsupported: dict[Path, str] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files += _walk(path, ignored, unsupported)
        elif any(ch in spec for ch in "*?["):
            for match in sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()):
                if format_from_name(match.name):
                    files.append(match)
                else:
                    unsupported[match.resolve()] = unsupported_reason(match)
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
                         + (f"; {len(ignored)} .npy file(s) are not (N, >=3) clouds" if ignored else "")
                         + (f"; {len(unsupported)} file(s) of other types" if unsupported else ""))
    return InputList(unique, ignored, unsupported)


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
    """Each input's output: its path relative to the inputs' common folder, suffix replaced. Two inputs that
    would share one (a.ply and a.las; a.ply and a.ply.npy) are a ValueError naming both: the name of an output
    must not depend on which other files a run was given."""
    root = Path(os.path.commonpath([p.parent for p in inputs]))
    targets: dict[Path, Path] = {}
    owner: dict[Path, Path] = {}
    for path in inputs:
        target = out_dir / path.relative_to(root).with_suffix(suffix)
        if target in owner:
            raise ValueError(f"{owner[target]} and {path} would both be written to {target}; rename one, or "
                             f"extract them in separate runs with different -o folders")
        owner[target] = targets[path] = target
    return targets


def check_server_url(url: str) -> str:
    """The gateway URL without a trailing slash; a ValueError when it is not an http(s) URL with a host."""
    if "://" not in url:
        raise ValueError(f"--server {url!r} has no scheme; did you mean http://{url}?")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"--server {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"--server {url!r} must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000")
    return url.rstrip("/")


def _problem_detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else (response.text.strip()[:200] or response.reason_phrase)


async def preflight(client: httpx.AsyncClient, opts: ExtractOptions) -> dict:
    """``GET /v1/models`` once, before any file: a ValueError naming the problem when the gateway cannot be
    reached, refuses the key, is no ponder gateway, or does not serve ``--model``. Returns the model list
    (empty while the gateway is still loading its models: then the names cannot be checked)."""
    try:
        response = await client.get("/v1/models", timeout=min(PREFLIGHT_TIMEOUT_S, opts.timeout_s))
    except httpx.TransportError as exc:
        raise ValueError(f"cannot reach the gateway at {opts.server} ({type(exc).__name__}: {exc or 'no answer'}); "
                         f"is `ponder serve` running there?") from None
    if response.status_code in (401, 403):
        raise ValueError(f"the gateway at {opts.server} refused the request (HTTP {response.status_code}: "
                         f"{_problem_detail(response)}); pass --api-key or set PONDER_API_KEY")
    if response.status_code in (429, 503):  # busy or starting: the uploads' retries deal with it
        return {}
    try:
        listing = response.json() if response.is_success else None
    except ValueError:
        listing = None
    if not isinstance(listing, dict) or not isinstance(listing.get("models"), list):
        raise ValueError(f"{opts.server} does not look like a ponder gateway (GET /v1/models answered "
                         f"HTTP {response.status_code}: {_problem_detail(response)})")
    names = [m.get("name") for m in listing["models"] if isinstance(m, dict)]
    if opts.model is not None and names and opts.model not in names:
        raise ValueError(f"the gateway at {opts.server} serves no model {opts.model!r}; "
                         f"it serves: {', '.join(map(str, names))}")
    return listing


def run_options(opts: ExtractOptions, listing: dict) -> dict:
    """What the outputs' bytes depend on besides the input (recorded in, and compared with, the manifest).
    ``model`` and ``model_version`` are None when the gateway could not say (still loading)."""
    name = opts.model or listing.get("default_model")
    entry = next((m for m in listing.get("models", []) if isinstance(m, dict) and m.get("name") == name), {})
    return {"model": name, "model_version": entry.get("version"), "condition": opts.condition,
            "grid_size": opts.grid_size, "dtype": opts.dtype, "format": opts.out_format, "output": "per_point"}


def _options_differ(old: dict, new: dict) -> list[str]:
    differ = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key in ("model", "model_version") and (a is None or b is None):
            continue  # unknown on one side (a gateway still loading): not held against the run
        if a != b:
            differ.append(f"{key} {a!r} -> {b!r}")
    return differ


def fingerprint(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of an input; a scene folder's are those of the arrays it uploads."""
    if path.is_dir():
        stats = [(path / f"{name}.npy").stat() for name in SCENE_PARTS if (path / f"{name}.npy").is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class Manifest:
    """``OUT_DIR/.ponder-extract.jsonl``: a header line with the folder's options, then one line per output
    written (relative output path, source path, source size and mtime, output size and mtime; the last line of
    an output wins). Lines are appended (one write each) before the output's rename, so every output in place
    has its line; a line whose output is not in place (killed before the rename) does not match anything. The
    file is rewritten atomically (compacted) when a run starts."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / MANIFEST
        self.out_dir = out_dir
        self.options: dict | None = None
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        if self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if not isinstance(record, dict):
                    continue
                if "options" in record and self.options is None:
                    self.options = record["options"]
                elif "output" in record:
                    self.entries[str(record["output"])] = record

    def key(self, target: Path) -> str:
        return target.relative_to(self.out_dir).as_posix()

    def matches(self, target: Path, source: Path) -> bool:
        """``target`` is in place and was made from ``source`` as it is now."""
        record = self.entries.get(self.key(target))
        if record is None or record.get("source") != str(source):
            return False
        try:
            out = target.stat()
            size, mtime = fingerprint(source)
        except OSError:
            return False
        return (record.get("size"), record.get("mtime_ns"), record.get("output_size"),
                record.get("output_mtime_ns")) == (size, mtime, out.st_size, out.st_mtime_ns)

    def rewrite(self, options: dict) -> None:
        """Atomically: the header with ``options`` and the lines of the outputs still there."""
        self.options = options
        self.entries = {k: v for k, v in self.entries.items() if (self.out_dir / k).is_file()}
        lines = [json.dumps({"ponder-extract": 1, "options": options})]
        lines += [json.dumps(record) for record in self.entries.values()]
        with replaced_on_success(self.path, self.path.with_name(f"{MANIFEST}.{os.getpid()}{TMP_SUFFIX}"),
                                 fsync=True) as tmp:
            tmp.write_text("\n".join(lines) + "\n")

    def record(self, target: Path, source: Path, source_print: tuple[int, int], written: Path) -> None:
        out = written.stat()
        record = {"output": self.key(target), "source": str(source), "size": source_print[0],
                  "mtime_ns": source_print[1], "output_size": out.st_size, "output_mtime_ns": out.st_mtime_ns}
        line = (json.dumps(record) + "\n").encode()
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            self.entries[record["output"]] = record


def write_atomic(array: np.ndarray, target: Path, out_format: str, written=None) -> None:
    """The temporary name carries the pid, so `remove_stale_temporaries` can tell a killed run's leftovers.
    ``written(tmp)`` runs once the file is complete, before the rename (the manifest's line)."""
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
        if written is not None:
            written(tmp)


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


async def _extract_one(client: httpx.AsyncClient, path: Path, target: Path, opts: ExtractOptions,
                       manifest: Manifest | None = None) -> int:
    """Upload one file and write its features; returns its point count. Raises PonderError on failure."""
    source_print = await asyncio.to_thread(fingerprint, path)  # before reading: a file changed meanwhile is redone
    if path.is_dir():  # a scene folder: one NPZ of its arrays
        data, name = await asyncio.to_thread(scene_npz, path), f"{path.name}.npz"
    else:
        data, name = await asyncio.to_thread(path.read_bytes), path.name
    if not data:
        raise ValueError("the file is empty")
    params = {"output": "per_point", "dtype": opts.dtype, "filename": name}
    params.update({k: str(v) for k, v in (("model", opts.model), ("condition", opts.condition),
                                          ("grid_size", opts.grid_size)) if v is not None})
    headers = {"Accept": NPY, "Content-Type": "application/octet-stream"}
    retrying = retrying_answers(opts.retries, opts.backoff_s, EXTRACT_RETRY_STATUSES, asynchronous=True,
                                retry_error_callback=_gave_up)
    response = await retrying(client.post, "/v1/features", content=data, params=params, headers=headers)
    raise_for_problem(response)  # other 4xx, 501, 504: retrying cannot help
    features = load_npy(response.content)
    written = None
    if manifest is not None:
        def written(tmp: Path) -> None:
            manifest.record(target, path, source_print, tmp)
    await asyncio.to_thread(write_atomic, features, target, opts.out_format, written)
    return len(features)


class TransferError(PonderError):
    """No answer from the gateway (connection refused or lost, time-out), after the retries."""

    def __init__(self, detail: str) -> None:
        RuntimeError.__init__(self, detail)
        self.status, self.detail, self.request_id = 0, detail, None


def _gave_up(state: RetryCallState) -> httpx.Response:
    """The PonderError of the last answer (its problem detail and request id, as raise_for_problem gives) or
    of the last connection error, once the retries have run out."""
    outcome = state.outcome
    attempts = f"after {state.attempt_number} attempts"
    if outcome.failed:
        exc = outcome.exception()
        raise TransferError(f"{type(exc).__name__}: {exc or 'no answer'} ({attempts})")
    try:
        raise_for_problem(outcome.result())
    except PonderError as exc:
        raise PonderError(exc.status, f"{exc.detail} ({attempts})", exc.request_id) from None
    return outcome.result()


def _quiet_http_logs() -> None:
    """httpx logs every request at INFO; the progress bar and the summary are this command's output (kept
    under -v, which sets the root logger to DEBUG)."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


async def extract(inputs: list[Path], opts: ExtractOptions) -> ExtractReport:
    """Run the batch. Problems found before the first upload (a bad URL, an unreachable gateway, an unknown
    model, two inputs for one output, an output folder made with other options) raise ValueError, which the
    command shows in one line with exit status 2; nothing is written then."""
    from tqdm import tqdm

    _quiet_http_logs()
    opts.server = check_server_url(opts.server)
    if opts.out_format == "parquet":
        import pyarrow.parquet  # noqa: F401 - fail before any upload when parquet cannot be written
    out_dir = opts.out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"-o {opts.out_dir} is a file, not a folder")
    # an output folder inside the input folder: its files (this or an earlier run's outputs) are no inputs
    ignored = {p: r for p, r in getattr(inputs, "ignored", {}).items() if not _within(p, out_dir)}
    unsupported = {p: r for p, r in getattr(inputs, "unsupported", {}).items() if not _within(p, out_dir)}
    inputs = [p for p in inputs if not _within(Path(p).resolve(), out_dir)]
    if not inputs:
        raise ValueError(f"no inputs left: every file found is inside the output folder {opts.out_dir}")
    report = ExtractReport(ignored=ignored, unsupported=unsupported)
    targets = output_paths([Path(p).resolve() for p in inputs], out_dir, "." + opts.out_format)

    manifest = Manifest(out_dir)
    if not opts.overwrite:
        for path, target in targets.items():  # an output that another existing input made (an earlier run)
            record = manifest.entries.get(manifest.key(target))
            if record and record.get("source") != str(path) and Path(record["source"]).exists():
                raise ValueError(f"{target} holds the features of {record['source']} (an earlier run), and this "
                                 f"run would write those of {path} there; use another -o folder")

    headers = {"X-API-Key": opts.api_key} if opts.api_key else {}
    limits = httpx.Limits(max_connections=opts.concurrency)
    async with httpx.AsyncClient(base_url=opts.server, timeout=opts.timeout_s, headers=headers,
                                 limits=limits) as client:
        options = run_options(opts, await preflight(client, opts))
        if manifest.options is not None and not opts.overwrite:
            differ = _options_differ(manifest.options, options)
            if differ:
                raise ValueError(f"{opts.out_dir} holds outputs made with other options ({'; '.join(differ)}); "
                                 f"use a new -o folder, or --overwrite to redo them with these options")
        elif manifest.options is not None:  # --overwrite: the old records say nothing about the new options
            manifest.entries.clear()
        if manifest.options is not None and not opts.overwrite:  # an unknown model stays as first recorded
            options = {k: (manifest.options.get(k) if v is None and k in ("model", "model_version") else v)
                       for k, v in options.items()}

        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        manifest.rewrite(options)
        todo = []
        for path, target in targets.items():
            if not opts.overwrite and manifest.matches(target, path):
                report.skipped.append(path)
                continue
            if target.exists() and manifest.key(target) not in manifest.entries and not opts.overwrite:
                report.unrecorded.append(path)
            todo.append(path)

        start = time.perf_counter()
        bar = tqdm(total=len(todo), unit="file", disable=not opts.progress, dynamic_ncols=True, file=sys.stderr)
        semaphore = asyncio.Semaphore(opts.concurrency)

        async def one(path: Path) -> None:
            async with semaphore:
                try:
                    # not `report.points += await ...`: that reads the total before the await and loses the
                    # counts other uploads add meanwhile
                    points = await _extract_one(client, path, targets[path], opts, manifest)
                    report.points += points
                    report.done.append(path)
                except (PonderError, OSError, ValueError) as exc:
                    report.failed[path] = str(exc)
                    bar.write(f"FAILED {path}: {exc}", file=sys.stderr)  # once, as it happens
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{report.points / max(elapsed, 1e-9):,.0f} points/s"
                                    + (f", {len(report.failed)} failed" if report.failed else ""), refresh=False)
                bar.update(1)

        try:
            await asyncio.gather(*(one(p) for p in todo))
        finally:
            bar.close()
            report.seconds = time.perf_counter() - start
    return report
