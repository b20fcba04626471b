"""Held-out-view scores of an image model: render target frames the model never saw as input (nor, with the
default selections, in training) from input views spread over the training frames; PSNR of the colour and
mean absolute z-depth error over the pixels with sensor depth (``training.pretrain.evaluate.score_view``, the
point-cloud model's scores, so the two compare on the same views)."""

from __future__ import annotations

import time

import numpy as np
import torch

from model.images.inference import render_from_images
from model.images.inputs import check_views
from model.images.model import ImageRenderModel
from model.render.cameras import Camera
from training.images.config import ImageDataConfig, ImageEvalConfig
from training.images.dataset import ImageViewsDataset
from training.pretrain.evaluate import EvalResult, ViewScore, held_out_frames, score_view


@torch.no_grad()
def evaluate_image_views(model: ImageRenderModel, data: ImageDataConfig, cfg: ImageEvalConfig) -> EvalResult:
    inputs = ImageViewsDataset(data, split=cfg.split, max_scenes=cfg.scenes)
    targets = ImageViewsDataset(data, split=cfg.split, selection=cfg.frames.selection(), max_scenes=cfg.scenes)
    by_id = {e.scene_id: i for i, e in enumerate(inputs.scenes)}
    scores, seconds, pixels = [], 0.0, 0
    for t_index, entry in enumerate(targets.scenes):
        if entry.scene_id not in by_id:
            continue
        i_index = by_id[entry.scene_id]
        in_frames = held_out_frames(inputs.scenes[i_index].frames, data.input_views)
        t_frames = held_out_frames(entry.frames, cfg.views)
        v = inputs.views(i_index, in_frames, t_frames)
        h, w = v["depth"].shape[1:]
        in_cams = [Camera(K=v["K"][i].astype(np.float64), w2c=v["w2c"][i].astype(np.float64), width=w, height=h)
                   for i in range(len(in_frames))]
        posed = check_views(list(v["images"]), in_cams, [str(f) for f in in_frames])
        cams = [Camera(K=v["intrinsic"][i][:3, :3].astype(np.float64), w2c=v["extrinsic"][i].astype(np.float64),
                       width=w, height=h) for i in range(len(t_frames))]
        start = time.perf_counter()
        rendered = render_from_images(model, posed, cams, inputs.bounds(i_index), cfg.chunk)
        seconds += time.perf_counter() - start
        pixels += len(t_frames) * h * w
        for i, view in enumerate(rendered):
            psnr, mae, n = score_view(view.rgb.cpu().numpy(), view.depth.cpu().numpy(),
                                      v["rgb"][i].astype(np.float32) / 255.0, v["depth"][i] * v["depth_scale"])
            scores.append(ViewScore(entry.scene_id, int(t_frames[i]), psnr, mae, n))
    if not scores:
        raise ValueError("no held-out views to evaluate (check eval.split, eval.frames and data.frames)")
    return EvalResult(views=scores, seconds=seconds, megapixels=pixels / 1e6)
