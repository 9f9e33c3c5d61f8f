"""The gradient-graph builder: the one object gradient rules talk to.

Convention: the gradients of a forward tensor of shape ``s`` have shape ``[P, *s]``: one row per
seed, in front of the forward shape. Forward values then broadcast against gradients in
ordinary ONNX ops (numpy broadcasting aligns trailing axes), and forward axis ``a`` is gradient
axis ``a + 1``. Ops with batch-first kernels (Conv, pooling) fold P into the forward batch of 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

Tensor = gs.Tensor
OpInput = gs.Tensor | np.ndarray


class RuleError(Exception):
    """Raised by a rule for a node it cannot differentiate; the caller adds the node's name."""


class GradBuilder:
    """Adds gradient ops to a graph and answers questions about forward tensors."""

    def __init__(
        self,
        graph: gs.Graph,
        shapes: Mapping[str, tuple[int, ...]],
        differentiable: Set[str],
        float_dtype: np.dtype = np.dtype(np.float32),
    ) -> None:
        self.graph = graph
        self.shapes = shapes
        self.differentiable = differentiable
        self.float_dtype = float_dtype
        self._constants = 0

    # -- questions about the forward graph -------------------------------------------------
    def shape(self, tensor: Tensor) -> tuple[int, ...]:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.values.shape)
        return tuple(self.shapes[tensor.name])

    def value(self, tensor: Tensor | None) -> np.ndarray | None:
        """The value of a constant tensor, or None when it is computed at run time."""
        if tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name):
            return None
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

    def constant(self, tensor: Tensor | None, what: str) -> np.ndarray:
        value = self.value(tensor)
        if value is None:
            raise RuleError(f"{what} must be a constant (tensor '{getattr(tensor, 'name', None)}' is computed at run time)")
        return value

    def needs_grad(self, tensor: Tensor | None) -> bool:
        return tensor is not None and tensor.name in self.differentiable

    # -- making ops ---------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[OpInput | None], attrs: Mapping[str, Any] | None = None, outputs: int = 1) -> Any:
        """Add one node; returns its output (or the list of outputs when ``outputs > 1``)."""
        ins = [self._as_tensor(i) for i in inputs]
        outs = self.graph.layer(
            op=op_type, inputs=ins, outputs=[f"gap_{op_type.lower()}"] * outputs, attrs=dict(attrs or {})
        )
        return outs[0] if outputs == 1 else outs

    def const(self, value: Any) -> gs.Constant:
        """A constant with the graph's float dtype (floats) or int64 (integers)."""
        array = np.asarray(value)
        if array.dtype.kind == "f":
            array = array.astype(self.float_dtype)
        elif array.dtype.kind in "iub":
            array = array.astype(np.int64)
        self._constants += 1
        return gs.Constant(f"gap_const_{self._constants}", np.ascontiguousarray(array))

    def ints(self, values: Sequence[int]) -> gs.Constant:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def _as_tensor(self, value: OpInput | None) -> Tensor:
        if value is None:
            return gs.Variable.empty()
        if isinstance(value, gs.Tensor):
            return value
        return self.const(value)

    # -- small combinators rules share -------------------------------------------------------
    def mul(self, a: OpInput, b: OpInput) -> Tensor:
        return self.op("Mul", [a, b])

    def add_all(self, terms: Sequence[Tensor]) -> Tensor:
        return terms[0] if len(terms) == 1 else self.op("Sum", list(terms))

    def to_float(self, tensor: Tensor) -> Tensor:
        return self.op("Cast", [tensor], {"to": _onnx_float(self.float_dtype)})

    def where(self, condition: Tensor, a: OpInput, b: OpInput) -> Tensor:
        return self.op("Where", [condition, a, b])

    def reduce_sum(self, tensor: Tensor, axes: Sequence[int], keepdims: bool = True) -> Tensor:
        return self.op("ReduceSum", [tensor, self.ints(axes)], {"keepdims": int(keepdims)})

    def as_grad(self, tensor: Tensor, forward_shape: Sequence[int]) -> Tensor:
        """Reshape to the gradient layout ``[P, *forward_shape]``."""
        return self.op("Reshape", [tensor, self.ints([-1, *forward_shape])])

    def fold_seeds(self, grad: Tensor, forward_shape: Sequence[int], what: str) -> Tensor:
        """``[P, 1, *rest]`` -> ``[P, *rest]``: the seeds become the batch of a batch-first kernel."""
        if not forward_shape or forward_shape[0] != 1:
            raise RuleError(f"{what} needs a forward batch of 1, the tensor has shape {list(forward_shape)}")
        return self.op("Reshape", [grad, self.ints([-1, *forward_shape[1:]])])

    def unbroadcast(self, grad: Tensor, input_shape: Sequence[int], output_shape: Sequence[int]) -> Tensor:
        """Sum a gradient over the axes along which ``input_shape`` was broadcast (numpy rules)."""
        if tuple(input_shape) == tuple(output_shape):
            return grad
        extra = len(output_shape) - len(input_shape)
        axes = list(range(1, extra + 1)) + [
            1 + extra + i for i, size in enumerate(input_shape) if size == 1 and output_shape[extra + i] != 1
        ]
        summed = self.reduce_sum(grad, axes) if axes else grad
        return self.as_grad(summed, input_shape) if extra else summed

    def zeros_like_grad(self, like: Tensor, forward_shape: Sequence[int]) -> Tensor:
        """Zeros of shape ``[P, *forward_shape]`` where P is taken from the gradient ``like``."""
        batch = self.op("Slice", [self.op("Shape", [like]), self.ints([0]), self.ints([1])])
        shape = self.op("Concat", [batch, self.ints(forward_shape)], {"axis": 0})
        zero = gs.Constant("zero", np.zeros([1], dtype=self.float_dtype))
        return self.op("ConstantOfShape", [shape], {"value": zero})

    def along_axis(self, tensor: Tensor, matrix: np.ndarray, axis: int, rank: int) -> Tensor:
        """``out[.., i, ..] = sum_j matrix[i, j] * tensor[.., j, ..]`` along one axis, as a MatMul.

        ``axis`` and ``rank`` are those of ``tensor`` itself (gradient layout for gradients).
        """
        axis = axis % rank
        matrix_t = np.ascontiguousarray(matrix.T.astype(self.float_dtype))
        if axis == rank - 1:
            return self.op("MatMul", [tensor, matrix_t])
        perm = [a for a in range(rank) if a != axis] + [axis]
        inverse = list(np.argsort(perm))
        moved = self.op("Transpose", [tensor], {"perm": perm})
        product = self.op("MatMul", [moved, matrix_t])
        return self.op("Transpose", [product], {"perm": inverse})


def _onnx_float(dtype: np.dtype) -> int:
    import onnx

    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
