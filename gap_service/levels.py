"""Device-resident level runs: the gradient, scores and child selection of one tree level.

Per (upper, lower) pair the *level graph* is the VJP graph plus the per-channel scores of the
contribution C = G * A (ReduceSum over space, of C and of ReLU(C)), added in the same pass that
builds the gradient. The *selection graph* gathers, for chosen (row, channel) pairs, the child
maps ReLU(C[row, k]) and the children's dense seeds (G[row, k] where C > 0, zero elsewhere); it
depends only on the layer's rank and channel axis, so one session per (rank, channel axis, seeds
or not, runtime) serves every model and layer of the process. All of it runs through
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

from . import runtime
from .cache import BuildOnce
from .graph.cone import Cone, export
from .graph.gradient import VJP, gradient_opset, vjp_cut
from .graph.loader import NormalizedModel
from .runtime import RuntimeConfig

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


def level_model(nm: NormalizedModel, cone: Cone, channel_axis: int) -> onnx.ModelProto:
    """The VJP graph of ``cone`` with per-channel net and positive contribution sums as extra outputs."""
    piece = vjp_cut(nm, cone)
    sub, shape = piece.graph, nm.shapes[cone.lower]
    contribution = sub.layer(op="Mul", inputs=[piece[VJP], piece[cone.lower]], outputs=["gap_contribution"])[0]
    positive = sub.layer(op="Relu", inputs=[contribution], outputs=["gap_positive"])[0]
    axes = np.asarray(_spatial_axes(shape, channel_axis) + [1], dtype=np.int64)  # + the batch-1 axis
    for name, source in ((SCORES_NET, contribution), (SCORES_POSITIVE, positive)):
        summed = sub.layer(op="ReduceSum", inputs=[source, axes], outputs=[f"{name}_sum"], attrs={"keepdims": 0})[0]
        out = gs.Variable(name, dtype=np.float32, shape=["P", shape[channel_axis]])
        sub.layer(op="Identity", inputs=[summed], outputs=[out])
        sub.outputs.append(out)
    return export(sub, gradient_opset(nm))


def build_selection_graph(rank: int, channel_axis: int, with_seeds: bool) -> onnx.ModelProto:
    """(G [P, *shape], A [*shape], rows [n], channels [n]) -> maps [n, *spatial] (+ seeds [n, *shape])
    for any layer of this rank and channel axis (batch 1; the other sizes are read at run time).

    Gathers only the chosen (row, channel) planes, so the cost is O(n * H * W) for the maps;
    the children's dense seeds (needed only when another level follows) cost O(n * C * H * W).
    """
    graph = gs.Graph(opset=17)
    dims: list[int | str] = [1, *(f"d{axis}" for axis in range(1, rank))]
    grad = gs.Variable(VJP, dtype=np.float32, shape=["P", *dims])
    activation = gs.Variable("gap_activation", dtype=np.float32, shape=dims)
    rows = gs.Variable(ROWS, dtype=np.int64, shape=["n"])
    chosen = gs.Variable(CHANNELS, dtype=np.int64, shape=["n"])

    def layer(op: str, inputs: list, name: str, **attrs) -> gs.Variable:
        return graph.layer(op=op, inputs=inputs, outputs=[name], attrs=attrs)[0]

    def ints(*values: int) -> np.ndarray:
        return np.asarray(values, np.int64)

    # Channel-first planes [P, C, *spatial] and [C, *spatial]: the layer's batch axis of 1 squeezed
    # out (a Transpose first only for channel-last layouts).
    others = [axis for axis in range(1, rank) if axis != channel_axis]
    grad_cf = layer("Transpose", [grad], "grad_cf", perm=[0, 1, 1 + channel_axis, *[1 + a for a in others]]) \
        if channel_axis != 1 else grad
    act_cf = layer("Transpose", [activation], "act_cf", perm=[0, channel_axis, *others]) if channel_axis != 1 else activation
    grad_cf = layer("Squeeze", [grad_cf, ints(1)], "grad_planes")
    act_cf = layer("Squeeze", [act_cf, ints(0)], "act_planes")
    pairs = layer("Concat", [layer("Unsqueeze", [rows, ints(1)], "rows_col"),
                             layer("Unsqueeze", [chosen, ints(1)], "channels_col")], "pairs", axis=1)
    picked = layer("GatherND", [grad_cf, pairs], "picked")                     # [n, *spatial]
    picked_activation = layer("Gather", [act_cf, chosen], "picked_activation", axis=0)
    contribution = layer("Mul", [picked, picked_activation], "contribution")
    maps = gs.Variable(MAPS, dtype=np.float32, shape=["n", *(dims[axis] for axis in others)])
    graph.layer(op="Relu", inputs=[contribution], outputs=[maps])
    outputs = [maps]
    if with_seeds:
        supported = layer("Greater", [contribution, np.asarray(0.0, np.float32)], "supported")
        kept = layer("Where", [supported, picked, np.asarray(0.0, np.float32)], "kept")
        channels = layer("Gather", [layer("Shape", [activation], "layer_shape"), ints(channel_axis)], "channel_count", axis=0)
        one_hot = layer("OneHot", [chosen, channels, np.asarray([0.0, 1.0], np.float32)], "one_hot", axis=-1)
        # [n, *spatial] and [n, C] -> [n, *shape]: size-1 axes where each has no extent.
        kept_planes = layer("Unsqueeze", [kept, ints(1, 1 + channel_axis)], "kept_planes")
        mask = layer("Unsqueeze", [one_hot, ints(*[a for a in range(1, rank + 1) if a != 1 + channel_axis])], "mask")
        seeds = gs.Variable(CHILD_SEEDS, dtype=np.float32, shape=["n", *dims])
        graph.layer(op="Mul", inputs=[kept_planes, mask], outputs=[seeds])
        outputs.append(seeds)
    graph.inputs = [grad, activation, rows, chosen]
    graph.outputs = outputs
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


_SELECTIONS: BuildOnce[tuple, ort.InferenceSession] = BuildOnce()


def selection_session(rank: int, channel_axis: int, with_seeds: bool, config: RuntimeConfig) -> ort.InferenceSession:
    """The process's one selection session for this layer layout and runtime (see the module doc)."""
    return _SELECTIONS.get((rank, channel_axis, with_seeds, config.key()), lambda: runtime.make_session(
        build_selection_graph(rank, channel_axis, with_seeds), config,
        f"selection graph (rank {rank}, channel axis {channel_axis}{', with seeds' if with_seeds else ''})"))


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float16 inside, float32 at its inputs and outputs.

    Uses onnxruntime's own converter; index-like and integer tensors are left alone.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


__all__ = ["Placement", "build_selection_graph", "level_model", "placement_for", "run_bound", "selection_session"]
