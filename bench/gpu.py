"""Issue 6 benchmark and CUDA-vs-CPU check (run by bench/gpu_check.sh on a GPU machine).

ResNet-50-shaped network at 224x224, top_k 5, depth 3 and 4: explain time with onnxruntime CUDA
(float32 and float16 gradient graphs) vs the PyTorch CUDA eager reference of the same tree (one
autograd call per node, and level-batched) vs onnxruntime CPU; Predict latency; CUDA trees
against CPU trees; GPU memory after 10 and after N explanations. Without CUDA it runs the CPU
parts only (``--smoke`` makes it small), so the script itself is tested on CPU machines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import timeit
from explain import torch_batched_tree, torch_reference_tree


def compare_trees(a, b) -> dict:
    """Per level: the share of nodes found at the same place (same path of channels from the root)
    in both trees, and the largest score difference among those, relative to the level's largest
    score. Trees from two devices agree where scores are well separated; near-ties (common among
    thousands of channels of a random-weight network) may swap."""
    def keyed(tree):
        return {tuple(tree.path(n.id)): n for n in tree.nodes[1:]}

    ka, kb = keyed(a), keyed(b)
    levels = {}
    for level in range(1, a.depth + 1):
        na = {k: n for k, n in ka.items() if n.level == level}
        nb = {k: n for k, n in kb.items() if n.level == level}
        common = sorted(set(na) & set(nb))
        scale = max(abs(n.score) for n in na.values()) if na else 1.0
        diff = max((abs(na[k].score - nb[k].score) for k in common), default=0.0) / scale
        levels[level] = {"nodes": len(na), "same_place": round(len(common) / max(len(na), 1), 4),
                         "max_score_difference": float(f"{diff:.2e}")}
    return {"identical": all(v["same_place"] == 1.0 for v in levels.values()), "levels": levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--depths", default="3,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-runs", type=int, default=500)
    parser.add_argument("--out", default="out/gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CPU-only machines")
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.depths, args.repeats, args.memory_runs = "resnet18", "2", 1, 3

    import onnxruntime as ort
    import torch

    from gap_service import Explainer
    from gap_service.runtime import RuntimeConfig
    from support.models import export_onnx, sample_input, torch_case

    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    results: dict = {"onnxruntime": ort.__version__, "providers": available, "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "arch": args.arch}
    print(f"onnxruntime {ort.__version__} providers {available}; torch {torch.__version__}; device {results['device']}")
    case = torch_case(args.arch)
    data = export_onnx(case, 17)
    x = sample_input(case)
    cpu = Explainer(data, runtime=RuntimeConfig(providers=("CPUExecutionProvider",)))
    gpu = Explainer(data, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]) if cuda else None
    if gpu is not None:
        assert gpu.compiled().placement.device == "cuda", gpu.compiled().providers
    module = case.module.to("cuda") if cuda else case.module
    device = "cuda" if cuda else "cpu"
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        row: dict = {"depth": depth}
        reference = cpu.explain(x, top_k=5, depth=depth)
        row["nodes"] = len(reference.nodes)
        row["ort_cpu_s"] = timeit(lambda: cpu.explain(x, top_k=5, depth=depth), max(1, args.repeats // 3))
        if gpu is not None:
            tree32 = gpu.explain(x, top_k=5, depth=depth)
            tree16 = gpu.explain(x, top_k=5, depth=depth, precision="float16")
            row["cuda_vs_cpu"] = compare_trees(reference, tree32)
            row["float16_vs_float32"] = compare_trees(tree32, tree16)
            row["ort_cuda_fp32_s"] = timeit(lambda: gpu.explain(x, top_k=5, depth=depth), args.repeats)
            row["ort_cuda_fp16_s"] = timeit(lambda: gpu.explain(x, top_k=5, depth=depth, precision="float16"), args.repeats)
        target = reference.target

        def eager() -> None:
            torch_reference_tree(module, x, target, 5, depth, device)
            if cuda:
                torch.cuda.synchronize()

        def batched() -> None:
            torch_batched_tree(module, x, target, 5, depth, device)
            if cuda:
                torch.cuda.synchronize()

        row[f"torch_{device}_eager_per_node_s"] = timeit(eager, max(1, args.repeats // 2))
        row[f"torch_{device}_level_batched_s"] = timeit(batched, args.repeats)
        rows.append(row)
        print(json.dumps(row))
    results["explain"] = rows

    logits = cpu.decision().logits
    results["predict_cpu_ms"] = 1e3 * timeit(lambda: cpu.forward(x, [logits]), 20, warmup=3)
    if gpu is not None:
        results["predict_cuda_ms"] = 1e3 * timeit(lambda: gpu.forward(x, [logits]), 50, warmup=5)

        def used_mib() -> float:
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20

        memory = {"before": used_mib()}
        started = time.perf_counter()
        for i in range(args.memory_runs):
            gpu.explain(x, top_k=5, depth=3)
            if i + 1 == 10:
                memory["after_10"] = used_mib()
        memory[f"after_{args.memory_runs}"] = used_mib()
        memory["seconds"] = time.perf_counter() - started
        results["gpu_memory_mib"] = memory
    print_table(results, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2))


def print_table(results: dict, device: str) -> None:
    print()
    print(f"| depth | nodes | ORT CUDA fp32 | ORT CUDA fp16 | torch {device} eager (per node) | torch {device} level-batched | ORT CPU |")
    print("|---|---|---|---|---|---|---|")
    for row in results["explain"]:
        def ms(key: str) -> str:
            return f"{row[key] * 1e3:.0f} ms" if key in row else "n/a"
        print(f"| {row['depth']} | {row['nodes']} | {ms('ort_cuda_fp32_s')} | {ms('ort_cuda_fp16_s')} | "
              f"{ms(f'torch_{device}_eager_per_node_s')} | {ms(f'torch_{device}_level_batched_s')} | {ms('ort_cpu_s')} |")
    for key in ("predict_cpu_ms", "predict_cuda_ms", "gpu_memory_mib"):
        if key in results:
            print(f"{key}: {results[key]}")


if __name__ == "__main__":
    main()
