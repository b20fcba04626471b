"""Box utilities, exact oriented 3D IoU, rotated NMS and detection AP against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.detection import (as_boxes, batched_nms_3d, bev_intersection_area, box_corners, canonical_boxes, iou_3d,
                             nms_3d, paired_iou_3d, points_in_boxes, transform_boxes)
from training.detect.metrics import DetectionEvaluator, voc_ap


def cube(x=0.0, y=0.0, z=0.0, size=1.0, yaw=0.0, height=None):
    return [x, y, z, size, size, size if height is None else height, yaw]


# ------------------------------------------------------------------------------------------ boxes


def test_corners_follow_the_convention():
    # A 2 x 1 x 0.5 box at (1, 2, 3) turned by +90°: its own x axis points along world +y.
    corners = box_corners([[1, 2, 3, 2, 1, 0.5, math.pi / 2]])[0]
    # Corner 0 is the box's (+x, +y, bottom) corner: local (1, 0.5, -0.25) -> world (1 - 0.5, 2 + 1, 3 - 0.25).
    np.testing.assert_allclose(corners[0], [0.5, 3.0, 2.75], atol=1e-12)
    np.testing.assert_allclose(corners[4], [0.5, 3.0, 3.25], atol=1e-12)
    np.testing.assert_allclose(corners.mean(axis=0), [1, 2, 3], atol=1e-12)
    # Bottom face counter-clockwise seen from above: positive signed area (2 x 1 = 2).
    xy = corners[:4, :2]
    signed = 0.5 * sum(xy[i, 0] * xy[(i + 1) % 4, 1] - xy[(i + 1) % 4, 0] * xy[i, 1] for i in range(4))
    assert signed == pytest.approx(2.0)


def test_canonical_boxes_describe_the_same_solid():
    boxes = np.array([[0, 0, 0, 3, 1, 1, math.pi / 2], [0, 0, 0, 3, 1, 1, 0.3 + math.pi], [0, 0, 0, 2, 1, 1, -2.0]])
    canon = canonical_boxes(boxes)
    assert np.all(canon[:, 6] >= -math.pi / 4) and np.all(canon[:, 6] < math.pi / 4)
    np.testing.assert_allclose(canon[0], [0, 0, 0, 1, 3, 1, 0], atol=1e-12)       # a quarter turn swaps dx, dy
    np.testing.assert_allclose(canon[1], [0, 0, 0, 3, 1, 1, 0.3], atol=1e-12)     # a half turn changes nothing
    np.testing.assert_allclose(np.diag(iou_3d(boxes, canon)), 1.0, atol=1e-9)


def test_transform_boxes_moves_boxes_with_their_points():
    rng = np.random.default_rng(0)
    box = np.array([[0.5, -0.2, 0.4, 1.2, 0.6, 0.8, 0.4]])
    local = rng.uniform(-0.5, 0.5, (200, 3)) * box[0, 3:6]                       # points inside the box
    c, s = math.cos(0.4), math.sin(0.4)
    pts = local @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T + box[0, :3]
    yaw, scale = 1.1, 1.3
    for flip_x, flip_y in ((False, False), (True, False), (False, True), (True, True)):
        flip = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
        rot = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
        moved = pts @ (scale * rot @ flip).T + [1.0, 2.0, 0.0]
        moved_box = transform_boxes(box, yaw, scale, flip_x, flip_y, (1.0, 2.0, 0.0))
        assert points_in_boxes(moved, moved_box).all()
        np.testing.assert_allclose(moved_box[0, 3:6], box[0, 3:6] * scale)


def test_invalid_boxes_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="shape"):
        as_boxes(np.zeros((3, 6)))
    with pytest.raises(ValueError, match="positive"):
        as_boxes([[0, 0, 0, 1, 0, 1, 0]])
    with pytest.raises(ValueError, match="NaN"):
        as_boxes([[0, 0, float("nan"), 1, 1, 1, 0]])


# ------------------------------------------------------------------------------------------ IoU


def test_identical_and_disjoint_boxes():
    a = [cube(yaw=0.7), [1, 2, 3, 2, 0.5, 1, -1.2]]
    np.testing.assert_allclose(np.diag(iou_3d(a, a)), [1.0, 1.0], atol=1e-12)
    assert iou_3d([cube()], [cube(x=1.5)])[0, 0] == 0.0                           # apart in x
    assert iou_3d([cube()], [cube(z=1.0)])[0, 0] == 0.0                           # touching faces: no volume
    assert iou_3d([cube()], [cube(z=3.0, yaw=0.3)])[0, 0] == 0.0                  # apart in z


def test_unit_cube_and_its_45_degree_turn():
    # Same centre, one turned 45° about z. The footprint intersection is the unit square minus four corner
    # triangles cut by the turned square's edges |x| + |y| = √2/2. Each triangle has legs 1 - √2/2, so the
    # corners total 4 · (1 - √2/2)² / 2 = 3 - 2√2, and the octagon has area 1 - (3 - 2√2) = 2(√2 - 1) ≈ 0.8284.
    # Full height overlap: IoU = 2(√2-1) / (2 - 2(√2-1)) = (√2-1) / (2-√2) = 1/√2 ≈ 0.7071.
    octagon = 2 * (math.sqrt(2) - 1)
    assert bev_intersection_area([cube()], [cube(yaw=math.pi / 4)])[0] == pytest.approx(octagon, abs=1e-12)
    assert iou_3d([cube()], [cube(yaw=math.pi / 4)])[0, 0] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    # Raise the turned cube by 0.5: heights overlap 0.5, intersection 0.5 · 2(√2-1) = √2 - 1 ≈ 0.4142,
    # union 2 - (√2 - 1) = 3 - √2, IoU = (√2 - 1)/(3 - √2) ≈ 0.2612.
    expected = (math.sqrt(2) - 1) / (3 - math.sqrt(2))
    assert iou_3d([cube()], [cube(z=0.5, yaw=math.pi / 4)])[0, 0] == pytest.approx(expected, abs=1e-12)


def test_partial_overlaps_worked_by_hand():
    # Axis-aligned, shifted 0.5 in x and 0.25 in z: intersection 0.5 · 1 · 0.75 = 0.375, union 2 - 0.375.
    assert iou_3d([cube()], [cube(x=0.5, z=0.25)])[0, 0] == pytest.approx(0.375 / 1.625, abs=1e-12)
    # A 2 x 1 x 1 box and the same box turned 90°: footprint overlap is the 1 x 1 centre square;
    # IoU = 1 / (2 + 2 - 1) = 1/3, even though both describe boxes of equal size.
    assert iou_3d([[0, 0, 0, 2, 1, 1, 0]], [[0, 0, 0, 2, 1, 1, math.pi / 2]])[0, 0] == pytest.approx(1 / 3, abs=1e-12)
    # The same turn written as a size swap is the same solid: IoU 1.
    assert iou_3d([[0, 0, 0, 2, 1, 1, 0]], [[0, 0, 0, 1, 2, 1, math.pi / 2]])[0, 0] == pytest.approx(1.0, abs=1e-12)
    # A unit cube turned 45° and centred on the corner (0.5, 0.5) of the unit cube at the origin: the turned
    # square's vertices lie √2/2 from its centre along the axes, so the overlap is its quarter in the quadrant
    # x <= 0.5, y <= 0.5: the right triangle (0.5, 0.5), (0.5 - √2/2, 0.5), (0.5, 0.5 - √2/2) with legs √2/2,
    # area (√2/2)² / 2 = 1/4. Full height overlap: IoU = 0.25 / (2 - 0.25) = 1/7.
    assert bev_intersection_area([cube()], [cube(x=0.5, y=0.5, yaw=math.pi / 4)])[0] == pytest.approx(0.25)
    assert iou_3d([cube()], [cube(x=0.5, y=0.5, yaw=math.pi / 4)])[0, 0] == pytest.approx(0.25 / 1.75)


def test_iou_matches_monte_carlo_on_random_rotated_boxes():
    rng = np.random.default_rng(1)
    a = np.c_[rng.uniform(0, 0.6, (6, 3)), rng.uniform(0.4, 1.2, (6, 3)), rng.uniform(-3, 3, 6)]
    b = np.c_[rng.uniform(0, 0.6, (6, 3)), rng.uniform(0.4, 1.2, (6, 3)), rng.uniform(-3, 3, 6)]
    exact = paired_iou_3d(a, b)
    pts = rng.uniform(-1, 1.6, (400_000, 3))
    ia, ib = points_in_boxes(pts, a), points_in_boxes(pts, b)
    estimate = (ia & ib).sum(axis=0) / np.maximum((ia | ib).sum(axis=0), 1)
    np.testing.assert_allclose(exact, estimate, atol=0.02)
    assert exact.max() > 0.1                                                       # the case is not trivial


def test_iou_matrix_is_symmetric_and_handles_many_pairs():
    rng = np.random.default_rng(2)
    boxes = np.c_[rng.uniform(0, 3, (100, 3)), rng.uniform(0.2, 1.5, (100, 3)), rng.uniform(-3, 3, 100)]
    m = iou_3d(boxes, boxes)                                                       # 10,000 pairs
    np.testing.assert_allclose(m, m.T, atol=1e-9)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    assert ((m >= 0) & (m <= 1 + 1e-12)).all()


# ------------------------------------------------------------------------------------------ NMS


def test_nms_keeps_the_right_boxes():
    boxes = np.array([cube(), cube(x=0.1), cube(x=3.0), cube(x=0.05, yaw=math.pi / 4), cube(x=0.6)])
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.5])
    # Score order: 3 (0.95), 0 (0.9), 1 (0.8), 2 (0.7), 4 (0.5). The turned cube 3 overlaps 0 and 1 with
    # IoU 0.70 each (> 0.5: both go), cube 2 is far away (kept), cube 4 overlaps 3 with IoU 0.26 (kept).
    keep = nms_3d(boxes, scores, 0.5)
    assert keep.tolist() == [3, 2, 4]
    assert iou_3d(boxes[[3]], boxes[[4]])[0, 0] < 0.5
    # At 0.8 only the pair (0, 1) overlaps more: shifted by 0.1, IoU = 0.9 / 1.1 ≈ 0.818, so 1 goes.
    assert nms_3d(boxes, scores, 0.8).tolist() == [3, 0, 2, 4]


def test_batched_nms_never_suppresses_across_classes():
    boxes = np.array([cube(), cube(x=0.05), cube(x=0.05)])
    scores = np.array([0.9, 0.8, 0.7])
    labels = np.array([0, 1, 0])
    assert batched_nms_3d(boxes, scores, labels, 0.25).tolist() == [0, 1]
    assert batched_nms_3d(np.zeros((0, 7)), np.zeros(0), np.zeros(0), 0.25).tolist() == []


# ------------------------------------------------------------------------------------------ AP


def test_voc_ap_of_a_hand_built_ranking():
    # 3 ground-truth boxes of one class in two scenes; 5 predictions ranked by score:
    #   rank 1 TP, rank 2 FP (no overlap), rank 3 TP, rank 4 FP (duplicate of an already matched box), rank 5 TP.
    # precision 1, 1/2, 2/3, 2/4, 3/5; recall 1/3, 1/3, 2/3, 2/3, 1.
    # All-point interpolation: recall steps 0→1/3 at precision max(1, ...) = 1, 1/3→2/3 at max(2/3, 1/2, 3/5) = 2/3,
    # 2/3→1 at 3/5. AP = 1/3 · 1 + 1/3 · 2/3 + 1/3 · 3/5 = (15 + 10 + 9) / 45 = 34/45 ≈ 0.7556.
    gt_a = np.array([cube(), cube(x=5)])
    gt_b = np.array([cube(y=3)])
    ev = DetectionEvaluator(["chair", "table"])
    ev.add(np.array([cube(x=0.05), cube(x=10), cube(x=5.1), cube(x=0.1)]), np.array([0.9, 0.8, 0.7, 0.6]),
           np.zeros(4, int), gt_a, np.zeros(2, int))
    ev.add(np.array([cube(y=3.05)]), np.array([0.5]), np.zeros(1, int), gt_b, np.zeros(1, int))
    metrics = ev.evaluate((0.25, 0.5))
    assert metrics.ap(0.25)[0] == pytest.approx(34 / 45)
    assert math.isnan(metrics.ap(0.25)[1])                          # no table in the ground truth
    assert metrics.map(0.25) == pytest.approx(34 / 45)              # NaN classes are left out of the mean
    assert metrics.recall(0.25) == pytest.approx(1.0)
    assert metrics.recall(0.25, min_score=0.65) == pytest.approx(2 / 3)
    assert voc_ap(np.array([1 / 3, 1 / 3, 2 / 3, 2 / 3, 1]), np.array([1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])) == \
        pytest.approx(34 / 45)


def test_ap_respects_class_scene_and_threshold():
    gt = np.array([cube()])
    ev = DetectionEvaluator(["chair", "table"])
    # Right place, wrong class: no true positive for chair; a table FP.
    ev.add(np.array([cube()]), np.array([0.9]), np.array([1]), gt, np.array([0]))
    # A box shifted 0.5 (IoU 1/3): a hit at 0.25, a miss at 0.5.
    ev.add(np.array([cube(x=0.5)]), np.array([0.8]), np.array([0]), gt, np.array([0]))
    m = ev.evaluate((0.25, 0.5))
    # chair: 2 GT (one per scene), ranking [TP] at 0.25 -> precision 1 at recall 1/2: AP = 0.5.
    assert m.ap(0.25)[0] == pytest.approx(0.5)
    assert m.ap(0.5)[0] == pytest.approx(0.0)
    assert "chair" in m.table() and "mAP" in m.table()


def test_evaluator_rejects_bad_input():
    ev = DetectionEvaluator(["chair"])
    with pytest.raises(ValueError, match="labels"):
        ev.add(np.array([cube()]), np.array([0.9]), np.array([3]), np.zeros((0, 7)), np.zeros(0, int))
    with pytest.raises(ValueError, match="scores"):
        ev.add(np.array([cube()]), np.array([0.9, 0.1]), np.array([0]), np.zeros((0, 7)), np.zeros(0, int))


def test_decode_keeps_boxes_finite_when_the_head_predicts_absurd_sizes():
    """An undertrained head can emit huge log-sizes; exp must not overflow into inf boxes."""
    from model.detection.head import DecodeConfig
    from model.detection.postprocess import decode

    n = 64
    positions = np.random.default_rng(0).uniform(0, 1, (n, 3))
    outputs = {"objectness": np.full(n, 5.0), "offset": np.zeros((n, 3)), "log_size": np.full((n, 3), 900.0),
               "yaw": np.tile([0.0, 1.0], (n, 1)), "class_logits": np.zeros((n, 4))}
    boxes = decode(positions, outputs, DecodeConfig(), score_threshold=0.0)
    assert len(boxes.boxes) > 0 and np.isfinite(boxes.boxes).all()
    assert boxes.boxes[:, 3:6].max() <= 50.0
