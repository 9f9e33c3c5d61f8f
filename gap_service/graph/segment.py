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

from .gradient import find_cone
from .loader import NormalizedModel

MASK = "gap_channel_mask"


def build_segment(nm: NormalizedModel, upper: str, lower: str, channel_axis: int | None = None) -> onnx.ModelProto:
    """Model (lower[, mask], side inputs) -> upper. With ``channel_axis``, lower is scaled by
    ``mask`` of shape [C] along that axis first."""
    graph = nm.graph()
    cone = find_cone(graph, nm, upper, lower)
    tensors = graph.tensors()
    lower_t = tensors[lower]
    for t in [lower_t, *cone.side_inputs]:
        t.inputs.clear()
        t.dtype = nm.dtypes[t.name]
        t.shape = list(nm.shapes[t.name])
    graph.nodes = list(cone.nodes)
    inputs = [lower_t, *cone.side_inputs]
    if channel_axis is not None:
        shape = nm.shapes[lower]
        mask = gs.Variable(MASK, dtype=np.float32, shape=[shape[channel_axis]])
        broadcast = [1] * len(shape)
        broadcast[channel_axis] = shape[channel_axis]
        reshaped = graph.layer(op="Reshape", inputs=[mask, np.asarray(broadcast, dtype=np.int64)], outputs=["gap_mask_b"])[0]
        masked = graph.layer(op="Mul", inputs=[lower_t, reshaped], outputs=["gap_masked"])[0]
        for node in cone.nodes:
            for index, t in enumerate(node.inputs):
                if t is lower_t:
                    node.inputs[index] = masked
        inputs.append(mask)
    graph.inputs = inputs
    upper_t = tensors[upper]
    upper_t.dtype, upper_t.shape = nm.dtypes[upper], list(nm.shapes[upper])
    graph.outputs = [upper_t]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(graph, do_type_check=False)
