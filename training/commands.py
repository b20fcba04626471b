"""Training-side subcommands: ``datasets generate``, ``train pretrain|segment|detect``, ``evaluate segment|detect``,
and the task commands that run trained models (``render``, ``detect``).

Each task module exposes ``add_train_arguments(parser)``/``run_train(args)`` (and, where it applies,
``add_evaluate_arguments``/``run_evaluate``); this file only wires them, importing each lazily.
"""

from __future__ import annotations

import argparse
import importlib

TASKS = {  # task name -> module with its train/evaluate entry points
    "pretrain": "training.pretrain.cli",
    "segment": "training.segment.cli",
    "detect": "training.detect.cli",
}
RUN_COMMANDS = (  # modules adding top-level commands that run a trained model (e.g. ``ponder render``)
    "training.pretrain.cli",
    "training.detect.cli",
)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):  # that task is not part of this install yet
            return None
        raise


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from training.data.synthetic.dataset import add_generate_arguments, run_generate

    datasets = subparsers.add_parser("datasets", help="generate or inspect training data")
    dsub = datasets.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)
    gen = dsub.add_parser("generate", help="write procedurally generated indoor scenes (points + RGB-D frames)")
    add_generate_arguments(gen)
    gen.set_defaults(handler=run_generate)

    train = subparsers.add_parser("train", help="pre-train or fine-tune a model")
    tsub = train.add_subparsers(dest="task", metavar="TASK", required=True)
    evaluate = subparsers.add_parser("evaluate", help="evaluate a checkpoint on a dataset")
    esub = evaluate.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, name in TASKS.items():
        module = _module(name)
        if module is None:
            continue
        p = tsub.add_parser(task, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_train_arguments(p)
        p.set_defaults(handler=module.run_train)
        if hasattr(module, "add_evaluate_arguments"):
            p = esub.add_parser(task, help=f"evaluate a {task} checkpoint")
            module.add_evaluate_arguments(p)
            p.set_defaults(handler=module.run_evaluate)
    for name in RUN_COMMANDS:
        module = _module(name)
        if module is not None and hasattr(module, "add_run_commands"):
            module.add_run_commands(subparsers)
