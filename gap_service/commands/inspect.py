"""``gap-service inspect MODEL``: what the rewriter sees in a model, and whether it can explain it."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from ..explainer import Explainer
from ..graph.gradient import unsupported_ops
from ..graph.layers import LayerInfo
from ..targets import Task
from .common import add_input_shape, input_shapes
from .explain import resolve_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="list a model's inputs, outputs, task, candidate layers (and why) "
                                                   "and unsupported ops")
    parser.add_argument("model", help="an ONNX file, or the name of a model in the bundled repository")
    add_input_shape(parser)
    parser.add_argument("--output", help="explain this output tensor instead of the first graph output")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--gradient-check", action="store_true",
                        help="also check one VJP against central finite differences")
    parser.set_defaults(run=run)


def describe(explainer: Explainer, gradient_check: bool = False) -> dict[str, Any]:
    compiled = explainer.compiled()
    nm = compiled.nm
    decision = compiled.decision
    path_start = next(iter(nm.inputs))
    report: dict[str, Any] = {
        "model": explainer.name,
        "opset": nm.opset,
        "inputs": [{"name": n, "shape": list(s), "dtype": str(nm.dtypes[n])} for n, s in nm.inputs.items()],
        "outputs": [{"name": n, "shape": list(nm.shapes.get(n, ()))} for n in nm.outputs],
        "decision": {"logits": decision.logits, "probabilities": decision.probabilities, "shape": list(decision.shape)},
        "task": task_summary(compiled.task),
        "layers": [layer_summary(i) for i in compiled.layers],
        # A detector's layers depend on the detection: each head branch starts its own chain.
        "head_branches": [{"output": output, "layers": [layer_summary(i) for i in compiled.chain_from(first)]}
                          for output, first in compiled.head_branches],
        "unsupported_ops": [{"op": op, "node": name} for op, name in unsupported_ops(nm, decision.logits, path_start)],
    }
    if gradient_check:
        report["gradient_check"] = finite_difference_check(explainer)
    return report


def layer_summary(info: LayerInfo) -> dict[str, Any]:
    return {"name": info.name, "shape": list(info.shape), "channel_axis": info.channel_axis, "channels": info.channels,
            "op": info.op, "reason": info.reason}


def task_summary(task: Task | None) -> dict[str, Any] | None:
    if task is None:
        return None
    layout = task.detection
    return {"kind": task.kind, "declared": task.declared, "layout": layout.layout if layout else None,
            "outputs": list(layout.output_names) if layout else ([task.output] if task.output else [])}


def finite_difference_check(explainer: Explainer, seed: int = 0) -> dict[str, Any]:
    """Compare <VJP(s), v> with (f(a + eps v) - f(a - eps v)) / 2 eps, f = <s, upper(a)>, for the top layer.

    The directional derivative is evaluated by feeding perturbed activations of the layer into
    the gradient graph's own forward part, so it checks the gradient rules against the
    forward ops that onnxruntime runs.
    """
    compiled = explainer.compiled()
    rng = np.random.default_rng(seed)
    inputs = {n: rng.standard_normal(s).astype(np.float32) for n, s in compiled.nm.inputs.items()}
    upper, lower = compiled.decision.logits, compiled.layers[0].name
    state = compiled.forward(inputs, compiled.state_names(upper, lower))
    seeds = rng.standard_normal((1, *compiled.shape(upper))).astype(np.float32)
    grad = compiled.run_vjp(upper, lower, state, seeds)[0]
    direction = rng.standard_normal(grad.shape).astype(np.float32)
    direction *= np.abs(state[lower]).mean() / np.abs(direction).mean()
    eps = 1e-3

    def objective(activation: np.ndarray) -> float:
        outputs = compiled.run_segment(upper, lower, {**state, lower: activation.astype(np.float32)})
        return float((seeds[0].astype(np.float64) * outputs).sum())

    numeric = (objective(state[lower] + eps * direction) - objective(state[lower] - eps * direction)) / (2 * eps)
    analytic = float((grad * direction).sum())
    return {"upper": upper, "lower": lower, "analytic": analytic, "finite_difference": numeric,
            "relative_error": abs(analytic - numeric) / max(abs(numeric), 1e-12)}


def print_layers(title: str, layers: list[dict[str, Any]]) -> None:
    print(title)
    for item in layers:
        print(f"  {item['name']:<40} {str(item['shape']):<22} channel axis {item['channel_axis']}  ({item['op']}): "
              f"{item['reason']}")


def run(args: argparse.Namespace) -> int:
    path, config = resolve_model(args)
    settings = {"output": args.output or (config.output if config else None), "task": config.task if config else None,
                "input_shapes": config.input_shape if config else None}
    explainer = Explainer(path, **settings)
    shapes = input_shapes(args, [s.name for s in explainer.inputs])
    if shapes:
        explainer = Explainer(path, **{**settings, "input_shapes": shapes})
    report = describe(explainer, args.gradient_check)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']} (opset {report['opset']})")
    for item in report["inputs"]:
        print(f"  input  {item['name']} {item['shape']} {item['dtype']}")
    for item in report["outputs"]:
        print(f"  output {item['name']} {item['shape']}")
    d = report["decision"]
    print(f"decision: logits '{d['logits']}' {d['shape']}" + (f", probabilities '{d['probabilities']}'" if d["probabilities"] else ""))
    if report["task"]:
        t = report["task"]
        print(f"task: {t['kind']}" + (f" ({t['layout']} layout, reading {', '.join(t['outputs'])})" if t["layout"] else "")
              + ("" if t["declared"] else ", detected from the output shapes"))
    print_layers("candidate layers below the decision (highest first):", report["layers"])
    for branch in report["head_branches"]:
        print_layers(f"head branch of '{branch['output']}': the layers of a detection whose seed flows through it:",
                     branch["layers"])
    if report["unsupported_ops"]:
        print("unsupported ops on the path from the input to the decision:")
        for item in report["unsupported_ops"]:
            print(f"  {item['op']} (node '{item['node']}')")
    else:
        print("every op on the path from the input to the decision has a gradient rule")
    if "gradient_check" in report:
        g = report["gradient_check"]
        print(f"gradient check {g['lower']} <- {g['upper']}: VJP {g['analytic']:.6g} vs finite difference "
              f"{g['finite_difference']:.6g} (relative error {g['relative_error']:.2e})")
    return 0
