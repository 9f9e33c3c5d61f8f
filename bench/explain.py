"""Issue 3 benchmark: a gAP tree (depth 3, top_k 5) on a ResNet-18-shaped network at 224x224,
2 threads, in one process:
  * gap-service (level-batched) vs a PyTorch eager reference of the same method (autograd, one
    node at a time, on the torch module the ONNX was exported from)   -> ratio, goal <= 1.0
  * gap-service level-batched vs the same engine with one gradient run per node -> batching speed-up
  * peak memory of a depth-4 tree with a memory bound on each batched run (fresh subprocesses).

    .venv/bin/python bench/explain.py [--threads 2] [--repeats 3] [--bound-mb 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import ROOT, pin_threads, timeit


def torch_reference_tree(module, x, target: int, top_k: int, depth: int, device: str = "cpu"):
    """The method, straight from its definition, one node at a time (torch autograd)."""
    import torch

    inp = torch.from_numpy(x).to(device).requires_grad_()
    acts = []
    h = module.stem(inp)
    for stage in module.stages:
        h = stage(h)
        acts.append(h)
    logits = module.fc(torch.flatten(module.pool(h), 1))
    layers = acts[::-1][:depth]  # highest first
    root = torch.zeros_like(logits)
    root[0, target] = 1.0
    nodes = [(None, target, float(logits[0, target].detach()))]
    frontier = [(0, logits, root)]
    for lower in layers:
        next_frontier = []
        for node_id, upper, seed in frontier:
            grad = torch.autograd.grad(upper, lower, seed, retain_graph=True)[0]
            contrib = grad * lower
            scores = contrib.sum(dim=(2, 3))[0]
            positive = torch.nonzero(scores > 0).flatten().tolist()
            chosen = sorted(positive, key=lambda c: (-float(scores[c]), c))[:top_k]
            for channel in chosen:
                nodes.append((node_id, channel, float(scores[channel])))
                child = torch.zeros_like(lower)
                child[0, channel] = torch.where(contrib[0, channel] > 0, grad[0, channel], 0.0)
                next_frontier.append((len(nodes) - 1, lower, child.detach()))
        frontier = next_frontier
    return nodes


def torch_batched_tree(module, x, target: int, top_k: int, depth: int, device: str = "cpu"):
    """The same tree with each level's nodes in one batched torch backward (a fairer baseline)."""
    import torch

    with torch.no_grad():
        acts = []
        h = module.stem(torch.from_numpy(x).to(device))
        for stage in module.stages:
            h = stage(h)
            acts.append(h)
    head = lambda t: module.fc(torch.flatten(module.pool(t), 1))  # noqa: E731
    segments = [head] + [module.stages[i] for i in range(len(module.stages) - 1, 0, -1)]
    layers = acts[::-1][:depth]
    seeds = torch.zeros(1, module.fc.out_features, device=device)
    seeds[0, target] = 1.0
    count = 1
    for level, lower in enumerate(layers):
        leaf = lower.expand(len(seeds), *lower.shape[1:]).clone().requires_grad_()
        grad = torch.autograd.grad(segments[level](leaf), leaf, seeds)[0]
        contrib = grad * lower
        scores = contrib.sum(dim=(2, 3))
        children = []
        for row in range(len(seeds)):
            positive = torch.nonzero(scores[row] > 0).flatten().tolist()
            for channel in sorted(positive, key=lambda c: (-float(scores[row, c]), c))[:top_k]:
                child = torch.zeros_like(lower[0])
                child[channel] = torch.where(contrib[row, channel] > 0, grad[row, channel], 0.0)
                children.append(child)
        count += len(children)
        seeds = torch.stack(children) if children else seeds[:0]
    return count


def memory_run(bound_mb: int, depth: int, threads: int) -> dict:
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT / 'bench')!r})
from common import pin_threads
pin_threads({threads})
from gap_service import Explainer
from gap_service.runtime import RuntimeConfig
from support.models import export_onnx, sample_input, torch_case
case = torch_case('resnet18')
explainer = Explainer(export_onnx(case, 17), runtime=RuntimeConfig(providers=('CPUExecutionProvider',), threads={threads}))
x = sample_input(case)
explainer.explain(x, top_k=1, depth={depth}, max_batch_bytes={bound_mb} * 2**20)  # build every session
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS counter
before = status('VmRSS:')
tree = explainer.explain(x, top_k=5, depth={depth}, max_batch_bytes={bound_mb} * 2**20)
print(json.dumps({{'bound_mb': {bound_mb}, 'rss_before_mb': before, 'peak_mb': status('VmHWM:'), 'nodes': len(tree.nodes)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bound-mb", type=int, default=64)
    args = parser.parse_args()
    pin_threads(args.threads)

    import numpy as np

    from gap_service import Explainer
    from gap_service.runtime import RuntimeConfig
    from support.models import export_onnx, sample_input, torch_case

    case = torch_case("resnet18")
    explainer = Explainer(export_onnx(case, 17), runtime=RuntimeConfig(providers=("CPUExecutionProvider",), threads=args.threads))
    x = sample_input(case)
    tree = explainer.explain(x, top_k=5, depth=3)
    reference = torch_reference_tree(case.module, x, tree.target, 5, 3)
    same_channels = [n.channel for n in tree.nodes] == [c for _, c, _ in reference]
    ref_scores = np.array([s for _, _, s in reference[1:]])
    ours_scores = np.array([n.score for n in tree.nodes[1:]])
    score_error = float(np.abs(ours_scores - ref_scores).max() / np.abs(ref_scores).max()) if same_channels else float("nan")

    batched = timeit(lambda: explainer.explain(x, top_k=5, depth=3), args.repeats)
    unbatched = timeit(lambda: explainer.explain(x, top_k=5, depth=3, seeds_per_run=1), args.repeats)
    eager = timeit(lambda: torch_reference_tree(case.module, x, tree.target, 5, 3), args.repeats)
    assert torch_batched_tree(case.module, x, tree.target, 5, 3) == len(tree.nodes)
    eager_batched = timeit(lambda: torch_batched_tree(case.module, x, tree.target, 5, 3), args.repeats)
    print(f"resnet18 224x224, {args.threads} threads, depth 3, top_k 5: {len(tree.nodes)} nodes "
          f"(same channels as the torch reference: {same_channels}, max score difference {score_error:.1e})")
    print(f"  gap-service, level-batched      {batched * 1e3:8.0f} ms")
    print(f"  gap-service, one run per node   {unbatched * 1e3:8.0f} ms")
    print(f"  PyTorch eager reference         {eager * 1e3:8.0f} ms   (the method as defined: one autograd call per node)")
    print(f"  PyTorch, level-batched          {eager_batched * 1e3:8.0f} ms   (same tree, one batched backward per level)")
    print(f"ratio gap-service / PyTorch eager reference: {batched / eager:.2f} (goal <= 1.0)")
    print(f"ratio gap-service / PyTorch level-batched: {batched / eager_batched:.2f}")
    print(f"speed-up of level batching: {unbatched / batched:.2f}x (goal > 1)")
    for bound in (args.bound_mb, 4 * args.bound_mb):
        m = memory_run(bound, 4, args.threads)
        growth = m["peak_mb"] - m["rss_before_mb"]
        print(f"depth 4 ({m['nodes']} nodes), bound {bound} MiB per batched run: peak RSS {m['peak_mb']:.0f} MiB, "
              f"growth during the explanation {growth:.0f} MiB ({'under' if growth <= bound else 'OVER'} the bound)")


if __name__ == "__main__":
    main()
