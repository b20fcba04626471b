"""Model-core subcommands: inspect, convert (features / segment live in ponder/inference_commands.py:
they choose among every encoder backend, including the exported ones, which model must not import)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    trust_help = ("read a .pth that needs full unpickling (it can run code: only for files you trust; by default "
                  "only tensors and plain data are read)")
    p = subparsers.add_parser("inspect", help="describe a checkpoint: kind, architecture, conditions, classes")
    p.add_argument("checkpoint", nargs="?", help="checkpoint: a model folder, .safetensors or official .pth "
                                                 "(default: the bundled model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--trust-checkpoint", action="store_true", help=trust_help)
    p.set_defaults(handler=run_inspect)

    p = subparsers.add_parser("convert", help="convert an official checkpoint into our format")
    p.add_argument("checkpoint", help="an official PonderV2/Pointcept .pth (or one of our model folders)")
    p.add_argument("-o", "--output", required=True, help="output folder (model.safetensors + config.json)")
    p.add_argument("--name", help="model name recorded in the config")
    p.add_argument("--overwrite", action="store_true", help="replace the model in an -o folder that holds one")
    p.add_argument("--trust-checkpoint", action="store_true", help=trust_help)
    p.set_defaults(handler=run_convert)


def describe(checkpoint: str | None, trust: bool = False) -> dict:
    """What `ponder inspect` prints: any checkpoint `load_checkpoint` reads, or an image model folder."""
    from model.checkpoint import load_checkpoint
    from model.images.checkpoint import config_kind
    from model.config_io import dump
    from model.inference import default_checkpoint

    if checkpoint and config_kind(checkpoint) in IMAGE_KINDS:
        return describe_image_model(checkpoint)
    loaded = load_checkpoint(checkpoint or default_checkpoint(), trust=trust)
    cfg = loaded.config
    params = sum(p.numel() for p in loaded.inference_model.parameters())  # same weights as .model, no spconv
    return {"source": loaded.source, "name": cfg.name, "kind": cfg.kind, "backbone": vars(cfg.backbone),
            "conditions": list(cfg.conditions), "class_names": {k: list(v) for k, v in cfg.class_names.items()},
            "feature_dim": cfg.feature_dim, "grid_size": cfg.grid_size, "input_features": list(cfg.input_features),
            "parameters": params, "render": dump(cfg.render) if cfg.render else None,
            "detection": dump(cfg.detection) if cfg.detection else None}


IMAGE_KINDS = ("image-render", "image-segment")


def describe_image_model(folder: str) -> dict:
    """An image model folder (posed RGB images → volume; ``ponder images``): trunk, lifting, volume, classes."""
    from model.config_io import dump
    from model.images.checkpoint import config_kind, load_image_model
    from model.images.segment import load_image_segment_model

    if config_kind(folder) == "image-segment":
        model = load_image_segment_model(folder)
        cfg, trunk, class_names = model.cfg, model.cfg.trunk, list(model.cfg.class_names)
    else:
        model = load_image_model(folder)
        cfg, trunk, class_names = model.cfg, model.cfg, []
    render = trunk.render
    return {"source": str(folder), "name": cfg.name, "kind": cfg.kind, "backbone": dump(trunk.backbone),
            "lift": dump(trunk.lift), "grid_shape": list(render.grid_shape), "grid_size": render.grid_size,
            "class_names": class_names, "parameters": sum(p.numel() for p in model.parameters())}


def _print_image_model(info: dict) -> None:
    bb, lift = info["backbone"], info["lift"]
    print(f"checkpoint   {info['source']}")
    print(f"kind         {info['kind']}  (posed RGB images: ponder images)")
    print(f"backbone     ResNet-{bb['depth']} width={bb['width']} stages={bb['stages']}")
    print(f"lift         dim={lift['dim']} fusion={lift['fusion']} variance={lift['variance']}")
    print(f"volume       {' x '.join(map(str, info['grid_shape']))} cells of {info['grid_size']} m")
    if info["class_names"]:
        print(f"classes ({len(info['class_names'])}): {', '.join(info['class_names'])}")
    print(f"parameters   {info['parameters']:,}")


def run_inspect(args) -> int:
    info = describe(args.checkpoint, args.trust_checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=list))
        return 0
    if info["kind"] in IMAGE_KINDS:
        _print_image_model(info)
        return 0
    bb = info["backbone"]
    print(f"checkpoint   {info['source']}")
    print(f"kind         {info['kind']}")
    print(f"backbone     {bb['type']}  in={bb['in_channels']} base={bb['base_channels']} "
          f"channels={list(bb['channels'])} layers={list(bb['layers'])}"
          + (f" classes={bb['num_classes']}" if bb["num_classes"] else ""))
    if bb["type"] == "SpUNet-v1m3":
        print(f"pdnorm       context={bb['context_channels']} banks={list(bb['conditions'])}")
    print(f"conditions   {info['conditions'] or '-'}")
    for cond, names in info["class_names"].items():
        print(f"classes[{cond}] ({len(names)}): {', '.join(names)}")
    print(f"features     {info['feature_dim']} channels, grid {info['grid_size']} m, input {info['input_features']}")
    if info["render"]:  # the whole head is in --json
        head = info["render"]["head"]
        decoders = [name for name in ("sdf", "rgb", "semantic") if head["field"].get(f"{name}_decoder")]
        print(f"render       volume {' x '.join(map(str, head['grid_shape']))} cells of {head['grid_size']} m, "
              f"{head['sampler']['num_samples']} samples per ray, decoders: {', '.join(decoders)}")
    if info["detection"]:  # a detector's kind is "encoder": its head is this section
        names = info["detection"]["class_names"]
        print(f"detection    voting head, {len(names)} classes: {', '.join(names)}")
    print(f"parameters   {info['parameters']:,}")
    return 0


def run_convert(args) -> int:
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.errors import CommandError

    out = Path(args.output)
    if out.exists() and not out.is_dir():  # found before reading the checkpoint, not as a FileExistsError after it
        raise CommandError(f"-o {out}: exists and is not a folder; convert writes a folder (model.safetensors + "
                           "config.json)")
    held = [name for name in ("model.safetensors", "config.json") if (out / name).exists()]
    if held and not args.overwrite:
        raise CommandError(f"-o {out} already holds a model ({', '.join(held)}); choose another folder, or pass "
                           "--overwrite to replace it")
    loaded = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    loaded.config.name = args.name or Path(args.checkpoint).stem
    model = loaded.inference_model  # the same state_dict as the spconv module tree, built without spconv
    out = save_checkpoint(model, loaded.config, args.output)
    print(f"wrote {out} ({loaded.config.kind}, {sum(p.numel() for p in model.parameters()):,} parameters)",
          file=sys.stderr)
    return 0
