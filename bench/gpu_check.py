"""The GPU check: fixture parity and speed of every encoder on one device, as one script (bench/gpu_check.sh
runs its steps, each under a timeout). Figures go to a JSON file, updated after every measurement, so a
step that is killed keeps what it had measured.

Steps (``--step``):
- ``env``: versions; imports ``spconv.pytorch`` and runs one sparse conv on the device.
- ``parity``: the official fixtures through the torch engine (gather and pairs formulations; kernel maps
  built on the device, and compared with the CPU ones), spconv through the `Predictor` (the model's own
  modules), and the exported ONNX graph in onnxruntime (CUDA provider; skipped when there is none).
- ``timing``: the published SpUNet-v1m1 size (random weights) on the generated room (~130k voxels) and on
  8 tiled copies of it (~1M voxels), best of n with synchronisation: kernel maps alone, the engine in
  fp32 and in half precision (error vs fp32), spconv fp32 / fp16, onnxruntime; then the targets.

Needs torch + numpy only (and spconv / onnxruntime for their parts, skipped with the reason otherwise);
the model package is imported from this checkout. ``PONDER_GPU_SPCONV=0`` skips spconv without trying.

    python bench/gpu_check.py --step all [--device cuda] [--small] [--json figures.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

CASES = (("spunet_v1m1_seg", None, "expected.npz"), ("ppt_v1m3_seg", "ScanNet", "expected_scannet.npz"),
         ("ppt_v1m3_seg", "S3DIS", "expected_s3dis.npz"))
TARGETS = {"engine_half_room_ms": 15.0, "engine_half_over_spconv": 1.5, "kernel_maps_1m_ms": 20.0}
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


# ---------------------------------------------------------------- env


def step_env(args, report: Report) -> None:
    import platform

    report.put("env", "python", platform.python_version())
    report.put("env", "torch", torch.__version__)
    report.put("env", "numpy", np.__version__)
    report.put("env", "device", str(args.device))
    if args.device.type == "cuda":
        report.put("env", "gpu", torch.cuda.get_device_name(args.device))
        report.put("env", "cuda_runtime", torch.version.cuda)
    try:
        import onnxruntime as ort

        report.put("env", "onnxruntime", {"version": ort.__version__, "providers": ort.get_available_providers()})
    except Exception as exc:
        report.put("env", "onnxruntime", {"error": f"{type(exc).__name__}: {exc}"})
    reason = spconv_reason()
    if reason:
        log(f"spconv: {reason}")
        report.put("env", "spconv", {"usable": False, "reason": reason})
        return

    def one_conv():
        import cumm
        import spconv
        import spconv.pytorch as spconv_torch

        algo = spconv_torch.ConvAlgo.Native if args.device.type == "cpu" else None
        conv = spconv_torch.SubMConv3d(4, 8, 3, bias=False, indice_key="t", **({"algo": algo} if algo else {}))
        conv = conv.to(args.device)
        gen = torch.Generator().manual_seed(0)
        xyz = torch.unique(torch.randint(0, 16, (400, 3), generator=gen), dim=0)
        idx = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], 1).int().to(args.device)
        feat = torch.randn(len(xyz), 4, generator=gen).to(args.device)
        out = conv(spconv_torch.SparseConvTensor(feat, idx, [16, 16, 16], 1)).features
        sync(args.device)
        return {"usable": True, "spconv": spconv.__version__, "cumm": cumm.__version__,
                "test_conv_rows": int(out.shape[0]), "finite": bool(torch.isfinite(out).all())}

    result = attempt(report, "env", "spconv", one_conv)
    log(f"spconv: {result}")
    if result.get("usable") and args.cache:
        (args.cache / "spconv_ok").write_text("1")


# ---------------------------------------------------------------- parity


def step_parity(args, report: Report) -> None:
    from gather_gpu import read_state  # bench/gather_gpu.py: the official .pth reader (numpy 1 and 2)
    from model.pointcloud.cloud import PointCloud
    from model.pointcloud.voxelize import voxelize
    from model.sparse.kernel_maps import build_kernel_maps

    dev = args.device
    no_spconv = spconv_reason()
    if no_spconv:
        report.put("parity", "default_model/spconv_vs_engine", {"skipped": no_spconv})
    else:
        value = attempt(report, "parity", "default_model/spconv_vs_engine", lambda: default_model_check(args))
        log(f"parity default_model (room) spconv vs engine {value}")
    if not (args.fixtures / "fixtures").is_dir():
        report.put("parity", "skipped", f"no fixtures at {args.fixtures}/fixtures")
        log(f"parity with the fixtures skipped: no fixtures at {args.fixtures}")
        return
    ort_reason = onnx_reason(dev)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_onnx_"))
    for name, condition, expected_file in CASES:
        folder = args.fixtures / "fixtures" / name
        inp, expected = np.load(folder / "input.npz"), np.load(folder / expected_file)
        voxels = voxelize(PointCloud(inp["coord"], inp["color"], inp["normal"]))
        p = voxels.point_to_voxel
        sd = read_state(folder / "checkpoint.pth")
        label = f"{name}/{condition or '-'}"

        def compare(feat: np.ndarray, logits: np.ndarray | None) -> dict[str, float]:
            out = {"backbone_feat": float(np.abs(feat[p] - expected["backbone_feat"]).max())}
            if logits is not None:
                out["seg_logits"] = float(np.abs(logits[p] - expected["seg_logits"]).max())
            return out

        def engine(formulation: str) -> dict[str, float]:
            eng = engine_for(sd, dev, formulation=formulation, heads=True)
            out = eng.run(voxels.feat, voxels.grid_coord, condition=condition)
            return compare(out["backbone_feat"], out.get("seg_logits"))

        def maps_equal() -> dict[str, Any]:
            grid = torch.from_numpy(voxels.grid_coord)
            on_dev, on_cpu = build_kernel_maps(grid.to(dev)), build_kernel_maps(grid)
            same = [bool(torch.equal(a.cpu(), b)) for a, b in zip(on_dev.tables(), on_cpu.tables())]
            return {"tables": len(same), "equal": all(same) and on_dev.num_sites == on_cpu.num_sites}

        def spconv_predictor() -> dict[str, float]:
            from model.inference import Predictor

            predictor = Predictor(spconv_model(sd, dev), dev)
            (feat,) = predictor.encode([voxels], condition)
            logits = predictor.classify([feat], condition)[0] if predictor.has_classifier else None
            return compare(feat, logits) | {"backend": predictor.backend}

        def onnxruntime() -> dict[str, Any]:
            from export.graph import GatherSpUNet
            from export.onnx_export import export_onnx
            from export.onnxrt import OnnxRunner

            path = export_onnx(GatherSpUNet.from_state_dict(sd), work / f"{name}.onnx")
            runner = OnnxRunner(path, device=dev.type)
            out = runner.run(voxels.feat, voxels.grid_coord, condition=condition)
            return compare(out["backbone_feat"], out.get("seg_logits")) | {"provider": runner.providers[0]}

        checks: dict[str, Callable[[], Any] | str] = {
            "engine_gather": lambda: engine("gather"), "engine_pairs": lambda: engine("pairs"),
            "kernel_maps_device_eq_cpu": maps_equal,
            "spconv_predictor": no_spconv or spconv_predictor, "onnxruntime": ort_reason or onnxruntime}
        for key, fn in checks.items():
            if isinstance(fn, str):
                report.put("parity", f"{label}/{key}", {"skipped": fn})
                log(f"parity {label:<24} {key:<26} skipped: {fn}")
                continue
            value = attempt(report, "parity", f"{label}/{key}", fn)
            log(f"parity {label:<24} {key:<26} {value}")


def default_model_check(args) -> dict[str, Any]:
    """spconv against the engine on the bundled default model (trained weights, in the working tree) and
    the generated room: the spconv check that needs no fixtures (the call that carries the bundle)."""
    from model.checkpoint import load_checkpoint
    from model.engine.encoder import EngineEncoder, place
    from model.inference import default_checkpoint

    dev = args.device
    feat_np, grid_np = scenes(args)["room"]
    loaded = load_checkpoint(default_checkpoint())
    engine = EngineEncoder.from_loaded(loaded, dev).engine
    model = place(loaded.model, dev).eval()
    feat, grid = torch.from_numpy(feat_np).to(dev), torch.from_numpy(grid_np).to(dev)
    with torch.no_grad():
        ref = engine(*engine.example_inputs(engine.kernel_maps(grid), feat))[0]
        out = model.features(feat, grid, torch.zeros(len(grid), dtype=torch.int64, device=dev), None)
    return {"voxels": len(grid_np), "engine_formulation": engine.formulation} | errors(out, ref)


def onnx_reason(device: torch.device) -> str | None:
    try:
        import onnxruntime as ort
    except Exception as exc:
        return f"no onnxruntime ({type(exc).__name__}: {exc})"
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime has no CUDA provider ({ort.get_available_providers()})"
    return None


# ---------------------------------------------------------------- timing


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


def step_timing(args, report: Report) -> None:
    from gather_gpu import published_size_state
    from model.engine.pairs import PRECISIONS

    dev, reps, warm = args.device, args.repeats, not args.small  # --small: no warm-up call (a slow CPU)
    sd = published_size_state(key_listing(args.fixtures))
    no_spconv = spconv_reason()
    fp32 = engine_for(sd, dev)
    report.put("timing", "engine_fp32_formulation", fp32.formulation)
    variants: dict[str, Callable[[], Any]] = {}  # half-precision engines: name -> builder of (engine, autocast)
    for prec in ("fp16", "bf16"):
        if prec in PRECISIONS:  # the engine's own mode (its default formulation for that precision)
            variants[f"engine_{prec}_native"] = lambda prec=prec: (engine_for(sd, dev, precision=prec), None)
        dtype = torch.float16 if prec == "fp16" else torch.bfloat16
        variants[f"engine_{prec}_autocast"] = lambda dtype=dtype: (fp32, dtype)  # fp32 engine under torch.autocast
    half = {name: attempt(report, "timing", f"{name}_build", build, record=False) for name, build in variants.items()}
    spconv32 = spconv16 = None
    if no_spconv:
        report.put("timing", "spconv", {"skipped": no_spconv})
    else:
        spconv32 = attempt(report, "timing", "spconv_build", lambda: spconv_model(sd, dev).model, record=False)
        if isinstance(spconv32, dict):
            spconv32 = None
        elif dev.type == "cpu":
            report.put("timing", "spconv_fp16", {"skipped": "spconv float16 on a CPU is ~30x slower than float32"})
        else:
            spconv16 = copy.deepcopy(spconv32).half()

    def forward(engine, grid, feat, autocast=None):
        def call():
            maps = engine.kernel_maps(grid)
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                return engine(*engine.example_inputs(maps, feat))[0]
        return call

    for scene, (feat_np, grid_np) in scenes(args).items():
        feat, grid = torch.from_numpy(feat_np).to(dev), torch.from_numpy(grid_np).to(dev)
        m = len(grid_np)
        report.put("timing", f"{scene}_voxels", m)
        log(f"-- {scene}: {m:,} voxels on {dev}")
        with torch.no_grad():
            ms = attempt(report, "timing", f"{scene}/kernel_maps_ms",
                         lambda: best_ms(lambda: fp32.kernel_maps(grid), dev, reps, warm)[0])
            log(f"  kernel maps            {ms}")
            ref = None

            def run_fp32():
                nonlocal ref
                t, ref = best_ms(forward(fp32, grid, feat), dev, reps, warm)
                return {"ms": t}

            log(f"  engine fp32            {attempt(report, 'timing', f'{scene}/engine_fp32', run_fp32)}")
            for name, built in half.items():
                if isinstance(built, dict):
                    continue
                engine, autocast = built

                def run_half(engine=engine, autocast=autocast):
                    t, out = best_ms(forward(engine, grid, feat, autocast), dev, reps, warm)
                    return {"ms": t} | (errors(out, ref) if ref is not None else {})

                log(f"  {name:<22} {attempt(report, 'timing', f'{scene}/{name}', run_half)}")
            for name, model, dtype in (("spconv_fp32", spconv32, torch.float32), ("spconv_fp16", spconv16, torch.float16)):
                if model is None:
                    continue
                index = torch.zeros(m, dtype=torch.int64, device=dev)

                def run_spconv(model=model, dtype=dtype):
                    t, out = best_ms(lambda: model.features(feat.to(dtype), grid, index, None), dev, reps, warm)
                    return {"ms": t} | (errors(out, ref) if ref is not None else {})

                log(f"  {name:<22} {attempt(report, 'timing', f'{scene}/{name}', run_spconv)}")
            if scene == "room" or not args.small:
                log(f"  onnxruntime            {attempt(report, 'timing', f'{scene}/onnxruntime', lambda: onnx_timing(args, sd, feat_np, grid_np, ref))}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    targets(report)


def onnx_timing(args, sd, feat: np.ndarray, grid: np.ndarray, ref) -> dict[str, Any]:
    """The exported graph (one export per process) with tables computed by the engine's code beforehand."""
    reason = onnx_reason(args.device)
    if reason:
        return {"skipped": reason}
    from export.graph import GatherSpUNet
    from export.onnx_export import export_onnx
    from export.onnxrt import OnnxRunner, make_inputs

    global _ONNX
    if "_ONNX" not in globals():
        start = time.perf_counter()
        path = export_onnx(GatherSpUNet.from_state_dict(sd), Path(tempfile.mkdtemp()) / "published.onnx")
        _ONNX = (OnnxRunner(path, device=args.device.type, threads=os.cpu_count()), time.perf_counter() - start)
    runner, export_s = _ONNX
    feeds = make_inputs(runner.info, feat, grid)
    t, out = best_ms(lambda: runner.run_feeds(feeds), torch.device("cpu"), args.repeats)
    result = {"ms_without_kernel_maps": t, "provider": runner.providers[0], "export_s": export_s}
    return result | (errors(torch.from_numpy(out["backbone_feat"]), ref.cpu()) if ref is not None else {})


def targets(report: Report) -> None:
    """The targets against what was measured (missing figures leave a target unjudged)."""
    t = report.data.get("timing", {})

    def ms(key: str) -> float | None:
        v = t.get(key)
        return v.get("ms") if isinstance(v, dict) else (v if isinstance(v, (int, float)) else None)

    halves = {k.split("/", 1)[1]: ms(k) for k in t if k.startswith("room/engine_") and "fp32" not in k}
    good = {k: v for k, v in halves.items() if v is not None and t[f"room/{k}"].get("cos_min", 0) > 0.99}
    best_half = min(good.items(), key=lambda kv: kv[1]) if good else None
    spconv = [v for v in (ms("room/spconv_fp32"), ms("room/spconv_fp16")) if v is not None]
    maps_1m = ms("tiled/kernel_maps_ms")
    out = {
        "engine_half_room_ms": {"target": TARGETS["engine_half_room_ms"], "best": best_half,
                                "met": None if best_half is None else best_half[1] <= TARGETS["engine_half_room_ms"]},
        "engine_half_over_spconv": {"target": TARGETS["engine_half_over_spconv"],
                                    "ratio": None if not (best_half and spconv) else best_half[1] / min(spconv),
                                    "met": None if not (best_half and spconv)
                                    else best_half[1] / min(spconv) <= TARGETS["engine_half_over_spconv"]},
        "kernel_maps_1m_ms": {"target": TARGETS["kernel_maps_1m_ms"], "ms": maps_1m, "voxels": t.get("tiled_voxels"),
                              "met": None if maps_1m is None else maps_1m <= TARGETS["kernel_maps_1m_ms"]},
    }
    for key, value in out.items():
        report.put("targets", key, value)
        log(f"target {key}: {value}")


# ---------------------------------------------------------------- main


def key_listing(fixtures: Path) -> Path:
    """The published SpUNet-v1m1 key listing: beside the fixtures, or packed with the spconv bundle."""
    name = "semseg-spunet-v1m1-0-base.tsv"
    for path in (fixtures / "keys" / name, REPO / ".gpu" / "spconv" / "keys" / name):
        if path.exists():
            return path
    raise FileNotFoundError(f"no {name} under {fixtures}/keys or .gpu/spconv/keys (run bench/pack_spconv.sh)")


def default_fixtures() -> Path:
    shared = os.environ.get("PONDER_SHARED")
    for path in (REPO / ".gpu" / "reference", Path(shared) / "reference" if shared else None,
                 REPO.parent / "shared" / "reference"):
        if path is not None and path.is_dir():
            return path
    return REPO / ".gpu" / "reference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=("env", "parity", "timing", "all"), default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fixtures", type=Path, default=default_fixtures(),
                        help="folder with fixtures/ and keys/ (default: .gpu/reference, then ../shared/reference)")
    parser.add_argument("--small", action="store_true", help="a small room (code paths on a CPU), repeats 1")
    parser.add_argument("--repeats", type=int, default=None, help="best of n (default 5; 1 with --small)")
    parser.add_argument("--json", type=Path, default=None, help="figures file (updated in place)")
    parser.add_argument("--cache", type=Path, default=None, help="scratch folder shared by the steps")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no CUDA GPU")
    args.repeats = args.repeats or (1 if args.small else 5)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    report = Report(args.json)
    log(f"gpu_check {args.step}: torch {torch.__version__} on {args.device}, fixtures {args.fixtures}, "
        f"repeats {args.repeats}{', small' if args.small else ''}")
    steps = {"env": step_env, "parity": step_parity, "timing": step_timing}
    for name in (steps if args.step == "all" else (args.step,)):
        start = time.perf_counter()
        steps[name](args, report)
        report.put("seconds", name, round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
