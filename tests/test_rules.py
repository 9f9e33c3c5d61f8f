"""Every gradient rule, exactly, on one-op graphs: our VJP vs torch autograd (the oracle).

Each case is a tiny graph from input x to output y; the VJP d<s, y>/dx for P = 3 random seeds
must equal the oracle's to 1e-4 relative. Attribute variants cover strides, pads, auto_pad,
dilations, groups, ceil_mode, count_include_pad and broadcasting.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from gap_service import Explainer
from gradcheck import TOLERANCE, relative_error
from support.torch_oracle import TorchGraph

RNG = np.random.default_rng(0)


def W(*shape: int, positive: bool = False) -> np.ndarray:
    values = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(values) + 0.5 if positive else values


def I(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def F(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# (id, node text, input shape, constants, opset)
CASES = [
    ("conv", "y = Conv <pads=[1,1,1,1]> (x, w)", (1, 4, 8, 8), {"w": W(6, 4, 3, 3)}, 17),
    ("conv_stride2_bias", "y = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w, b)", (1, 4, 9, 9), {"w": W(6, 4, 3, 3), "b": W(6)}, 17),
    ("conv_asym_pads", "y = Conv <strides=[2,1], pads=[0,2,1,0]> (x, w)", (1, 3, 8, 7), {"w": W(5, 3, 3, 2)}, 17),
    ("conv_same_upper", "y = Conv <auto_pad=\"SAME_UPPER\", strides=[2,2]> (x, w)", (1, 3, 8, 8), {"w": W(4, 3, 4, 4)}, 17),
    ("conv_same_lower", "y = Conv <auto_pad=\"SAME_LOWER\"> (x, w)", (1, 3, 7, 7), {"w": W(4, 3, 2, 2)}, 17),
    ("conv_valid", "y = Conv <auto_pad=\"VALID\", strides=[3,3]> (x, w)", (1, 3, 11, 11), {"w": W(4, 3, 3, 3)}, 17),
    ("conv_dilated", "y = Conv <dilations=[2,2], pads=[2,2,2,2]> (x, w)", (1, 3, 9, 9), {"w": W(4, 3, 3, 3)}, 17),
    ("conv_grouped", "y = Conv <group=2, pads=[1,1,1,1]> (x, w)", (1, 4, 6, 6), {"w": W(6, 2, 3, 3)}, 17),
    ("conv_depthwise_s2", "y = Conv <group=4, strides=[2,2], pads=[1,1,1,1]> (x, w)", (1, 4, 8, 8), {"w": W(4, 1, 3, 3)}, 17),
    ("conv_1d", "y = Conv <pads=[1,1]> (x, w)", (1, 3, 10), {"w": W(4, 3, 3)}, 17),
    ("conv_transpose", "y = ConvTranspose <strides=[2,2], pads=[1,1,1,1], output_padding=[1,1]> (x, w)", (1, 4, 5, 5), {"w": W(4, 3, 3, 3)}, 17),
    ("conv_transpose_grouped", "y = ConvTranspose <group=2, strides=[2,2]> (x, w, b)", (1, 4, 4, 4), {"w": W(4, 2, 2, 2), "b": W(4)}, 17),
    ("gemm", "y = Gemm <transB=1, alpha=0.5, beta=2.0> (x, w, b)", (1, 6), {"w": W(4, 6), "b": W(4)}, 17),
    ("gemm_no_trans", "y = Gemm (x, w)", (1, 6), {"w": W(6, 4)}, 17),
    ("matmul", "y = MatMul (x, w)", (1, 3, 4), {"w": W(4, 5)}, 17),
    ("matmul_both_paths", "t = Transpose <perm=[0,2,1]> (x)\ny = MatMul (x, t)", (1, 3, 4), {}, 17),
    ("batchnorm", "y = BatchNormalization <epsilon=0.001> (x, s, b, m, v)", (1, 4, 5, 5),
     {"s": W(4), "b": W(4), "m": W(4), "v": W(4, positive=True)}, 17),
    ("relu", "y = Relu (x)", (1, 3, 5, 5), {}, 17),
    ("leaky_relu", "y = LeakyRelu <alpha=0.2> (x)", (1, 3, 5, 5), {}, 17),
    ("prelu", "y = PRelu (x, a)", (1, 3, 5, 5), {"a": W(3, 1, 1)}, 17),
    ("elu", "y = Elu <alpha=0.7> (x)", (1, 3, 5, 5), {}, 17),
    ("selu", "y = Selu (x)", (1, 3, 5, 5), {}, 17),
    ("clip_relu6", "y = Clip (x, lo, hi)", (1, 3, 5, 5), {"lo": F(0.0)[0], "hi": F(0.6)[0]}, 17),
    ("clip_min_only", "y = Clip (x, lo)", (1, 3, 5, 5), {"lo": F(-0.3)[0]}, 17),
    ("sigmoid", "y = Sigmoid (x)", (1, 3, 5, 5), {}, 17),
    ("hard_sigmoid", "y = HardSigmoid <alpha=0.3, beta=0.4> (x)", (1, 3, 5, 5), {}, 17),
    ("hard_swish", "z = Mul (x, k)\ny = HardSwish (z)", (1, 3, 5, 5), {"k": F(4.0)[0]}, 17),
    ("tanh", "y = Tanh (x)", (1, 3, 5, 5), {}, 17),
    ("softplus", "y = Softplus (x)", (1, 3, 5, 5), {}, 17),
    ("mish", "y = Mish (x)", (1, 3, 5, 5), {}, 18),
    ("gelu", "y = Gelu (x)", (1, 3, 5, 5), {}, 20),
    ("gelu_tanh", "y = Gelu <approximate=\"tanh\"> (x)", (1, 3, 5, 5), {}, 20),
    ("add_broadcast", "y = Add (x, b)", (1, 3, 4, 4), {"b": W(3, 1, 1)}, 17),
    ("sub_both", "r = Relu (x)\ny = Sub (r, x)", (1, 3, 4, 4), {}, 17),
    ("mul_se_broadcast", "p = GlobalAveragePool (x)\ns = Sigmoid (p)\ny = Mul (x, s)", (1, 3, 4, 4), {}, 17),
    ("div_both", "d = Add (e, one)\ne = Exp (x)\ny = Div (x, d)", (1, 3, 4, 4), {"one": F(1.0)[0]}, 17),
    ("sum_mean", "a = Sum (x, x, b)\ny = Mean (a, x)", (1, 3, 4, 4), {"b": W(4)}, 17),
    ("pow_sqrt_neg", "p = Pow (x, two)\nq = Add (p, one)\nr = Sqrt (q)\ny = Neg (r)", (1, 3, 4, 4),
     {"two": F(2.0)[0], "one": F(1.0)[0]}, 17),
    ("pow_fractional", "a = Abs (x)\nq = Add (a, one)\ny = Pow (q, e)", (1, 3, 4, 4), {"one": F(1.0)[0], "e": F(1.5)[0]}, 17),
    ("max_pool", "y = MaxPool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]> (x)", (1, 3, 9, 9), {}, 17),
    ("max_pool_ceil_dilated", "y = MaxPool <kernel_shape=[2,2], strides=[2,2], ceil_mode=1, dilations=[2,1]> (x)", (1, 3, 9, 8), {}, 17),
    ("avg_pool_exclude_pad_ceil", "y = AveragePool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1], ceil_mode=1, count_include_pad=0> (x)", (1, 3, 8, 8), {}, 17),
    ("avg_pool_include_pad", "y = AveragePool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1], count_include_pad=1> (x)", (1, 3, 9, 9), {}, 17),
    ("avg_pool_same", "y = AveragePool <kernel_shape=[2,2], auto_pad=\"SAME_UPPER\", strides=[2,2]> (x)", (1, 2, 7, 7), {}, 17),
    ("global_avg_pool", "y = GlobalAveragePool (x)", (1, 3, 5, 5), {}, 17),
    ("global_max_pool", "y = GlobalMaxPool (x)", (1, 3, 5, 5), {}, 17),
    ("reduce_mean", "y = ReduceMean <axes=[2,3], keepdims=0> (x)", (1, 3, 5, 5), {}, 17),
    ("reduce_mean_18", "y = ReduceMean <keepdims=1> (x, ax)", (1, 3, 5, 5), {"ax": I(1, 3)}, 18),
    ("reduce_sum", "y = ReduceSum <keepdims=0> (x, ax)", (1, 3, 5, 5), {"ax": I(1)}, 17),
    ("reduce_max", "y = ReduceMax <axes=[1], keepdims=0> (x)", (1, 3, 5, 5), {}, 17),
    ("lrn", "y = LRN <size=3, alpha=0.1, beta=0.75, bias=1.5> (x)", (1, 6, 4, 4), {}, 17),
    ("flatten", "y = Flatten <axis=1> (x)", (1, 3, 4, 4), {}, 17),
    ("reshape_shuffle", "a = Reshape (x, s1)\nb = Transpose <perm=[0,2,1,3,4]> (a)\ny = Reshape (b, s2)", (1, 6, 3, 3),
     {"s1": I(1, 2, 3, 3, 3), "s2": I(1, 6, 3, 3)}, 17),
    ("transpose_nhwc", "y = Transpose <perm=[0,2,3,1]> (x)", (1, 3, 4, 5), {}, 17),
    ("squeeze_unsqueeze", "a = Unsqueeze (x, ax)\ny = Squeeze (a, ax)", (1, 3, 4), {"ax": I(2)}, 17),
    ("concat", "r = Relu (x)\ny = Concat <axis=1> (x, r, c)", (1, 3, 4, 4), {"c": W(1, 2, 4, 4)}, 17),
    ("split_partial", "a, b, c = Split <axis=1> (x, sp)\ny = Mul (a, c)", (1, 6, 3, 3), {"sp": I(2, 2, 2)}, 17),
    ("slice_steps", "y = Slice (x, st, en, ax, sp)", (1, 4, 9, 9), {"st": I(1, 8, 0), "en": I(4, 0, 9), "ax": I(1, 2, 3), "sp": I(1, -2, 3)}, 17),
    ("slice_plain", "y = Slice (x, st, en, ax)", (1, 4, 9, 9), {"st": I(1, 1), "en": I(-1, 7), "ax": I(2, 3)}, 17),
    ("gather", "y = Gather <axis=1> (x, ix)", (1, 5, 3, 3), {"ix": I(4, 0, 0, -1)}, 17),
    ("gather_scalar", "y = Gather <axis=2> (x, ix)", (1, 5, 3, 3), {"ix": np.asarray(1, dtype=np.int64)}, 17),
    ("pad_constant", "y = Pad <mode=\"constant\"> (x, p)", (1, 3, 4, 4), {"p": I(0, 0, 1, 2, 0, 0, 2, 1)}, 17),
    ("pad_reflect", "y = Pad <mode=\"reflect\"> (x, p)", (1, 3, 5, 5), {"p": I(0, 0, 2, 1, 0, 0, 1, 3)}, 17),
    ("pad_edge", "y = Pad <mode=\"edge\"> (x, p)", (1, 3, 4, 4), {"p": I(0, 0, 2, 1, 0, 0, 1, 3)}, 17),
    ("resize_nearest", "y = Resize <mode=\"nearest\"> (x, , sc)", (1, 3, 4, 5), {"sc": F(1, 1, 2, 3)}, 17),
    ("resize_nearest_asym_floor", "y = Resize <mode=\"nearest\", coordinate_transformation_mode=\"asymmetric\", nearest_mode=\"floor\"> (x, , sc)", (1, 3, 4, 4), {"sc": F(1, 1, 2, 2)}, 17),
    ("resize_linear_half_pixel", "y = Resize <mode=\"linear\"> (x, , sc)", (1, 3, 4, 5), {"sc": F(1, 1, 2, 1.5)}, 17),
    ("resize_linear_align_corners", "y = Resize <mode=\"linear\", coordinate_transformation_mode=\"align_corners\"> (x, , , sz)", (1, 3, 4, 5), {"sz": I(1, 3, 7, 9)}, 17),
    ("resize_linear_pytorch", "y = Resize <mode=\"linear\", coordinate_transformation_mode=\"pytorch_half_pixel\"> (x, , sc)", (1, 3, 6, 6), {"sc": F(1, 1, 0.5, 0.5)}, 17),
    ("identity_dropout_cast", "a = Identity (x)\nb = Dropout (a)\ny = Cast <to=1> (b)", (1, 3, 4, 4), {}, 17),
    ("softmax", "y = Softmax <axis=1> (x)", (1, 10), {}, 17),
    ("softmax_spatial", "y = Softmax <axis=1> (x)", (1, 4, 3, 3), {}, 17),
    ("log_softmax", "y = LogSoftmax (x)", (1, 10), {}, 17),
    ("expand", "y = Expand (x, s)", (1, 3, 1, 4), {"s": I(1, 3, 5, 4)}, 17),
    ("tile", "y = Tile (x, r)", (1, 3, 2, 2), {"r": I(1, 2, 3, 1)}, 17),
    ("softmax_opset11_coerced", "y = Softmax <axis=1> (x)", (1, 4, 3, 3), {}, 11),
    ("squeeze_opset11", "a = Unsqueeze <axes=[2]> (x)\ny = Squeeze <axes=[2]> (a)", (1, 3, 4), {}, 11),
    ("upsample_opset9", "y = Upsample <mode=\"nearest\"> (x, sc)", (1, 2, 3, 3), {"sc": F(1, 1, 2, 2)}, 9),
]


def build(text: str, shape: tuple[int, ...], constants: dict[str, np.ndarray], opset: int) -> onnx.ModelProto:
    graph = onnx.parser.parse_graph(f"g (float{list(shape)} x) => (float y) {{ {text} }}")
    graph.initializer.extend(onnx.numpy_helper.from_array(v, name=k) for k, v in constants.items())
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_autograd(case) -> None:
    _, text, shape, constants, opset = case
    model = build(text, shape, constants, opset)
    explainer = Explainer(model)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out_shape = explainer.forward(x, ["y"])["y"].shape
    seeds = np.random.default_rng(2).standard_normal((3, *out_shape)).astype(np.float32)
    ours = explainer.vjp(x, "y", "x", seeds)
    reference = TorchGraph(model).vjp({"x": x}, "y", "x", seeds.astype(np.float64))
    assert ours.shape == reference.shape
    assert relative_error(ours, reference) < TOLERANCE
