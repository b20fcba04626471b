"""Batch feature extraction through a gateway: ``ponder extract INPUT... --server URL -o OUT_DIR``.

Inputs are a directory (every supported point-cloud file under it), a glob, a text file listing paths,
or plain file paths (`service.extract_inputs`). An output folder inside the input folder is never read as input.

Each input gets one ``OUT_DIR/<relative path>.npy`` (or ``.parquet``) of per-point features, written
atomically (temporary file + rename). Two inputs that would get the same output are refused before anything
runs. ``OUT_DIR/.ponder-extract.jsonl`` (:class:`Manifest`) records the options of the folder and, per
output, its source file (path, size, mtime) and the output's own size and mtime, written before the output
is renamed into place; a rerun skips an output only when that record matches, redoes outputs it has no
record of (made before the manifest existed, or by a run killed at that moment), and refuses (exit 2) other
options (model, condition, grid size, dtype, format) or an output that another existing input made
(`service.extract_manifest`).

Before the first upload the ``--server`` URL is checked and ``GET /v1/models`` must answer (the gateway is
reachable, the key accepted, ``--model`` served). Uploads run ``concurrency`` at a time; 408, 429, 500, 502,
503 and connection errors are retried with backoff or the server's Retry-After (the client's tenacity policy,
``service.client.retrying_answers``); other answers (4xx, 501, 504: each retry of a 504 would cost another
full deadline) are reported at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tenacity import RetryCallState

from model.conditions import resolve_condition
from service.client import NPY, PonderError, load_npy, raise_for_problem, retrying_answers
from service.extract_inputs import output_paths, scene_npz
from service.extract_manifest import (MANIFEST, Manifest, fingerprint, options_differ, remove_stale_temporaries,
                                      write_atomic)
# retried: time-outs of the upload (408), a busy or restarting gateway; not 501 (the model cannot do it) or
# 504 (the request ran past the gateway's deadline: a retry costs the same deadline again and ends the same)
EXTRACT_RETRY_STATUSES = (408, 429, *(s for s in range(500, 600) if s not in (501, 504, 505)))
PREFLIGHT_TIMEOUT_S = 10.0
SHOWN = 5  # left-out files named in the summary


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
    interrupted: int | None = None  # inputs not done when the run was interrupted (Ctrl-C); None: not interrupted

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
        if self.interrupted is not None:
            lines.append(f"interrupted: {self.interrupted} file(s) not done; run the same command again to do "
                         f"them (the {len(self.done) + len(self.skipped)} done are skipped)")
        return "\n".join(lines)




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
    reached, refuses the key, is no ponder gateway, does not serve ``--model`` or refuses ``--condition``.
    Returns the model list (empty while the gateway is still loading its models: then the names cannot be checked)."""
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
    name = opts.model or listing.get("default_model")
    entry = next((m for m in listing["models"] if isinstance(m, dict) and m.get("name") == name), None)
    if entry is not None and isinstance(entry.get("conditions"), list):
        try:  # the gateway's own rule, so a bad --condition fails here and not once per file
            resolve_condition(entry["conditions"], opts.condition, default=entry.get("default_condition"),
                              model=name)
        except ValueError as exc:
            raise ValueError(f"--condition: {exc}") from None
    return listing


def run_options(opts: ExtractOptions, listing: dict) -> dict:
    """What the outputs' bytes depend on besides the input (recorded in, and compared with, the manifest).
    ``model`` and ``model_version`` are None when the gateway could not say (still loading)."""
    name = opts.model or listing.get("default_model")
    entry = next((m for m in listing.get("models", []) if isinstance(m, dict) and m.get("name") == name), {})
    return {"model": name, "model_version": entry.get("version"), "condition": opts.condition,
            "grid_size": opts.grid_size, "dtype": opts.dtype, "format": opts.out_format, "output": "per_point"}


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
            differ = options_differ(manifest.options, options)
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
        except asyncio.CancelledError:
            # Ctrl-C (asyncio.run cancels this task): outputs already written stay, with their manifest lines;
            # uploads in flight are dropped and redone by the next run. The report says so (a second Ctrl-C
            # stops at once).
            report.interrupted = len(todo) - len(report.done) - len(report.failed)
        finally:
            bar.close()
            report.seconds = time.perf_counter() - start
    return report
