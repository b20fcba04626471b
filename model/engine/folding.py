"""Inference-time folding of the SpUNet norms into per-channel affine maps ``y = x * a + b``.

BatchNorm in eval mode is affine. PDNorm adds ``* (1 + scale) + shift`` where (shift, scale) come from
``Linear(SiLU(context))`` and the context is one row of the wrapper's ``embedding_table``, so for a
fixed condition it is affine too. Folding every condition ahead of time turns the condition into an
integer that selects a row of (a, b), which keeps the exported graph free of the embedding MLPs and
string handling. Computed in float64 and stored in float32.
"""

from __future__ import annotations

import torch

BN_EPS = 1e-3  # every SpUNet norm (BatchNorm1d(eps=1e-3, momentum=0.01))


def fold_batchnorm(sd: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of ``BatchNorm1d`` at ``prefix`` (keys ``weight``/``bias`` optional: affine=False)."""
    try:
        mean = sd[prefix + "running_mean"].double()
        var = sd[prefix + "running_var"].double()
    except KeyError as exc:
        raise KeyError(f"missing BatchNorm statistics {exc.args[0]!r}") from exc
    weight = sd[prefix + "weight"].double() if prefix + "weight" in sd else torch.ones_like(mean)
    bias = sd[prefix + "bias"].double() if prefix + "bias" in sd else torch.zeros_like(mean)
    a = weight / torch.sqrt(var + BN_EPS)
    return a, bias - mean * a


def fold_pdnorm(sd: dict[str, torch.Tensor], prefix: str, bank: int,
                context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of a PDBatchNorm at ``prefix`` for BN bank ``bank`` and context (context_channels,)."""
    bn = f"{prefix}bns.{bank}." if f"{prefix}bns.{bank}.running_mean" in sd else f"{prefix}bn."
    a, b = fold_batchnorm(sd, bn)
    if prefix + "modulation.1.weight" in sd:
        if context is None:
            raise ValueError(f"{prefix}: an adaptive PDNorm needs the wrapper's embedding_table (context)")
        hidden = torch.nn.functional.silu(context.double())
        m = sd[prefix + "modulation.1.weight"].double() @ hidden + sd[prefix + "modulation.1.bias"].double()
        shift, scale = m.chunk(2)  # shift first, then scale (official order)
        a, b = a * (1.0 + scale), b * (1.0 + scale) + shift
    return a, b


class FoldedNorm(torch.nn.Module):
    """``x * a[cond] + b[cond]`` with a, b of shape (num_conditions, C); one row when unconditioned."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a.float().contiguous())
        self.register_buffer("b", b.float().contiguous())

    def affine(self, condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (C,), of one condition: to fold into the preceding conv's weights and bias."""
        if condition is None:
            return self.a[0], self.b[0]
        return self.a.index_select(0, condition)[0], self.b.index_select(0, condition)[0]

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        # x (M, C); condition (1,) int64 or None
        if condition is None:
            return x * self.a[0] + self.b[0]
        return x * self.a.index_select(0, condition) + self.b.index_select(0, condition)


def build_norm(sd: dict[str, torch.Tensor], prefix: str, banks: list[int] | None,
               contexts: list[torch.Tensor | None] | None) -> FoldedNorm:
    """A plain BatchNorm (banks None) or a PDNorm folded once per exported condition."""
    if banks is None:
        a, b = fold_batchnorm(sd, prefix)
        return FoldedNorm(a[None], b[None])
    pairs = [fold_pdnorm(sd, prefix, bank, ctx) for bank, ctx in zip(banks, contexts)]
    return FoldedNorm(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
