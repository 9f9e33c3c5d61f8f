"""The op table: one entry per op, gradients placed at the declared inputs, forward preparations
that leave the model alone, layout facts that layer discovery reads, and the AveragePool divisor
computed from the ONNX semantics, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper

from gap_service import Explainer
from gap_service.errors import UnsupportedOpError
from gap_service.graph.builder import GradBuilder
from gap_service.graph.layers import ELEMENTWISE, NCHW_OPS, NOT_A_LAYER, PASS_THROUGH_AFTER_SOFTMAX
from gap_service.graph.rules import OPS, Layout, entry, input_grads, merge
from gap_service.graph.rules._geometry import explicit_pads
from gap_service.graph.rules.pool import counted_taps, inverse_divisor
from gap_service.graph.rules.table import inputs, unary, variadic


def _model(text: str, shape: tuple[int, ...], opset: int = 17, constants: dict | None = None) -> onnx.ModelProto:
    graph = onnx.parser.parse_graph(f"g (float{list(shape)} x) => (float y) {{ {text} }}")
    graph.initializer.extend(onnx.numpy_helper.from_array(v, name=k) for k, v in (constants or {}).items())
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_an_op_with_two_entries_is_refused() -> None:
    first = {"Relu": unary(lambda b, n, g: [g[0]])}
    with pytest.raises(ValueError, match="Relu"):
        merge([first, {"Relu": unary(lambda b, n, g: [g[0]])}])


@pytest.mark.parametrize("op, facts", [
    ("Conv", Layout.NCHW), ("MaxPool", Layout.NCHW | Layout.POOLING), ("GlobalAveragePool", Layout.NCHW),
    ("Relu", Layout.ELEMENTWISE), ("Add", Layout.ELEMENTWISE), ("Transpose", Layout.COPY),
    ("Reshape", Layout.COPY | Layout.SAME_ORDER), ("Identity", Layout.COPY | Layout.SAME_ORDER | Layout.ELEMENTWISE),
    ("Softmax", Layout.NONE), ("Concat", Layout.NONE),
])
def test_layout_facts_are_stated_once_and_read_by_layer_discovery(op: str, facts: Layout) -> None:
    assert entry(op).layout == facts
    assert (op in NCHW_OPS, op in ELEMENTWISE, op in PASS_THROUGH_AFTER_SOFTMAX) == \
        (Layout.NCHW in facts, Layout.ELEMENTWISE in facts, Layout.SAME_ORDER in facts)
    assert (op in NOT_A_LAYER) == bool(facts & (Layout.COPY | Layout.POOLING))


def test_every_entry_is_a_rule_a_declared_gap_or_not_differentiable() -> None:
    for op, e in OPS.items():
        assert e.rule is None or e.carries_gradient, op
        if e.differentiable:
            assert list(e.differentiable) == sorted(set(e.differentiable)), op
    assert not entry("Shape").carries_gradient and entry("Shape").has_rule
    assert not entry("LpPool").has_rule and Layout.POOLING in entry("LpPool").layout
    assert not entry("NoSuchOp").has_rule


def _builder_and_node(op: str, n_inputs: int) -> tuple[GradBuilder, gs.Node]:
    graph = gs.Graph(opset=17)
    ins = [gs.Variable(f"i{k}", np.float32, [1, 2]) for k in range(n_inputs)]
    node = gs.Node(op, inputs=ins, outputs=[gs.Variable("o", np.float32, [1, 2])])
    graph.nodes.append(node)
    return GradBuilder(graph, {t.name: (1, 2) for t in ins}, {t.name for t in ins}), node


def test_gradients_are_placed_at_the_declared_inputs() -> None:
    b, node = _builder_and_node("Gemm", 3)
    seed = gs.Variable("seed", np.float32, ["P", 1, 2])
    placed = input_grads(inputs((0, 2), lambda b, n, g: ["dA", "dC"]), b, node, [seed])
    assert placed == ["dA", None, "dC"]
    b, node = _builder_and_node("Concat", 3)
    assert input_grads(variadic(lambda b, n, g: ["d0", None, "d2"]), b, node, [seed]) == ["d0", None, "d2"]
    b, node = _builder_and_node("Reshape", 2)
    assert input_grads(unary(lambda b, n, g: [g[0]]), b, node, [seed]) == [seed, None]
    with pytest.raises(ValueError):  # a rule that returns a gradient per node input instead
        input_grads(unary(lambda b, n, g: [g[0], None]), b, node, [seed])


def test_max_pool_preparation_changes_the_gradient_graph_not_the_model() -> None:
    model = _model("y = MaxPool <kernel_shape=[2,2], strides=[2,2], storage_order=1> (x)", (1, 2, 6, 6))
    explainer = Explainer(model)
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    seeds = np.random.default_rng(1).standard_normal((3, 1, 2, 3, 3)).astype(np.float32)
    grads = explainer.vjp(x, "y", "x", seeds)
    compiled = explainer.compiled()
    (pool,) = compiled.cone("y", "x").nodes
    assert len(pool.outputs) == 1 and pool.attrs["storage_order"] == 1
    windows = x.reshape(1, 2, 3, 2, 3, 2)
    winners = windows == windows.max(axis=(3, 5), keepdims=True)
    expected = (winners * seeds.reshape(3, 1, 2, 3, 1, 3, 1)).reshape(3, 1, 2, 6, 6)
    np.testing.assert_array_equal(grads, expected)


def test_a_known_op_without_a_rule_is_unsupported_on_the_path() -> None:
    constants = {"s": np.ones(3, np.float32), "b": np.zeros(3, np.float32)}
    model = _model("a = InstanceNormalization (x, s, b)\ny = Sin (a)", (1, 3, 4, 4), constants=constants)
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    with pytest.raises(UnsupportedOpError) as info:
        Explainer(model).vjp(np.ones((1, 3, 4, 4), np.float32), "y", "x", np.ones((1, 1, 3, 4, 4), np.float32))
    assert info.value.ops == [("InstanceNormalization", "n0"), ("Sin", "n1")]


# (attributes, input spatial shape, opset): pads, ceil_mode windows past the end pad, both
# count_include_pad modes, SAME padding, dilations (opset 19).
POOLS = [
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 0}, (8, 8), 17),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1}, (8, 8), 17),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}, (9, 9), 17),
    ({"kernel_shape": [3, 2], "strides": [3, 1], "pads": [2, 0, 1, 1], "ceil_mode": 1, "count_include_pad": 1}, (10, 7), 17),
    ({"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (7, 7), 17),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER", "count_include_pad": 1}, (7, 6), 17),
    ({"kernel_shape": [3, 3], "strides": [1, 2], "dilations": [2, 1], "pads": [2, 1, 2, 1], "count_include_pad": 0}, (9, 8), 19),
    ({"kernel_shape": [2, 3], "strides": [2, 2], "dilations": [2, 2], "pads": [1, 2, 1, 2], "ceil_mode": 1, "count_include_pad": 1}, (9, 9), 19),
]


@pytest.mark.parametrize("attrs, spatial, opset", POOLS, ids=[str(i) for i in range(len(POOLS))])
def test_average_pool_divisor_matches_onnxruntime(attrs: dict, spatial: tuple[int, int], opset: int) -> None:
    """Pooling a ones image gives count(o) / div(o), count(o) being the real inputs in the window."""
    node = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, *spatial])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    pooled = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": np.ones((1, 1, *spatial), np.float32)})[0][0, 0]
    kernel, strides = attrs["kernel_shape"], attrs["strides"]
    dilations = attrs.get("dilations", [1, 1])
    begins, ends = explicit_pads(attrs, list(spatial), kernel, strides, dilations)
    include_pad = bool(attrs.get("count_include_pad", 0))
    inverse = inverse_divisor(list(spatial), list(pooled.shape), kernel, strides, dilations, begins, ends, include_pad)
    axes = zip(spatial, pooled.shape, kernel, strides, dilations, begins, ends)
    real = np.multiply.outer(*[counted_taps(*axis, include_pad=False) for axis in axes])
    np.testing.assert_allclose(real * inverse, pooled, rtol=1e-6)
