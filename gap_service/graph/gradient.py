"""Vector-Jacobian graphs: along the cone of (upper, lower), the ONNX graph that maps P seeds on
``upper`` ([P, *shape(upper)]) to the P gradients d<seed, upper>/d lower ([P, *shape(lower)]) in
one run; see builder.py for the gradient layout.

The graph recomputes the cone (cone.py) at batch 1, so the rules can read forward values such
as ReLU masks or argmax indices, and then runs the rules in reverse topological order at batch P.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InvalidModelError, NotConnectedError
from .builder import GradBuilder, RuleError
from .cone import Cone, Cut, cut, export, find_cone
from .loader import NormalizedModel
from .rules import entry, input_grads

SEED = "gap_seed"
VJP = "gap_vjp"
GRAD_OPSET = 17  # ScatterElements(reduction=add) needs >= 16


def gradient_opset(nm: NormalizedModel) -> int:
    return max(nm.opset, GRAD_OPSET)


def vjp_cut(nm: NormalizedModel, cone: Cone) -> Cut:
    """The cut with the gradient added: inputs (lower, side inputs, seeds), output ``VJP``.

    Raises a clear error before anything runs: every unsupported op on the path at once, or the
    node whose rule refused it.
    """
    cone.check_supported()
    piece = cut(nm, cone)
    forward = list(piece.graph.nodes)
    for node in forward:  # declared forward preparations (MaxPool: also return the argmax)
        prepare = entry(node.op).prepare
        if prepare is not None:
            prepare(node)
    seed = gs.Variable(SEED, dtype=np.float32, shape=["P", *nm.shapes[cone.upper]])
    piece.graph.inputs.append(seed)

    builder = GradBuilder(piece.graph, nm.shapes, cone.path_tensors)
    grads: dict[str, list[gs.Tensor]] = defaultdict(list)
    grads[cone.upper].append(seed)
    for node in reversed(forward):
        out_grads = [builder.add_all(grads[t.name]) if grads.get(t.name) else None for t in node.outputs]
        if all(g is None for g in out_grads):
            continue
        try:
            in_grads = input_grads(entry(node.op), builder, node, out_grads)
        except RuleError as exc:
            raise InvalidModelError(f"{node.op} node '{node.name}' {cone.where}: {exc}") from exc
        for t, g in zip(node.inputs, in_grads):
            if g is not None and t.name in cone.path_tensors:
                grads[t.name].append(g)
    if not grads.get(cone.lower):
        raise NotConnectedError(f"no gradient reaches '{cone.lower}' from '{cone.upper}'")
    output = gs.Variable(VJP, dtype=np.float32, shape=["P", *nm.shapes[cone.lower]])
    piece.graph.layer(op="Identity", inputs=[builder.add_all(grads[cone.lower])], outputs=[output])
    piece.graph.outputs = [output]
    piece.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    piece.tensors[VJP] = output
    return piece


def vjp_model(nm: NormalizedModel, cone: Cone) -> onnx.ModelProto:
    """(lower, side inputs, seeds [P, *shape(upper)]) -> ``VJP`` [P, *shape(lower)]."""
    return export(vjp_cut(nm, cone).graph, gradient_opset(nm))


def unsupported_ops(nm: NormalizedModel, upper: str, lower: str) -> list[tuple[str, str]]:
    """(op type, node name) of every op on the path without a gradient rule."""
    return find_cone(nm.graph(), nm, upper, lower).unsupported()
