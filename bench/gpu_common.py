"""What the GPU check's steps share (bench/gpu_check.py, bench/gpu_timing.py): the figures file, timing with
synchronisation, error measures, the encoders built from a state_dict, the generated scenes and the reasons a
backend is skipped."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TILES = (4, 2)  # the ~1M-voxel scene: 4 x 2 copies of the room side by side


class Report:
    """The figures JSON: sections of key → value, written out after every `put`."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path and path.exists() else {}

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.path)


def log(msg: str) -> None:
    print(msg, flush=True)


def attempt(report: Report, section: str, key: str, fn: Callable[[], Any], record: bool = True) -> Any:
    """Run one measurement; an exception is logged and recorded as {"error": ...}, and the step goes on.
    ``record=False``: the result is an object (a model), recorded as {"ok": true} only."""
    try:
        value = fn()
    except Exception as exc:  # one broken backend must not hide the others
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log(f"  {section}/{key}: FAILED {reason}")
        traceback.print_exc(limit=4)
        report.put(section, key, {"error": reason})
        return {"error": reason}
    report.put(section, key, value if record else {"ok": True})
    return value


def spconv_reason() -> str | None:
    """None when spconv can be used, else why not (``PONDER_GPU_SPCONV=0`` from the env step)."""
    if os.environ.get("PONDER_GPU_SPCONV") == "0":
        return os.environ.get("PONDER_GPU_SPCONV_REASON", "the env step found spconv unusable")
    try:
        import spconv.pytorch  # noqa: F401  (the import itself is the check)
    except Exception as exc:
        return f"import spconv.pytorch failed: {type(exc).__name__}: {exc}"
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: bool = True) -> tuple[float, Any]:
    """Best wall time in ms over ``repeats`` synchronised calls after one warm-up, and the last result."""
    out = fn() if warmup else None
    best = float("inf")
    for _ in range(max(repeats, 1)):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3, out


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |d| / max |ref|, and the per-voxel cosine similarity (min and mean)."""
    out, ref = out.float(), ref.float()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    return {"max_rel": float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)),
            "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}


def engine_for(sd: dict, device: torch.device, precision: str = "fp32", formulation: str | None = None,
               heads: bool = False):
    """The torch engine as `EngineEncoder.from_loaded` builds it (gather on CUDA in fp32, pairs otherwise),
    from a state_dict, so it needs no spconv."""
    from model.engine.unet import SpUNetEngine

    if formulation is None:
        formulation = "pairs" if device.type == "cpu" or precision != "fp32" else "gather"
    engine = SpUNetEngine.from_state_dict(sd, heads=heads, formulation=formulation, precision=precision)
    return engine.to(device).eval()


def spconv_model(sd: dict, device: torch.device):
    """The model's own spconv modules with these weights, placed on the device (`Predictor`'s model)."""
    from model.build import build_model
    from model.checkpoint import LoadedModel, load_state_strict
    from model.engine.encoder import place
    from model.infer_config import infer_config

    config = infer_config(sd)
    model = build_model(config)
    load_state_strict(model, sd, "gpu_check")
    return LoadedModel(config=config, model=place(model.eval(), device), source="gpu_check")


def onnx_reason(device: torch.device) -> str | None:
    try:
        import onnxruntime as ort
    except Exception as exc:
        return f"no onnxruntime ({type(exc).__name__}: {exc})"
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime has no CUDA provider ({ort.get_available_providers()})"
    return None


def scenes(args) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"room": (feat, grid), "tiled": ...}: the generated room of bench/encoder.py and 8 tiled copies
    (cached in --cache, so each step process generates them once)."""
    cache = args.cache / f"scenes{'_small' if args.small else ''}.npz" if args.cache else None
    if cache and cache.exists():
        data = np.load(cache)
        return {k: (data[f"{k}_feat"], data[f"{k}_grid"]) for k in ("room", "tiled")}
    from model.pointcloud.cloud import PointCloud
    from model.pointcloud.voxelize import voxelize
    from training.data.synthetic import SceneConfig, generate_scene

    density = 30.0 if args.small else 1300.0
    scene = generate_scene(7, SceneConfig(points_per_m2=density, num_frames=0, room_x=(6.0, 6.0), room_y=(5.0, 5.0)))
    v = voxelize(PointCloud(scene.points.coord, scene.points.color, scene.points.normal))
    grid = v.grid_coord.astype(np.int64)
    step = grid.max(axis=0) + 8  # a gap wider than any kernel: tiles are never neighbours
    nx, ny = (2, 1) if args.small else TILES
    tiles = [grid + np.array([i * step[0], j * step[1], 0]) for i in range(nx) for j in range(ny)]
    out = {"room": (v.feat, grid.astype(np.int32)),
           "tiled": (np.concatenate([v.feat] * len(tiles)), np.concatenate(tiles).astype(np.int32))}
    if cache:
        np.savez(cache, **{f"{k}_{n}": a for k, (f, g) in out.items() for n, a in (("feat", f), ("grid", g))})
    return out


def key_listing(fixtures: Path) -> Path:
    """The published SpUNet-v1m1 key listing: beside the fixtures, or packed with the spconv bundle."""
    name = "semseg-spunet-v1m1-0-base.tsv"
    for path in (fixtures / "keys" / name, REPO / ".gpu" / "spconv" / "keys" / name):
        if path.exists():
            return path
    raise FileNotFoundError(f"no {name} under {fixtures}/keys or .gpu/spconv/keys (run bench/pack_spconv.sh)")
