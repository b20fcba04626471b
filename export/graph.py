"""GatherSpUNet: the SpUNet (v1m1 and v1m3/PDNorm) as gathers + matmuls over precomputed kernel maps.

It is built from a state_dict with the official key names and computes the same function as the
spconv model, without spconv: every conv is `gather_conv` over a table of `model.sparse.kernel_maps`,
every norm is folded into ``x * a[cond] + b[cond]`` (`export.folding`). The graph therefore contains
only Gather / MatMul / elementwise ops, which export to ONNX and TensorRT and run anywhere.

Inputs (positional): ``feat (M_0, C_in)`` float32, then the tables in `KernelMaps.tables` order, then
``condition (1,)`` int64 (index into `conditions`) for PDNorm models. Outputs: ``backbone_feat
(M_0, C)`` and, when the checkpoint has a head, ``seg_logits (M_0, K)``. Rows follow the input rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from export.folding import FoldedNorm, build_norm
from model.config import ModelConfig
from model.infer_config import infer_config
from model.sparse.gather_ops import conv1x1, conv1x1_from_spconv, gather_conv, inverse_conv, taps_from_spconv
from model.sparse.kernel_maps import KernelMaps, build_kernel_maps, table_names


@dataclass
class GraphInfo:
    """What an exported graph takes and returns; stored in the ONNX metadata and Triton config."""

    kind: str
    backbone: str
    in_channels: int
    out_channels: int
    num_levels: int
    stem_kernel: int
    conditions: tuple[str, ...]
    outputs: tuple[str, ...]
    num_classes: dict[str, int] = field(default_factory=dict)
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    grid_size: float = 0.02
    input_features: tuple[str, ...] = ("color", "normal")

    @property
    def input_names(self) -> list[str]:
        names = ["feat", *table_names(self.num_levels, with_stem=True)]
        return names + (["condition"] if self.conditions else [])


class _Block(nn.Module):
    """BasicBlock: ``relu(n2(conv2(relu(n1(conv1(x))))) + proj(x))``, proj = 1x1 conv + norm or identity."""

    def __init__(self, sd: dict, prefix: str, norm, taps_per_matmul: int | None):
        super().__init__()
        self.group = taps_per_matmul
        self.register_buffer("w1", taps_from_spconv(sd[prefix + "conv1.weight"]))
        self.register_buffer("w2", taps_from_spconv(sd[prefix + "conv2.weight"]))
        self.n1, self.n2 = norm(prefix + "bn1."), norm(prefix + "bn2.")
        proj = next((k for k in (prefix + "proj.0.weight", prefix + "proj_conv.weight") if k in sd), None)
        self.has_proj = proj is not None
        if self.has_proj:
            self.register_buffer("wp", conv1x1_from_spconv(sd[proj]))
            self.np = norm(prefix + ("proj.1." if proj.endswith("proj.0.weight") else "proj_norm."))

    def forward(self, x: torch.Tensor, table: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = torch.relu(self.n1(gather_conv(x, table, self.w1, self.group), cond))
        h = self.n2(gather_conv(h, table, self.w2, self.group), cond)
        residual = self.np(conv1x1(x, self.wp), cond) if self.has_proj else x
        return torch.relu(h + residual)


class _ConvNorm(nn.Module):
    """Stem / down / up: conv over a table, norm, ReLU."""

    def __init__(self, weight: torch.Tensor, norm: FoldedNorm, inverse: bool = False,
                 taps_per_matmul: int | None = None):
        super().__init__()
        self.register_buffer("w", taps_from_spconv(weight))
        self.norm, self.inverse, self.group = norm, inverse, taps_per_matmul

    def forward(self, x: torch.Tensor, table: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        y = inverse_conv(x, table, self.w) if self.inverse else gather_conv(x, table, self.w, self.group)
        return torch.relu(self.norm(y, cond))


class GatherSpUNet(nn.Module):
    """See the module docstring. Build with `from_state_dict` or `from_loaded`.

    taps_per_matmul: None = per-tap matmuls (memory-lean, best in torch); 27 = one gather + GEMM per
    conv (fastest in onnxruntime, needs (M, 27*C) floats per conv). See `gather_conv`."""

    def __init__(self, sd: dict[str, torch.Tensor], config: ModelConfig, heads: bool = True,
                 taps_per_matmul: int | None = None):
        super().__init__()
        bb_cfg = config.backbone
        if bb_cfg.type not in ("SpUNet-v1m1", "SpUNet-v1m3"):
            raise ValueError(f"cannot export backbone type {bb_cfg.type!r}")
        nested = config.kind == "ppt-backbone-segmentor"
        bb = "backbone.backbone." if nested else "backbone."
        wrapper = "backbone." if nested else ""
        if bb + "conv_input.0.weight" not in sd and bb + "conv_input.conv.weight" not in sd:
            raise ValueError(f"state_dict has no SpUNet stem under {bb!r} (kind {config.kind!r})")
        v1m1 = bb_cfg.type == "SpUNet-v1m1"
        conv, norm_key = ("0", "1") if v1m1 else ("conv", "bn")

        # exported conditions: the wrapper's order (embedding rows); each selects a BN bank + context row
        self.conditions: tuple[str, ...] = ()
        banks = contexts = None
        if not v1m1:
            table = sd.get(wrapper + "embedding_table.weight")
            self.conditions = tuple(config.conditions) if table is not None else tuple(bb_cfg.conditions)
            missing = [c for c in self.conditions if c not in bb_cfg.conditions]
            if missing:
                raise ValueError(f"conditions {missing} have no BN bank; the backbone has {list(bb_cfg.conditions)}")
            banks = [bb_cfg.conditions.index(c) if bb_cfg.norm_decouple else 0 for c in self.conditions]
            contexts = [None if table is None else table[i] for i in range(len(self.conditions))]

        def norm(prefix: str) -> FoldedNorm:
            return build_norm(sd, prefix, banks, contexts)  # prefix: absolute key prefix

        stages = len(bb_cfg.layers) // 2
        self.num_levels = stages + 1
        stem = sd[f"{bb}conv_input.{conv}.weight"]
        self.stem_kernel = int(stem.shape[1])
        group = self.taps_per_matmul = taps_per_matmul
        self.stem = _ConvNorm(stem, norm(f"{bb}conv_input.{norm_key}."), taps_per_matmul=group)
        self.down = nn.ModuleList(_ConvNorm(sd[f"{bb}down.{s}.{conv}.weight"], norm(f"{bb}down.{s}.{norm_key}."),
                                            taps_per_matmul=group) for s in range(stages))
        self.up = nn.ModuleList(_ConvNorm(sd[f"{bb}up.{s}.{conv}.weight"], norm(f"{bb}up.{s}.{norm_key}."), inverse=True)
                                for s in range(stages))
        self.enc = nn.ModuleList(nn.ModuleList(_Block(sd, f"{bb}enc.{s}.block{i}.", norm, group)
                                               for i in range(bb_cfg.layers[s])) for s in range(stages))
        self.dec = nn.ModuleList(nn.ModuleList(_Block(sd, f"{bb}dec.{s}.block{i}.", norm, group)
                                               for i in range(bb_cfg.layers[len(bb_cfg.layers) - 1 - s]))
                                 for s in range(stages))

        self.head = "none"
        num_classes: dict[str, int] = {}
        if heads and bb + "final.weight" in sd:
            self.head = "final"
            self.register_buffer("final_w", conv1x1_from_spconv(sd[bb + "final.weight"]))
            self.register_buffer("final_b", sd[bb + "final.bias"].float().clone())
            k = int(sd[bb + "final.bias"].shape[0])
            num_classes = {c: k for c in self.conditions} if self.conditions else {"default": k}
        elif heads and config.kind == "ppt-segmentor":
            self.head = "language"
            self._language_head(sd, config)
            num_classes = {c: len(v) for c, v in zip(self.conditions, config.valid_index)}

        self.info = GraphInfo(
            kind=config.kind, backbone=bb_cfg.type, in_channels=int(stem.shape[-1]), out_channels=bb_cfg.out_channels,
            num_levels=self.num_levels, stem_kernel=self.stem_kernel, conditions=self.conditions,
            outputs=("backbone_feat",) + (("seg_logits",) if self.head != "none" else ()),
            num_classes=num_classes,
            class_names={k: v for k, v in config.class_names.items() if k in num_classes},
            grid_size=config.grid_size, input_features=tuple(config.input_features))

    def _language_head(self, sd: dict[str, torch.Tensor], config: ModelConfig) -> None:
        """PPT-v1m1: ``exp(logit_scale) * normalize(proj_head(f)) @ class_embedding[valid_index[c]].T``.

        The rows of every condition are stored back to back with their condition id; the graph picks
        the current condition's rows with NonZero + Gather (the number of classes depends on it)."""
        if len(config.valid_index) != len(self.conditions):
            raise ValueError(f"{len(config.valid_index)} valid_index lists for {len(self.conditions)} conditions")
        rows = [i for idx in config.valid_index for i in idx]
        owner = [c for c, idx in enumerate(config.valid_index) for _ in idx]
        text = sd["class_embedding"].double()[rows] * sd["logit_scale"].double().exp()  # (sum K_c, 512)
        self.register_buffer("proj_w", sd["proj_head.weight"].float().t().contiguous())  # (C, 512)
        self.register_buffer("proj_b", sd["proj_head.bias"].float().clone())
        self.register_buffer("text", text.float().t().contiguous())  # (512, sum K_c)
        self.register_buffer("text_owner", torch.tensor(owner, dtype=torch.int64))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], config: ModelConfig | None = None,
                        heads: bool = True, taps_per_matmul: int | None = None) -> "GatherSpUNet":
        """From an official (``module.``-stripped) state_dict; the config is inferred when not given."""
        sd = {k: v.detach().cpu() for k, v in sd.items()}
        try:
            return cls(sd, config or infer_config(sd), heads=heads, taps_per_matmul=taps_per_matmul).eval()
        except KeyError as exc:
            raise ValueError(f"state_dict does not match the SpUNet layout: missing key {exc.args[0]!r}") from exc

    @classmethod
    def from_loaded(cls, loaded, heads: bool = True, taps_per_matmul: int | None = None) -> "GatherSpUNet":
        """From a `model.checkpoint.LoadedModel` (its modules carry the official key names)."""
        return cls.from_state_dict(loaded.model.state_dict(), loaded.config, heads=heads,
                                   taps_per_matmul=taps_per_matmul)

    def kernel_maps(self, grid_coord, batch=None) -> KernelMaps:
        """The tables this graph needs for a batch of voxelised scenes."""
        return build_kernel_maps(grid_coord, batch, num_levels=self.num_levels, stem_kernel=self.stem_kernel)

    def example_inputs(self, maps: KernelMaps, feat: torch.Tensor, condition: int = 0) -> tuple[torch.Tensor, ...]:
        args = (feat, *maps.tables())
        return args + ((torch.tensor([condition], dtype=torch.int64),) if self.conditions else ())

    def forward(self, feat: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = self.num_levels
        stem, subm = inputs[0], inputs[1 : 1 + levels]
        down = inputs[1 + levels : 2 * levels]
        up = inputs[2 * levels : 3 * levels - 1]
        cond = inputs[3 * levels - 1] if self.conditions else None

        x = self.stem(feat, stem, cond)  # level 0
        skips = [x]
        for s in range(levels - 1):
            x = self.down[s](x, down[s], cond)  # level s + 1
            for block in self.enc[s]:
                x = block(x, subm[s + 1], cond)
            skips.append(x)
        x = skips.pop()
        for s in reversed(range(levels - 1)):
            x = self.up[s](x, up[s], cond)  # level s
            x = torch.cat([x, skips.pop()], dim=1)  # [upsampled, skip]
            for block in self.dec[s]:
                x = block(x, subm[s], cond)
        if self.head == "final":
            return x, conv1x1(x, self.final_w) + self.final_b
        if self.head == "language":
            f = x @ self.proj_w + self.proj_b  # (M, 512)
            f = f / torch.linalg.vector_norm(f, dim=1, keepdim=True)  # no epsilon, as the official code
            cols = torch.nonzero(self.text_owner == cond).reshape(-1)  # rows of this condition
            return x, f @ self.text.index_select(1, cols)
        return (x,)

    @torch.no_grad()
    def run(self, feat, grid_coord, batch=None, condition: int | str | None = None) -> dict[str, np.ndarray]:
        """Convenience for tests and benchmarks: numpy in, per-voxel numpy outputs."""
        maps = self.kernel_maps(grid_coord, batch)
        args = self.example_inputs(maps, torch.as_tensor(np.asarray(feat, dtype=np.float32)),
                                   self.condition_index(condition))
        return {n: o.numpy() for n, o in zip(self.info.outputs, self(*args))}

    def condition_index(self, condition: int | str | None) -> int:
        if not self.conditions:
            if condition not in (None, 0, "", "default"):
                raise ValueError(f"this model takes no condition (got {condition!r})")
            return 0
        if isinstance(condition, str):
            if condition not in self.conditions:
                raise ValueError(f"unknown condition {condition!r}; this model supports {list(self.conditions)}")
            return self.conditions.index(condition)
        if condition is None or not 0 <= int(condition) < len(self.conditions):
            raise ValueError(f"condition must be one of {list(self.conditions)} (or its index), got {condition!r}")
        return int(condition)
