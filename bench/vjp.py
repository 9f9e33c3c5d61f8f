"""Issue 2 benchmark: one batched gradient run (P seeds) from a ResNet-18's last stage to the
stage below, at 224x224 on 2 threads: gap-service (onnxruntime) vs PyTorch autograd on the
same segment, in the same process. Prints the ratio (goal <= 1.0).

    .venv/bin/python bench/vjp.py [--seeds 25] [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse

from common import pin_threads, timeit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    pin_threads(args.threads)

    import numpy as np
    import torch

    from gap_service import Explainer
    from gap_service.runtime import RuntimeConfig
    from support.models import export_onnx, sample_input, torch_case

    case = torch_case(args.arch)
    explainer = Explainer(export_onnx(case, 17), runtime=RuntimeConfig(providers=("CPUExecutionProvider",), threads=args.threads))
    x = sample_input(case)
    compiled = explainer.compiled()
    upper, lower = compiled.layers[0].name, compiled.layers[1].name
    state = compiled.forward(explainer.feeds(x), compiled.state_names(upper, lower))
    rng = np.random.default_rng(0)
    seeds = rng.standard_normal((args.seeds, *compiled.shape(upper))).astype(np.float32)
    ours = timeit(lambda: compiled.run_vjp(upper, lower, state, seeds), args.repeats)

    module = case.module
    segment = module.stages[3]
    lower_value = torch.from_numpy(state[lower]).clone()
    assert torch.allclose(module.stages[2](module.stages[1](module.stages[0](module.stem(torch.from_numpy(x))))), lower_value, atol=1e-4)
    seeds_t = torch.from_numpy(seeds)

    def torch_vmap() -> torch.Tensor:
        leaf = lower_value.clone().requires_grad_()
        out = segment(leaf)
        return torch.autograd.grad(out, leaf, seeds_t, is_grads_batched=True)[0]

    def torch_batched_forward() -> torch.Tensor:
        leaf = lower_value.expand(args.seeds, -1, -1, -1).clone().requires_grad_()
        out = segment(leaf)
        return torch.autograd.grad(out, leaf, seeds_t[:, 0])[0]

    def torch_loop() -> torch.Tensor:
        leaf = lower_value.clone().requires_grad_()
        out = segment(leaf)
        return torch.stack([torch.autograd.grad(out, leaf, s, retain_graph=True)[0] for s in seeds_t])

    reference = torch_batched_forward().numpy()
    ours_value = compiled.run_vjp(upper, lower, state, seeds)[:, 0]
    error = float(np.abs(ours_value - reference).max() / np.abs(reference).max())
    baselines = {
        "torch autograd.grad(is_grads_batched)": timeit(torch_vmap, args.repeats),
        "torch forward+backward at batch P": timeit(torch_batched_forward, args.repeats),
        "torch P backward calls": timeit(torch_loop, max(2, args.repeats // 3)),
    }
    best_name = min(baselines, key=baselines.get)
    print(f"{args.arch} 224x224, {args.threads} threads, P={args.seeds}: {lower} <- {upper}")
    print(f"  gap-service (onnxruntime CPU) {ours * 1e3:8.1f} ms   (max relative difference to torch {error:.1e})")
    for name, value in baselines.items():
        print(f"  {name:<38} {value * 1e3:8.1f} ms")
    print(f"ratio gap-service / fastest torch ({best_name}): {ours / baselines[best_name]:.2f} (goal <= 1.0)")


if __name__ == "__main__":
    main()
