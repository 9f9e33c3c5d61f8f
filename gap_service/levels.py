"""Device-resident level runs: the gradient, scores and child selection of one tree level.

Per (upper, lower) pair the *level graph* is the VJP graph plus the per-channel scores of the
contribution C = G * A (ReduceSum over space, of C and of ReLU(C)). Per lower layer the
*selection graph* gathers, for chosen (row, channel) pairs, the child maps ReLU(C[row, k]) and
the children's dense seeds (G[row, k] where C > 0, zero elsewhere). All of it runs through
onnxruntime IOBinding: activations, gradients and seeds stay on the execution device (CUDA
memory on a GPU) between the forward run and the level-by-level gradient runs; only the scores
[P, C], the selected maps and the indices cross to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .graph.gradient import VJP, VjpGraph

SCORES_NET = "gap_scores_net"
SCORES_POSITIVE = "gap_scores_positive"
ROWS = "gap_rows"
CHANNELS = "gap_channels"
MAPS = "gap_maps"
CHILD_SEEDS = "gap_child_seeds"


@dataclass(frozen=True)
class Placement:
    """Where OrtValues live: onnxruntime's device name and id ("cpu" or "cuda")."""

    device: str = "cpu"
    device_id: int = 0

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)


def placement_for(session: ort.InferenceSession) -> Placement:
    return Placement("cuda") if session.get_providers()[0] == "CUDAExecutionProvider" else Placement("cpu")


def run_bound(session: ort.InferenceSession, placement: Placement, inputs: dict[str, ort.OrtValue | np.ndarray],
              outputs: list[str]) -> list[ort.OrtValue]:
    """One run with inputs and outputs bound on the device; returns device OrtValues."""
    binding = session.io_binding()
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            value = placement.to_device(value)
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, placement.device, placement.device_id)
    session.run_with_iobinding(binding)
    return list(binding.get_outputs())


def _spatial_axes(shape: tuple[int, ...], channel_axis: int) -> list[int]:
    """Spatial axes of a layer, in the gradient layout [P, *shape] (batch axis 0 excluded)."""
    return [axis + 1 for axis in range(1, len(shape)) if axis != channel_axis]


def build_level_graph(vjp: VjpGraph, channel_axis: int) -> onnx.ModelProto:
    """The VJP graph with per-channel net and positive contribution sums as extra outputs."""
    graph = gs.import_onnx(vjp.model)
    tensors = graph.tensors()
    grad, activation = tensors[VJP], tensors[vjp.lower]
    contribution = graph.layer(op="Mul", inputs=[grad, activation], outputs=["gap_contribution"])[0]
    positive = graph.layer(op="Relu", inputs=[contribution], outputs=["gap_positive"])[0]
    axes = np.asarray(_spatial_axes(vjp.lower_shape, channel_axis) + [1], dtype=np.int64)  # + the batch-1 axis
    channels = vjp.lower_shape[channel_axis]
    outputs = []
    for name, source in ((SCORES_NET, contribution), (SCORES_POSITIVE, positive)):
        summed = graph.layer(op="ReduceSum", inputs=[source, axes], outputs=[f"{name}_sum"], attrs={"keepdims": 0})[0]
        out = gs.Variable(name, dtype=np.float32, shape=["P", channels])
        graph.layer(op="Identity", inputs=[summed], outputs=[out])
        outputs.append(out)
    graph.outputs = [*graph.outputs, *outputs]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.opset_import[0].version = vjp.model.opset_import[0].version
    return model


def build_selection_graph(lower_shape: tuple[int, ...], channel_axis: int, with_seeds: bool) -> onnx.ModelProto:
    """(G [P, *shape], A [*shape], rows [n], channels [n]) -> maps [n, *spatial] (+ seeds [n, *shape]).

    Gathers only the chosen (row, channel) planes, so the cost is O(n * H * W) for the maps;
    the children's dense seeds (needed only when another level follows) cost O(n * C * H * W).
    """
    rank = len(lower_shape)
    channels = lower_shape[channel_axis]
    spatial = [d for axis, d in enumerate(lower_shape) if axis not in (0, channel_axis)]
    graph = gs.Graph(opset=17)
    grad = gs.Variable(VJP, dtype=np.float32, shape=["P", *lower_shape])
    activation = gs.Variable("gap_activation", dtype=np.float32, shape=list(lower_shape))
    rows = gs.Variable(ROWS, dtype=np.int64, shape=["n"])
    chosen = gs.Variable(CHANNELS, dtype=np.int64, shape=["n"])

    def layer(op: str, inputs: list, name: str, **attrs) -> gs.Variable:
        return graph.layer(op=op, inputs=inputs, outputs=[name], attrs=attrs)[0]

    # Channel-first views: [P, C, *spatial] and [C, *spatial] (a Transpose only for channel-last layouts).
    others = [axis for axis in range(1, rank) if axis != channel_axis]
    grad_cf = layer("Transpose", [grad], "grad_cf", perm=[0, 1 + channel_axis, *[1 + a for a in others], 1]) \
        if channel_axis != 1 else grad
    act_cf = layer("Transpose", [activation], "act_cf", perm=[channel_axis, *others, 0]) if channel_axis != 1 else activation
    grad_cf = layer("Reshape", [grad_cf, np.asarray([0, channels, *spatial], np.int64)], "grad_planes")
    act_cf = layer("Reshape", [act_cf, np.asarray([channels, *spatial], np.int64)], "act_planes")
    pairs = layer("Concat", [layer("Unsqueeze", [rows, np.asarray([1], np.int64)], "rows_col"),
                             layer("Unsqueeze", [chosen, np.asarray([1], np.int64)], "channels_col")], "pairs", axis=1)
    picked = layer("GatherND", [grad_cf, pairs], "picked")                     # [n, *spatial]
    picked_activation = layer("Gather", [act_cf, chosen], "picked_activation", axis=0)
    contribution = layer("Mul", [picked, picked_activation], "contribution")
    maps = gs.Variable(MAPS, dtype=np.float32, shape=["n", *spatial])
    graph.layer(op="Relu", inputs=[contribution], outputs=[maps])
    outputs = [maps]
    if with_seeds:
        supported = layer("Greater", [contribution, np.asarray(0.0, np.float32)], "supported")
        kept = layer("Where", [supported, picked, np.asarray(0.0, np.float32)], "kept")
        kept_shape = [-1] + [1 if axis in (0, channel_axis) else d for axis, d in enumerate(lower_shape)]
        one_hot = layer("OneHot", [chosen, np.asarray(channels, np.int64), np.asarray([0.0, 1.0], np.float32)], "one_hot", axis=-1)
        mask_shape = [-1] + [channels if axis == channel_axis else 1 for axis in range(rank)]
        seeds = gs.Variable(CHILD_SEEDS, dtype=np.float32, shape=["n", *lower_shape])
        graph.layer(op="Mul", inputs=[layer("Reshape", [kept, np.asarray(kept_shape, np.int64)], "kept_planes"),
                                      layer("Reshape", [one_hot, np.asarray(mask_shape, np.int64)], "mask")], outputs=[seeds])
        outputs.append(seeds)
    graph.inputs = [grad, activation, rows, chosen]
    graph.outputs = outputs
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float16 inside, float32 at its inputs and outputs.

    Uses onnxruntime's own converter; index-like and integer tensors are left alone.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


__all__ = ["Placement", "build_level_graph", "build_selection_graph", "placement_for", "run_bound"]
