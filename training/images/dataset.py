"""Image pre-training samples: per scene, ``input_views`` RGB frames (the model's input) and ``target_views``
other RGB-D frames (what it must render), with the scene box to lift into."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.data.formats import load_rgbd_frames, load_scene
from training.images.config import ImageDataConfig
from training.pretrain.dataset import find_scenes


class ImageViewsDataset:
    def __init__(self, cfg: ImageDataConfig, split: str | None = None, selection=None, max_scenes: int | None = None):
        import dataclasses

        data = cfg.scene_data()
        if max_scenes is not None:
            data = dataclasses.replace(data, max_scenes=max_scenes)
        self.cfg = cfg
        self.scenes = find_scenes(data, split=split, selection=selection)
        self._bounds: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.scenes)

    def bounds(self, index: int) -> np.ndarray:
        """(2, 3) float32 box of the scene's points grown by the margin (cached)."""
        if index not in self._bounds:
            coord = load_scene(self.scenes[index].points)["coord"]
            m = self.cfg.bounds_margin
            self._bounds[index] = np.stack([coord.min(0) - m, coord.max(0) + m]).astype(np.float32)
        return self._bounds[index]

    def views(self, index: int, inputs, targets) -> dict[str, Any]:
        entry = self.scenes[index]
        v_in = load_rgbd_frames(entry.rgbd, [int(i) for i in inputs])
        v_t = load_rgbd_frames(entry.rgbd, [int(i) for i in targets])
        return {"images": v_in["rgb"], "K": v_in["intrinsic"][:, :3, :3].astype(np.float32),
                "w2c": v_in["extrinsic"].astype(np.float32), "bounds": self.bounds(index),
                "rgb": v_t["rgb"], "depth": v_t["depth"].astype(np.float32),
                "intrinsic": v_t["intrinsic"].astype(np.float32), "extrinsic": v_t["extrinsic"].astype(np.float32),
                "depth_scale": float(v_t["depth_scale"]), "scene_id": entry.scene_id}

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        frames = np.asarray(self.scenes[index].frames)
        v_in, v_t = self.cfg.input_views, self.cfg.target_views
        need = v_in + v_t
        chosen = rng.choice(frames, need, replace=need > len(frames))
        return self.views(index, chosen[:v_in], chosen[v_in:])


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Views stacked per scene (B, V, ...); all samples must share V and the image size."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    for key in ("images", "rgb"):
        if len({s[key].shape for s in samples}) != 1:
            raise ValueError(f"samples of one batch must share their {key} shape")
    stack = lambda key: torch.from_numpy(np.stack([s[key] for s in samples]))  # noqa: E731
    return {"images": stack("images"), "K": stack("K"), "w2c": stack("w2c"), "bounds": stack("bounds"),
            "rgb": stack("rgb"), "depth": stack("depth"), "intrinsic": stack("intrinsic"),
            "extrinsic": stack("extrinsic"),
            "depth_scale": torch.tensor([s["depth_scale"] for s in samples], dtype=torch.float32),
            "scene_id": [s["scene_id"] for s in samples]}
