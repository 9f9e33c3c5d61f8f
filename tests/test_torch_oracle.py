"""Tests of the PyTorch-autograd oracle (:mod:`support.torch_oracle`).

Forward passes are compared with onnxruntime (float32) on tiny single-op graphs over
many opsets/attribute combinations, and on the ONNX model-zoo "light" graphs and the
PaddleOCR models of ``rapidocr_onnxruntime``.  VJPs are checked against central finite
differences of the oracle itself in float64.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from support.torch_oracle import TorchGraph  # tests/ is on sys.path (tests/conftest.py)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def rand(*shape: int, seed: int = 0, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def i64(values: Sequence[int] | int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def f32(values: Sequence[float] | float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    feeds: dict[str, np.ndarray],
    outputs: Sequence[str],
    opset: int,
    inits: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A single-graph model; graph inputs typed from ``feeds``, output types inferred."""
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info(k, _NP_TO_ONNX[v.dtype], v.shape) for k, v in feeds.items()],
        [helper.make_value_info(name, onnx.TypeProto()) for name in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(graph, opset_imports=[opset_id], ir_version=helper.find_min_ir_version_for([opset_id]))
    return onnx.shape_inference.infer_shapes(model)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """One intra-op thread: the tiny graphs gain nothing from more, and OpenMP thread pools
    slow down by orders of magnitude when the (2-core) machine is shared with other jobs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_close(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-5, atol: float = 1e-5, name: str = "") -> None:
    """Float32-level agreement; tolerances are relative to the reference's magnitude."""
    ref = np.asarray(ref)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    if ref.dtype.kind in "biu":
        assert got.dtype.kind == ref.dtype.kind or (got.dtype.kind in "iu" and ref.dtype.kind in "iu"), name
        np.testing.assert_array_equal(got, ref, err_msg=name)
        return
    assert got.dtype == np.float64, name
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * scale, err_msg=name)


def check(
    nodes: Sequence[onnx.NodeProto] | onnx.NodeProto,
    feeds: dict[str, np.ndarray],
    outputs: Sequence[str] = ("y",),
    opset: int = 13,
    inits: dict[str, np.ndarray] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> dict[str, np.ndarray]:
    """Build a model, run onnxruntime and the oracle, assert they agree; return the oracle's outputs."""
    if isinstance(nodes, onnx.NodeProto):
        nodes = [nodes]
    model = make_model(nodes, feeds, outputs, opset, inits)
    refs = ort_run(model, feeds)
    got = TorchGraph(model).run(feeds)
    for name, ref in zip(outputs, refs):
        assert_close(got[name], ref, rtol, atol, name)
    return got


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str] = ("y",), **attrs) -> onnx.NodeProto:
    return helper.make_node(op_type, list(inputs), list(outputs), name=f"{op_type}_0", **attrs)


# --------------------------------------------------------------------------------------
# Convolutions and dense layers
# --------------------------------------------------------------------------------------


def _conv_cases() -> list[tuple]:
    cases = []
    for dims in (1, 2):
        for stride, dilation, group in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 2), (1, 1, "dw"), (2, 1, "dw")]:
            for pad in ("zero", "sym", "asym", "SAME_UPPER", "SAME_LOWER", "VALID"):
                if dilation > 1 and pad.startswith("SAME"):
                    continue  # onnxruntime: "Dilation not supported for AutoPadType::SAME_*"
                cases.append((dims, stride, dilation, group, pad))
    return cases


@pytest.mark.parametrize("dims,stride,dilation,group,pad", _conv_cases())
def test_conv(dims: int, stride: int, dilation: int, group: int | str, pad: str) -> None:
    channels = 4
    groups = channels if group == "dw" else group
    out_channels = 8 if group != "dw" else 4
    kernel = [3, 2][:dims] if dims == 2 else [3]
    spatial = [9, 10][:dims] if dims == 2 else [11]
    attrs: dict = {"strides": [stride] * dims, "dilations": [dilation] * dims, "group": groups}
    if pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        attrs["auto_pad"] = pad
    else:
        asym = [1, 0, 2, 1] if dims == 2 else [2, 0]
        attrs["pads"] = {"zero": [0] * 2 * dims, "sym": [1] * 2 * dims, "asym": asym}[pad]
    if dims == 2 and stride == 1:
        attrs["kernel_shape"] = kernel
    inits = {"w": rand(out_channels, channels // groups, *kernel, seed=1), "b": rand(out_channels, seed=2)}
    feeds = {"x": rand(2, channels, *spatial)}
    check(node("Conv", ["x", "w", "b"], **attrs), feeds, opset=11 if stride == 1 else 9, inits=inits)


@pytest.mark.parametrize(
    "dims,attrs",
    [
        (2, {}),
        (2, {"strides": [2, 2]}),
        (2, {"strides": [2, 3], "pads": [1, 0, 1, 2]}),
        (2, {"strides": [2, 2], "output_padding": [1, 0]}),
        (2, {"strides": [3, 2], "output_padding": [2, 1], "pads": [1, 1, 0, 0]}),
        (2, {"strides": [2, 2], "dilations": [2, 1]}),
        (2, {"strides": [2, 2], "dilations": [2, 2], "output_padding": [1, 1]}),
        (2, {"group": 2, "strides": [2, 1]}),
        (2, {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        (2, {"strides": [2, 2], "output_shape": [12, 13]}),
        (2, {"strides": [2, 2], "output_shape": [12, 15]}),
        (2, {"strides": [2, 2], "output_shape": [12, 15], "auto_pad": "SAME_UPPER"}),
        (2, {"strides": [2, 2], "output_shape": [12, 15], "auto_pad": "SAME_LOWER"}),
        (2, {"strides": [2, 2], "output_shape": [10, 12]}),
        (2, {"strides": [2, 2], "output_shape": [10, 12], "auto_pad": "SAME_UPPER"}),
        (2, {"strides": [2, 2], "output_shape": [10, 12], "auto_pad": "SAME_LOWER"}),
        (2, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
        (2, {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
        (2, {"strides": [2, 3], "auto_pad": "SAME_UPPER", "dilations": [1, 2]}),
        (2, {"strides": [2, 2], "auto_pad": "VALID"}),
        (1, {"strides": [2], "pads": [1, 2], "output_padding": [1]}),
        (1, {"strides": [3], "output_shape": [20]}),
        (1, {"strides": [2], "auto_pad": "SAME_LOWER", "group": 2}),
    ],
)
@pytest.mark.parametrize("opset", [9, 11])
def test_conv_transpose(dims: int, attrs: dict, opset: int) -> None:
    kernel = [3, 4][:dims] if dims == 2 else [3]
    spatial = [5, 6] if dims == 2 else [7]
    group = attrs.get("group", 1)
    inits = {"w": rand(4, 6 // group, *kernel, seed=1), "b": rand(6 // group * group, seed=2)}
    check(node("ConvTranspose", ["x", "w", "b"], **attrs), {"x": rand(2, 4, *spatial)}, opset=opset, inits=inits)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -2.0)])
@pytest.mark.parametrize("c_shape", [None, (), (5,), (1, 5), (3, 1), (3, 5)])
def test_gemm(trans_a: int, trans_b: int, alpha: float, beta: float, c_shape: tuple | None) -> None:
    a = rand(*((4, 3) if trans_a else (3, 4)), seed=1)
    b = rand(*((5, 4) if trans_b else (4, 5)), seed=2)
    inputs = ["a", "b"]
    inits = {"b": b}
    if c_shape is not None:
        inits["c"] = rand(*c_shape, seed=3)
        inputs.append("c")
    n = node("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    check(n, {"a": a}, opset=11 if c_shape is None else 9, inits=inits)


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4,))],
)
def test_matmul(a_shape: tuple, b_shape: tuple) -> None:
    check(node("MatMul", ["a", "b"]), {"a": rand(*a_shape, seed=1), "b": rand(*b_shape, seed=2)})


@pytest.mark.parametrize("opset", [9, 14, 15])
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (2, 3, 4, 5)])
def test_batch_norm(opset: int, shape: tuple) -> None:
    c = shape[1]
    inits = {"s": rand(c, seed=1), "b": rand(c, seed=2), "m": rand(c, seed=3), "v": rand(c, seed=4, low=0.5, high=1.5)}
    bn = node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)
    check(bn, {"x": rand(*shape)}, opset=opset, inits=inits)


# --------------------------------------------------------------------------------------
# Element-wise ops
# --------------------------------------------------------------------------------------

UNARY = [
    ("Relu", {}, 9),
    ("LeakyRelu", {}, 9),
    ("LeakyRelu", {"alpha": 0.3}, 16),
    ("Elu", {"alpha": 0.5}, 9),
    ("Selu", {}, 9),
    ("Selu", {"alpha": 1.5, "gamma": 2.0}, 9),
    ("Sigmoid", {}, 13),
    ("HardSigmoid", {}, 9),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 9),
    ("HardSwish", {}, 14),
    ("Tanh", {}, 13),
    ("Softplus", {}, 9),
    ("Sqrt", {}, 13),
    ("Neg", {}, 13),
    ("Exp", {}, 13),
    ("Log", {}, 13),
    ("Erf", {}, 13),
    ("Abs", {}, 13),
    ("Floor", {}, 13),
    ("Ceil", {}, 13),
    ("Reciprocal", {}, 13),
    ("Sin", {}, 9),
    ("Cos", {}, 9),
    ("Sign", {}, 13),
    ("Identity", {}, 9),
    ("Identity", {}, 21),
    ("Dropout", {"ratio": 0.3}, 9),
    ("Dropout", {}, 13),
]


@pytest.mark.parametrize("op,attrs,opset", UNARY)
def test_unary(op: str, attrs: dict, opset: int) -> None:
    x = rand(2, 3, 4, 5, low=-4, high=4)
    if op in ("Sqrt", "Log", "Reciprocal"):
        x = np.abs(x) + 0.1
    check(node(op, ["x"], **attrs), {"x": x}, opset=opset)


@pytest.mark.parametrize("opset", [9, 10, 12, 13])
def test_dropout_mask(opset: int) -> None:
    check(node("Dropout", ["x"], ["y", "mask"]), {"x": rand(3, 4)}, outputs=["y", "mask"], opset=opset)


@pytest.mark.parametrize("slope_shape", [(1,), (3, 1, 1), (1, 3, 1, 1), (5,), (4, 5)])
@pytest.mark.parametrize("opset", [9, 16])
def test_prelu(slope_shape: tuple, opset: int) -> None:
    check(node("PRelu", ["x", "s"]), {"x": rand(2, 3, 4, 5)}, opset=opset, inits={"s": rand(*slope_shape, seed=1)})


@pytest.mark.parametrize(
    "opset,attrs,bounds",
    [
        (9, {}, None),
        (9, {"min": -0.5}, None),
        (9, {"max": 0.25}, None),
        (9, {"min": -0.5, "max": 0.25}, None),
        (11, {}, (-0.5, 0.5)),
        (11, {}, (None, 0.5)),
        (13, {}, (-0.5, None)),
        (13, {}, (None, None)),
        (13, {}, (0.5, -0.5)),  # min > max: everything becomes max
    ],
)
def test_clip(opset: int, attrs: dict, bounds: tuple | None) -> None:
    inputs, inits = ["x"], {}
    if bounds is not None:
        for name, value in zip(("lo", "hi"), bounds):
            if value is None:
                inputs.append("")
            else:
                inputs.append(name)
                inits[name] = f32(value)
    check(node("Clip", inputs, **attrs), {"x": rand(3, 4, 5)}, opset=opset, inits=inits)


BROADCAST_SHAPES = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (2, 3)), ((), (2, 3))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"])
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES)
def test_binary_broadcast(op: str, shapes: tuple) -> None:
    a = rand(*shapes[0], seed=1, low=0.5, high=2.0) if op == "Pow" else rand(*shapes[0], seed=1)
    b = rand(*shapes[1], seed=2, low=0.5, high=1.5) if op == "Div" else rand(*shapes[1], seed=2)
    check(node(op, ["a", "b"]), {"a": a, "b": b})


@pytest.mark.parametrize("op", ["Max", "Min", "Sum", "Mean"])
@pytest.mark.parametrize("opset", [9, 13])
def test_variadic(op: str, opset: int) -> None:
    feeds = {"a": rand(2, 3, 4, seed=1), "b": rand(3, 1, seed=2), "c": rand(4, seed=3)}
    check(node(op, ["a", "b", "c"]), feeds, opset=opset)
    check(node(op, ["a"]), {"a": feeds["a"]}, opset=opset)


@pytest.mark.parametrize("op", ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_comparison(op: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-2, 3, (2, 3, 4)).astype(dtype)
    b = rng.integers(-2, 3, (3, 1)).astype(dtype)
    check(node(op, ["a", "b"]), {"a": a, "b": b}, opset=16)


def test_logic_and_where() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 4)) > 0.5, rng.random((4,)) > 0.5
    for op in ("And", "Or", "Xor"):
        check(node(op, ["a", "b"]), {"a": a, "b": b})
    check(node("Not", ["a"]), {"a": a})
    check(node("Where", ["a", "x", "z"]), {"a": a, "x": rand(2, 3, 4), "z": rand(4, seed=1)}, opset=16)
    check(node("Where", ["a", "x", "z"]), {"a": a, "x": i64(np.arange(4)), "z": i64(-1)}, opset=9)


def test_integer_arithmetic() -> None:
    a, b = i64([[7, -7, 9, -9], [5, 3, -2, 0]]), i64([2, 2, -4, 4])
    for op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        check(node(op, ["a", "b"]), {"a": a, "b": b})
    check(node("Pow", ["x", "e"]), {"x": rand(3, 4, low=0.5, high=2), "e": i64([2, 3, 1, 0])}, opset=15)
    check(node("Pow", ["x", "e"]), {"x": rand(3, 4), "e": f32([2.0, 3.0, 1.0, 0.0])}, opset=9)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [9, 11, 13])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1])
def test_softmax(op: str, opset: int, axis: int | None) -> None:
    attrs = {} if axis is None else {"axis": axis}
    check(node(op, ["x"], **attrs), {"x": rand(2, 3, 4, 5, low=-3, high=3)}, opset=opset)


# --------------------------------------------------------------------------------------
# Pooling and normalisation
# --------------------------------------------------------------------------------------


def _pool_cases() -> list[tuple]:
    cases = []
    for kernel, strides in [([3, 3], [1, 1]), ([2, 2], [2, 2]), ([3, 2], [2, 3]), ([3, 3], [2, 2])]:
        for pads in ([0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 1], [0, 2, 2, 0]):
            if max(pads) >= min(kernel):
                continue
            for ceil_mode in (0, 1):
                cases.append(({"kernel_shape": kernel, "strides": strides, "pads": pads, "ceil_mode": ceil_mode}, 12))
    for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        cases.append(({"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": auto_pad}, 10))
        cases.append(({"kernel_shape": [2, 3], "strides": [1, 2], "auto_pad": auto_pad}, 9))
    cases.append(({"kernel_shape": [2, 2], "strides": [4, 4], "pads": [1, 1, 1, 1], "ceil_mode": 1}, 11))
    cases.append(({"kernel_shape": [2, 2], "pads": [0, 0, 1, 1]}, 9))
    return cases


@pytest.mark.parametrize("attrs,opset", _pool_cases())
def test_max_pool(attrs: dict, opset: int) -> None:
    check(node("MaxPool", ["x"], **attrs), {"x": rand(2, 3, 9, 10)}, opset=opset)


@pytest.mark.parametrize(
    "attrs,opset",
    [
        ({"kernel_shape": [3, 3], "dilations": [2, 2]}, 10),
        ({"kernel_shape": [2, 3], "dilations": [2, 1], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, 12),
        ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 12),
        ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1}, 12),
        ({"kernel_shape": [2, 2], "storage_order": 1}, 9),
        ({"kernel_shape": [3, 2], "storage_order": 1, "strides": [2, 2], "pads": [1, 1, 0, 1]}, 12),
    ],
)
def test_max_pool_dilations_and_indices(attrs: dict, opset: int) -> None:
    check(node("MaxPool", ["x"], ["y", "idx"], **attrs), {"x": rand(2, 3, 9, 10)}, outputs=["y", "idx"], opset=opset)


@pytest.mark.parametrize(
    "attrs,spatial",
    [
        ({"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1}, [10]),
        ({"kernel_shape": [2], "dilations": [3]}, [10]),
        ({"kernel_shape": [2, 2, 2], "strides": [2, 2, 2], "pads": [1, 0, 1, 0, 1, 1]}, [5, 6, 4]),
    ],
)
def test_max_pool_1d_3d(attrs: dict, spatial: list[int]) -> None:
    check(node("MaxPool", ["x"], ["y", "idx"], **attrs), {"x": rand(2, 3, *spatial)}, outputs=["y", "idx"], opset=12)


def _avg_pool_cases() -> list[tuple]:
    cases = []
    for kernel, strides in [([3, 3], [1, 1]), ([2, 2], [2, 2]), ([3, 2], [2, 3])]:
        for pads in ([0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 1]):
            for ceil_mode in (0, 1):
                for cip in (0, 1):
                    cases.append(
                        ({"kernel_shape": kernel, "strides": strides, "pads": pads, "ceil_mode": ceil_mode,
                          "count_include_pad": cip}, 11)
                    )
    for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        for cip in (0, 1):
            cases.append(({"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": auto_pad, "count_include_pad": cip}, 9))
    cases += [
        ({"kernel_shape": [2, 2], "strides": [4, 4], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1}, 19),
        ({"kernel_shape": [2, 2], "strides": [4, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1}, 10),
        ({"kernel_shape": [3, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}, 19),
        ({"kernel_shape": [2, 2], "dilations": [2, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, 19),
    ]
    return cases


@pytest.mark.parametrize("attrs,opset", _avg_pool_cases())
def test_average_pool(attrs: dict, opset: int) -> None:
    check(node("AveragePool", ["x"], **attrs), {"x": rand(2, 3, 9, 10)}, opset=opset)


@pytest.mark.parametrize("spatial", [[10], [9, 10], [4, 5, 6]])
def test_average_pool_nd_and_global(spatial: list[int]) -> None:
    n = len(spatial)
    attrs = {"kernel_shape": [3] * n, "strides": [2] * n, "pads": [1] * 2 * n, "ceil_mode": 1}
    x = {"x": rand(2, 3, *spatial)}
    check(node("AveragePool", ["x"], **attrs), x, opset=19)
    check(node("GlobalAveragePool", ["x"]), x)
    check(node("GlobalMaxPool", ["x"]), x)


def lrn_reference(x: np.ndarray, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> np.ndarray:
    """The ONNX LRN formula, written as a plain loop over channels."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    channels = x.shape[1]
    for c in range(channels):
        lo, hi = max(0, c - (size - 1) // 2), min(channels - 1, c + -(-(size - 1) // 2))
        square_sum = (x[:, lo : hi + 1] ** 2).sum(axis=1)
        out[:, c] = x[:, c] / (bias + alpha / size * square_sum) ** beta
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_lrn(size: int) -> None:
    attrs = {"size": size} if size != 3 else {"size": 3, "alpha": 0.01, "beta": 0.5, "bias": 2.0}
    x = rand(2, 7, 3, 4, low=-3, high=3)
    if size % 2:
        check(node("LRN", ["x"], **attrs), {"x": x})
    else:  # onnxruntime only accepts odd sizes: compare with the formula instead
        model = make_model([node("LRN", ["x"], **attrs)], {"x": x}, ["y"], 13)
        expected = lrn_reference(x, **attrs)
        np.testing.assert_allclose(TorchGraph(model).run({"x": x})["y"], expected, rtol=1e-12)
    np.testing.assert_allclose(
        TorchGraph(make_model([node("LRN", ["x"], size=size, alpha=0.5)], {"x": x}, ["y"], 9)).run({"x": x})["y"],
        lrn_reference(x, size, alpha=0.5),
        rtol=1e-12,
    )


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd"])
@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("axes", [None, [1], [-1, 0]])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce(op: str, opset: int, axes: list[int] | None, keepdims: int) -> None:
    as_input = opset >= (13 if op == "ReduceSum" else 18)
    inputs, inits, attrs = ["x"], {}, {"keepdims": keepdims}
    if axes is not None:
        if as_input:
            inputs.append("axes")
            inits["axes"] = i64(axes)
        else:
            attrs["axes"] = axes
    check(node(op, inputs, **attrs), {"x": rand(2, 3, 4, low=0.5, high=1.5)}, opset=opset, inits=inits)


@pytest.mark.parametrize("op,opset", [("ReduceSum", 13), ("ReduceMean", 18), ("ReduceMax", 18)])
def test_reduce_noop_with_empty_axes(op: str, opset: int) -> None:
    x = {"x": rand(2, 3, 4)}
    check(node(op, ["x"], noop_with_empty_axes=1), x, opset=opset)
    check(node(op, ["x", "axes"], noop_with_empty_axes=1), x, opset=opset, inits={"axes": i64([])})


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("attrs", [{}, {"axis": 1, "keepdims": 0}, {"axis": -1, "select_last_index": 1}])
def test_arg_max(op: str, attrs: dict) -> None:
    x = np.random.default_rng(0).integers(0, 3, (3, 4, 5)).astype(np.float32)  # many ties
    check(node(op, ["x"], **attrs), {"x": x}, opset=13)


# --------------------------------------------------------------------------------------
# Shape manipulation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
@pytest.mark.parametrize("opset", [9, 13])
def test_flatten(axis: int, opset: int) -> None:
    if axis < 0 and opset < 11:
        pytest.skip("negative axis needs opset 11")
    check(node("Flatten", ["x"], axis=axis), {"x": rand(2, 3, 4, 5)}, opset=opset)


@pytest.mark.parametrize(
    "shape,allowzero,opset",
    [([6, 20], 0, 9), ([0, -1], 0, 13), ([2, 0, 4, 5], 0, 13), ([-1], 0, 14), ([3, 0, 4], 1, 14), ([2, 3, 2, 10], 1, 14)],
)
def test_reshape(shape: list[int], allowzero: int, opset: int) -> None:
    attrs = {"allowzero": allowzero} if opset >= 14 else {}
    x = rand(2, 3, 4, 5)
    if allowzero and 0 in shape:
        x = rand(0, 3, 4)
    check(node("Reshape", ["x", "s"], **attrs), {"x": x}, opset=opset, inits={"s": i64(shape)})


@pytest.mark.parametrize("perm", [None, [0, 2, 1, 3], [3, 1, 0, 2]])
def test_transpose(perm: list[int] | None) -> None:
    attrs = {} if perm is None else {"perm": perm}
    check(node("Transpose", ["x"], **attrs), {"x": rand(2, 3, 4, 5)})


@pytest.mark.parametrize("opset", [9, 11, 13, 21])
@pytest.mark.parametrize("axes", [None, [1], [-1, 1]])
def test_squeeze_unsqueeze(opset: int, axes: list[int] | None) -> None:
    if opset < 11 and axes and min(axes) < 0:
        pytest.skip("negative axes need opset 11")
    x = {"x": rand(2, 1, 3, 1)}
    inputs, inits, attrs = ["x"], {}, {}
    if axes is not None:
        if opset >= 13:
            inputs.append("axes")
            inits["axes"] = i64(axes)
        else:
            attrs["axes"] = axes
    check(node("Squeeze", inputs, **attrs), x, opset=opset, inits=inits)
    if axes is not None:
        check(node("Unsqueeze", inputs, **attrs), x, opset=opset, inits=inits)
    un_axes = [0, -1, 3]
    if opset >= 13:
        check(node("Unsqueeze", ["x", "ua"]), x, opset=opset, inits={"ua": i64(un_axes)})
    elif opset >= 11:
        check(node("Unsqueeze", ["x"], axes=un_axes), x, opset=opset)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis: int) -> None:
    shapes = {
        0: [(1, 3, 4), (2, 3, 4), (3, 3, 4)],
        1: [(2, 1, 4), (2, 3, 4), (2, 2, 4)],
        -1: [(2, 3, 1), (2, 3, 4), (2, 3, 2)],
    }
    feeds = {f"x{i}": rand(*s, seed=i) for i, s in enumerate(shapes[axis])}
    check(node("Concat", list(feeds), axis=axis), feeds, opset=11)


@pytest.mark.parametrize(
    "opset,attrs,split,n_out",
    [
        (9, {}, None, 3),
        (11, {"axis": 1, "split": [1, 4, 1]}, None, 3),
        (11, {"axis": -1}, None, 2),
        (13, {"axis": 1}, [2, 4], 2),
        (13, {"axis": 1}, None, 2),
        (18, {"axis": 1, "num_outputs": 4}, None, 4),  # 7 -> parts of ceil(7 / 4) = 2: 2, 2, 2, 1
        (18, {"axis": 2, "num_outputs": 3}, None, 3),  # 4 -> 2, 2, 0
        (18, {"axis": 0}, [1, 2], 2),
    ],
)
def test_split(opset: int, attrs: dict, split: list[int] | None, n_out: int) -> None:
    outputs = [f"y{i}" for i in range(n_out)]
    inputs, inits = ["x"], {}
    if split is not None:
        inputs.append("split")
        inits["split"] = i64(split)
    x = rand(3, 7, 4) if opset >= 18 else rand(6, 6, 4)
    check(node("Split", inputs, outputs, **attrs), {"x": x}, outputs=outputs, opset=opset, inits=inits)


@pytest.mark.parametrize(
    "starts,ends,axes,steps",
    [
        ([1], [3], None, None),
        ([0, 1], [2, -1], [0, 2], None),
        ([-3, 0], [100, 2**62], [1, -1], None),
        ([4], [0], [2], [-1]),
        ([-1, 2**62], [-100, -2**62], [1, 2], [-2, -3]),
        ([0, 5], [10, -8], [0, 2], [2, -2]),
        ([10], [20], [1], None),  # empty after clamping
        ([2, 0], [0, 5], [3, 1], [1, 2]),  # empty (start > end)
    ],
)
@pytest.mark.parametrize("opset", [10, 13])
def test_slice(starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None, opset: int) -> None:
    inits = {"starts": i64(starts), "ends": i64(ends)}
    inputs = ["x", "starts", "ends"]
    if axes is not None or steps is not None:
        inits["axes"] = i64(axes if axes is not None else list(range(len(starts))))
        inputs.append("axes")
    if steps is not None:
        inits["steps"] = i64(steps)
        inputs.append("steps")
    check(node("Slice", inputs), {"x": rand(3, 4, 6, 5)}, opset=opset, inits=inits)


@pytest.mark.parametrize(
    "attrs",
    [
        {"starts": [1], "ends": [3]},
        {"starts": [0, -3], "ends": [2, 1000], "axes": [0, 2]},
        {"starts": [1], "ends": [-1], "axes": [3]},
    ],
)
def test_slice_opset9(attrs: dict) -> None:
    check(node("Slice", ["x"], **attrs), {"x": rand(3, 4, 6, 5)}, opset=9)


@pytest.mark.parametrize(
    "axis,indices",
    [(0, i64(1)), (0, i64([2, 0, -1])), (1, i64([[0, 1], [-2, 3]])), (-1, i64(-2)), (2, i64([[[1]], [[0]]]))],
)
@pytest.mark.parametrize("opset", [9, 13])
def test_gather(axis: int, indices: np.ndarray, opset: int) -> None:
    if opset < 11 and (axis < 0 or (indices < 0).any()):
        pytest.skip("negative axis/indices need opset 11")
    check(node("Gather", ["x", "i"], axis=axis), {"x": rand(3, 4, 5)}, opset=opset, inits={"i": indices})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 2, 1], [0, 1, 0, 3, 0, 0, 2, 0], [0, 0, -1, 1, 0, 0, 1, -2]])
@pytest.mark.parametrize("opset", [9, 11, 13])
def test_pad(mode: str, pads: list[int], opset: int) -> None:
    x = {"x": rand(2, 3, 4, 5)}
    if opset < 11:
        check(node("Pad", ["x"], mode=mode, pads=pads, value=1.5), x, opset=opset)
        return
    inputs, inits = ["x", "pads"], {"pads": i64(pads)}
    if mode == "constant":
        inputs.append("v")
        inits["v"] = f32(-0.75)
    check(node("Pad", inputs, mode=mode), x, opset=opset, inits=inits)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_axes_opset19(mode: str) -> None:
    inits = {"pads": i64([1, 2, 3, 1]), "axes": i64([-1, 1])}
    inputs = ["x", "pads", "", "axes"] if mode != "constant" else ["x", "pads", "v", "axes"]
    if mode == "constant":
        inits["v"] = f32(2.0)
    check(node("Pad", inputs, mode=mode), {"x": rand(2, 3, 4, 5)}, opset=19, inits=inits)
    all_axes = {"pads": i64([0, 1, 2, 3, 0, 0, 1, 2])}
    check(node("Pad", ["x", "pads"], mode=mode), {"x": rand(2, 3, 4, 5)}, opset=19, inits=all_axes)


def test_pad_integer() -> None:
    inits = {"pads": i64([1, 0, 0, 2]), "v": i64(7)}
    check(node("Pad", ["x", "pads", "v"]), {"x": i64(np.arange(12).reshape(3, 4))}, inits=inits)


@pytest.mark.parametrize("shape", [[2, 3, 4, 5], [3, 1, 5], [1, 1, 1, 5], [5]])
@pytest.mark.parametrize("opset", [9, 13])
def test_expand(shape: list[int], opset: int) -> None:
    check(node("Expand", ["x", "s"]), {"x": rand(3, 1, 5)}, opset=opset, inits={"s": i64(shape)})


@pytest.mark.parametrize("repeats", [[1, 1, 1], [2, 1, 3], [1, 3, 2]])
def test_tile(repeats: list[int]) -> None:
    check(node("Tile", ["x", "r"]), {"x": rand(2, 3, 4)}, inits={"r": i64(repeats)})


@pytest.mark.parametrize(
    "attrs,opset",
    [({}, 9), ({}, 15), ({"start": 1}, 15), ({"start": -3, "end": -1}, 15), ({"end": 10}, 15), ({"start": 3, "end": 1}, 19)],
)
def test_shape(attrs: dict, opset: int) -> None:
    check(node("Shape", ["x"], **attrs), {"x": rand(2, 3, 4, 5)}, opset=opset)


def test_size_and_cast() -> None:
    x = rand(2, 3, 4, low=-3, high=3)
    check(node("Size", ["x"]), {"x": x})
    for to in (TensorProto.INT64, TensorProto.INT32, TensorProto.DOUBLE, TensorProto.FLOAT, TensorProto.BOOL):
        check(node("Cast", ["x"], to=to), {"x": x}, opset=9)
    check(node("Cast", ["x"], to=TensorProto.FLOAT), {"x": i64(np.arange(-3, 3))}, opset=13)
    check(node("Cast", ["x"], to=TensorProto.INT64), {"x": np.array([True, False])}, opset=19)


@pytest.mark.parametrize(
    "start,limit,delta",
    [(i64(0), i64(5), i64(1)), (i64(10), i64(-3), i64(-4)), (f32(0.5), f32(3.0), f32(0.3)), (i64(3), i64(3), i64(1))],
)
def test_range(start: np.ndarray, limit: np.ndarray, delta: np.ndarray) -> None:
    check(node("Range", ["a", "b", "c"]), {}, opset=11, inits={"a": start, "b": limit, "c": delta})


def test_constants() -> None:
    value = numpy_helper.from_array(rand(2, 3), "v")
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(f32([1.5, -2.0]), "sv"), numpy_helper.from_array(i64([1, 4]), "si"), [2, 3]
    )
    nodes = [
        node("Constant", [], ["c0"], value=value),
        node("Constant", [], ["c1"], value_float=2.5),
        node("Constant", [], ["c2"], value_floats=[1.0, 2.0, 3.0]),
        node("Constant", [], ["c3"], value_int=3),
        node("Constant", [], ["c4"], value_ints=[2, 3]),
        node("Constant", [], ["c5"], value_float=-1.0),
        node("ConstantOfShape", ["c4"], ["c6"]),
        node("ConstantOfShape", ["c4"], ["c7"], value=numpy_helper.from_array(i64([7]), "v")),
        node("ConstantOfShape", ["c4"], ["c8"], value=numpy_helper.from_array(f32([-1.5]), "v")),
    ]
    for i in range(len(nodes)):
        nodes[i].name = f"n{i}"
    check(nodes, {}, outputs=[f"c{i}" for i in range(9)], opset=13)


def test_sparse_constant() -> None:
    """onnxruntime returns sparse constants as SparseTensor objects: compare with numpy."""
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(f32([1.5, -2.0]), "sv"), numpy_helper.from_array(i64([1, 4]), "si"), [2, 3]
    )
    coo = helper.make_sparse_tensor(
        numpy_helper.from_array(f32([3.0]), "sv"), numpy_helper.from_array(i64([[1, 2]]), "si"), [2, 3]
    )
    nodes = [node("Constant", [], ["a"], sparse_value=sparse), node("Constant", [], ["b"], sparse_value=coo)]
    nodes[1].name = "c"
    out = TorchGraph(make_model(nodes, {}, ["a", "b"], 13)).run({})
    np.testing.assert_array_equal(out["a"], [[0, 1.5, 0], [0, -2.0, 0]])
    np.testing.assert_array_equal(out["b"], [[0, 0, 0], [0, 0, 3.0]])


def test_constant_of_shape_from_input_shape() -> None:
    nodes = [node("Shape", ["x"], ["s"]), node("ConstantOfShape", ["s"], ["z"]), node("Add", ["x", "z"], ["y"])]
    check(nodes, {"x": rand(2, 3)}, opset=9)


# --------------------------------------------------------------------------------------
# Resize / Upsample
# --------------------------------------------------------------------------------------

RESIZE_SCALES = [[1, 1, 2, 2], [1, 1, 1.5, 2.5], [1, 1, 0.6, 0.5], [1, 1, 3, 0.75]]


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", RESIZE_SCALES)
@pytest.mark.parametrize("op,opset", [("Upsample", 9), ("Resize", 10)])
def test_upsample_and_resize10(mode: str, scales: list[float], op: str, opset: int) -> None:
    if op == "Upsample" and min(scales) < 1:
        pytest.skip("Upsample scales must be >= 1")
    check(node(op, ["x", "scales"], mode=mode), {"x": rand(2, 3, 5, 6)}, opset=opset, inits={"scales": f32(scales)})


COORD_MODES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]


def _resize_cases() -> list[tuple]:
    cases = []
    for coord in COORD_MODES:
        for nearest in NEAREST_MODES:
            cases.append(("nearest", coord, nearest))
        if coord != "tf_half_pixel_for_nn":
            cases.append(("linear", coord, None))
            cases.append(("cubic", coord, None))
    return cases


@pytest.mark.parametrize("mode,coord,nearest", _resize_cases())
@pytest.mark.parametrize("scales", RESIZE_SCALES[1:] + [None])
@pytest.mark.parametrize("opset", [11, 13])
def test_resize(mode: str, coord: str, nearest: str | None, scales: list[float] | None, opset: int) -> None:
    attrs = {"mode": mode, "coordinate_transformation_mode": coord}
    if nearest:
        attrs["nearest_mode"] = nearest
    inits = {"roi": f32([])}
    if scales is None:
        inits["scales"] = f32([])
        inits["sizes"] = i64([2, 3, 9, 4])
        inputs = ["x", "roi", "scales", "sizes"]
    else:
        inits["scales"] = f32(scales)
        inputs = ["x", "roi", "scales"]
    if opset >= 13:
        inputs[1] = ""
        inits.pop("roi")
        if scales is None:
            inputs[2] = ""
            inits.pop("scales")
    check(node("Resize", inputs, **attrs), {"x": rand(2, 3, 5, 6, low=-2, high=2)}, opset=opset, inits=inits)


@pytest.mark.parametrize(
    "attrs",
    [
        {"mode": "cubic", "cubic_coeff_a": -0.5},
        {"mode": "cubic", "exclude_outside": 1},
        {"mode": "cubic", "exclude_outside": 1, "coordinate_transformation_mode": "align_corners"},
        {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 3.0},
        {"mode": "nearest", "coordinate_transformation_mode": "tf_crop_and_resize"},
    ],
)
def test_resize_cubic_and_crop(attrs: dict) -> None:
    inits = {"roi": f32([0, 0, -0.2, 0.1, 1, 1, 0.8, 1.3]), "scales": f32([1, 1, 1.6, 0.7])}
    check(node("Resize", ["x", "roi", "scales"], **attrs), {"x": rand(2, 3, 5, 6)}, opset=13, inits=inits)


@pytest.mark.parametrize(
    "attrs,scales,sizes",
    [
        ({"axes": [2, 3]}, [2.0, 0.5], None),
        ({"axes": [-1]}, [1.7], None),
        ({"axes": [2, 3], "mode": "linear"}, None, [7, 4]),
        ({"keep_aspect_ratio_policy": "not_larger", "mode": "linear"}, None, [2, 3, 8, 20]),
        ({"keep_aspect_ratio_policy": "not_smaller"}, None, [2, 3, 8, 20]),
        ({"keep_aspect_ratio_policy": "not_larger", "axes": [3, 2]}, None, [11, 4]),
        ({"coordinate_transformation_mode": "half_pixel_symmetric", "mode": "linear"}, [1, 1, 1.7, 0.6], None),
        ({"coordinate_transformation_mode": "half_pixel_symmetric"}, None, [2, 3, 8, 4]),
    ],
)
@pytest.mark.parametrize("opset", [18, 19])
def test_resize_opset18(attrs: dict, scales: list[float] | None, sizes: list[int] | None, opset: int) -> None:
    if opset == 18 and attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        pytest.skip("half_pixel_symmetric is opset 19")
    if scales is not None:
        inputs, inits = ["x", "", "scales"], {"scales": f32(scales)}
    else:
        inputs, inits = ["x", "", "", "sizes"], {"sizes": i64(sizes)}
    check(node("Resize", inputs, **attrs), {"x": rand(2, 3, 5, 6)}, opset=opset, inits=inits)


# --------------------------------------------------------------------------------------
# Graph-level behaviour
# --------------------------------------------------------------------------------------


def _small_cnn(opset: int = 13) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv/BN/Relu/MaxPool/depthwise conv/AveragePool/Resize/LRN/Gemm/Softmax chain."""
    inits = {
        "w1": rand(6, 3, 3, 3, seed=1),
        "b1": rand(6, seed=2),
        "s": rand(6, seed=3, low=0.5, high=1.5),
        "bb": rand(6, seed=4),
        "m": rand(6, seed=5),
        "v": rand(6, seed=6, low=0.5, high=1.5),
        "w2": rand(6, 1, 3, 3, seed=7),
        "scales": f32([1, 1, 1.5, 1.5]),
        "shape": i64([0, -1]),
        "wf": rand(10, 96, seed=8),
        "bf": rand(10, seed=9),
    }
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["bn"]),
        node("Relu", ["bn"], ["r1"]),
        node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        node("Conv", ["p1", "w2"], ["c2"], group=6, strides=[1, 1], auto_pad="SAME_UPPER"),
        node("LRN", ["c2"], ["n2"], size=3, alpha=0.1),
        node("AveragePool", ["n2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, pads=[0, 0, 1, 1]),
        node("Resize", ["p2", "", "scales"], ["rs"], mode="linear"),
        node("Reshape", ["rs", "shape"], ["flat"]),
        node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
        node("Softmax", ["logits"], ["y"]),
    ]
    for i, n in enumerate(nodes):
        n.name = f"n{i}"
    feeds = {"x": rand(2, 3, 10, 10, seed=10)}
    return make_model(nodes, feeds, ["y"], opset, inits), feeds


def test_small_cnn_forward_and_intermediates() -> None:
    model, feeds = _small_cnn()
    graph = TorchGraph(model)
    out = graph.run(feeds)
    ref = ort_run(model, feeds)[0]
    assert_close(out["y"], ref)
    assert_close(TorchGraph(model, dtype=torch.float32).run(feeds)["y"], ref, rtol=1e-4, atol=1e-5)
    inter = graph.run(feeds, ["p1", "c2", "flat", "w1"])
    assert inter["flat"].shape == (2, 96) and inter["p1"].shape == (2, 6, 5, 5)
    np.testing.assert_array_equal(inter["w1"], model_init(model, "w1").astype(np.float64))
    # Overriding an intermediate tensor replaces its computed value.
    override = graph.run({"x": feeds["x"], "flat": np.zeros((2, 96))}, ["logits"])["logits"]
    np.testing.assert_allclose(override, np.broadcast_to(model_init(model, "bf"), (2, 10)), rtol=1e-7)


def model_init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_initializer_inputs_and_missing_inputs() -> None:
    """Old-style graphs list initializers as inputs: they default to the initializer value."""
    w = rand(3, 3, seed=1)
    graph = helper.make_graph(
        [node("MatMul", ["x", "w"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    x = rand(2, 3)
    tg = TorchGraph(model)
    assert tg.input_names == ["x"]
    np.testing.assert_allclose(tg.run({"x": x})["y"], x.astype(np.float64) @ w.astype(np.float64), rtol=1e-12)
    w2 = rand(3, 3, seed=5)
    np.testing.assert_allclose(tg.run({"x": x, "w": w2})["y"], x.astype(np.float64) @ w2.astype(np.float64), rtol=1e-12)
    with pytest.raises(ValueError, match="missing"):
        tg.run({})


def test_unsupported_op_raises() -> None:
    model = make_model([node("Einsum", ["x"], equation="ij->ji")], {"x": rand(2, 3)}, ["y"], 13)
    with pytest.raises(NotImplementedError, match=r"Einsum.*Einsum_0"):
        TorchGraph(model)


# --------------------------------------------------------------------------------------
# VJP
# --------------------------------------------------------------------------------------


def fd_check(
    graph: TorchGraph, feeds: dict[str, np.ndarray], upper: str, lower: str, n_seeds: int = 3, h: float = 1e-6
) -> None:
    """Compare <vjp(seed), v> with the central difference of <seed, upper> along v."""
    rng = np.random.default_rng(42)
    base = graph.run(feeds, [upper, lower])
    seeds = rng.standard_normal((n_seeds, *base[upper].shape))
    v = rng.standard_normal(base[lower].shape)
    grads = graph.vjp(feeds, upper, lower, seeds)
    assert grads.shape == (n_seeds, *base[lower].shape) and grads.dtype == np.float64

    def f(t: float) -> np.ndarray:
        return graph.run({**feeds, lower: base[lower] + t * v}, [upper])[upper]

    directional = (f(h) - f(-h)) / (2 * h)
    for p in range(n_seeds):
        fd = float(np.sum(seeds[p] * directional))
        ad = float(np.sum(grads[p] * v))
        assert abs(fd - ad) <= 1e-6 * max(1.0, abs(fd)), (p, fd, ad)


@pytest.mark.parametrize(
    "upper,lower", [("y", "x"), ("logits", "c1"), ("y", "p2"), ("c2", "c2"), ("flat", "bn"), ("y", "w1")]
)
def test_vjp_small_cnn(upper: str, lower: str) -> None:
    model, feeds = _small_cnn()
    fd_check(TorchGraph(model), feeds, upper, lower)


VJP_SINGLE_OPS = [
    (node("LRN", ["x"], size=5, alpha=0.5), {}, 13),
    (node("Pad", ["x", "pads"], mode="reflect"), {"pads": i64([0, 0, 1, 2, 0, 1, 2, 0])}, 13),
    (node("Pad", ["x", "pads"], mode="edge"), {"pads": i64([0, 0, 1, 2, 0, 1, 2, 0])}, 13),
    (
        node("Slice", ["x", "a", "b", "c", "d"]),
        {"a": i64([-1, 0]), "b": i64([-100, 4]), "c": i64([3, 2]), "d": i64([-2, 3])},
        13,
    ),
    (node("Gather", ["x", "i"], axis=1), {"i": i64([[2, 0], [-1, 2]])}, 13),
    (node("Resize", ["x", "", "s"], mode="cubic"), {"s": f32([1, 1, 1.5, 0.7])}, 13),
    (node("Resize", ["x", "", "s"], mode="nearest"), {"s": f32([1, 1, 2.0, 1.5])}, 13),
    (
        node("ConvTranspose", ["x", "w"], strides=[2, 2], output_padding=[1, 0], pads=[1, 0, 0, 1]),
        {"w": rand(3, 2, 3, 3, seed=3)},
        13,
    ),
    (node("AveragePool", ["x"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), {}, 19),
    (node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 1], dilations=[1, 2], ceil_mode=1), {}, 12),
    (node("LogSoftmax", ["x"], axis=2), {}, 11),
    (node("HardSwish", ["x"]), {}, 14),
    (node("Softplus", ["x"]), {}, 13),
    (node("Selu", ["x"]), {}, 13),
    (node("Pow", ["x", "e"]), {"e": f32(3.0)}, 13),
    (node("Clip", ["x", "lo", "hi"]), {"lo": f32(-0.5), "hi": f32(0.5)}, 13),
    (node("Expand", ["x", "s"]), {"s": i64([2, 2, 3, 4, 5])}, 13),
    (node("ReduceMax", ["x"], axes=[1, 3]), {}, 13),
    (node("Tile", ["x", "r"]), {"r": i64([1, 2, 1, 2])}, 13),
]


@pytest.mark.parametrize("n,inits,opset", VJP_SINGLE_OPS, ids=lambda v: getattr(v, "op_type", None))
def test_vjp_single_ops(n: onnx.NodeProto, inits: dict, opset: int) -> None:
    feeds = {"x": rand(2, 3, 4, 5, seed=7, low=-2, high=2)}
    model = make_model([n], feeds, ["y"], opset, inits)
    graph = TorchGraph(model)
    assert_close(graph.run(feeds)["y"], ort_run(model, feeds)[0])
    fd_check(graph, feeds, "y", "x")


def test_vjp_batched_matches_loop_and_errors() -> None:
    model, feeds = _small_cnn()
    graph = TorchGraph(model)
    seeds = np.random.default_rng(0).standard_normal((4, 2, 10))
    batched = graph.vjp(feeds, "y", "p1", seeds)
    single = np.stack([graph.vjp(feeds, "y", "p1", seeds[p : p + 1])[0] for p in range(4)])
    np.testing.assert_allclose(batched, single, rtol=1e-12, atol=1e-14)
    assert graph.vjp(feeds, "y", "x", seeds[:0]).shape == (0, 2, 3, 10, 10)
    with pytest.raises(ValueError, match="does not depend"):
        graph.vjp(feeds, "c1", "p1", np.ones((1, 2, 6, 10, 10)))  # p1 is downstream of c1
    with pytest.raises(ValueError, match="does not depend"):
        graph.vjp({**feeds, "p1": graph.run(feeds, ["p1"])["p1"]}, "y", "r1", seeds)  # p1 fed: cut
    with pytest.raises(ValueError, match="shape"):
        graph.vjp(feeds, "y", "x", np.ones((1, 3, 10)))


def test_vjp_loop_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """If vmap cannot batch the backward pass, vjp falls back to a loop over the seeds."""
    model, feeds = _small_cnn()
    graph = TorchGraph(model)
    seeds = np.random.default_rng(1).standard_normal((3, 2, 10))
    expected = graph.vjp(feeds, "y", "c1", seeds)
    original = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("vmap: batching rule not implemented")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    np.testing.assert_allclose(graph.vjp(feeds, "y", "c1", seeds), expected, rtol=1e-12, atol=1e-15)


def test_vjp_parallel_branches_and_shape_only_dependency() -> None:
    nodes = [
        node("Relu", ["x"], ["a"]),
        node("Sigmoid", ["x"], ["b"]),
        node("Mul", ["a", "a"], ["y"]),
        node("Shape", ["b"], ["s"]),
        node("ConstantOfShape", ["s"], ["ones"], value=numpy_helper.from_array(f32([1.0]), "v")),
        node("Add", ["ones", "a"], ["z"]),
    ]
    for i, n in enumerate(nodes):
        n.name = f"n{i}"
    feeds = {"x": rand(2, 3)}
    graph = TorchGraph(make_model(nodes, feeds, ["y", "z"], 13))
    with pytest.raises(ValueError, match="does not depend"):
        graph.vjp(feeds, "y", "b", np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match="does not depend"):
        graph.vjp(feeds, "ones", "b", np.ones((1, 2, 3)))  # only through Shape
    grad = graph.vjp(feeds, "z", "x", np.ones((1, 2, 3)))
    np.testing.assert_allclose(grad[0], (feeds["x"] > 0).astype(np.float64))
    with pytest.raises(ValueError, match="not floating point"):
        graph.vjp(feeds, "ones", "s", np.ones((1, 2, 3)))


# --------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------

ZOO_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
ZOO = sorted(glob.glob(os.path.join(ZOO_DIR, "light_*.onnx")))
SLOW_ZOO = {"light_vgg19.onnx", "light_zfnet512.onnx"}  # large dense layers: > 5 s each


def randomize_zoo_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace weight-producing ConstantOfShape nodes by Constants with seeded random values.

    Conv/Gemm weights: He-normal (std sqrt(2 / fan_in)); BatchNormalization scale and
    variance (and Mul factors): U(0.5, 1.5); biases, means and other tensors: N(0, 0.05).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in graph.node:
        for k, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, k))

    def role(name: str) -> tuple[onnx.NodeProto, int] | None:
        uses = consumers.get(name, [])
        if not uses:
            return None
        n, k = uses[0]
        if n.op_type in ("Unsqueeze", "Reshape") and k == 0:  # BN as Unsqueeze -> Mul/Add
            return role(n.output[0])
        return n, k

    new_nodes = []
    for n in graph.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in inits:
            new_nodes.append(n)
            continue
        shape = [int(d) for d in inits[n.input[0]]]
        use = role(n.output[0])
        op, k = (use[0].op_type, use[1]) if use else ("", -1)
        if op == "Conv" and k == 1:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        elif op == "Gemm" and k == 1:
            trans_b = any(a.name == "transB" and a.i for a in use[0].attribute)
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / shape[1 if trans_b else 0]))
        elif (op == "BatchNormalization" and k in (1, 4)) or op == "Mul":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.05, shape)
        tensor = numpy_helper.from_array(value.astype(np.float32), n.output[0])
        new_nodes.append(helper.make_node("Constant", [], [n.output[0]], name=n.name or n.output[0], value=tensor))
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model


def _compare_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float, atol: float) -> None:
    """Compare all graph outputs plus the inputs of Softmax/Sigmoid nodes (the logits)."""
    extra = [n.input[0] for n in model.graph.node if n.op_type in ("Softmax", "Sigmoid")]
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = [o.name for o in model.graph.output]
    for name in extra:
        if name not in names:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            names.append(name)
    refs = ort_run(model, feeds)
    got = TorchGraph(model).run(feeds, names)
    assert max(float(np.abs(ref).max()) for ref in refs) > 1e-2, "trivial activations"
    for name, ref in zip(names, refs):
        assert_close(got[name], ref, rtol, atol, name)


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW_ZOO else p for p in ZOO],
    ids=[os.path.basename(p)[6:-5] for p in ZOO],
)
def test_model_zoo_forward(path: str) -> None:
    model = randomize_zoo_weights(onnx.load(path))
    graph_inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    (name,) = graph_inputs
    _compare_model(model, {name: rand(1, 3, 224, 224, seed=3)}, rtol=1e-4, atol=1e-4)


def _paddle_models() -> list[str]:
    try:
        import rapidocr_onnxruntime
    except ImportError:  # pragma: no cover
        return []
    return sorted(glob.glob(os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models", "*.onnx")))


PADDLE_SHAPES = {"cls": (1, 3, 48, 192), "det": (1, 3, 64, 64), "rec": (1, 3, 48, 160)}


def _paddle_kind(path: str) -> str:
    """"cls", "det" or "rec" from a rapidocr model file name."""
    return next(k for k in PADDLE_SHAPES if f"_{k}_" in os.path.basename(path))


@pytest.mark.parametrize("path", _paddle_models(), ids=_paddle_kind)
def test_paddle_forward(path: str) -> None:
    kind = _paddle_kind(path)
    model = onnx.load(path)
    _compare_model(model, {"x": rand(*PADDLE_SHAPES[kind], seed=4)}, rtol=1e-4, atol=1e-4)


def test_paddle_cls_vjp() -> None:
    """Finite-difference check of a whole real model (PaddleOCR direction classifier)."""
    paths = [p for p in _paddle_models() if _paddle_kind(p) == "cls"]
    if not paths:
        pytest.skip("rapidocr_onnxruntime not installed")
    model = onnx.load(paths[0])
    graph = TorchGraph(model)
    fd_check(graph, {"x": rand(*PADDLE_SHAPES["cls"], seed=4)}, model.graph.output[0].name, "x", n_seeds=2)
