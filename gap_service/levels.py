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

from .graph.gradient import SEED, VJP, VjpGraph

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


def build_selection_graph(lower_shape: tuple[int, ...], channel_axis: int) -> onnx.ModelProto:
    """(G [P, *shape], A [*shape], rows [n], channels [n]) -> (maps [n, *spatial], seeds [n, *shape])."""
    rank = len(lower_shape)
    channels = lower_shape[channel_axis]
    spatial = [d for axis, d in enumerate(lower_shape) if axis not in (0, channel_axis)]
    graph = gs.Graph(opset=17)
    grad = gs.Variable(VJP, dtype=np.float32, shape=["P", *lower_shape])
    activation = gs.Variable("gap_activation", dtype=np.float32, shape=list(lower_shape))
    rows = gs.Variable(ROWS, dtype=np.int64, shape=["n"])
    chosen = gs.Variable(CHANNELS, dtype=np.int64, shape=["n"])
    picked = graph.layer(op="Gather", inputs=[grad, rows], outputs=["picked"], attrs={"axis": 0})[0]
    contribution = graph.layer(op="Mul", inputs=[picked, activation], outputs=["contribution"])[0]
    one_hot = graph.layer(op="OneHot", inputs=[chosen, np.asarray(channels, np.int64), np.asarray([0.0, 1.0], np.float32)],
                          outputs=["one_hot"], attrs={"axis": -1})[0]
    mask_shape = [-1] + [channels if axis == channel_axis else 1 for axis in range(rank)]
    mask = graph.layer(op="Reshape", inputs=[one_hot, np.asarray(mask_shape, np.int64)], outputs=["mask"])[0]
    selected = graph.layer(op="Mul", inputs=[contribution, mask], outputs=["selected"])[0]
    summed = graph.layer(op="ReduceSum", inputs=[selected, np.asarray([1, channel_axis + 1], np.int64)], outputs=["summed"],
                         attrs={"keepdims": 0})[0]
    maps = gs.Variable(MAPS, dtype=np.float32, shape=["n", *spatial])
    graph.layer(op="Relu", inputs=[summed], outputs=[maps])
    supported = graph.layer(op="Greater", inputs=[contribution, np.asarray(0.0, np.float32)], outputs=["supported"])[0]
    kept = graph.layer(op="Where", inputs=[supported, picked, np.asarray(0.0, np.float32)], outputs=["kept"])[0]
    seeds = gs.Variable(CHILD_SEEDS, dtype=np.float32, shape=["n", *lower_shape])
    graph.layer(op="Mul", inputs=[kept, mask], outputs=[seeds])
    graph.inputs = [grad, activation, rows, chosen]
    graph.outputs = [maps, seeds]
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float16 inside, float32 at its inputs and outputs.

    Uses onnxruntime's own converter; index-like and integer tensors are left alone.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


__all__ = ["SEED", "Placement", "build_level_graph", "build_selection_graph", "placement_for", "run_bound"]
