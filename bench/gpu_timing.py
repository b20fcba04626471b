"""The GPU check's timing step (bench/gpu_check.py --step timing): the published SpUNet-v1m1 size on the
generated room and its tiled ~1M-voxel copy, every encoder on the device, then the targets."""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gpu_common import Report, attempt, best_ms, engine_for, errors, key_listing, log, onnx_reason, scenes, \
    spconv_model, spconv_reason

TARGETS = {"engine_half_room_ms": 15.0, "engine_half_over_spconv": 1.5, "kernel_maps_1m_ms": 20.0}


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
