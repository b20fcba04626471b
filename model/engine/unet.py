"""SpUNetEngine: the SpUNet (v1m1 and v1m3/PDNorm) as convolutions over precomputed kernel maps.

Built from a state_dict with the official key names (read off `model.backbones.layout.SpUNetLayout`, the
one description the modules are built from too), it computes the same function as the spconv model
without spconv: every norm is folded into ``x * a[cond] + b[cond]`` (`model.engine.folding`), every conv
runs over a table of `model.sparse.kernel_maps` in one of two formulations:

- ``"gather"``: dense tables, ``sum_k pad(x)[table[:, k]] @ W[k]`` (`model.sparse.gather_ops`); only
  Gather / MatMul / elementwise ops, so it exports to ONNX and TensorRT (export/graph.py) with no Scatter.
- ``"pairs"``: the CPU formulation (`model.engine.plans`), plans derived once per table per forward and
  shared by every conv of a level: the stem and the submanifold convs of large levels run mask-bucketed
  (`model.engine.buckets`: rows with the same neighbour pattern as one gather + one dense GEMM, no
  scatter), the other rows, small levels and the k2s2 down convs over valid pairs summed per output row
  (`model.engine.bags`: gather → per-tap GEMM → ``embedding_bag``), the k2s2 up convs over their one pair
  per row (`model.engine.pairs`). Not exportable, fast on CPU. Single-condition models fold their norms
  into the weights (in the GEMM dtype) once at construction, replacing the raw weights. Between blocks it
  calls `model.cancel.checkpoint`, so a request past its deadline gives its model thread back within one
  block (~0.1 s) instead of at the end of a forward that may take a minute.

Inputs (positional): ``feat (M_0, C_in)`` float32, then the tables in `KernelMaps.tables` order, then
``condition (1,)`` int64 (index into `conditions`) for PDNorm models. Outputs: ``backbone_feat
(M_0, C)`` and, when built with heads and the checkpoint has one, ``seg_logits (M_0, K)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from model.backbones.layout import FINAL, BlockSpec, ConvNormSpec, ConvSpec, NormSpec, SpUNetLayout
from model.cancel import checkpoint
from model.conditions import condition_index
from model.config import ModelConfig
from model.engine.bags import RowBags, bags_conv
from model.engine.buckets import MaskBuckets, bucket_conv
from model.engine.rows import zero_row_buffer
from model.engine.folding import FoldedNorm, build_norm
from model.engine.pairs import PRECISIONS, TapPairs, pairs_conv
from model.engine.plans import cpu_plans
from model.infer_config import infer_config
from model.sparse.gather_ops import conv1x1_from_spconv, gather_conv, inverse_conv, taps_from_spconv
from model.sparse.kernel_maps import KernelMaps, build_kernel_maps

FORMULATIONS = ("gather", "pairs")
Plan = torch.Tensor | RowBags | TapPairs | MaskBuckets  # a dense table (gather), or its CPU plan (pairs)
_CONVS = {RowBags: bags_conv, TapPairs: pairs_conv, MaskBuckets: bucket_conv}


def _exported() -> None:
    """The gather formulation's checkpoint: none (its forward is traced into ONNX)."""


def _sparse_conv(x: torch.Tensor, plan: RowBags | TapPairs | MaskBuckets, w: torch.Tensor,
                 b: torch.Tensor | None) -> torch.Tensor:
    return _CONVS[type(plan)](x, plan, w, b)


def _conv(x: torch.Tensor, plan: Plan, w: torch.Tensor, group: int | None, inverse: bool = False) -> torch.Tensor:
    return inverse_conv(x, plan, w) if inverse else gather_conv(x, plan, w, group)


def _folded(w: torch.Tensor, norm: FoldedNorm, cond: torch.Tensor | None, dtype: torch.dtype):
    """The conv weight with the norm's scale folded into its output channels, and the norm's shift:
    ``norm(conv_W(x)) = conv_{W*a}(x) + b``, so no (M, C) multiply per norm. Done once at construction
    for single-condition models (`_Block.prefold`), per forward under PDNorm's several conditions."""
    a, b = norm.affine(cond)
    return (w * a).to(dtype), b


def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv in the weight's precision, result float32."""
    out = (x if x.dtype == w.dtype else x.to(w.dtype)) @ w
    return out if out.dtype == torch.float32 else out.float()


class _Block(nn.Module):
    """BasicBlock: ``relu(n2(conv2(relu(n1(conv1(x))))) + proj(x))``, proj = 1x1 conv + norm or identity."""

    def __init__(self, weight: Callable[[ConvSpec], torch.Tensor], norm: Callable[[NormSpec], FoldedNorm],
                 spec: BlockSpec, taps_per_matmul: int | None):
        super().__init__()
        self.group = taps_per_matmul
        self.register_buffer("w1", taps_from_spconv(weight(spec.conv1)))
        self.register_buffer("w2", taps_from_spconv(weight(spec.conv2)))
        self.n1, self.n2 = norm(spec.norm1), norm(spec.norm2)
        self.has_proj = spec.proj is not None
        if spec.proj is not None:
            self.register_buffer("wp", conv1x1_from_spconv(weight(spec.proj.conv)))
            self.np = norm(spec.proj.norm)
        self.prefolded = False

    def prefold(self, dtype: torch.dtype) -> None:
        """Pairs formulation, one condition: fold the norms into the weights (in the GEMM dtype) once,
        the proj's shift into conv2's bias; the weights replace the raw ones (no extra memory)."""
        if self.n1.a.shape[0] != 1:
            return
        (self.w1, b1), (self.w2, b2) = _folded(self.w1, self.n1, None, dtype), _folded(self.w2, self.n2, None, dtype)
        if self.has_proj:
            self.wp, bp = _folded(self.wp, self.np, None, dtype)
            b2 = b2 + bp
            del self.np
        del self.n1, self.n2
        self.register_buffer("b1", b1.contiguous())
        self.register_buffer("b2", b2.contiguous())
        self.prefolded = True

    def _pairs_weights(self, cond: torch.Tensor | None, dtype: torch.dtype):
        """(w1, b1, w2, b2 with the proj's shift, wp or None), folded for this forward unless prefolded."""
        if self.prefolded:
            return self.w1, self.b1, self.w2, self.b2, self.wp if self.has_proj else None
        (w1, b1), (w2, b2) = _folded(self.w1, self.n1, cond, dtype), _folded(self.w2, self.n2, cond, dtype)
        if not self.has_proj:
            return w1, b1, w2, b2, None
        wp, bp = _folded(self.wp, self.np, cond, dtype)
        return w1, b1, w2, b2 + bp, wp

    def forward(self, x: torch.Tensor, plan: Plan, cond: torch.Tensor | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not isinstance(plan, torch.Tensor):  # norms folded into the convs, in-place ReLUs
            w1, b1, w2, b2, wp = self._pairs_weights(cond, dtype)
            h = _sparse_conv(x, plan, w1, b1).relu_()
            h = _sparse_conv(h, plan, w2, b2)
            if wp is None:
                h += x
            elif wp.dtype == torch.float32 and x.dtype == torch.float32:
                h.addmm_(x, wp)  # no (M, C) temporary
            else:
                h += _matmul(x, wp)
            return h.relu_()
        h = torch.relu(self.n1(_conv(x, plan, self.w1, self.group), cond))
        h = self.n2(_conv(h, plan, self.w2, self.group), cond)
        residual = self.np(x @ self.wp, cond) if self.has_proj else x
        return torch.relu(h + residual)


class _ConvNorm(nn.Module):
    """Stem / down / up: conv over a table, norm, ReLU."""

    def __init__(self, weight: torch.Tensor, norm: FoldedNorm, inverse: bool = False,
                 taps_per_matmul: int | None = None):
        super().__init__()
        self.register_buffer("w", taps_from_spconv(weight))
        self.norm, self.inverse, self.group = norm, inverse, taps_per_matmul
        self.prefolded = False

    def prefold(self, dtype: torch.dtype) -> None:
        """See `_Block.prefold`."""
        if self.norm.a.shape[0] != 1:
            return
        self.w, b = _folded(self.w, self.norm, None, dtype)
        del self.norm
        self.register_buffer("b", b.contiguous())
        self.prefolded = True

    def forward(self, x: torch.Tensor, plan: Plan, cond: torch.Tensor | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not isinstance(plan, torch.Tensor):
            w, b = (self.w, self.b) if self.prefolded else _folded(self.w, self.norm, cond, dtype)
            return _sparse_conv(x, plan, w, b).relu_()
        return torch.relu(self.norm(_conv(x, plan, self.w, self.group, self.inverse), cond))


class SpUNetEngine(nn.Module):
    """See the module docstring. Build with `from_state_dict` or `from_loaded`.

    formulation: "gather" (exportable) or "pairs" (CPU-fast). precision: "fp32", or "bf16" (pairs only:
    bf16 GEMM operands, float32 sums). taps_per_matmul (gather only): None = per-tap matmuls; 27 = one
    gather + GEMM per conv (fastest in onnxruntime). See `gather_conv`."""

    def __init__(self, sd: dict[str, torch.Tensor], config: ModelConfig, heads: bool = True,
                 taps_per_matmul: int | None = None, formulation: str = "gather", precision: str = "fp32"):
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision != "fp32" and formulation != "pairs":
            raise ValueError("bf16 precision is implemented for the pairs formulation only")
        self.formulation, self.precision, self.config = formulation, precision, config
        bb_cfg = config.backbone
        if bb_cfg.type not in ("SpUNet-v1m1", "SpUNet-v1m3"):
            raise ValueError(f"the engine cannot run backbone type {bb_cfg.type!r}")
        nested = config.kind == "ppt-backbone-segmentor"
        bb = "backbone.backbone." if nested else "backbone."
        wrapper = "backbone." if nested else ""
        layout = self.layout = SpUNetLayout.from_config(bb_cfg)  # what to read, and the shapes to expect
        if bb + layout.stem.conv.key + ".weight" not in sd:
            raise ValueError(f"state_dict has no SpUNet stem under {bb!r} (kind {config.kind!r})")
        v1m1 = layout.variant == "v1m1"

        # conditions: the wrapper's order (embedding rows); each selects a BN bank + context row
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

        def norm(spec: NormSpec) -> FoldedNorm:
            return build_norm(sd, f"{bb}{spec.key}.", banks, contexts)

        def weight(spec: ConvSpec) -> torch.Tensor:
            w = sd[f"{bb}{spec.key}.weight"]
            if tuple(w.shape) != spec.shape:
                raise ValueError(f"{bb}{spec.key}.weight has shape {tuple(w.shape)}, the config's SpUNet needs "
                                 f"{spec.shape}")
            return w

        def conv_norm(spec: ConvNormSpec, **options) -> _ConvNorm:
            return _ConvNorm(weight(spec.conv), norm(spec.norm), **options)

        self.num_levels = layout.num_stages + 1
        self.stem_kernel, self.in_channels = layout.stem.conv.kernel_size, layout.in_channels
        group = self.taps_per_matmul = taps_per_matmul
        self.stem = conv_norm(layout.stem, taps_per_matmul=group)
        self.down = nn.ModuleList(conv_norm(spec, taps_per_matmul=group) for spec in layout.down)
        self.up = nn.ModuleList(conv_norm(spec, inverse=True) for spec in layout.up)
        self.enc = nn.ModuleList(nn.ModuleList(_Block(weight, norm, b, group) for b in stage) for stage in layout.enc)
        self.dec = nn.ModuleList(nn.ModuleList(_Block(weight, norm, b, group) for b in stage) for stage in layout.dec)

        self.head = "none"
        self.num_classes: dict[str, int] = {}
        final = bb + FINAL  # the head when the checkpoint has one, whatever the config's num_classes
        if heads and final + ".weight" in sd:
            self.head = "final"
            self.register_buffer("final_w", conv1x1_from_spconv(sd[final + ".weight"]))
            self.register_buffer("final_b", sd[final + ".bias"].float().clone())
            k = int(sd[final + ".bias"].shape[0])
            self.num_classes = {c: k for c in self.conditions} if self.conditions else {"default": k}
        elif heads and config.kind == "ppt-segmentor":
            self.head = "language"
            self._language_head(sd, config)
            self.num_classes = {c: len(v) for c, v in zip(self.conditions, config.valid_index)}
        self.outputs: tuple[str, ...] = ("backbone_feat",) + (("seg_logits",) if self.head != "none" else ())
        if formulation == "pairs":  # norms folded into the weights once (per forward only under several conditions)
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            for module in self.modules():
                if isinstance(module, (_Block, _ConvNorm)):
                    module.prefold(dtype)

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
                        heads: bool = True, **options) -> "SpUNetEngine":
        """From an official (``module.``-stripped) state_dict; the config is inferred when not given.
        ``options``: taps_per_matmul, formulation, precision (see the class)."""
        sd = {k: v.detach().cpu() for k, v in sd.items()}
        try:
            return cls(sd, config or infer_config(sd), heads=heads, **options).eval()
        except KeyError as exc:
            raise ValueError(f"state_dict does not match the SpUNet layout: missing key {exc.args[0]!r}") from exc

    @classmethod
    def from_loaded(cls, loaded, heads: bool = True, **options) -> "SpUNetEngine":
        """From a `model.checkpoint.LoadedModel` (its modules carry the official key names)."""
        return cls.from_state_dict(loaded.state_dict(), loaded.config, heads=heads, **options)

    def kernel_maps(self, grid_coord, batch=None) -> KernelMaps:
        """The tables this network needs for a batch of voxelised scenes (on grid_coord's device)."""
        return build_kernel_maps(grid_coord, batch, num_levels=self.num_levels, stem_kernel=self.stem_kernel)

    def example_inputs(self, maps: KernelMaps, feat: torch.Tensor, condition: int = 0) -> tuple[torch.Tensor, ...]:
        args = (feat, *maps.tables())
        return args + ((torch.tensor([condition], dtype=torch.int64, device=feat.device),) if self.conditions else ())

    def forward(self, feat: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = self.num_levels
        cond = inputs[3 * levels - 1] if self.conditions else None
        tables = (inputs[0], inputs[1 : 1 + levels], inputs[1 + levels : 2 * levels], inputs[2 * levels : 3 * levels - 1])
        if self.formulation == "gather":
            return self._network(feat, tables[0], list(tables[1]), list(tables[2]), list(tables[3]), cond)
        *plans, new_id = cpu_plans(*tables, precision=self.precision)  # level rows renumbered: see model.engine.plans
        outputs = self._network(feat, *plans, cond)  # the stem plan reads the caller's rows
        return outputs if new_id is None else tuple(o.index_select(0, new_id) for o in outputs)

    def _concat(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.formulation == "gather":  # the exported graph: a plain Concat
            return torch.cat([x, skip], dim=1)
        buf = zero_row_buffer(x.shape[0], x.shape[1] + skip.shape[1], x.dtype, x.device)
        return torch.cat([x, skip], dim=1, out=buf[:-1])  # padded for the next bucketed conv, no extra copy

    def _network(self, feat, stem, subm, down, up, cond) -> tuple[torch.Tensor, ...]:
        levels = self.num_levels
        dt = torch.bfloat16 if self.precision == "bf16" else torch.float32  # GEMM operands (pairs)
        check = checkpoint if self.formulation == "pairs" else _exported  # nothing in the exported graph
        x = self.stem(feat, stem, cond, dt)  # level 0
        skips = [x]
        for s in range(levels - 1):
            check()
            x = self.down[s](x, down[s], cond, dt)  # level s + 1
            for block in self.enc[s]:
                check()
                x = block(x, subm[s + 1], cond, dt)
            skips.append(x)
        x = skips.pop()
        for s in reversed(range(levels - 1)):
            check()
            x = self.up[s](x, up[s], cond, dt)  # level s
            x = self._concat(x, skips.pop())  # [upsampled, skip]
            for block in self.dec[s]:
                check()
                x = block(x, subm[s], cond, dt)
        if self.head == "final":
            return x, x @ self.final_w + self.final_b
        if self.head == "language":
            f = x @ self.proj_w + self.proj_b  # (M, 512)
            f = f / torch.linalg.vector_norm(f, dim=1, keepdim=True)  # no epsilon, as the official code
            cols = torch.nonzero(self.text_owner == cond).reshape(-1)  # rows of this condition
            return x, f @ self.text.index_select(1, cols)
        return (x,)

    @torch.no_grad()
    def run(self, feat, grid_coord, batch=None, condition: int | str | None = None) -> dict[str, np.ndarray]:
        """Convenience for tests and benchmarks: numpy in, per-voxel numpy outputs."""
        device = next(iter(self.buffers())).device
        grid = torch.as_tensor(np.asarray(grid_coord)).to(device)
        maps = self.kernel_maps(grid, None if batch is None else torch.as_tensor(np.asarray(batch)).to(device))
        feat = torch.as_tensor(np.asarray(feat, dtype=np.float32)).to(device)
        args = self.example_inputs(maps, feat, self.condition_index(condition))
        return {n: o.cpu().numpy() for n, o in zip(self.outputs, self(*args))}

    def condition_index(self, condition: int | str | None) -> int:
        """The ``condition`` input for a condition name or index, by `model.conditions.condition_index` (a
        conditioned model runs under its default when none is named); 0 for a model without conditions,
        the placeholder its exported graph takes. ConditionError (a ValueError) for one it does not take."""
        index = condition_index(self.conditions, condition)
        return 0 if index is None else index
