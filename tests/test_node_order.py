"""`export.node_order`: the file order of an exported graph, so that onnxruntime's default (depth-first) execution
order runs a conv's taps one gather at a time. Checked on small hand-built graphs (where the listing can be read
off), against onnxruntime's numbers, and on a real export (every Gemm's gather listed before the previous tap's
Gemm)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.node_order import order_for_onnxruntime

TAPS, ROWS, C_IN, C_OUT = 4, 50, 3, 5


def _tap_chain_graph() -> onnx.ModelProto:
    """out = sum_k gather(x, idx[:, k]) @ W_k, written as the exporter writes it: gather_k, then
    Gemm(gather_k, W_k, sum_{k-1}), tap by tap."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((C_IN, C_OUT)).astype(np.float32), f"w{k}") for k in range(TAPS)]
    inits += [numpy_helper.from_array(np.array(k, np.int64), f"k{k}") for k in range(TAPS)]
    nodes = []
    for k in range(TAPS):
        nodes.append(helper.make_node("Gather", ["idx", f"k{k}"], [f"col{k}"], axis=1, name=f"col{k}"))
        nodes.append(helper.make_node("Gather", ["x", f"col{k}"], [f"g{k}"], axis=0, name=f"gather{k}"))
        if k == 0:
            nodes.append(helper.make_node("MatMul", ["g0", "w0"], ["s0"], name="sum0"))
        else:
            nodes.append(helper.make_node("Gemm", [f"g{k}", f"w{k}", f"s{k - 1}"], [f"s{k}"], name=f"sum{k}"))
    nodes.append(helper.make_node("Relu", [f"s{TAPS - 1}"], ["out"], name="relu"))
    graph = helper.make_graph(nodes, "taps", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C_IN]),
                                              helper.make_tensor_value_info("idx", TensorProto.INT64, ["m", TAPS])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["m", C_OUT])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node]


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_each_tap_gather_is_listed_before_the_previous_taps_sum():
    model = _tap_chain_graph()
    moved = order_for_onnxruntime(model.graph)
    onnx.checker.check_model(model, full_check=True)  # still a topological listing
    names = _names(model)
    assert moved > 0
    for k in range(1, TAPS):
        assert names.index(f"gather{k}") < names.index(f"sum{k - 1}")
    # the exporter's order otherwise: tap k's gather comes after tap k-2's sum, the sums stay in tap order
    for k in range(2, TAPS):
        assert names.index(f"gather{k}") > names.index(f"sum{k - 2}")
    assert [n for n in names if n.startswith("sum")] == [f"sum{k}" for k in range(TAPS)]


def test_reordering_changes_no_number():
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((ROWS, C_IN)).astype(np.float32),
             "idx": rng.integers(0, ROWS, (ROWS, TAPS)).astype(np.int64)}
    before = _run(_tap_chain_graph(), feeds)
    model = _tap_chain_graph()
    order_for_onnxruntime(model.graph)
    np.testing.assert_array_equal(_run(model, feeds), before)


def test_a_residual_keeps_its_dependency_order():
    """Add(x1, f(x1)): the later input needs the earlier one, so it cannot be listed first; nothing moves."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Neg", ["a"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["y"], name="y")]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert order_for_onnxruntime(model.graph) == 0
    assert _names(model) == ["a", "b", "y"]


def test_a_listing_that_is_not_topological_is_refused():
    nodes = [helper.make_node("Neg", ["a"], ["y"], name="y"), helper.make_node("Relu", ["x"], ["a"], name="a")]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(ValueError, match="topological"):
        order_for_onnxruntime(graph)
    assert [n.name for n in graph.node] == ["y", "a"]


def test_an_export_lists_every_gather_before_the_previous_taps_gemm(tmp_path, monkeypatch):
    """The bundled model's export: each accumulating Gemm's gathered operand comes from a node listed before
    the Gemm that made its accumulator."""
    from export.backends import exported_encoder
    from model.checkpoint import load_checkpoint
    from model.inference import DEFAULT_MODEL_DIR

    monkeypatch.setattr("export.backends.CACHE", tmp_path)
    model = onnx.load(str(exported_encoder(load_checkpoint(DEFAULT_MODEL_DIR))), load_external_data=False)
    nodes = list(model.graph.node)
    position = {name: i for i, node in enumerate(nodes) for name in node.output}
    chained = [n for n in nodes if n.op_type == "Gemm" and len(n.input) == 3 and n.input[2] in position
               and nodes[position[n.input[2]]].op_type in ("Gemm", "MatMul")]
    assert len(chained) > 100
    assert all(position[n.input[0]] < position[n.input[2]] for n in chained)
