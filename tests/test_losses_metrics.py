"""Segmentation losses and metrics against hand-worked cases and brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import cross_entropy, lovasz_softmax, segmentation_loss
from training.metrics import SegMetrics, intersection_and_union

# ------------------------------------------------------------------------------------------ metrics


def test_intersection_and_union_hand_worked():
    # Labelled (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); the two ignored points predict 3 and 2,
    # which must not count. Class 3 appears in neither (after the ignore rule).
    target = np.array([0, 0, 1, 1, 2, -1, -1])
    pred = np.array([0, 1, 1, 1, 0, 3, 2])
    i, u, t = intersection_and_union(pred, target, 4)
    assert i.tolist() == [1, 2, 0, 0]
    assert u.tolist() == [3, 3, 1, 0]   # area_pred (2,3,0,0) + area_target (2,2,1,0) - I
    assert t.tolist() == [2, 2, 1, 0]
    m = SegMetrics(4)
    m.update(pred, target)
    assert m.iou == pytest.approx([1 / 3, 2 / 3, 0, 0])
    assert m.miou == pytest.approx(0.25)    # absent class 3 counts as 0 in the mean, as the official formula
    assert m.macc == pytest.approx((0.5 + 1.0) / 4)
    assert m.allacc == pytest.approx(3 / 5)


def test_sums_over_scenes_before_ratios():
    m = SegMetrics(2, ("a", "b"))
    m.update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 0]))  # I0 = 4, U0 = 4
    m.update(np.array([1, 1]), np.array([0, 1]))              # I1 = 1, U0 = 1, U1 = 2
    assert m.intersection.tolist() == [4, 1] and m.union.tolist() == [5, 2]
    assert m.miou == pytest.approx((4 / 5 + 1 / 2) / 2)       # not the mean of per-scene mIoUs (0.375)
    assert m.allacc == pytest.approx(5 / 6)
    assert m.scenes == 2
    table = m.table()
    assert "a " in table and "b " in table and "mIoU/mAcc/allAcc 0.6500" in table
    assert m.as_dict()["per_class"]["a"]["iou"] == pytest.approx(0.8)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="points"):
        intersection_and_union(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\)"):
        intersection_and_union(np.zeros(2, int), np.array([0, 5]), 2)
    with pytest.raises(ValueError, match="pred labels"):
        intersection_and_union(np.array([0, 7]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="integer"):
        intersection_and_union(np.zeros(2), np.zeros(2, int), 2)
    with pytest.raises(ValueError, match="class names"):
        SegMetrics(3, ("a", "b"))
    # a prediction on an ignored point may be anything
    assert intersection_and_union(np.array([0, 9]), np.array([0, -1]), 2)[0].tolist() == [1, 0]


# ------------------------------------------------------------------------------------------ losses


def _logits_from_probs(probs: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def test_lovasz_binary_hand_worked():
    # Point A: label 0, p = (0.8, 0.2); point B: label 1, p = (0.4, 0.6).
    # Class 0: errors (A 0.2 fg, B 0.4 bg); sorted B, A; Δ({B}) = 1/(1+1), Δ({B,A}) = 2/2 -> 0.4·0.5 + 0.2·0.5 = 0.3.
    # Class 1: errors (A 0.2 bg, B 0.4 fg); sorted B, A; Δ({B}) = 1/1, Δ({B,A}) = 2/2 -> 0.4·1 + 0.2·0 = 0.4.
    logits = _logits_from_probs([[0.8, 0.2], [0.4, 0.6]])
    target = torch.tensor([0, 1])
    assert lovasz_softmax(logits, target).item() == pytest.approx(0.35, abs=1e-12)
    # Only class 0 present: class 1 is skipped ("present"), but counted with "all".
    only0 = torch.tensor([0, 0])
    # class 0 errors (0.2, 0.6): sorted 0.6 (fg), 0.2 (fg); Δ = 1/2, then 2/2 -> 0.6·0.5 + 0.2·0.5 = 0.4
    assert lovasz_softmax(logits, only0).item() == pytest.approx(0.4, abs=1e-12)
    # class 1 (absent): errors = p1 = (0.2, 0.6); Δ(any non-empty) = 1 -> the largest error, 0.6
    assert lovasz_softmax(logits, only0, classes="all").item() == pytest.approx((0.4 + 0.6) / 2, abs=1e-12)


def _jaccard_loss(mispredicted: np.ndarray, foreground: np.ndarray) -> float:
    union = np.count_nonzero(foreground | mispredicted)
    return np.count_nonzero(mispredicted) / union if union else 0.0


def _lovasz_by_thresholds(probs: np.ndarray, labels: np.ndarray, steps: int = 200_000) -> float:
    """The Lovász extension as the integral over t in (0, 1) of the set function at the level set {m > t}."""
    ts = (np.arange(steps) + 0.5) / steps
    losses = []
    for c in np.unique(labels):
        fg = labels == c
        errors = np.abs(fg.astype(float) - probs[:, c])
        # Δ only changes at the error values: integrate piecewise-constant levels on the fine grid.
        order = np.sort(errors)
        counts = len(errors) - np.searchsorted(order, ts, side="right")   # |{m > t}| for each t
        idx = np.argsort(-errors, kind="stable")
        level_values = [_jaccard_loss(np.isin(np.arange(len(errors)), idx[:k]), fg) for k in range(len(errors) + 1)]
        losses.append(np.mean(np.array(level_values)[counts]))
    return float(np.mean(losses))


def test_lovasz_matches_threshold_integral():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 4, generator=gen, dtype=torch.float64) * 2
    target = torch.tensor([0, 2, 2, 1, -1, 0, 2, -1, 1])
    loss = lovasz_softmax(logits, target).item()
    valid = (target != -1).numpy()
    probs = torch.softmax(logits, 1).numpy()[valid]
    assert loss == pytest.approx(_lovasz_by_thresholds(probs, target.numpy()[valid]), abs=1e-4)


def test_lovasz_is_tight_on_hard_predictions():
    """With one-hot probabilities the extension equals the discrete loss mean_c (1 - IoU_c) over present classes."""
    target = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0])
    logits = F.one_hot(pred, 3).double() * 60.0
    i, u, _ = intersection_and_union(pred.numpy(), target.numpy(), 3)
    assert lovasz_softmax(logits, target).item() == pytest.approx(np.mean(1 - i / u), abs=1e-9)


def test_ignored_points_do_not_count_and_gradients_flow():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 5, generator=gen, requires_grad=True)
    target = torch.tensor([0, 1, 4, -1, 2, 2, -1, 3, 0, 1, -1, 4])
    out = segmentation_loss(logits, target)
    out["loss"].backward()
    grad = logits.grad
    assert torch.isfinite(grad).all() and grad[target != -1].abs().sum() > 0
    assert grad[target == -1].abs().sum() == 0
    keep = target != -1
    assert out["lovasz"].item() == pytest.approx(lovasz_softmax(logits[keep], target[keep]).item(), abs=1e-6)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(logits[keep], target[keep]).item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["lovasz"].item(), abs=1e-6)


def test_all_ignored_gives_zero_with_graph_and_bad_labels_raise():
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.full((4,), -1)
    loss = cross_entropy(logits, target) + lovasz_softmax(logits, target)
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().sum() == 0
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        lovasz_softmax(logits, torch.tensor([0, 1, 3, -1]))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="present"):
        lovasz_softmax(logits, torch.zeros(4, dtype=torch.long), classes="some")


def test_lovasz_decreases_under_gradient_descent():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 3, generator=gen, requires_grad=True)
    target = torch.randint(0, 3, (40,), generator=gen)
    opt = torch.optim.SGD([logits], lr=20.0)  # per-point gradients are O(1/N)
    first = None
    for _ in range(30):
        loss = lovasz_softmax(logits, target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lovasz_softmax(logits, target).item() < 0.2 * first
    assert not math.isnan(first)
