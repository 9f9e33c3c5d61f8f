"""Forward segments: the part of a model between two tensors, as a model of its own.

A segment takes ``lower`` (optionally multiplied by a per-channel mask input, the rewriter's
channel-ablation hook) plus the side inputs it reads, and returns ``upper``. The faithfulness
check zeroes channels through the mask; the finite-difference check feeds perturbed
activations.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .cone import Cone, cut, export
from .loader import NormalizedModel

MASK = "gap_channel_mask"


def segment_model(nm: NormalizedModel, cone: Cone, channel_axis: int | None = None) -> onnx.ModelProto:
    """Model (lower[, mask], side inputs) -> upper. With ``channel_axis``, lower is scaled by
    ``mask`` of shape [C] along that axis first."""
    piece = cut(nm, cone)
    sub = piece.graph
    if channel_axis is not None:
        lower = piece[cone.lower]
        shape = nm.shapes[cone.lower]
        mask = gs.Variable(MASK, dtype=np.float32, shape=[shape[channel_axis]])
        broadcast = [1] * len(shape)
        broadcast[channel_axis] = shape[channel_axis]
        consumers = list(lower.outputs)
        reshaped = sub.layer(op="Reshape", inputs=[mask, np.asarray(broadcast, dtype=np.int64)], outputs=["gap_mask_b"])[0]
        masked = sub.layer(op="Mul", inputs=[lower, reshaped], outputs=["gap_masked"])[0]
        for node in consumers:
            for index, t in enumerate(node.inputs):
                if t is lower:
                    node.inputs[index] = masked
        sub.inputs.append(mask)
    upper = piece[cone.upper]
    upper.dtype, upper.shape = nm.dtypes[cone.upper], list(nm.shapes[cone.upper])
    sub.outputs = [upper]
    return export(sub, nm.opset)
