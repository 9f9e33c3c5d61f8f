"""Several copies of one graph in one model: what runs many inputs' work in one session run.

A compiled model is specialised to batch 1 (its shapes folded at that size), and its level graphs
recompute the forward cone of one input, so several inputs cannot simply share a batch axis.
Stacking puts ``copies`` independent copies of a graph side by side instead: copy i reads and
writes the original names with the suffix ``#i`` (its symbolic sizes too: copies may differ in
them), and every copy reads the same initializers, so the weights are held once. Each copy computes exactly what the graph alone computes.
"""

from __future__ import annotations

import onnx

SUFFIX = "#"


def stacked_name(name: str, copy: int) -> str:
    return f"{name}{SUFFIX}{copy}"


def stackable(model: onnx.ModelProto) -> bool:
    """False for graphs with sub-graphs (If, Loop, Scan): their bodies read outer names."""
    return not any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for node in model.graph.node for attr in node.attribute)


def stack(model: onnx.ModelProto, copies: int) -> onnx.ModelProto:
    """``copies`` copies of ``model``'s graph in one model, sharing its initializers."""
    if copies < 1:
        raise ValueError(f"copies={copies} must be at least 1")
    if not stackable(model):
        raise ValueError("a graph with sub-graphs (If, Loop, Scan) cannot be stacked")
    graph = model.graph
    shared = {init.name for init in graph.initializer} | {""}  # "" is an omitted optional input

    def renamed(name: str, copy: int) -> str:
        return name if name in shared else stacked_name(name, copy)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:], out.graph.input[:], out.graph.output[:], out.graph.value_info[:]
    for copy in range(copies):
        for node in graph.node:
            clone = out.graph.node.add()
            clone.CopyFrom(node)
            clone.name = stacked_name(node.name, copy) if node.name else ""
            clone.input[:] = [renamed(name, copy) for name in node.input]
            clone.output[:] = [renamed(name, copy) for name in node.output]
        for source, target in ((graph.input, out.graph.input), (graph.output, out.graph.output),
                               (graph.value_info, out.graph.value_info)):
            for value in source:
                if value.name in shared:
                    continue
                clone = target.add()
                clone.CopyFrom(value)
                clone.name = stacked_name(value.name, copy)
                if clone.type.HasField("tensor_type"):  # each copy's sizes are its own ("P" of copy 0 is not copy 1's)
                    for dim in clone.type.tensor_type.shape.dim:
                        if dim.HasField("dim_param"):
                            dim.dim_param = stacked_name(dim.dim_param, copy)
    return out
