"""Vector-Jacobian subgraphs: from a forward model and two tensors, build the ONNX graph
that maps P seeds on ``upper`` ([P, *shape(upper)]) to the P gradients d<seed, upper>/d lower
([P, *shape(lower)]) in one run; see builder.py for the gradient layout.

The graph recomputes the forward cone from ``lower`` to ``upper`` at batch 1 (so the rules can
read forward values such as ReLU masks or argmax indices) and then runs the rules in reverse
topological order at batch P. Tensors that the cone reads but that do not depend on ``lower``
(skip branches from below, constant shapes computed at run time) become extra inputs,
fetched from the forward run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InvalidModelError, NotConnectedError, UnknownTensorError, UnsupportedOpError
from .builder import GradBuilder, RuleError
from .loader import NormalizedModel
from .rules import NON_DIFFERENTIABLE, RULES

SEED = "gap_seed"
VJP = "gap_vjp"
GRAD_OPSET = 17  # ScatterElements(reduction=add) needs >= 16


@dataclass(frozen=True)
class VjpGraph:
    """An ONNX model computing VJPs, and what to feed it."""

    model: onnx.ModelProto
    upper: str
    lower: str
    side_inputs: tuple[str, ...]
    upper_shape: tuple[int, ...]
    lower_shape: tuple[int, ...]
    path_elements: int  # elements of all forward tensors on the path: a per-seed memory estimate


@dataclass(frozen=True)
class Cone:
    """The nodes on differentiable paths from ``lower`` to ``upper``, in topological order."""

    nodes: list[gs.Node]
    path_tensors: set[str]
    side_inputs: list[gs.Tensor]


def _is_float(dtypes, name: str) -> bool:
    dtype = dtypes.get(name)
    return dtype is not None and np.dtype(dtype).kind == "f"


def find_cone(graph: gs.Graph, nm: NormalizedModel, upper: str, lower: str) -> Cone:
    tensors = graph.tensors()
    for role, name in (("upper", upper), ("lower", lower)):
        if name not in tensors:
            raise UnknownTensorError(f"{role} tensor '{name}' is not in the model")
    downstream = {lower}
    for node in graph.nodes:
        if node.op in NON_DIFFERENTIABLE:
            continue
        if any(t.name in downstream for t in node.inputs):
            downstream.update(t.name for t in node.outputs if t.name and _is_float(nm.dtypes, t.name))
    if upper not in downstream:
        raise NotConnectedError(f"lower tensor '{lower}' does not feed upper tensor '{upper}': no gradient path between them")
    needed = {upper}
    cone: list[gs.Node] = []
    for node in reversed(graph.nodes):
        if not any(t.name in needed for t in node.outputs):
            continue
        if not any(t.name in downstream for t in node.inputs):
            continue
        cone.append(node)
        needed.update(t.name for t in node.inputs if t.name in downstream)
    cone.reverse()
    produced = {t.name for n in cone for t in n.outputs}
    side: dict[str, gs.Tensor] = {}
    for node in cone:
        for t in node.inputs:
            if t.name and t.name != lower and t.name not in produced and not isinstance(t, gs.Constant):
                side[t.name] = t
    return Cone(cone, needed & downstream, list(side.values()))


def check_cone(cone: Cone, where: str) -> None:
    """Fail before building anything, listing every op on the path that has no rule."""
    missing = [(n.op, n.name) for n in cone.nodes if n.op not in RULES]
    if missing:
        raise UnsupportedOpError(missing, where)


def build_vjp_graph(nm: NormalizedModel, upper: str, lower: str) -> VjpGraph:
    """Build the VJP model for one (upper, lower) pair; raises a clear error before anything runs."""
    graph = nm.graph()
    cone = find_cone(graph, nm, upper, lower)
    where = f"from '{lower}' to '{upper}'"
    check_cone(cone, where)
    tensors = graph.tensors()
    lower_t = tensors[lower]
    for t in [lower_t, *cone.side_inputs]:
        t.inputs.clear()
        t.dtype = nm.dtypes[t.name]
        t.shape = list(nm.shapes[t.name])
    seed = gs.Variable(SEED, dtype=np.float32, shape=["P", *nm.shapes[upper]])
    graph.nodes = list(cone.nodes)
    graph.inputs = [lower_t, *cone.side_inputs, seed]

    builder = GradBuilder(graph, nm.shapes, cone.path_tensors)
    grads: dict[str, list[gs.Tensor]] = defaultdict(list)
    grads[upper].append(seed)
    for node in reversed(cone.nodes):
        out_grads = [builder.add_all(grads[t.name]) if grads.get(t.name) else None for t in node.outputs]
        if all(g is None for g in out_grads):
            continue
        try:
            in_grads = RULES[node.op](builder, node, out_grads)
        except RuleError as exc:
            raise InvalidModelError(f"{node.op} node '{node.name}' {where}: {exc}") from exc
        for t, g in zip(node.inputs, in_grads):
            if g is not None and t.name in cone.path_tensors:
                grads[t.name].append(g)
    if not grads.get(lower):
        raise NotConnectedError(f"no gradient reaches '{lower}' from '{upper}'")
    result = builder.add_all(grads[lower])
    output = gs.Variable(VJP, dtype=np.float32, shape=["P", *nm.shapes[lower]])
    graph.layer(op="Identity", inputs=[result], outputs=[output])
    graph.outputs = [output]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    _set_opset(model, max(nm.opset, GRAD_OPSET))
    return VjpGraph(
        model=model,
        upper=upper,
        lower=lower,
        side_inputs=tuple(t.name for t in cone.side_inputs),
        upper_shape=tuple(nm.shapes[upper]),
        lower_shape=tuple(nm.shapes[lower]),
        path_elements=sum(int(np.prod(nm.shapes[name])) for name in cone.path_tensors),
    )


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version


def unsupported_ops(nm: NormalizedModel, upper: str, lower: str) -> list[tuple[str, str]]:
    """(op type, node name) of every op on the path without a gradient rule."""
    cone = find_cone(nm.graph(), nm, upper, lower)
    return [(n.op, n.name) for n in cone.nodes if n.op not in RULES]
