"""The GPU check: fixture parity and speed of every encoder on one device, as one script (bench/gpu_check.sh
runs its steps, each under a timeout). Figures go to a JSON file, updated after every measurement, so a
step that is killed keeps what it had measured.

Steps (``--step``; the shared helpers are in bench/gpu_common.py, the timing step in bench/gpu_timing.py):
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
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpu_common import Report, attempt, engine_for, errors, log, onnx_reason, scenes, spconv_model, \
    spconv_reason, sync  # noqa: E402
from gpu_timing import step_timing  # noqa: E402

CASES = (("spunet_v1m1_seg", None, "expected.npz"), ("ppt_v1m3_seg", "ScanNet", "expected_scannet.npz"),
         ("ppt_v1m3_seg", "S3DIS", "expected_s3dis.npz"))


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


# ---------------------------------------------------------------- main


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
