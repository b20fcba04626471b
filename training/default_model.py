"""Reproduce the bundled default model with one command:

    .venv/bin/python -m training.default_model --out model/default_model [--work runs/default-model]

Steps (each a ``ponder`` command, so every piece is what users run themselves):
1. rendering pre-training of the small SpUNet-v1m1 (training/configs/pretrain-small-cpu.yaml);
2. generated rooms for fine-tuning, held out from pre-training (another dataset seed);
3. segmentation fine-tuning from the pre-trained encoder (training/configs/segment-small-cpu.yaml);
4. detection fine-tuning from the pre-trained encoder (training/configs/detect-small-cpu.yaml, 8 cm voxels);
5. evaluation on the held-out val rooms of step 2 and the model card;
6. the image model: rendering pre-training from posed RGB views (training/configs/pretrain-images-default-cpu.yaml)
   and its held-out-view evaluation.

The result is one folder: the segmentation model at its top (what ``features``/``segment``/``serve`` use),
``detect/`` (what ``ponder detect`` uses), ``render/`` (the pre-trained render decoder for ``ponder render``) and
``images/`` (the image model of ``ponder features --images`` / ``ponder images``) and ``images-segment/`` (its
segmentation head, for image uploads to ``/v1/segment``). Detection runs at 8 cm and
rendering needs the encoder its decoder was trained with, so they keep their own encoders (the four together are
~14 MB; the budget for the folder is 25 MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def ponder(*args: str) -> str:
    """Run one ``ponder`` command (same interpreter), echo it, return its stdout."""
    cmd = [sys.executable, "-m", "ponder", *args]
    print("$ ponder " + " ".join(args), flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"step failed ({result.returncode}): ponder {' '.join(args)}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="model/default_model", help="where the default model is written")
    parser.add_argument("--work", default="runs/default-model", help="run folders and generated data")
    parser.add_argument("--pretrained", help="reuse this pre-training run's final checkpoint (skip step 1)")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    pretrained = Path(args.pretrained) if args.pretrained else work / "pretrain" / "final"
    if not args.pretrained:
        ponder("train", "pretrain", "--config", str(CONFIGS / "pretrain-small-cpu.yaml"), "--out", str(work / "pretrain"))
    data = work / "finetune-data"
    if not (data / "train").exists():
        ponder("datasets", "generate", "--out", str(data), "--scenes", "24", "--seed", "1", "--frames", "0",
               "--val-fraction", "0.25", "--quiet")
    ponder("train", "segment", "--config", str(CONFIGS / "segment-small-cpu.yaml"), "--init", str(pretrained),
           "--data", str(data), "--out", str(work / "segment"), "--evaluate", "none")
    ponder("train", "detect", "--config", str(CONFIGS / "detect-small-cpu.yaml"), "--init", str(pretrained),
           "--data", str(data), "--out", str(work / "detect"))

    # the val rooms of the fine-tuning data were seen by neither training run
    seg_fast = ponder("evaluate", "segment", "--data", str(data), "--split", "val", "--checkpoint",
                      str(work / "segment" / "final"))
    det = ponder("evaluate", "detect", "--data", str(data), "--split", "val", "--checkpoint",
                 str(work / "detect" / "final"))
    image_config = str(CONFIGS / "pretrain-images-default-cpu.yaml")
    ponder("images", "train", "--config", image_config, "--out", str(work / "images"))
    image_eval = ponder("images", "evaluate", "--config", image_config, "--checkpoint", str(work / "images" / "final"),
                        "--point-checkpoint", str(pretrained))
    segment_config = str(CONFIGS / "segment-images-small-cpu.yaml")
    ponder("images", "train-segment", "--config", segment_config, "--out", str(work / "images-segment"))
    image_segment_eval = ponder("images", "evaluate-segment", "--config", segment_config, "--checkpoint",
                                str(work / "images-segment" / "final"), "--point-checkpoint", str(work / "segment" / "final"))

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(work / "segment" / "final", out)
    shutil.copytree(work / "detect" / "final", out / "detect")
    shutil.copytree(pretrained, out / "render")
    shutil.copytree(work / "images" / "final", out / "images")
    shutil.copytree(work / "images-segment" / "final", out / "images-segment")
    _rename(out / "config.json", "ponder-default")
    _rename(out / "detect" / "config.json", "ponder-default-detect")
    _rename(out / "render" / "config.json", "ponder-default-render")
    _rename(out / "images" / "config.json", "ponder-default-images")
    _rename(out / "images-segment" / "config.json", "ponder-default-images-segment")
    (out / "MODEL_CARD.md").write_text(_card(seg_fast, det) + image_card(image_eval, image_segment_eval))
    print(f"wrote {out}")
    return 0


def _rename(config: Path, name: str) -> None:
    data = json.loads(config.read_text())
    data["name"] = name
    config.write_text(json.dumps(data, indent=2))


def _card(segmentation: str, detection: str) -> str:
    return f"""# ponder-default — the bundled default model

Small, CPU-trainable PonderV2 models, trained only on procedurally generated indoor rooms (no real data):

| part | folder | what | input |
|---|---|---|---|
| segmentation | `.` | SpUNet-v1m1 (base 16, channels 16-32-48-64-48-32-32-32, one block per stage) + linear head, 20 ScanNet classes | 2 cm voxels, colour + normal |
| detection | `detect/` | the same encoder + VoteNet-style voting head (centre xyz, size dx dy dz, yaw about +z), 18 furniture classes | 8 cm voxels |
| rendering | `render/` | the rendering-pre-trained encoder + UNet3D projection + NeuS SDF field (colour, depth) | 2 cm voxels |

Training: rendering pre-training on generated RGB-D rooms (`training/configs/pretrain-small-cpu.yaml`), then
fine-tuning of both tasks from the pre-trained encoder on 18 other generated rooms (dataset seed 1;
`segment-small-cpu.yaml`, `detect-small-cpu.yaml`). Evaluation: the 6 val rooms of that dataset, seen by neither run.

Classes: the ScanNet-20 label set (wall, floor, cabinet, bed, chair, sofa, table, door, window, bookshelf,
picture, counter, desk, curtain, refrigerator, shower curtain, toilet, sink, bathtub, otherfurniture).

Reproduce: `.venv/bin/python -m training.default_model --out model/default_model`

It is a demonstration model: generated rooms are much simpler than real scans. For real data use the
published PonderV2 checkpoints (they load directly) or fine-tune with `ponder train`.

## Segmentation on held-out rooms (fast mode)

```
{segmentation.strip()}
```

## Detection on held-out rooms

```
{detection.strip()}
```
"""


def image_card(evaluation: str, segmentation: str) -> str:
    return f"""
## Image model (`images/`)

A ResNet-18-style 2D backbone (width 16, strides 4/8/16) whose features are lifted into a 48x48x16 voxel volume
over the scene's box (masked mean + variance across the views that see each voxel), then the point-cloud small
model's UNet3D, SDF/colour decoders and NeuS renderer. Pre-trained by rendering held-out RGB views of 4 generated
rooms from 5 posed input views, no depth input (`training/configs/pretrain-images-default-cpu.yaml`). Used by
`ponder features --images DIR --cameras CAMS.json` and `ponder images features|render`. Evaluation: held-out
(odd) frames of the same rooms, rendered from 5 even input frames (second line: the point-cloud render model
`render/` on the same frames, rendered from the rooms' point clouds):

```
{evaluation.strip()}
```

`images-segment/`: the same image trunk (trained from scratch) + a per-voxel classifier over the 20 classes and
empty space, fine-tuned on 7 generated rooms with voxel targets from their labelled points
(`training/configs/segment-images-small-cpu.yaml`); `/v1/segment` uses it for image uploads. Per-point mIoU on the
config's 3 held-out rooms, beside the point-cloud segmentation model (`.`) on the same rooms and points:

```
{segmentation.strip()}
```
"""


if __name__ == "__main__":
    sys.exit(main())
