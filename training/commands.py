"""Training-side subcommands: ``datasets generate``, ``train pretrain|segment|detect``,
``evaluate pretrain|segment|detect`` (commands that run trained models live in `ponder`).

Each task module exposes ``add_train_arguments(parser)``/``run_train(args)`` (and, where it applies,
``add_evaluate_arguments``/``run_evaluate``); this file only wires them. The task
modules import their heavy dependencies inside the handlers, so importing them here is cheap.
"""

from __future__ import annotations

import argparse

from training.data.synthetic.dataset import add_generate_arguments, run_generate
from training.detect import cli as detect_cli
from training.pretrain import cli as pretrain_cli
from training.segment import cli as segment_cli

TASKS = {"pretrain": pretrain_cli, "segment": segment_cli, "detect": detect_cli}  # task name -> its entry points
TASK_HELP = {  # one line each for `ponder train --help` / `ponder evaluate --help`
    "pretrain": ("rendering pre-training (PonderV2) on RGB-D scenes", "PSNR and depth error of rendered held-out views"),
    "segment": ("semantic-segmentation fine-tuning (cross-entropy + Lovász; official SpUNet/PPT recipes)",
                "mIoU, mAcc and allAcc on labelled scenes"),
    "detect": ("3D object detection: an encoder with a voting box head", "mAP at --iou of predicted boxes"),
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    datasets = subparsers.add_parser("datasets", help="generate training data")
    dsub = datasets.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)
    gen = dsub.add_parser("generate", help="write procedurally generated indoor scenes (points + RGB-D frames)")
    add_generate_arguments(gen)
    gen.set_defaults(handler=run_generate)

    train = subparsers.add_parser("train", help="pre-train or fine-tune a model")
    tsub = train.add_subparsers(dest="task", metavar="TASK", required=True)
    evaluate = subparsers.add_parser("evaluate", help="evaluate a checkpoint on a dataset")
    esub = evaluate.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, module in TASKS.items():
        p = tsub.add_parser(task, help=TASK_HELP[task][0])
        module.add_train_arguments(p)
        p.set_defaults(handler=module.run_train)
        if hasattr(module, "add_evaluate_arguments"):
            p = esub.add_parser(task, help=f"evaluate a {task} checkpoint: {TASK_HELP[task][1]}")
            module.add_evaluate_arguments(p)
            p.set_defaults(handler=module.run_evaluate)
