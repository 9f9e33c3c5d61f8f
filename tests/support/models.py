"""Models used by the test-suite and the benchmarks.

Three families of ONNX graphs are provided:

* **Torch cases** (:data:`TORCH_CASES`): small, seeded PyTorch CNNs covering the
  architectural patterns an explainer must handle (residual adds, BatchNorm in its
  three guises, depthwise convs, squeeze-excitation, dense concatenation, NHWC
  layouts, a Softmax head, and a zoo of less common ops), plus full-size
  ResNet-18/50.  :func:`export_onnx` turns a case into ONNX bytes with the
  TorchScript exporter; the torch module stays available as a numerical reference.
* **ONNX model-zoo graphs** (:data:`ZOO_MODELS`): the "light" models shipped in
  ``onnx/backend/test/data/light``.  Their weights are stored as constant-filled
  ``ConstantOfShape`` nodes; :func:`zoo_model` swaps them for seeded random
  ``Constant`` nodes with sensible scales so that activations stay well-behaved.
* **PaddleOCR graphs** (:data:`PADDLE_MODELS`): the real, trained ONNX models
  bundled with ``rapidocr_onnxruntime``.

Everything is deterministic: the same name and seed always give the same weights
and inputs, and building a case never disturbs the global torch RNG.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    "PADDLE_INPUT_SHAPES",
    "PADDLE_MODELS",
    "TORCH_CASES",
    "ZOO_MODELS",
    "TorchCase",
    "export_onnx",
    "output_name",
    "paddle_input",
    "sample_input",
    "torch_case",
    "zoo_data_input",
    "zoo_input",
    "zoo_logits_name",
    "zoo_model",
]


# --------------------------------------------------------------------------------------
# Torch cases: public API
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchCase:
    """A seeded torch module in eval mode together with its static input shape."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]


def torch_case(name: str) -> TorchCase:
    """Build a fresh instance of the torch case called *name* (see :data:`TORCH_CASES`, :data:`LAYER_CASES`)."""
    builders = {**TORCH_CASES, **LAYER_CASES}
    try:
        builder = builders[name]
    except KeyError:
        raise KeyError(f"unknown torch case {name!r}; known: {sorted(builders)}") from None
    return builder()


def output_name(case: TorchCase) -> str:
    """Name of the ONNX graph output: ``"probs"`` for Softmax-headed models, else ``"logits"``."""
    return "probs" if case.name == "softmax_head" else "logits"


def export_onnx(case: TorchCase, opset: int = 17) -> bytes:
    """Export *case* to ONNX with the TorchScript exporter and return the serialized model.

    The graph has one input ``"input"`` and one output (:func:`output_name`), all shapes
    static.  The exporter's constant folding is on and :func:`_fold_constant_subgraphs`
    finishes its job, so no shape arithmetic survives; the module is exported in
    ``TrainingMode.PRESERVE`` so that BatchNorm layers stay ``BatchNormalization`` ops
    (the exporter's ``EVAL`` mode would fold them into the preceding conv).

    Results are cached per ``(case.name, opset)`` for the life of the process: the name
    identifies the case and every builder is deterministic, so do not export a module
    you have modified under its original name.
    """
    key = (case.name, opset)
    if key not in _EXPORT_CACHE:
        _EXPORT_CACHE[key] = _export(case, opset)
    return _EXPORT_CACHE[key]


def sample_input(case: TorchCase, seed: int = 0) -> np.ndarray:
    """A seeded standard-normal float32 input of the case's shape."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(case.input_shape, dtype=np.float32)


_EXPORT_CACHE: dict[tuple[str, int], bytes] = {}


def _export(case: TorchCase, opset: int) -> bytes:
    buffer = io.BytesIO()
    dummy = torch.from_numpy(sample_input(case))
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # the extra `onnxscript` package; the legacy path is still fully functional.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            case.module,
            (dummy,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=[output_name(case)],
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    model = _fold_constant_subgraphs(onnx.load_from_string(buffer.getvalue()))
    return model.SerializeToString()


def _fold_constant_subgraphs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constants and store its outputs as initializers.

    The TorchScript exporter's own folding skips ``ConstantOfShape``, so e.g. ``F.pad``
    leaves a ``ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Reshape ->
    Cast`` chain computing the (constant) pads.  Folding it gives ``Pad`` a constant
    ``pads`` initializer like any other exporter would.  Constant nodes that end up
    unused are dropped; everything that depends on the graph input is left untouched.
    """
    graph = model.graph
    known: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept: list[onnx.NodeProto] = []
    folded: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            known[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            kept.append(node)
            continue
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                           for a in node.attribute)  # fmt: skip
        inputs = [name for name in node.input if name]
        if has_subgraph or not inputs or not all(name in known for name in inputs):
            kept.append(node)
            continue
        # Only exporter shape plumbing gets here, whose semantics are opset-independent.
        outputs = ReferenceEvaluator(node).run(None, {name: known[name] for name in inputs})
        for name, value in zip(node.output, outputs):
            known[name] = folded[name] = np.asarray(value)

    if not folded:
        return model
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    nodes = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(
        numpy_helper.from_array(value, name=name) for name, value in folded.items() if name in used
    )
    # The exporter could not infer shapes through the unfolded chain (the output got a
    # symbolic batch dim); re-infer them now that the pads are constants.
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for output, inferred_output in zip(graph.output, inferred.graph.output):
        output.CopyFrom(inferred_output)
    return model


# --------------------------------------------------------------------------------------
# Torch cases: seeding and initialisation helpers
# --------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the torch RNG seeded, restoring the global RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finalize(module: nn.Module) -> nn.Module:
    """Give every layer non-trivial seeded parameters and switch to eval mode.

    Conv/Linear weights get He-normal init (so signals neither vanish nor explode with
    depth) and small random biases; BatchNorm layers get random affine parameters *and*
    random running statistics, so that BN is far from the identity and gradient checks
    through it are meaningful.  Must be called inside :func:`_seeded`.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if isinstance(layer, nn.ConvTranspose2d):
                # kaiming uses dim 1 as fan-in, which for ConvTranspose is the output side.
                layer.weight.data *= math.sqrt(layer.out_channels / layer.in_channels)
            if layer.bias is not None:
                nn.init.normal_(layer.bias, std=0.1)
        elif isinstance(layer, nn.BatchNorm2d):
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_(0.0, 0.1)
                layer.running_mean.normal_(0.0, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
        elif isinstance(layer, nn.PReLU):
            with torch.no_grad():
                layer.weight.uniform_(0.05, 0.3)
    return module.eval()


class ConvBN(nn.Sequential):
    """``Conv2d`` followed by ``BatchNorm2d`` (and optionally an activation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: nn.Module | None = None,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if activation is not None:
            layers.append(activation)
        super().__init__(*layers)


class DecomposedBatchNorm2d(nn.Module):
    """Inference BatchNorm written as ``(x - mean) * scale + bias`` (Sub/Mul/Add in ONNX)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("mean", bn.running_mean.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("scale", scale.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("shift", bn.bias.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale + self.shift


def _calibrate_batchnorms(module: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """Set every BN's running statistics to the actual statistics of a random batch.

    In deep residual nets, random running statistics do not renormalise anything and the
    residual sums double the variance at every block (ResNet-50 logits reach ~1e4).
    Like a trained network, the calibrated one keeps activations O(1) at every depth;
    the BN affine parameters stay random.  Must be called inside :func:`_seeded`.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch gives its exact statistics
    module.train()
    with torch.no_grad():
        module(torch.randn(4, *input_shape[1:]))
    for norm in norms:
        norm.momentum = 0.1
    return module.eval()


def _fuse_batchnorms(module: nn.Module) -> nn.Module:
    """Fold every ``Conv2d -> BatchNorm2d`` pair inside an ``nn.Sequential`` (in place)."""
    for child in module.children():
        _fuse_batchnorms(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return module


def _decompose_batchnorms(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` by an equivalent :class:`DecomposedBatchNorm2d` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, DecomposedBatchNorm2d(child))
        else:
            _decompose_batchnorms(child)
    return module


# --------------------------------------------------------------------------------------
# Torch cases: architectures
# --------------------------------------------------------------------------------------


class SmallVGG(nn.Module):
    """VGG-style: conv3x3+ReLU stacks with max-pooling, then a two-layer MLP with Dropout."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(3, 8), *conv(8, 8), nn.MaxPool2d(2),
            *conv(8, 16), *conv(16, 16), nn.MaxPool2d(2),
            *conv(16, 32), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 64),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, residual add, 1x1 stride-s projection if needed."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.branch = nn.Sequential(
            ConvBN(in_channels, channels, 3, stride, activation=nn.ReLU()),
            ConvBN(channels, out_channels, 3),
        )
        self.downsample: nn.Module = (
            ConvBN(in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck (torchvision v1.5 layout: stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.branch = nn.Sequential(
            ConvBN(in_channels, channels, 1, activation=nn.ReLU()),
            ConvBN(channels, channels, 3, stride, activation=nn.ReLU()),
            ConvBN(channels, out_channels, 1),
        )
        self.downsample: nn.Module = (
            ConvBN(in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.downsample(x))


class ResNet(nn.Module):
    """Generic ResNet: stem, stages of residual blocks, global average pool, linear head."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        imagenet_stem: bool,
    ) -> None:
        super().__init__()
        stem_width = widths[0]
        if imagenet_stem:  # 7x7 stride-2 conv + 3x3 stride-2 max-pool, as in torchvision
            self.stem = nn.Sequential(
                ConvBN(3, stem_width, 7, 2, activation=nn.ReLU()),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = ConvBN(3, stem_width, 3, activation=nn.ReLU())
        stages: list[nn.Module] = []
        in_channels = stem_width
        for index, (depth, width) in enumerate(zip(layers, widths)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if index > 0 and j == 0 else 1
                blocks.append(block(in_channels, width, stride))
                in_channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def _small_resnet() -> ResNet:
    return ResNet(BasicBlock, [1, 1, 1, 1], [8, 16, 24, 32], num_classes=10, imagenet_stem=False)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand, depthwise kxk, optional SE, 1x1 linear projection."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        stride: int,
        activation: Callable[[], nn.Module],
        kernel_size: int = 3,
        se: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers.append(ConvBN(in_channels, hidden, 1, activation=activation()))
        layers.append(
            ConvBN(hidden, hidden, kernel_size, stride, groups=hidden, activation=activation())
        )
        if se is not None:
            layers.append(se(hidden))
        layers.append(ConvBN(hidden, out_channels, 1))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class SqueezeExcitation(nn.Module):
    """SE: global average pool -> 1x1 conv -> act -> 1x1 conv -> gate -> channel-wise Mul."""

    def __init__(
        self,
        channels: int,
        squeezed: int,
        activation: Callable[[], nn.Module],
        gate: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.activation = activation()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.activation(self.reduce(self.pool(x)))))
        return x * scale


class MobileNetV2(nn.Module):
    """MobileNetV2-style: inverted residuals, depthwise convs, ReLU6 (Clip in ONNX)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        relu6 = nn.ReLU6
        self.features = nn.Sequential(
            ConvBN(3, 16, 3, 2, activation=relu6()),
            InvertedResidual(16, 16, 8, 1, relu6),
            InvertedResidual(8, 32, 16, 2, relu6),
            InvertedResidual(16, 64, 16, 1, relu6),
            InvertedResidual(16, 64, 24, 2, relu6),
            ConvBN(24, 64, 1, activation=relu6()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MobileNetV3(nn.Module):
    """MobileNetV3-style: HardSwish, squeeze-excitation gated by HardSigmoid."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def se(channels: int) -> nn.Module:
            return SqueezeExcitation(channels, max(channels // 4, 4), nn.ReLU, nn.Hardsigmoid)

        self.features = nn.Sequential(
            ConvBN(3, 16, 3, 2, activation=nn.Hardswish()),
            InvertedResidual(16, 16, 16, 2, nn.ReLU, se=se),
            InvertedResidual(16, 48, 24, 2, nn.ReLU),
            InvertedResidual(24, 64, 24, 1, nn.Hardswish, kernel_size=5, se=se),
            ConvBN(24, 96, 1, activation=nn.Hardswish()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(96, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class DenseLayer(nn.Module):
    """DenseNet bottleneck layer: BN-ReLU-conv1x1-BN-ReLU-conv3x3, concatenated to its input."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


class SmallDenseNet(nn.Module):
    """DenseNet-style: dense blocks (feature Concat) joined by conv1x1 + AvgPool transitions."""

    def __init__(self, num_classes: int = 10, growth: int = 8) -> None:
        super().__init__()
        channels = 16
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
        for block_index in range(2):
            for _ in range(3):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if block_index == 0:
                layers += [
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                    nn.Conv2d(channels, channels // 2, 1, bias=False),
                    nn.AvgPool2d(2, stride=2),
                ]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class SmallEfficientNet(nn.Module):
    """EfficientNet-style: SiLU (Sigmoid+Mul in ONNX) and MBConv blocks with SE."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def se(channels: int) -> nn.Module:
            return SqueezeExcitation(channels, 4, nn.SiLU, nn.Sigmoid)

        self.features = nn.Sequential(
            ConvBN(3, 16, 3, 2, activation=nn.SiLU()),
            InvertedResidual(16, 64, 24, 2, nn.SiLU, se=se),  # depthwise stride-2 MBConv
            InvertedResidual(24, 96, 24, 1, nn.SiLU, se=se),  # residual MBConv
            ConvBN(24, 64, 1, activation=nn.SiLU()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class NHWCConv(nn.Module):
    """A conv applied to an NHWC tensor, the way TF/Keras converters emit it (Transpose pairs)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class NHWCNet(nn.Module):
    """NHWC input and activations; channels-first only inside each wrapped conv."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = NHWCConv(3, 8)
        self.conv2 = NHWCConv(8, 8)
        self.conv3 = NHWCConv(8, 16, stride=2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(x + self.conv2(x))  # residual Add in NHWC
        x = F.relu(self.conv3(x))
        return self.fc(x.mean(dim=(1, 2)))


class SoftmaxHeadNet(nn.Module):
    """A small CNN whose output is already a probability vector (graph ends in Softmax)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return torch.softmax(self.fc(torch.flatten(x, 1)), dim=1)


class PaddedStridesNet(nn.Module):
    """TF/Keras-style explicit padding: a ZeroPad2d or F.pad before each strided conv (what
    tf2onnx emits for "same" padding, and EfficientNet ports do), so padded copies of odd sizes
    (65, 34, 17) sit between the real stage maps (32, 16, 8)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())  # 64 -> 32
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.down1 = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.Conv2d(8, 16, 1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())  # 16
        self.down2 = nn.Conv2d(16, 32, 3, stride=2)  # after F.pad: 17 -> 8
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down1(self.block1(self.stem(x))))
        x = F.relu(self.down2(F.pad(x, (0, 1, 0, 1))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MiscOpsA(nn.Module):
    """Activations, padding modes, dilated/grouped convs and ceil-mode pooling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.prelu = nn.PReLU(8)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)  # padded by hand with F.pad(reflect)
        self.conv_edge = nn.Conv2d(8, 8, 3)  # padded by hand with F.pad(replicate)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avgpool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 9 * 9, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.leaky(self.conv1(x))  # 32x32
        x = self.prelu(self.dilated(x))
        x = F.elu(self.grouped(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        x = F.selu(self.conv_edge(F.pad(x, (1, 1, 1, 1), mode="replicate")))
        x = self.maxpool(x)  # 32 -> 17: ceil_mode adds a partial last window
        x = torch.tanh(x) + F.softplus(x) * torch.sigmoid(x)
        x = self.avgpool(x)  # 17 -> 9
        x = F.relu(self.conv_out(x))
        return self.fc(torch.flatten(x, 1))


class _OnnxLRN(torch.autograd.Function):
    """Export hook: makes the TorchScript exporter emit a single ONNX ``LRN`` node."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, x: torch.Tensor, size: int, alpha: float, beta: float, k: float
    ) -> torch.Tensor:
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, x, size: int, alpha: float, beta: float, k: float
    ):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LocalResponseNorm(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` that exports as ONNX ``LRN`` (same formula for odd sizes).

    The stock module is a Python composition (Pad/AvgPool/Pow/Div over a 5-D view) that
    the TorchScript exporter turns into ~20 nodes including an ``If``; in torch (and for
    autograd) this class behaves exactly like the stock module.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _OnnxLRN.apply(x, self.size, self.alpha, self.beta, self.k)
        return super().forward(x)


class MiscOpsB(nn.Module):
    """Transposed conv, resizing, split/slice, elementwise algebra, LRN and channel shuffle."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.lrn = LocalResponseNorm(3, alpha=1e-2, beta=0.75, k=1.0)
        self.conv_out = nn.Conv2d(8, 8, 3, stride=2)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(8 * 5 * 5, num_classes)

    @staticmethod
    def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = F.relu(self.down(x))  # 16x16
        up = self.up(x0)  # 32x32 (stride 2, output_padding 1)
        nearest = F.interpolate(x0, scale_factor=2.0, mode="nearest")
        bilinear = F.interpolate(x0, scale_factor=2.0, mode="bilinear", align_corners=False)
        aligned = F.interpolate(x0, scale_factor=2.0, mode="bilinear", align_corners=True)
        h = up + nearest * torch.sigmoid(bilinear) + aligned
        # Static split sizes: torch.chunk would export as Shape/Gather/Slice arithmetic.
        a, b = torch.split(h, [4, 4], dim=1)
        left, right = torch.split(h, [3, 5], dim=1)
        a = a[:, :, 1:-1, 1:-1]  # 30x30
        b = b[:, :, 1:-1, 1:-1]
        ratio = a.pow(2) / torch.sqrt(b * b + 1.0)  # Pow, Sqrt of a positive tensor, Div
        ratio = ratio - ratio.mean(dim=(2, 3), keepdim=True)
        side = (left.sum(dim=1, keepdim=True) - right.mean(dim=1, keepdim=True))[:, :, 1:-1, 1:-1]
        x = self.lrn(torch.cat([ratio, a * side], dim=1))  # 8 channels
        x = self.channel_shuffle(x, 2)
        x = F.relu(self.conv_out(x))  # 14x14
        x = F.avg_pool2d(x, 3, stride=3)  # 4x4
        x = F.pad(x, (0, 1, 0, 1))  # 5x5 (constant padding)
        return self.head(self.flatten(x))


# --------------------------------------------------------------------------------------
# Torch cases: registry
# --------------------------------------------------------------------------------------

_SEED = 0


def _make(
    name: str,
    factory: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    transform: Callable[[nn.Module], nn.Module] | None = None,
) -> Callable[[], TorchCase]:
    """A builder that seeds, constructs, initialises (and optionally rewrites) a module."""

    def build() -> TorchCase:
        with _seeded(_SEED), torch.no_grad():
            module = _finalize(factory())
            if transform is not None:
                module = transform(module).eval()
        # Inputs may require grad; the weights never do (no accidental autograd graphs).
        module.requires_grad_(False)
        return TorchCase(name=name, module=module, input_shape=input_shape)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"Build the {name!r} torch case."
    return build


_NCHW_64 = (1, 3, 64, 64)
_NCHW_32 = (1, 3, 32, 32)
_NCHW_224 = (1, 3, 224, 224)

TORCH_CASES: dict[str, Callable[[], TorchCase]] = {
    "vgg": _make("vgg", SmallVGG, _NCHW_64),
    "resnet_bn": _make("resnet_bn", _small_resnet, _NCHW_64),
    "resnet_fused": _make("resnet_fused", _small_resnet, _NCHW_64, _fuse_batchnorms),
    "resnet_bn_decomposed": _make(
        "resnet_bn_decomposed", _small_resnet, _NCHW_64, _decompose_batchnorms
    ),
    "mobilenetv2": _make("mobilenetv2", MobileNetV2, _NCHW_64),
    "mobilenetv3": _make("mobilenetv3", MobileNetV3, _NCHW_64),
    "densenet": _make("densenet", SmallDenseNet, _NCHW_32),
    "efficientnet": _make("efficientnet", SmallEfficientNet, _NCHW_64),
    "nhwc": _make("nhwc", NHWCNet, (1, 32, 32, 3)),
    "softmax_head": _make("softmax_head", SoftmaxHeadNet, _NCHW_32),
    "misc_ops_a": _make("misc_ops_a", MiscOpsA, _NCHW_32),
    "misc_ops_b": _make("misc_ops_b", MiscOpsB, _NCHW_32),
    "resnet18": _make(
        "resnet18",
        lambda: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], 1000, imagenet_stem=True),
        _NCHW_224,
        lambda module: _calibrate_batchnorms(module, _NCHW_224),
    ),
    "resnet50": _make(
        "resnet50",
        lambda: ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], 1000, imagenet_stem=True),
        _NCHW_224,
        lambda module: _calibrate_batchnorms(module, _NCHW_224),
    ),
}
"""Builders of every torch case, by name. ``resnet_bn``, ``resnet_fused`` and
``resnet_bn_decomposed`` compute the same function with three BatchNorm encodings.
``resnet18``/``resnet50`` have torchvision's layout with BN statistics calibrated on a
random batch (see :func:`_calibrate_batchnorms`); all other BN layers have random stats."""

LAYER_CASES: dict[str, Callable[[], TorchCase]] = {
    "padded_strides": _make("padded_strides", PaddedStridesNet, _NCHW_64),
}
"""Cases for layer discovery (explicit padding), built and exported like the torch cases."""



# --------------------------------------------------------------------------------------
# ONNX model zoo ("light" models from the onnx package)
# --------------------------------------------------------------------------------------

ZOO_MODELS: list[str] = [
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
]

_ZOO_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def zoo_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """Load ``light_<name>.onnx`` with seeded random weights in place of its placeholders.

    In these files most weights are ``ConstantOfShape`` nodes that fill a tensor with a
    single value; each is replaced by a ``Constant`` node (same node name, same output
    name) holding random values scaled for the weight's role:

    * Conv / Gemm weights: He init, ``N(0, sqrt(2 / fan_in))``; their biases ``N(0, 0.01)``;
    * BatchNormalization: scale ``U(0.5, 1.5)``, bias ``N(0, 0.1)``;
    * Caffe "Scale" layers (``Unsqueeze`` -> ``Mul`` / ``Add``): like BN scale / bias.

    BN running statistics are first drawn like the torch cases' (mean ``N(0, 0.1)``,
    variance ``U(0.5, 1.5)``) and then calibrated to the actual statistics of a seeded
    random image (see :func:`_calibrate_zoo_batchnorms`): with random statistics the
    per-layer gain compounds over 50+ BN layers and the residual sums, and the
    ResNet-50 / ShuffleNet logits reach 1e4-1e5.

    A few small tensors are stored as real initializers holding pre-trained values;
    those are inconsistent with random neighbours (e.g. BN variances of 1e-13 that
    would blow activations up), so they get the same treatment, in place and under
    their own names.  All other nodes and all tensor names are untouched.
    """
    if name not in ZOO_MODELS:
        raise KeyError(f"unknown zoo model {name!r}; known: {ZOO_MODELS}")
    model = onnx.load(str(_ZOO_DIR / f"light_{name}.onnx"))
    graph = model.graph
    rng = np.random.default_rng(seed)
    consumers = _consumers(graph)
    initializers = {tensor.name: tensor for tensor in graph.initializer}

    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
        values = _random_weight(consumers, initializers, node.output[0], shape, rng)
        # Rewrite the node in place: building a new one would copy the (large) tensor twice.
        del node.input[:]
        del node.attribute[:]
        node.op_type = "Constant"
        attribute = node.attribute.add()
        attribute.name = "value"
        attribute.type = onnx.AttributeProto.TENSOR
        _write_tensor(attribute.t, values)

    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or not consumers.get(tensor.name):
            continue
        shape = tuple(tensor.dims)
        values = _random_weight(consumers, initializers, tensor.name, shape, rng)
        _write_tensor(tensor, values)

    _calibrate_zoo_batchnorms(model, seed)
    return model


def _write_tensor(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Overwrite *tensor*'s type, shape and data with float32 *values*, keeping its name."""
    name = tensor.name
    tensor.Clear()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.FLOAT
    tensor.dims.extend(values.shape)
    tensor.raw_data = np.ascontiguousarray(values, dtype="<f4").tobytes()


def _weight_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor of *graph* by name: initializers and ``Constant`` node values."""
    tensors = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def _calibrate_zoo_batchnorms(model: onnx.ModelProto, seed: int) -> None:
    """Set every BatchNormalization's mean/variance to its input's statistics (in place).

    A calibration copy of the graph computes each BN with the statistics of its actual
    input (like training mode, over the batch and spatial axes) and exposes them as extra
    outputs; one onnxruntime run on a seeded random image (different from
    :func:`zoo_input`'s) then yields all of them at once, consistently, since every BN
    downstream already sees normalised inputs.
    """
    bn_nodes = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    if not bn_nodes:
        return
    import onnxruntime  # local import: only the zoo helpers need it

    calibration = onnx.ModelProto()
    calibration.CopyFrom(model)
    graph = calibration.graph
    statistics: list[tuple[str, str, str, str]] = []  # (mean output, var output, mean, var)
    nodes: list[onnx.NodeProto] = []
    make = onnx.helper.make_node
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        x, scale, bias, mean, var = node.input
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"__calibration_{index}_"
        nodes += [
            make("ReduceMean", [x], [p + "mean"], axes=[0, 2, 3], keepdims=1),
            make("Sub", [x, p + "mean"], [p + "centered"]),
            make("Mul", [p + "centered", p + "centered"], [p + "squared"]),
            make("ReduceMean", [p + "squared"], [p + "var"], axes=[0, 2, 3], keepdims=1),
            make("Constant", [], [p + "eps"], value=numpy_helper.from_array(
                np.array(epsilon, dtype=np.float32))),
            make("Add", [p + "var", p + "eps"], [p + "var_eps"]),
            make("Sqrt", [p + "var_eps"], [p + "std"]),
            make("Div", [p + "centered", p + "std"], [p + "normalized"]),
            make("Unsqueeze", [scale], [p + "scale"], axes=[0, 2, 3]),
            make("Unsqueeze", [bias], [p + "bias"], axes=[0, 2, 3]),
            make("Mul", [p + "normalized", p + "scale"], [p + "scaled"]),
            make("Add", [p + "scaled", p + "bias"], [node.output[0]]),
        ]  # fmt: skip
        statistics.append((p + "mean", p + "var", mean, var))
    graph.ClearField("node")
    graph.node.extend(nodes)
    wanted = [name for entry in statistics for name in entry[:2]]
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in wanted)

    data = zoo_data_input(model)
    shape = tuple(d.dim_value for d in data.type.tensor_type.shape.dim)
    image = np.random.default_rng(seed + 1_000_003).standard_normal(shape, dtype=np.float32)
    session = onnxruntime.InferenceSession(
        calibration.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    values = dict(zip(wanted, session.run(wanted, {data.name: image})))
    del calibration, session

    tensors = _weight_tensors(model.graph)
    for mean_output, var_output, mean, var in statistics:
        _write_tensor(tensors[mean], values[mean_output].reshape(-1))
        _write_tensor(tensors[var], values[var_output].reshape(-1))


def zoo_data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The image input of a zoo graph: the one graph input that is not an initializer."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    data = [value for value in model.graph.input if value.name not in initializers]
    if len(data) != 1:
        raise ValueError(f"expected exactly one data input, found {[v.name for v in data]}")
    return data[0]


def zoo_input(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded standard-normal image for the zoo model *name*, keyed by its input name."""
    model = onnx.load(str(_ZOO_DIR / f"light_{name}.onnx"), load_external_data=False)
    data = zoo_data_input(model)
    shape = tuple(d.dim_value for d in data.type.tensor_type.shape.dim)
    rng = np.random.default_rng(seed)
    return {data.name: rng.standard_normal(shape, dtype=np.float32)}


def zoo_logits_name(model: onnx.ModelProto) -> str:
    """Name of the logits tensor: the Softmax input, or the graph output if there is no Softmax.

    All zoo graphs but ``densenet121`` end in a Softmax over their logits.
    """
    softmax = [node for node in model.graph.node if node.op_type == "Softmax"]
    if len(softmax) > 1:
        raise ValueError(f"expected at most one Softmax node, found {len(softmax)}")
    return softmax[0].input[0] if softmax else model.graph.output[0].name


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Map each tensor name to the ``(node, input index)`` pairs that read it."""
    result: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for position, tensor in enumerate(node.input):
            result.setdefault(tensor, []).append((node, position))
    return result


_PASS_THROUGH = {"Unsqueeze", "Reshape", "Identity", "Squeeze", "Flatten"}


def _random_weight(
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]],
    initializers: dict[str, onnx.TensorProto],
    tensor: str,
    shape: tuple[int, ...],
    rng: np.random.Generator,
) -> np.ndarray:
    """Random float32 values for weight *tensor* of *shape*, scaled for its role."""
    # Follow shape-only ops (Unsqueeze of Scale parameters, Reshape of FC weights) to
    # the op that actually uses the tensor, tracking the shape it sees.
    user_shape = shape
    name = tensor
    while True:
        uses = consumers.get(name, [])
        if len(uses) != 1:
            raise ValueError(f"weight {tensor!r} has {len(uses)} consumers; expected one")
        node, position = uses[0]
        if node.op_type not in _PASS_THROUGH or position != 0:
            break
        if node.op_type == "Reshape" and node.input[1] in initializers:
            target = numpy_helper.to_array(initializers[node.input[1]])
            user_shape = tuple(np.empty(user_shape, dtype=np.uint8).reshape(target).shape)
        name = node.output[0]

    op = node.op_type
    if (op == "Conv" and position == 1) or (op == "Gemm" and position == 1):
        if op == "Conv":
            fan_in = int(np.prod(user_shape[1:]))
        else:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            fan_in = user_shape[1] if trans_b else user_shape[0]
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(math.sqrt(2.0 / fan_in))
    elif op in ("Conv", "Gemm") and position == 2:
        values = rng.normal(0.0, 0.01, shape)
    elif (op == "BatchNormalization" and position in (1, 4)) or op == "Mul":
        values = rng.uniform(0.5, 1.5, shape)  # BN scale / variance, Scale-layer gamma
    elif (op == "BatchNormalization" and position in (2, 3)) or op == "Add":
        values = rng.normal(0.0, 0.1, shape)  # BN bias / mean, Scale-layer beta
    else:
        raise ValueError(f"weight {tensor!r} feeds {op} input {position}: unknown role")
    return np.asarray(values, dtype=np.float32)


# --------------------------------------------------------------------------------------
# PaddleOCR models shipped with rapidocr_onnxruntime
# --------------------------------------------------------------------------------------


def _rapidocr_models_dir() -> Path:
    """Locate rapidocr_onnxruntime/models without importing the package (which pulls cv2)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return Path(os.devnull)  # absent: the paths below simply won't exist
    return Path(next(iter(spec.submodule_search_locations))) / "models"


_PADDLE_DIR = _rapidocr_models_dir()

PADDLE_MODELS: dict[str, Path] = {
    "ppocr_cls": _PADDLE_DIR / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "ppocr_det": _PADDLE_DIR / "ch_PP-OCRv4_det_infer.onnx",
    "ppocr_rec": _PADDLE_DIR / "ch_PP-OCRv4_rec_infer.onnx",
}
"""Paths of the real PaddleOCR classifier, detector and recognizer ONNX files."""

PADDLE_INPUT_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "ppocr_cls": (1, 3, 48, 192),
    "ppocr_det": (1, 3, 64, 64),
    "ppocr_rec": (1, 3, 48, 160),
}
"""Static NCHW input shapes used with the (dynamically shaped) PaddleOCR graphs."""


def paddle_input(name: str, seed: int = 0) -> np.ndarray:
    """A seeded float32 image for PaddleOCR model *name*, uniform in [-1, 1] (their normalisation)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, PADDLE_INPUT_SHAPES[name]).astype(np.float32)
