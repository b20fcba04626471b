"""The output folder of ``ponder extract``: ``OUT_DIR/.ponder-extract.jsonl`` (:class:`Manifest`), the options
the folder's outputs were made with, and atomic output files.

A rerun skips an output only when its record matches (source path, size and mtime; the output's own size and
mtime), redoes outputs it has no record of, and refuses other options or an output another input made.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from model.files import replaced_on_success
from service.extract_inputs import SCENE_PARTS

TMP_SUFFIX = ".ponder-tmp"
MANIFEST = ".ponder-extract.jsonl"


def options_differ(old: dict, new: dict) -> list[str]:
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
