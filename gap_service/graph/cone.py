"""The forward cone between two tensors, and the one place where a sub-graph is cut along it.

The cone of (upper, lower): the nodes on differentiable paths from ``lower`` to ``upper``, in
topological order. Tensors those nodes read that do not depend on ``lower`` (skip branches from
below, constant shapes computed at run time) are its *side inputs*, fetched from the forward
run. Gradient, level and segment graphs all start from ``cut``: a new graph holding copies of
the cone's nodes, fed by ``lower`` and the side inputs. The model's own graph (imported once per
compiled model) is only read, so any number of cuts can be made from it, also concurrently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import NotConnectedError, UnknownTensorError, UnsupportedOpError
from .loader import NormalizedModel
from .rules import entry


@dataclass(frozen=True, eq=False)
class Cone:
    """The nodes on differentiable paths from ``lower`` to ``upper``, and what they read."""

    graph: gs.Graph  # the model's graph the cone lies in: read, never changed
    upper: str
    lower: str
    nodes: tuple[gs.Node, ...]  # nodes of ``graph``
    path_tensors: frozenset[str]
    side_inputs: tuple[str, ...]
    path_elements: int  # elements of all forward tensors on the path: a per-seed memory estimate

    @property
    def state_names(self) -> tuple[str, ...]:
        """The forward tensors a graph cut along this cone is fed."""
        return (self.lower, *self.side_inputs)

    @property
    def where(self) -> str:
        return f"from '{self.lower}' to '{self.upper}'"

    def unsupported(self) -> list[tuple[str, str]]:
        """(op type, node name) of every op on the path without a gradient rule."""
        return [(n.op, n.name) for n in self.nodes if not entry(n.op).has_rule]

    def check_supported(self) -> None:
        """Fail before building anything, listing every op on the path that has no rule."""
        missing = self.unsupported()
        if missing:
            raise UnsupportedOpError(missing, self.where)


def _is_float(dtypes: Mapping[str, np.dtype], name: str) -> bool:
    dtype = dtypes.get(name)
    return dtype is not None and np.dtype(dtype).kind == "f"


def find_cone(graph: gs.Graph, nm: NormalizedModel, upper: str, lower: str) -> Cone:
    tensors = graph.tensors()
    for role, name in (("upper", upper), ("lower", lower)):
        if name not in tensors:
            raise UnknownTensorError(f"{role} tensor '{name}' is not in the model")
    downstream = {lower}
    for node in graph.nodes:
        if not entry(node.op).carries_gradient:
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
    side = dict.fromkeys(
        t.name for node in cone for t in node.inputs
        if t.name and t.name != lower and t.name not in produced and not isinstance(t, gs.Constant)
    )
    path = frozenset(needed & downstream)
    return Cone(graph, upper, lower, tuple(cone), path, tuple(side), sum(int(np.prod(nm.shapes[name])) for name in path))


@dataclass
class Cut:
    """A new graph holding copies of a cone's nodes; ``tensors`` maps names to its own tensors."""

    graph: gs.Graph
    tensors: dict[str, gs.Tensor]

    def __getitem__(self, name: str) -> gs.Tensor:
        return self.tensors[name]


def cut(nm: NormalizedModel, cone: Cone) -> Cut:
    """The cone as a graph of its own: inputs ``lower`` and the side inputs (with their static
    shapes and dtypes), no outputs yet. Nodes and tensors are copies (weights are shared, not
    copied), so the caller may change them freely."""
    copies: dict[str, gs.Tensor] = {}

    def copy(tensor: gs.Tensor) -> gs.Tensor:
        if not tensor.name:
            return gs.Variable.empty()
        if tensor.name not in copies:
            copies[tensor.name] = tensor.copy()
        return copies[tensor.name]

    nodes = [node.copy(inputs=[copy(t) for t in node.inputs], outputs=[copy(t) for t in node.outputs]) for node in cone.nodes]
    inputs = [copies[name] for name in cone.state_names]
    for t in inputs:
        t.dtype, t.shape = nm.dtypes[t.name], list(nm.shapes[t.name])
    graph = cone.graph
    sub = gs.Graph(
        nodes=nodes, inputs=inputs, outputs=[], name=graph.name, doc_string=graph.doc_string, opset=graph.opset,
        import_domains=graph.import_domains, producer_name=graph.producer_name,
        producer_version=graph.producer_version, functions=graph.functions, ir_version=graph.ir_version,
    )
    return Cut(sub, copies)


def export(graph: gs.Graph, opset: int) -> onnx.ModelProto:
    """The finished graph (unused nodes dropped, sorted) as a model of the given default opset."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    for opset_id in model.opset_import:
        if opset_id.domain in ("", "ai.onnx"):
            opset_id.version = opset
    return model
