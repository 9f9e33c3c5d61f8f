"""Issue 10 benchmark: a detection target on the real detector, against the torch reference of the
method in the same run.

PP-PicoDet (the bundled document-layout detector, 800x608) on examples/page.png, the title's
detection, depth 3, top_k 3, 2 threads:
  * gap-service: layers found from the detection's seed, one forward run, one batched gradient run per level;
  * the torch reference: the same ONNX graph run eagerly in torch (tests/support/torch_oracle.py,
    float32), one forward with autograd, then one torch.autograd.grad call per node with the
    same seed (the method as docs/method.md defines it).
Prints both times and their ratio (goal <= 1.0), and whether the trees agree.

    .venv/bin/python bench/targets.py [--threads 2] [--repeats 3] [--top-k 3] [--depth 3]
"""

from __future__ import annotations

import argparse

from common import ROOT, pin_threads, timeit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--depth", type=int, default=3)
    args = parser.parse_args()
    pin_threads(args.threads)

    import numpy as np
    import torch
    from PIL import Image

    from gap_service.options import DetectionTarget
    from gap_service.preprocess import preprocess
    from gap_service.repository import BUNDLED_REPOSITORY, load_repository
    from gap_service.runtime import RuntimeConfig
    from gap_service.targets import decode, detection_seed
    from support.reference import reference_tree
    from support.torch_oracle import TorchGraph

    entry = load_repository(BUNDLED_REPOSITORY)["picodet_layout_cdla"]
    explainer = entry.explainer(RuntimeConfig(providers=("CPUExecutionProvider",), threads=args.threads))
    x, _ = preprocess(Image.open(ROOT / "examples" / "page.png").convert("RGB"), entry.config.preprocessing)
    found = explainer.detections(x)
    index = next(i for i, d in enumerate(found) if d.label == "title")
    target = DetectionTarget(index)
    tree = explainer.explain(x, target=target, top_k=args.top_k, depth=args.depth)
    compiled = explainer.compiled()
    layout = compiled.task.detection

    oracle = TorchGraph(compiled.nm.model, dtype=torch.float32)
    root, layers = tree.root.layer, tree.layers
    axes = [compiled.layer(name).channel_axis for name in layers]

    def reference() -> list[tuple]:
        values = oracle.graph_values({"image": x}, [*layout.output_names, *layers], leaf="image")
        outputs = {name: values[name].detach().numpy() for name in layout.output_names}
        detection = decode(outputs, layout, compiled.task.score_threshold, compiled.task.iou_threshold,
                           input_hw=compiled.input_hw)[index]
        (name, seed), = detection_seed(detection, {k: v.shape for k, v in outputs.items()}).items()

        def vjp(upper: str, lower: str, seeds: np.ndarray) -> np.ndarray:
            grad = torch.autograd.grad(values[upper], values[lower], torch.from_numpy(seeds[0]).float(), retain_graph=True)[0]
            return grad.numpy()[None]

        activations = {layer: values[layer].detach().numpy() for layer in layers}
        return reference_tree(vjp, activations, name, seed, tree.root.channel, layers, axes, args.top_k, "net")

    expected = reference()
    same = [(n.parent, n.layer, n.channel) for n in tree.nodes] == [(e[0], e[2], e[3]) for e in expected]
    ours, ref = np.array([n.score for n in tree.nodes[1:]]), np.array([e[4] for e in expected[1:]])
    error = float(np.abs(ours - ref).max() / np.abs(ref).max()) if same else float("nan")

    gap = timeit(lambda: explainer.explain(x, target=target, top_k=args.top_k, depth=args.depth), args.repeats)
    eager = timeit(reference, args.repeats)
    print(f"picodet_layout_cdla 800x608, {tree.explained.describe(tree.label)}, depth {args.depth}, top_k {args.top_k}, "
          f"{args.threads} threads: {len(tree.nodes)} nodes, layers {layers}")
    print(f"  same tree as the torch reference: {same} (largest score difference {error:.1e} of the largest score)")
    print(f"  gap-service                      {gap * 1e3:8.0f} ms")
    print(f"  torch reference                  {eager * 1e3:8.0f} ms   (eager torch, one autograd call per node)")
    print(f"ratio gap-service / torch reference: {gap / eager:.2f} (goal <= 1.0)")


if __name__ == "__main__":
    main()
