"""An independent PyTorch-autograd reference ("oracle") for ONNX graphs.

:class:`TorchGraph` interprets an ONNX graph with differentiable torch operations, so
that ``torch.autograd`` yields reference vector-Jacobian products between any two
tensors of the graph.  It is deliberately written from the ONNX operator specification
(and, where onnxruntime deviates from the text of the specification, from observed
onnxruntime behaviour, see the notes on the individual ops) and shares no code with the
project's own gradient rules.

Conventions
-----------
* Floating-point tensors (inputs, initializers, constants, casts to any float type) are
  evaluated in ``dtype`` (float64 by default); every integer tensor is int64 and boolean
  tensors stay bool.
* Each operator is one small function ``op_xxx(ctx, *inputs)`` registered in
  :data:`OPS`.  Optional inputs that are absent in the middle of the input list arrive as
  ``None``; absent trailing inputs are simply not passed.
* Shape-like inputs (``Reshape``'s shape, ``Slice``'s starts, ...) are read as Python ints.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

Tensor = torch.Tensor
OpResult = Tensor | Sequence[Tensor]

__all__ = ["OPS", "NodeContext", "TorchGraph"]


# --------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
_INT_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


def _onnx_type_to_torch(elem_type: int, float_dtype: torch.dtype) -> torch.dtype:
    """Map an ONNX element type to the dtype used for evaluation."""
    if elem_type in _FLOAT_TYPES:
        return float_dtype
    if elem_type in _INT_TYPES:
        return torch.int64
    if elem_type == onnx.TensorProto.BOOL:
        return torch.bool
    raise NotImplementedError(f"unsupported ONNX element type {onnx.TensorProto.DataType.Name(elem_type)}")


def _np_to_torch(array: Any, float_dtype: torch.dtype) -> Tensor:
    """Convert an array-like to a torch tensor following the evaluation conventions."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        return torch.from_numpy(a.copy())
    if np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V":  # "V": ml_dtypes bfloat16
        return torch.from_numpy(a.astype(np.float64)).to(float_dtype)
    if np.issubdtype(a.dtype, np.integer):
        return torch.from_numpy(a.astype(np.int64))
    raise NotImplementedError(f"unsupported array dtype {a.dtype}")


def _torch_to_np(t: Tensor) -> np.ndarray:
    """Convert a result tensor to numpy: floats as float64, ints as int64, bools as bool."""
    t = t.detach().cpu()
    if t.is_floating_point():
        return t.to(torch.float64).numpy().copy()
    return t.numpy().copy()


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Densify a ``SparseTensorProto`` (linearised [NNZ] or coordinate [NNZ, rank] indices)."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(sparse.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices.reshape(-1)
    dense[indices] = values
    return dense.reshape(dims)


def _attribute_value(attr: onnx.AttributeProto) -> Any:
    """Python value of a node attribute (strings decoded, tensors as numpy arrays)."""
    if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        return _sparse_to_dense(attr.sparse_tensor)
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def _ints(t: Tensor | None) -> list[int]:
    """A 0-D/1-D integer tensor as a list of Python ints (``[]`` for None)."""
    if t is None:
        return []
    return [int(v) for v in t.reshape(-1).tolist()]


def _scalar(t: Tensor) -> float | int | bool:
    """The single value of a one-element tensor as a Python number."""
    return t.reshape(-1)[0].item()


def _norm_axis(axis: int, rank: int) -> int:
    """Normalise a possibly negative axis."""
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------------------
# Node context
# --------------------------------------------------------------------------------------


@dataclass
class NodeContext:
    """Everything an op function may need besides its input tensors."""

    node: onnx.NodeProto
    attrs: dict[str, Any]
    opset: int
    float_dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def n_outputs(self) -> int:
        """Number of declared outputs (including empty, i.e. unused, optional ones)."""
        return len(self.node.output)

    def wants_output(self, index: int) -> bool:
        """Whether optional output ``index`` is present (non-empty name)."""
        return index < len(self.node.output) and bool(self.node.output[index])

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


OpFunction = Callable[..., OpResult]
OPS: dict[str, OpFunction] = {}


def _register(*op_types: str) -> Callable[[OpFunction], OpFunction]:
    def decorate(fn: OpFunction) -> OpFunction:
        for op_type in op_types:
            OPS[op_type] = fn
        return fn

    return decorate


# --------------------------------------------------------------------------------------
# Padding / window arithmetic helpers
# --------------------------------------------------------------------------------------

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL_FN = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _torch_pad(pads: Sequence[tuple[int, int]]) -> list[int]:
    """(begin, end) pairs for the trailing axes, first axis first -> ``F.pad`` argument."""
    flat: list[int] = []
    for begin, end in reversed(list(pads)):
        flat += [begin, end]
    return flat


def _pad(x: Tensor, pads: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
    """Constant-pad the trailing ``len(pads)`` axes (no-op when all pads are zero)."""
    if not any(b or e for b, e in pads):
        return x
    return F.pad(x, _torch_pad(pads), value=value)


def _explicit_pads(ctx: NodeContext, n_axes: int) -> list[tuple[int, int]]:
    """The ``pads`` attribute ``[b1, b2, ..., e1, e2, ...]`` as (begin, end) pairs."""
    pads = ctx.attr("pads") or [0] * (2 * n_axes)
    return [(pads[i], pads[i + n_axes]) for i in range(n_axes)]


def _same_pads(in_size: int, stride: int, eff_kernel: int, auto_pad: str) -> tuple[int, int]:
    """SAME_UPPER / SAME_LOWER padding so that ``out = ceil(in / stride)``."""
    out = -(-in_size // stride)
    total = max(0, (out - 1) * stride + eff_kernel - in_size)
    head = total // 2 if auto_pad == "SAME_UPPER" else (total + 1) // 2
    return head, total - head


def _window_attrs(
    ctx: NodeContext, n_axes: int, kernel: Sequence[int] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """(kernel_shape, strides, dilations) with defaults."""
    kernel = list(ctx.attr("kernel_shape") or kernel or [])
    strides = list(ctx.attr("strides") or [1] * n_axes)
    dilations = list(ctx.attr("dilations") or [1] * n_axes)
    return kernel, strides, dilations


def _conv_pads(
    ctx: NodeContext, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[tuple[int, int]]:
    """Per-axis (begin, end) padding of Conv, honouring ``auto_pad``."""
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    n = len(in_sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return [_same_pads(in_sizes[i], strides[i], (kernel[i] - 1) * dilations[i] + 1, auto_pad) for i in range(n)]
    if auto_pad == "VALID":
        return [(0, 0)] * n
    return _explicit_pads(ctx, n)


@dataclass
class _PoolAxis:
    """Geometry of one spatial axis of a pooling window."""

    head: int  # explicit/auto padding before the data
    tail: int  # explicit/auto padding after the data
    extra: int  # additional padding after ``tail`` needed by ceil_mode's last window
    out: int  # number of output positions


def _pool_geometry(
    ctx: NodeContext, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[_PoolAxis]:
    """Per-axis pooling geometry.

    Output size: ``floor`` (or ``ceil`` with ``ceil_mode``) of
    ``(in + head + tail - eff_kernel) / stride + 1``; with ``ceil_mode`` a last window that
    would start at or beyond ``in + head`` (i.e. entirely in the end padding) is dropped.
    That is the onnxruntime (and PyTorch) rule; ONNX shape inference does not apply it and
    may declare one more output position than onnxruntime produces.
    """
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    axes: list[_PoolAxis] = []
    explicit = _explicit_pads(ctx, len(in_sizes))
    for i, in_size in enumerate(in_sizes):
        eff = (kernel[i] - 1) * dilations[i] + 1
        stride = strides[i]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            head, tail = _same_pads(in_size, stride, eff, auto_pad)
            out = -(-in_size // stride)
        elif auto_pad == "VALID":
            head, tail = 0, 0
            out = (in_size - eff) // stride + 1
        else:
            head, tail = explicit[i]
            span = in_size + head + tail - eff
            if ceil_mode:
                out = -(-span // stride) + 1
                if (out - 1) * stride >= in_size + head:
                    out -= 1
            else:
                out = span // stride + 1
        extra = max(0, (out - 1) * stride + eff - (in_size + head + tail))
        axes.append(_PoolAxis(head, tail, extra, out))
    return axes


def _crop_to(t: Tensor, sizes: Sequence[int]) -> Tensor:
    """Keep the first ``sizes[i]`` entries of each trailing spatial axis."""
    first = t.dim() - len(sizes)
    for i, size in enumerate(sizes):
        t = t.narrow(first + i, 0, size)
    return t


# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------


@_register("Constant")
def op_constant(ctx: NodeContext) -> Tensor:
    """``Constant`` with any of value / value_float(s) / value_int(s) / sparse_value."""
    if "value" in ctx.attrs:
        return _np_to_torch(ctx.attrs["value"], ctx.float_dtype)
    if "sparse_value" in ctx.attrs:
        return _np_to_torch(ctx.attrs["sparse_value"], ctx.float_dtype)
    if "value_float" in ctx.attrs:
        return torch.tensor(float(ctx.attrs["value_float"]), dtype=ctx.float_dtype)
    if "value_floats" in ctx.attrs:
        return torch.tensor([float(v) for v in ctx.attrs["value_floats"]], dtype=ctx.float_dtype)
    if "value_int" in ctx.attrs:
        return torch.tensor(int(ctx.attrs["value_int"]), dtype=torch.int64)
    if "value_ints" in ctx.attrs:
        return torch.tensor([int(v) for v in ctx.attrs["value_ints"]], dtype=torch.int64)
    raise NotImplementedError(f"Constant node {ctx.name!r}: unsupported value attribute {sorted(ctx.attrs)}")


@_register("ConstantOfShape")
def op_constant_of_shape(ctx: NodeContext, shape: Tensor) -> Tensor:
    value = ctx.attr("value")
    if value is None:
        return torch.zeros(_ints(shape), dtype=ctx.float_dtype)
    fill = _np_to_torch(value, ctx.float_dtype).reshape(-1)[0]
    return torch.full(_ints(shape), fill.item(), dtype=fill.dtype)


# --------------------------------------------------------------------------------------
# Convolutions and dense layers
# --------------------------------------------------------------------------------------


@_register("Conv")
def op_conv(ctx: NodeContext, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    n = x.dim() - 2
    kernel, strides, dilations = _window_attrs(ctx, n, list(w.shape[2:]))
    pads = _conv_pads(ctx, list(x.shape[2:]), kernel, strides, dilations)
    x = _pad(x, pads)
    return _CONV_FN[n](x, w, b, stride=strides, dilation=dilations, groups=ctx.attr("group", 1))


@_register("ConvTranspose")
def op_conv_transpose(ctx: NodeContext, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """ConvTranspose: full transposed convolution, then output_padding and cropping.

    The un-cropped size is ``(in - 1) * stride + (k - 1) * dilation + 1 + output_padding``.
    With ``output_shape`` (or SAME auto_pad, target ``in * stride``) the total padding is
    the excess over the target, split as in the spec: the larger half goes to the *end* for
    SAME_UPPER and to the *beginning* otherwise.  A negative total (target larger than the
    full output, which onnxruntime accepts by less than a stride) extends the output at the
    *end* with zeros (plus bias) whatever auto_pad says, as onnxruntime does.
    """
    n = x.dim() - 2
    kernel, strides, dilations = _window_attrs(ctx, n, list(w.shape[2:]))
    out_pad = list(ctx.attr("output_padding") or [0] * n)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    output_shape = ctx.attr("output_shape")
    in_sizes = list(x.shape[2:])
    full = [(in_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + out_pad[i] for i in range(n)]
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-n:] if output_shape else [s * st for s, st in zip(in_sizes, strides)]
        pads = []
        for i in range(n):
            total = full[i] - target[i]
            if total < 0:  # target larger than the full output: extended at the end
                pads.append((0, total))
            elif auto_pad == "SAME_UPPER":
                pads.append((total // 2, total - total // 2))
            else:
                pads.append((total - total // 2, total // 2))
    elif auto_pad == "VALID":
        pads = [(0, 0)] * n
    else:
        pads = _explicit_pads(ctx, n)
    y = _CONV_T_FN[n](x, w, None, stride=strides, dilation=dilations, groups=ctx.attr("group", 1))
    y = _pad(y, [(-head, out_pad[i] - tail) for i, (head, tail) in enumerate(pads)])
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return y


@_register("Gemm")
def op_gemm(ctx: NodeContext, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    if ctx.attr("transA", 0):
        a = a.transpose(0, 1)
    if ctx.attr("transB", 0):
        b = b.transpose(0, 1)
    y = ctx.attr("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + ctx.attr("beta", 1.0) * c
    return y


@_register("MatMul")
def op_matmul(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


@_register("BatchNormalization")
def op_batch_norm(
    ctx: NodeContext, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor
) -> OpResult:
    """Inference-form BatchNormalization (running statistics)."""
    if ctx.attr("training_mode", 0):
        raise NotImplementedError(f"BatchNormalization {ctx.name!r}: training_mode=1 is not supported")
    shape = [1, -1] + [1] * (x.dim() - 2)
    factor = scale * torch.rsqrt(var + ctx.attr("epsilon", 1e-5))
    y = x * factor.reshape(shape) + (bias - mean * factor).reshape(shape)
    # Optional extra outputs of old opsets (running/saved statistics): pass the inputs through.
    return (y, mean, var, mean, var)[: ctx.n_outputs]


# --------------------------------------------------------------------------------------
# Element-wise activations and math
# --------------------------------------------------------------------------------------


def _unary(op_type: str, fn: Callable[[Tensor], Tensor]) -> None:
    def op(ctx: NodeContext, x: Tensor) -> Tensor:
        return fn(x)

    op.__name__ = f"op_{op_type.lower()}"
    OPS[op_type] = op


_unary("Relu", torch.relu)
_unary("Sigmoid", torch.sigmoid)
_unary("Tanh", torch.tanh)
_unary("Softplus", F.softplus)  # log(exp(x) + 1), computed stably
_unary("Sqrt", torch.sqrt)
_unary("Neg", torch.neg)
_unary("Exp", torch.exp)
_unary("Log", torch.log)
_unary("Erf", torch.erf)
_unary("Abs", torch.abs)
_unary("Floor", torch.floor)
_unary("Ceil", torch.ceil)
_unary("Reciprocal", torch.reciprocal)
_unary("Sin", torch.sin)
_unary("Cos", torch.cos)
_unary("Sign", torch.sign)
_unary("Not", torch.logical_not)


@_register("Identity")
def op_identity(ctx: NodeContext, x: Tensor) -> Tensor:
    return x


@_register("Dropout")
def op_dropout(ctx: NodeContext, x: Tensor, ratio: Tensor | None = None, training: Tensor | None = None) -> OpResult:
    """Inference-mode Dropout: identity.

    The optional mask output is all True from opset 12; before, onnxruntime returns an
    all-zero mask (its Dropout-7..11 kernel is an identity that zero-fills the mask), and
    the oracle follows it.  Before opset 10 the mask has the input's (float) type.
    """
    if training is not None and bool(_scalar(training)):
        raise NotImplementedError(f"Dropout {ctx.name!r}: training_mode=True is not supported")
    mask_dtype = torch.bool if ctx.opset >= 10 else x.dtype
    mask = torch.full(x.shape, ctx.opset >= 12, dtype=mask_dtype)
    return (x, mask)[: ctx.n_outputs]


@_register("LeakyRelu")
def op_leaky_relu(ctx: NodeContext, x: Tensor) -> Tensor:
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


@_register("PRelu")
def op_prelu(ctx: NodeContext, x: Tensor, slope: Tensor) -> Tensor:
    """``slope`` broadcasts to ``x`` with numpy (unidirectional) rules."""
    return torch.where(x < 0, x * slope, x)


@_register("Elu")
def op_elu(ctx: NodeContext, x: Tensor) -> Tensor:
    return F.elu(x, ctx.attr("alpha", 1.0))


@_register("Selu")
def op_selu(ctx: NodeContext, x: Tensor) -> Tensor:
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0)))


@_register("HardSigmoid")
def op_hard_sigmoid(ctx: NodeContext, x: Tensor) -> Tensor:
    return torch.clamp(ctx.attr("alpha", 0.2) * x + ctx.attr("beta", 0.5), 0.0, 1.0)


@_register("HardSwish")
def op_hard_swish(ctx: NodeContext, x: Tensor) -> Tensor:
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@_register("Mish")
def op_mish(ctx: NodeContext, x: Tensor) -> Tensor:
    return x * torch.tanh(F.softplus(x))


@_register("Gelu")
def op_gelu(ctx: NodeContext, x: Tensor) -> Tensor:
    approximate = ctx.attr("approximate", "none")
    return F.gelu(x, approximate=approximate.decode() if isinstance(approximate, bytes) else approximate)


@_register("Clip")
def op_clip(ctx: NodeContext, x: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """Clip: bounds are attributes before opset 11, optional scalar inputs from opset 11."""
    if ctx.opset < 11:
        lo_v = ctx.attr("min")
        hi_v = ctx.attr("max")
        lo = None if lo_v is None else torch.tensor(lo_v, dtype=x.dtype)
        hi = None if hi_v is None else torch.tensor(hi_v, dtype=x.dtype)
    if lo is None and hi is None:
        return x
    lo = None if lo is None else lo.reshape(()).to(x.dtype)
    hi = None if hi is None else hi.reshape(()).to(x.dtype)
    return torch.clamp(x, min=lo, max=hi)  # min > max gives max everywhere, as in ONNX


def _binary(op_type: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    def op(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
        return fn(a, b)

    op.__name__ = f"op_{op_type.lower()}"
    OPS[op_type] = op


_binary("Add", torch.add)
_binary("Sub", torch.sub)
_binary("Mul", torch.mul)
_binary("Equal", torch.eq)
_binary("Less", torch.lt)
_binary("Greater", torch.gt)
_binary("LessOrEqual", torch.le)
_binary("GreaterOrEqual", torch.ge)
_binary("And", torch.logical_and)
_binary("Or", torch.logical_or)
_binary("Xor", torch.logical_xor)


@_register("Div")
def op_div(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
    """Float division, or C-style truncating division for integers."""
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@_register("Pow")
def op_pow(ctx: NodeContext, base: Tensor, exponent: Tensor) -> Tensor:
    """Pow; the result has the type of ``base`` (exponent type may differ from opset 12)."""
    if base.is_floating_point():
        return torch.pow(base, exponent.to(base.dtype))
    if exponent.is_floating_point():
        return torch.pow(base.to(exponent.dtype), exponent).to(base.dtype)
    return torch.pow(base, exponent)


@_register("Sum")
def op_sum(ctx: NodeContext, *xs: Tensor) -> Tensor:
    return functools.reduce(torch.add, xs)


@_register("Mean")
def op_mean(ctx: NodeContext, *xs: Tensor) -> Tensor:
    return functools.reduce(torch.add, xs) / len(xs)


@_register("Max")
def op_max(ctx: NodeContext, *xs: Tensor) -> Tensor:
    return functools.reduce(torch.maximum, xs)


@_register("Min")
def op_min(ctx: NodeContext, *xs: Tensor) -> Tensor:
    return functools.reduce(torch.minimum, xs)


@_register("Where")
def op_where(ctx: NodeContext, cond: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return torch.where(cond.to(torch.bool), x, y)


@_register("Cast")
def op_cast(ctx: NodeContext, x: Tensor) -> Tensor:
    """Cast; float targets map to the evaluation dtype, integer targets to int64.

    Float -> int truncates toward zero (as C++ ``static_cast``); range saturation/wrapping
    of narrow integer types is not modelled.
    """
    target = _onnx_type_to_torch(ctx.attr("to"), ctx.float_dtype)
    if target == torch.int64 and x.is_floating_point():
        return torch.trunc(x).to(torch.int64)
    return x.to(target)


@_register("Softmax", "LogSoftmax")
def op_softmax(ctx: NodeContext, x: Tensor) -> Tensor:
    """Softmax/LogSoftmax.

    Before opset 13 the input is coerced to 2-D ``[prod(shape[:axis]), prod(shape[axis:])]``
    (default axis 1) and normalised over the second dimension; from opset 13 the
    normalisation is over the single ``axis`` (default -1).
    """
    fn = torch.softmax if ctx.node.op_type == "Softmax" else torch.log_softmax
    if ctx.opset >= 13:
        return fn(x, dim=_norm_axis(ctx.attr("axis", -1), x.dim()))
    axis = _norm_axis(ctx.attr("axis", 1), x.dim()) if x.dim() else 0
    shape = list(x.shape)
    flat = x.reshape(math.prod(shape[:axis]), math.prod(shape[axis:]))
    return fn(flat, dim=1).reshape(shape)


# --------------------------------------------------------------------------------------
# Pooling and normalisation
# --------------------------------------------------------------------------------------


@_register("MaxPool")
def op_max_pool(ctx: NodeContext, x: Tensor) -> OpResult:
    """MaxPool via explicit ``-inf`` padding and ``F.max_poolNd`` (gradient to the first max).

    The optional ``Indices`` output is the flat index into the *unpadded* input tensor
    (including the batch/channel offset), row-major or, with ``storage_order=1``,
    column-major within each spatial plane.
    """
    n = x.dim() - 2
    kernel, strides, dilations = _window_attrs(ctx, n)
    in_sizes = list(x.shape[2:])
    geo = _pool_geometry(ctx, in_sizes, kernel, strides, dilations)
    xp = _pad(x, [(g.head, g.tail + g.extra) for g in geo], value=-math.inf)
    y, idx = _MAX_POOL_FN[n](xp, kernel, strides, padding=0, dilation=dilations, return_indices=True)
    out_sizes = [g.out for g in geo]
    y = _crop_to(y, out_sizes)
    if not ctx.wants_output(1):
        return y
    idx = _crop_to(idx, out_sizes)
    padded_sizes = list(xp.shape[2:])
    coords = []
    rest = idx
    for size in reversed(padded_sizes):  # unravel over the padded plane (row-major)
        coords.append(rest % size)
        rest = rest // size
    coords = [c - g.head for c, g in zip(reversed(coords), geo)]
    if ctx.attr("storage_order", 0):
        order, sizes = list(reversed(coords)), list(reversed(in_sizes))
    else:
        order, sizes = coords, in_sizes
    flat = torch.zeros_like(idx)
    for c, size in zip(order, sizes):
        flat = flat * size + c
    plane = torch.arange(x.shape[0] * x.shape[1], dtype=torch.int64).reshape(x.shape[0], x.shape[1], *([1] * n))
    return y, flat + plane * math.prod(in_sizes)


def _window_sum(x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> Tensor:
    """Sum over (dilated) windows of every channel independently (no implicit padding)."""
    n = x.dim() - 2
    if all(d == 1 for d in dilations):
        # Unpadded average times window size (much faster than a depthwise conv in float64).
        return _AVG_POOL_FN[n](x, list(kernel), list(strides)) * math.prod(kernel)
    channels = x.shape[1]
    ones = torch.ones([channels, 1, *kernel], dtype=x.dtype)
    return _CONV_FN[n](x, ones, stride=list(strides), dilation=list(dilations), groups=channels)


@_register("AveragePool")
def op_average_pool(ctx: NodeContext, x: Tensor) -> Tensor:
    """AveragePool as window sum / window count.

    The count is the number of window elements inside the input (``count_include_pad=0``)
    or inside input plus explicit/auto padding (``count_include_pad=1``); window positions
    added by ``ceil_mode`` beyond the padded input never count.
    """
    n = x.dim() - 2
    kernel, strides, dilations = _window_attrs(ctx, n)
    in_sizes = list(x.shape[2:])
    geo = _pool_geometry(ctx, in_sizes, kernel, strides, dilations)
    out_sizes = [g.out for g in geo]
    xp = _pad(x, [(g.head, g.tail + g.extra) for g in geo])
    sums = _crop_to(_window_sum(xp, kernel, strides, dilations), out_sizes)
    mask = torch.ones([1, 1, *in_sizes], dtype=x.dtype)
    if ctx.attr("count_include_pad", 0):
        mask = _pad(mask, [(g.head, g.tail) for g in geo], value=1.0)
        mask = _pad(mask, [(0, g.extra) for g in geo], value=0.0)
    else:
        mask = _pad(mask, [(g.head, g.tail + g.extra) for g in geo], value=0.0)
    counts = _crop_to(_window_sum(mask, kernel, strides, dilations), out_sizes)
    return sums / counts


@_register("GlobalAveragePool")
def op_global_average_pool(ctx: NodeContext, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_register("GlobalMaxPool")
def op_global_max_pool(ctx: NodeContext, x: Tensor) -> Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@_register("LRN")
def op_lrn(ctx: NodeContext, x: Tensor) -> Tensor:
    """Local response normalisation across channels.

    ``y = x / (bias + alpha / size * sum_{c' in window(c)} x[c']^2) ** beta`` with window
    ``[c - floor((size-1)/2), c + ceil((size-1)/2)]``.
    """
    size = ctx.attr("size")
    alpha, beta, bias = ctx.attr("alpha", 1e-4), ctx.attr("beta", 0.75), ctx.attr("bias", 1.0)
    lo = (size - 1) // 2
    hi = size - 1 - lo
    sq = x * x
    pad_shape = list(sq.shape)
    padded = torch.cat(
        [sq.new_zeros([pad_shape[0], lo, *pad_shape[2:]]), sq, sq.new_zeros([pad_shape[0], hi, *pad_shape[2:]])], dim=1
    )
    square_sum = padded.unfold(1, size, 1).sum(dim=-1)
    return x / (bias + alpha / size * square_sum) ** beta


def _reduce_axes(ctx: NodeContext, x: Tensor, axes_input: Tensor | None, input_since: int) -> list[int] | None:
    """Reduction axes (attribute before ``input_since``, input afterwards); None = identity."""
    if ctx.opset >= input_since:
        axes = _ints(axes_input)
    else:
        axes = list(ctx.attr("axes") or [])
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return None
        return list(range(x.dim()))
    return sorted(_norm_axis(a, x.dim()) for a in axes)


def _reduce_op(op_type: str, input_since: int, fn: Callable[[Tensor, list[int], bool], Tensor]) -> None:
    def op(ctx: NodeContext, x: Tensor, axes: Tensor | None = None) -> Tensor:
        dims = _reduce_axes(ctx, x, axes, input_since)
        if dims is None:
            return x
        return fn(x, dims, bool(ctx.attr("keepdims", 1)))

    op.__name__ = f"op_{op_type.lower()}"
    OPS[op_type] = op


def _prod(x: Tensor, dims: list[int], keepdim: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


_reduce_op("ReduceSum", 13, lambda x, d, k: torch.sum(x, dim=d, keepdim=k) if d else x.clone())
_reduce_op("ReduceMean", 18, lambda x, d, k: torch.mean(x, dim=d, keepdim=k) if d else x.clone())
_reduce_op("ReduceMax", 18, lambda x, d, k: torch.amax(x, dim=d, keepdim=k) if d else x.clone())
_reduce_op("ReduceMin", 18, lambda x, d, k: torch.amin(x, dim=d, keepdim=k) if d else x.clone())
_reduce_op("ReduceProd", 18, _prod)


@_register("ArgMax", "ArgMin")
def op_arg_max(ctx: NodeContext, x: Tensor) -> Tensor:
    axis = _norm_axis(ctx.attr("axis", 0), x.dim())
    keepdims = bool(ctx.attr("keepdims", 1))
    fn = torch.argmax if ctx.node.op_type == "ArgMax" else torch.argmin
    if ctx.attr("select_last_index", 0):
        flipped = fn(x.flip(axis), dim=axis, keepdim=keepdims)
        return x.shape[axis] - 1 - flipped
    return fn(x, dim=axis, keepdim=keepdims)


# --------------------------------------------------------------------------------------
# Shape manipulation
# --------------------------------------------------------------------------------------


@_register("Flatten")
def op_flatten(ctx: NodeContext, x: Tensor) -> Tensor:
    axis = ctx.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    shape = list(x.shape)
    return x.reshape(math.prod(shape[:axis]), math.prod(shape[axis:]))


@_register("Reshape")
def op_reshape(ctx: NodeContext, x: Tensor, shape: Tensor) -> Tensor:
    """Reshape; 0 copies the input dimension unless ``allowzero=1``, -1 is inferred."""
    target = _ints(shape)
    allow_zero = bool(ctx.attr("allowzero", 0))
    dims = [x.shape[i] if (d == 0 and not allow_zero) else d for i, d in enumerate(target)]
    return x.reshape(dims)


@_register("Transpose")
def op_transpose(ctx: NodeContext, x: Tensor) -> Tensor:
    perm = ctx.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(list(perm))


@_register("Squeeze")
def op_squeeze(ctx: NodeContext, x: Tensor, axes: Tensor | None = None) -> Tensor:
    """Squeeze: axes attribute before opset 13, optional input after; none = all size-1 dims."""
    axes_list = list(ctx.attr("axes") or []) if ctx.opset < 13 else _ints(axes)
    if not axes_list:
        return x.reshape([d for d in x.shape if d != 1])
    drop = {_norm_axis(a, x.dim()) for a in axes_list}
    for a in drop:
        if x.shape[a] != 1:
            raise ValueError(f"Squeeze {ctx.name!r}: axis {a} has size {x.shape[a]}")
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


@_register("Unsqueeze")
def op_unsqueeze(ctx: NodeContext, x: Tensor, axes: Tensor | None = None) -> Tensor:
    """Unsqueeze: axes (relative to the output rank) as attribute before opset 13, else input."""
    axes_list = list(ctx.attr("axes") or []) if ctx.opset < 13 else _ints(axes)
    out_rank = x.dim() + len(axes_list)
    for a in sorted(_norm_axis(a, out_rank) for a in axes_list):
        x = x.unsqueeze(a)
    return x


@_register("Concat")
def op_concat(ctx: NodeContext, *xs: Tensor) -> Tensor:
    return torch.cat(list(xs), dim=_norm_axis(ctx.attr("axis"), xs[0].dim()))


@_register("Split")
def op_split(ctx: NodeContext, x: Tensor, split: Tensor | None = None) -> OpResult:
    """Split: sizes from attribute (opset < 13) or input (>= 13); else equal parts.

    From opset 18 the number of parts may come from ``num_outputs`` and the last part may be
    smaller (parts of ``ceil(dim / num_outputs)``).
    """
    axis = _norm_axis(ctx.attr("axis", 0), x.dim())
    sizes = list(ctx.attr("split") or []) if ctx.opset < 13 else _ints(split)
    if not sizes:
        parts = ctx.attr("num_outputs", ctx.n_outputs) if ctx.opset >= 18 else ctx.n_outputs
        dim = x.shape[axis]
        if ctx.opset >= 18:
            chunk = -(-dim // parts)
            sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
        else:
            if dim % parts:
                raise ValueError(f"Split {ctx.name!r}: {dim} not divisible into {parts} parts")
            sizes = [dim // parts] * parts
    return torch.split(x, sizes, dim=axis)


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    """One axis of ONNX Slice, with its clamping rules (negative steps via index_select)."""
    dim = x.shape[axis]
    if step == 0:
        raise ValueError("Slice step must not be 0")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        index: list[slice] = [slice(None)] * x.dim()
        index[axis] = slice(start, end, step)
        return x[tuple(index)]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return x.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))


@_register("Slice")
def op_slice(
    ctx: NodeContext,
    x: Tensor,
    starts: Tensor | None = None,
    ends: Tensor | None = None,
    axes: Tensor | None = None,
    steps: Tensor | None = None,
) -> Tensor:
    """Slice: attributes starts/ends/axes before opset 10; inputs (+ steps) from opset 10."""
    if ctx.opset < 10:
        starts_l, ends_l = list(ctx.attr("starts")), list(ctx.attr("ends"))
        axes_l = list(ctx.attr("axes") or range(len(starts_l)))
        steps_l = [1] * len(starts_l)
    else:
        starts_l, ends_l = _ints(starts), _ints(ends)
        axes_l = _ints(axes) if axes is not None else list(range(len(starts_l)))
        steps_l = _ints(steps) if steps is not None else [1] * len(starts_l)
    for axis, start, end, step in zip(axes_l, starts_l, ends_l, steps_l):
        x = _slice_axis(x, _norm_axis(axis, x.dim()), start, end, step)
    return x


@_register("Gather")
def op_gather(ctx: NodeContext, data: Tensor, indices: Tensor) -> Tensor:
    """Gather along ``axis``; output shape ``data[:axis] + indices.shape + data[axis+1:]``."""
    axis = _norm_axis(ctx.attr("axis", 0), data.dim())
    dim = data.shape[axis]
    idx = torch.where(indices < 0, indices + dim, indices).to(torch.int64)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1 :]))


def _pad_index(size: int, begin: int, end: int, mode: str) -> Tensor:
    """Source indices of one padded axis for edge / reflect / wrap padding."""
    i = torch.arange(-begin, size + end, dtype=torch.int64)
    if mode == "edge":
        return i.clamp(0, size - 1)
    if mode == "wrap":
        return torch.remainder(i, size)
    if mode == "reflect":
        if size == 1:
            return torch.zeros_like(i)
        period = 2 * (size - 1)
        j = torch.remainder(i, period)
        return torch.where(j >= size, period - j, j)
    raise NotImplementedError(f"Pad mode {mode!r}")


@_register("Pad")
def op_pad(
    ctx: NodeContext,
    x: Tensor,
    pads: Tensor | None = None,
    constant_value: Tensor | None = None,
    axes: Tensor | None = None,
) -> Tensor:
    """Pad: attributes pads/value before opset 11; inputs pads/constant_value/(axes, 18+)."""
    mode = ctx.attr("mode", "constant")
    rank = x.dim()
    if ctx.opset < 11:
        pad_list = list(ctx.attr("pads"))
        value: float | int = ctx.attr("value", 0.0)
        axes_l = list(range(rank))
    else:
        pad_list = _ints(pads)
        value = _scalar(constant_value) if constant_value is not None and constant_value.numel() else 0
        axes_l = [_norm_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    per_axis = [(0, 0)] * rank
    k = len(axes_l)
    for j, a in enumerate(axes_l):
        per_axis[a] = (pad_list[j], pad_list[j + k])
    if mode == "constant":
        value = float(value) if x.is_floating_point() else int(value)
        return F.pad(x, _torch_pad(per_axis), value=value)
    for a, (begin, end) in enumerate(per_axis):
        if begin or end:
            x = x.index_select(a, _pad_index(x.shape[a], begin, end, mode))
    return x


@_register("Expand")
def op_expand(ctx: NodeContext, x: Tensor, shape: Tensor) -> Tensor:
    """Expand with bidirectional (numpy) broadcasting between ``x.shape`` and ``shape``."""
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


@_register("Tile")
def op_tile(ctx: NodeContext, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(*_ints(repeats)) if x.dim() else x.clone()


@_register("Shape")
def op_shape(ctx: NodeContext, x: Tensor) -> Tensor:
    """Shape, with the opset-15 ``start``/``end`` slice (Python slicing clamps identically)."""
    dims = list(x.shape)[ctx.attr("start", 0) : ctx.attr("end")]
    return torch.tensor(dims, dtype=torch.int64)


@_register("Size")
def op_size(ctx: NodeContext, x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64)


@_register("Range")
def op_range(ctx: NodeContext, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    """``start + i * delta`` for ``i < max(ceil((limit - start) / delta), 0)``."""
    count = max(math.ceil((_scalar(limit) - _scalar(start)) / _scalar(delta)), 0)
    steps = torch.arange(count, dtype=torch.int64)
    if start.is_floating_point():
        steps = steps.to(start.dtype)
    return start.reshape(()) + steps * delta.reshape(())


# --------------------------------------------------------------------------------------
# Resize / Upsample
# --------------------------------------------------------------------------------------


@dataclass
class _ResizeSpec:
    """Attributes that shape the per-axis interpolation."""

    mode: str  # nearest | linear | cubic
    coordinate_mode: str
    nearest_mode: str  # round_prefer_floor | round_prefer_ceil | floor | ceil | simple
    cubic_coeff_a: float = -0.75
    exclude_outside: bool = False
    extrapolation_value: float = 0.0


def _original_coordinates(
    spec: _ResizeSpec, out_len: int, in_len: int, scale: float, roi: tuple[float, float]
) -> np.ndarray:
    """x_original for every output position, computed in float32 like onnxruntime."""
    f32 = np.float32
    x = np.arange(out_len, dtype=f32)
    s = f32(scale)
    mode = spec.coordinate_mode
    if mode == "half_pixel":
        return (x + f32(0.5)) / s - f32(0.5)
    if mode == "half_pixel_symmetric":
        adjustment = f32(out_len) / (s * f32(in_len))
        center = f32(in_len) / f32(2)
        offset = center * (f32(1) - adjustment)
        return offset + (x + f32(0.5)) / s - f32(0.5)
    if mode == "pytorch_half_pixel":
        return (x + f32(0.5)) / s - f32(0.5) if out_len > 1 else np.zeros(out_len, dtype=f32)
    if mode == "align_corners":
        if out_len == 1:
            return np.zeros(out_len, dtype=f32)
        return x * f32(in_len - 1) / f32(out_len - 1)
    if mode == "asymmetric":
        return x / s
    if mode == "tf_half_pixel_for_nn":
        return (x + f32(0.5)) / s
    if mode == "tf_crop_and_resize":
        start, end = f32(roi[0]), f32(roi[1])
        if out_len > 1:
            return start * f32(in_len - 1) + x * (end - start) * f32(in_len - 1) / f32(out_len - 1)
        return np.full(out_len, f32(0.5) * (start + end) * f32(in_len - 1), dtype=f32)
    raise NotImplementedError(f"coordinate_transformation_mode {mode!r}")


def _nearest_index(x: np.ndarray, mode: str, downsampling: bool) -> np.ndarray:
    """Nearest source pixel per ``nearest_mode`` (``simple``: legacy Upsample / Resize-10)."""
    if mode == "round_prefer_floor":
        return np.where(x == np.floor(x) + 0.5, np.floor(x), np.round(x))
    if mode == "round_prefer_ceil":
        return np.where(x == np.floor(x) + 0.5, np.ceil(x), np.round(x))
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    if mode == "simple":
        return np.ceil(x) if downsampling else np.trunc(x)
    raise NotImplementedError(f"nearest_mode {mode!r}")


def _cubic_coefficients(t: np.ndarray, a: float) -> list[np.ndarray]:
    """Keys cubic weights of taps at offsets -1, 0, 1, 2 from ``floor(x)`` (``t`` = frac)."""

    def kernel(d: np.ndarray) -> np.ndarray:
        d = np.abs(d)
        return np.where(
            d <= 1,
            ((a + 2) * d - (a + 3)) * d * d + 1,
            np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0),
        )

    return [kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)]


def _resize_axis(
    x: Tensor, axis: int, out_len: int, scale: float, spec: _ResizeSpec, roi: tuple[float, float]
) -> Tensor:
    """Resample one axis: ``y = sum_taps w_tap[i] * x[idx_tap[i]]`` (differentiable in x)."""
    in_len = x.shape[axis]
    coords = _original_coordinates(spec, out_len, in_len, scale, roi)
    taps: list[tuple[np.ndarray, np.ndarray]] = []
    if spec.mode == "nearest":
        idx = _nearest_index(coords, spec.nearest_mode, scale < 1).astype(np.int64)
        taps.append((np.clip(idx, 0, in_len - 1), np.ones(out_len)))
    elif spec.mode == "linear":
        xc = np.clip(coords, 0, in_len - 1).astype(np.float64)
        x0 = np.floor(xc).astype(np.int64)
        x1 = np.minimum(x0 + 1, in_len - 1)
        frac = xc - x0
        taps += [(x0, 1.0 - frac), (x1, frac)]
    elif spec.mode == "cubic":
        xf = np.floor(coords).astype(np.int64)
        weights = _cubic_coefficients(coords.astype(np.float64) - xf, spec.cubic_coeff_a)
        positions = [xf - 1, xf, xf + 1, xf + 2]
        if spec.exclude_outside:
            inside = [(p >= 0) & (p < in_len) for p in positions]
            weights = [w * m for w, m in zip(weights, inside)]
            total = sum(weights)
            weights = [w / total for w in weights]
        taps += [(np.clip(p, 0, in_len - 1), w) for p, w in zip(positions, weights)]
    else:
        raise NotImplementedError(f"Resize mode {spec.mode!r}")
    view = [1] * x.dim()
    view[axis] = out_len
    y = None
    for idx, w in taps:
        term = x.index_select(axis, torch.from_numpy(idx)) * torch.from_numpy(w).to(x.dtype).reshape(view)
        y = term if y is None else y + term
    if spec.coordinate_mode == "tf_crop_and_resize":
        outside = torch.from_numpy((coords < 0) | (coords > in_len - 1)).reshape(view)
        y = torch.where(outside, torch.tensor(spec.extrapolation_value, dtype=x.dtype), y)
    return y


def _resize(
    x: Tensor,
    scales: list[float] | None,
    sizes: list[int] | None,
    spec: _ResizeSpec,
    roi: list[float] | None,
) -> Tensor:
    """Separable resize over all axes (given full-rank scales or sizes)."""
    rank = x.dim()
    roi = roi or [0.0] * rank + [1.0] * rank
    for axis in range(rank):
        in_len = x.shape[axis]
        if sizes is not None:
            out_len = sizes[axis]
            scale = float(np.float32(out_len) / np.float32(in_len))
        else:
            # The spec multiplies by the roi extent for tf_crop_and_resize; onnxruntime does
            # not, and the oracle follows onnxruntime.
            scale = float(scales[axis])
            out_len = int(np.floor(np.float32(in_len) * np.float32(scale)))
        if out_len == in_len and scale == 1.0 and spec.coordinate_mode != "tf_crop_and_resize":
            continue
        x = _resize_axis(x, axis, out_len, scale, spec, (roi[axis], roi[axis + rank]))
    return x


@_register("Upsample")
def op_upsample(ctx: NodeContext, x: Tensor, scales: Tensor | None = None) -> Tensor:
    """Upsample (opset 7 scales attribute, opset 9 scales input): asymmetric coordinates."""
    scale_list = [float(s) for s in (scales.reshape(-1).tolist() if scales is not None else ctx.attr("scales"))]
    mode = ctx.attr("mode", "nearest")
    spec = _ResizeSpec(
        mode="linear" if mode in ("linear", "bilinear") else "nearest",
        coordinate_mode="asymmetric",
        nearest_mode="simple",
    )
    return _resize(x, scale_list, None, spec, None)


@_register("Resize")
def op_resize(
    ctx: NodeContext,
    x: Tensor,
    roi_or_scales: Tensor | None = None,
    scales: Tensor | None = None,
    sizes: Tensor | None = None,
) -> Tensor:
    """Resize.

    * opset 10: inputs (X, scales), asymmetric coordinates, legacy nearest rounding (as
      Upsample).
    * opset 11+: inputs (X, roi, scales, sizes); attributes coordinate_transformation_mode,
      mode (nearest/linear/cubic), nearest_mode, cubic_coeff_a, exclude_outside,
      extrapolation_value; opset 18+: axes, keep_aspect_ratio_policy (antialias unsupported).
    """
    mode = ctx.attr("mode", "nearest")
    if ctx.opset < 11:
        spec = _ResizeSpec(mode=mode, coordinate_mode="asymmetric", nearest_mode="simple")
        return _resize(x, [float(s) for s in roi_or_scales.reshape(-1).tolist()], None, spec, None)
    if ctx.attr("antialias", 0):
        raise NotImplementedError(f"Resize {ctx.name!r}: antialias=1 is not supported")
    spec = _ResizeSpec(
        mode=mode,
        coordinate_mode=ctx.attr("coordinate_transformation_mode", "half_pixel"),
        nearest_mode=ctx.attr("nearest_mode", "round_prefer_floor"),
        cubic_coeff_a=ctx.attr("cubic_coeff_a", -0.75),
        exclude_outside=bool(ctx.attr("exclude_outside", 0)),
        extrapolation_value=ctx.attr("extrapolation_value", 0.0),
    )
    rank = x.dim()
    axes = [_norm_axis(a, rank) for a in (ctx.attr("axes") or range(rank))]
    roi_vals = roi_or_scales.reshape(-1).tolist() if roi_or_scales is not None and roi_or_scales.numel() else None
    roi = None
    if roi_vals is not None:
        k = len(axes)
        roi = [0.0] * rank + [1.0] * rank
        for j, a in enumerate(axes):
            roi[a], roi[a + rank] = roi_vals[j], roi_vals[j + k]
    if sizes is not None and sizes.numel():
        requested = _ints(sizes)
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
        full_sizes = list(x.shape)
        if policy == "stretch":
            for j, a in enumerate(axes):
                full_sizes[a] = requested[j]
            return _resize(x, None, full_sizes, spec, roi)
        ratios = [requested[j] / x.shape[a] for j, a in enumerate(axes)]
        ratio = min(ratios) if policy == "not_larger" else max(ratios)
        full_scales = [1.0] * rank
        for a in axes:
            full_sizes[a] = int(math.floor(ratio * x.shape[a] + 0.5))
            full_scales[a] = ratio
        return _resize_with(x, full_sizes, full_scales, spec, roi)
    scale_vals = [float(s) for s in scales.reshape(-1).tolist()]
    full_scales = [1.0] * rank
    for j, a in enumerate(axes):
        full_scales[a] = scale_vals[j]
    return _resize(x, full_scales, None, spec, roi)


def _resize_with(
    x: Tensor, sizes: list[int], scales: list[float], spec: _ResizeSpec, roi: list[float] | None
) -> Tensor:
    """Resize to explicit ``sizes`` while mapping coordinates with explicit ``scales``."""
    rank = x.dim()
    roi = roi or [0.0] * rank + [1.0] * rank
    for axis in range(rank):
        if sizes[axis] == x.shape[axis] and scales[axis] == 1.0:
            continue
        x = _resize_axis(x, axis, sizes[axis], scales[axis], spec, (roi[axis], roi[axis + rank]))
    return x


# --------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise ValueError("model does not import the default ONNX domain")


def _topological_order(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[int]:
    """Node indices in a valid execution order (stable w.r.t. the file order)."""
    produced_by = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    order: list[int] = []
    state: dict[int, int] = {}  # 1 = visiting, 2 = done

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if expanded:
                state[j] = 2
                order.append(j)
                continue
            if state.get(j) == 2:
                continue
            if state.get(j) == 1:
                raise ValueError(f"graph has a cycle through node {nodes[j].name!r}")
            state[j] = 1
            stack.append((j, True))
            for name in reversed(nodes[j].input):
                if name and name not in available and name in produced_by:
                    k = produced_by[name]
                    if state.get(k) != 2:
                        stack.append((k, False))

    for i in range(len(nodes)):
        if state.get(i) != 2:
            visit(i)
    return order


class TorchGraph:
    """Evaluate an ONNX graph with differentiable torch ops.

    Parameters
    ----------
    model:
        The model; only the default ONNX domain is supported (opsets 9 to 21 are tested).
    dtype:
        Floating-point evaluation dtype (float64 by default).
    """

    def __init__(self, model: onnx.ModelProto, dtype: torch.dtype = torch.float64) -> None:
        self.model = model
        self.dtype = dtype
        graph = model.graph
        self.opset = _default_opset(model)
        self._initializers: dict[str, Tensor] = {
            init.name: _np_to_torch(numpy_helper.to_array(init), dtype) for init in graph.initializer
        }
        for sparse in graph.sparse_initializer:
            self._initializers[sparse.values.name] = _np_to_torch(_sparse_to_dense(sparse), dtype)
        self.input_names = [i.name for i in graph.input if i.name not in self._initializers]
        self.output_names = [o.name for o in graph.output]
        self._nodes = list(graph.node)
        self._contexts: list[NodeContext] = []
        for node in self._nodes:
            if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                domain = f"{node.domain}::" if node.domain else ""
                raise NotImplementedError(f"unsupported op {domain}{node.op_type} (node {node.name!r})")
            attrs = {a.name: _attribute_value(a) for a in node.attribute}
            self._contexts.append(NodeContext(node, attrs, self.opset, dtype))
        self._producer = {out: i for i, node in enumerate(self._nodes) for out in node.output if out}
        self._order = _topological_order(self._nodes, set(self._initializers))
        self._constants: dict[int, list[Tensor]] = {
            i: [op_constant(ctx)] for i, ctx in enumerate(self._contexts) if ctx.node.op_type == "Constant"
        }

    # ----------------------------------------------------------------------------------

    def _needed_nodes(self, wanted: Sequence[str], fed: set[str]) -> set[int]:
        """Indices of the nodes that must run to produce ``wanted`` given ``fed`` tensors."""
        needed: set[int] = set()
        stack = [name for name in wanted if name not in fed]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            i = self._producer.get(name)
            if i is None or i in needed:
                continue
            needed.add(i)
            stack += [n for n in self._nodes[i].input if n and n not in fed]
        return needed

    def _ancestors(self, name: str, fed: set[str]) -> set[str]:
        """All tensor names ``name`` is computed from (including itself), not looking
        through tensors in ``fed``."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            i = None if n in fed else self._producer.get(n)
            if i is not None:
                stack += [m for m in self._nodes[i].input if m]
        return seen

    def _forward(
        self, inputs: dict[str, np.ndarray], wanted: Sequence[str], leaf: str | None = None
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Evaluate the nodes needed for ``wanted``.

        ``inputs`` may name graph inputs, initializers (overriding them) or intermediate
        tensors (whose computed value is then replaced).  If ``leaf`` is given, that tensor
        is replaced by a fresh ``requires_grad`` leaf copy as soon as it is available.
        """
        values: dict[str, Tensor] = dict(self._initializers)
        fed = {name: _np_to_torch(value, self.dtype) for name, value in inputs.items()}
        values.update(fed)
        known = set(values)
        for name in wanted:
            if name not in known and name not in self._producer:
                raise KeyError(f"unknown tensor {name!r}")
        leaf_tensor: Tensor | None = None

        def make_leaf(name: str) -> None:
            nonlocal leaf_tensor
            t = values[name]
            if not t.is_floating_point():
                raise ValueError(f"tensor {name!r} is not floating point ({t.dtype}); cannot differentiate")
            leaf_tensor = t.detach().clone().requires_grad_(True)
            values[name] = leaf_tensor

        if leaf is not None and leaf in values:
            make_leaf(leaf)
        needed = self._needed_nodes(wanted, set(fed))
        for i in self._order:
            if i not in needed:
                continue
            node, ctx = self._nodes[i], self._contexts[i]
            if i in self._constants:
                results: Sequence[Tensor] = self._constants[i]
            else:
                args: list[Tensor | None] = []
                for name in node.input:
                    if not name:
                        args.append(None)
                    elif name in values:
                        args.append(values[name])
                    else:
                        raise ValueError(f"missing value for tensor {name!r} (input of node {node.name!r})")
                while args and args[-1] is None:
                    args.pop()
                out = OPS[node.op_type](ctx, *args)
                results = (out,) if isinstance(out, Tensor) else tuple(out)
            for name, t in zip(node.output, results):
                if name and name not in fed:
                    values[name] = t
                    if name == leaf:
                        make_leaf(name)
        return values, leaf_tensor

    # ----------------------------------------------------------------------------------

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Forward pass; returns the named tensors (any intermediate tensor name allowed;
        default: graph outputs).  ``inputs`` may also override initializers or intermediate
        tensors.  Float results are float64 numpy arrays, integer results int64."""
        wanted = list(outputs) if outputs is not None else list(self.output_names)
        self._check_inputs(inputs, wanted)
        with torch.no_grad():
            values, _ = self._forward(inputs, wanted)
        return {name: _torch_to_np(values[name]) for name in wanted}

    def graph_values(self, inputs: dict[str, np.ndarray], wanted: Sequence[str], leaf: str) -> dict[str, Tensor]:
        """The forward values of ``wanted`` as tensors of one autograd graph grown from ``leaf``
        (made a leaf that requires grad), so that ``torch.autograd.grad`` gives VJPs between any two
        of them without running the forward again: the eager one-call-per-node reference."""
        self._check_inputs(inputs, wanted)
        with torch.enable_grad():
            values, _ = self._forward(inputs, wanted, leaf=leaf)
        return {name: values[name] for name in wanted}

    def vjp(self, inputs: dict[str, np.ndarray], upper: str, lower: str, seeds: np.ndarray) -> np.ndarray:
        """seeds: [P, *shape(upper)]. Returns [P, *shape(lower)]: d<seeds[p], upper>/d lower for each p.

        The value of ``lower`` is replaced by a leaf copy so that gradient flows only
        through it; gradients are taken with ``is_grads_batched=True`` (falling back to a
        loop over P where vmap does not support an op).  Raises ValueError if ``upper``
        does not depend (differentiably) on ``lower``.
        """
        if lower not in self._ancestors(upper, set(inputs)):
            raise ValueError(f"{upper!r} does not depend on {lower!r}")
        self._check_inputs(inputs, [upper])
        seeds = np.asarray(seeds)
        with torch.enable_grad():
            values, leaf = self._forward(inputs, [upper], leaf=lower)
            if leaf is None:
                raise ValueError(f"{upper!r} does not depend on {lower!r}")
            up = values[upper]
            if tuple(seeds.shape[1:]) != tuple(up.shape):
                raise ValueError(f"seeds shape {seeds.shape} does not match [P, *{tuple(up.shape)}]")
            if not up.requires_grad:
                raise ValueError(f"{upper!r} does not depend (differentiably) on {lower!r}")
            seed_t = torch.from_numpy(seeds.astype(np.float64)).to(up.dtype)
            if seed_t.shape[0] == 0:
                return np.zeros((0, *leaf.shape))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    (grad,) = torch.autograd.grad(up, leaf, seed_t, retain_graph=True, is_grads_batched=True)
            except (RuntimeError, NotImplementedError):
                grad = torch.stack(
                    [torch.autograd.grad(up, leaf, seed_t[p], retain_graph=True)[0] for p in range(seed_t.shape[0])]
                )
        return _torch_to_np(grad)

    def _check_inputs(self, inputs: dict[str, np.ndarray], wanted: Sequence[str]) -> None:
        """Raise a clear error for graph inputs that are needed but not fed."""
        needed = self._needed_nodes(wanted, set(inputs))
        required = {n for i in needed for n in self._nodes[i].input if n} | set(wanted)
        missing = [n for n in self.input_names if n in required and n not in inputs]
        if missing:
            raise ValueError(f"missing graph inputs: {missing}")
