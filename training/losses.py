"""Segmentation losses of the official fine-tune configs (spec §4.2): cross-entropy and the Lovász-softmax
loss, both ignoring label -1, summed with weight 1 each.

Lovász-softmax (Berman, Rannen Triki and Blaschko, CVPR 2018) is the Lovász extension of the per-class
Jaccard loss ``Δ_c(M) = |M| / |F_c ∪ M|`` (M: the set of mispredicted points, F_c: the points of class c),
evaluated at the vector of errors ``m_i = |[y_i = c] - p_i(c)|``. With the errors sorted in decreasing order
(permutation π), the extension is ``Σ_k m_π(k) · (Δ_c({π(1..k)}) - Δ_c({π(1..k-1)}))``; it is piecewise
linear, tight on {0,1} error vectors and convex, so it can be minimised with gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the labelled points. logits (N, K), target (N,) int.

    The official ``nn.CrossEntropyLoss`` returns NaN when every label is ignored; with sparse labels
    (the data-efficient setting) that happens to whole crops, so this returns a zero that still
    carries a graph instead."""
    _check(logits, target, ignore_index)
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(_at_least_float32(logits), target.long(), ignore_index=ignore_index)


def lovasz_weights(foreground_sorted: torch.Tensor) -> torch.Tensor:
    """Increments ``Δ(π(1..k)) - Δ(π(1..k-1))`` of the Jaccard loss along the sorted order.

    foreground_sorted (P,) float: 1 where the k-th largest error belongs to a point of the class.
    After the first k points are counted as mispredicted, the intersection holds the class points not
    yet counted and the union the class points plus the counted background points."""
    total = foreground_sorted.sum()
    intersection = total - foreground_sorted.cumsum(0)
    union = total + (1.0 - foreground_sorted).cumsum(0)
    jaccard_loss = 1.0 - intersection / union  # Δ after k points, k = 1..P (union ≥ 1 from k = 1 on)
    return torch.cat([jaccard_loss[:1], jaccard_loss[1:] - jaccard_loss[:-1]])


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   classes: str = "present") -> torch.Tensor:
    """Multiclass Lovász-softmax on softmax(logits), over all points of the batch at once (per_image=False).

    classes="present": average over the classes that occur in the labelled target (the configs' choice);
    "all": over every class. Returns a zero with a graph when nothing is labelled."""
    _check(logits, target, ignore_index)
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
    valid = target != ignore_index
    probs = torch.softmax(_at_least_float32(logits), dim=1)[valid]   # (P, K)
    labels = target[valid].long()                         # (P,)
    if labels.numel() == 0:
        return logits.sum() * 0.0
    losses = []
    for c in range(probs.shape[1]):
        foreground = (labels == c).to(probs.dtype)
        if classes == "present" and not foreground.any():
            continue
        errors = (foreground - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_weights(foreground[order])))
    return torch.stack(losses).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """The fine-tune criteria: ``loss = CE + Lovász`` (weights 1, 1), with both parts for logging."""
    ce = cross_entropy(logits, target, ignore_index)
    lovasz = lovasz_softmax(logits, target, ignore_index)
    return {"loss": ce + lovasz, "ce": ce.detach(), "lovasz": lovasz.detach()}


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (AMP) are scored in float32; float64 stays float64."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _check(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    if logits.ndim != 2 or target.ndim != 1 or len(logits) != len(target):
        raise ValueError(f"expected logits (N, K) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if target.dtype.is_floating_point:
        raise ValueError(f"target must hold integer labels, got {target.dtype}")
    bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
    if bad.any():
        raise ValueError(f"target labels must lie in [0, {logits.shape[1]}) or be {ignore_index}; "
                         f"found {int(target[bad][0])}")
