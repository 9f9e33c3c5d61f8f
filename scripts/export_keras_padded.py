"""Export a small Keras CNN with explicit Pads to tests/data/keras_padded{,_nhwc}.onnx (issue 10).

Why: Keras' MobileNetV2 and EfficientNetB0 put a ``ZeroPadding2D(correct_pad(...))`` before each
strided 'valid' DepthwiseConv2D, and tf2onnx keeps it as an explicit ``Pad`` node. Layer
discovery must pick the Pad's input, never the padded copy; tests/test_layers.py checks that on
both files: ``keras_padded.onnx`` as tf2onnx writes it by default (its transpose pass moves the
NHWC->NCHW Transpose to the input: NCHW inside) and ``keras_padded_nhwc.onnx`` without that pass
(NHWC maps, every conv wrapped in Transposes, as graphs keep them where the Transposes cannot
be cancelled). The network copies those
blocks at a toy size (64x64 input, <= 32 channels) with seeded random weights and randomised
BatchNorm statistics, so the file stays small and needs no download.

TensorFlow is only needed to regenerate the files; the tests read the committed ONNX. Use a
virtualenv of its own (never the project's .venv)::

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tfvenv/bin/python scripts/export_keras_padded.py

It prints the Pad nodes of each exported graph and fails if there are none (tf2onnx would then
have folded every padding into a Conv, and the file would not test what it is for).
Generated with tensorflow-cpu 2.21.0, keras 3.15.1, tf2onnx 1.17.0, opset 17; the output is
byte-identical across runs (``canonicalise``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
import tf2onnx.optimizer
from tensorflow import keras
from tensorflow.keras import layers

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "tests" / "data" / "keras_padded.onnx"
OUTPUT_NHWC = ROOT / "tests" / "data" / "keras_padded_nhwc.onnx"  # without tf2onnx's transpose pass
INPUT_SHAPE = (64, 64, 3)  # NHWC, batch 1
OPSET = 17
SEED = 0
CLASSES = 10
GENERATED = re.compile(r"__\d+")  # the suffix tf2onnx gives the names it makes


def correct_pad(size: int, kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras applications' ``correct_pad`` for an even map: TF 'SAME' padding of a stride-2 conv,
    one more row/column after than before (((0, 1), (0, 1)) for a 3x3 kernel)."""
    adjust = (1 - size % 2, 1 - size % 2)
    correct = (kernel // 2, kernel // 2)
    return (correct[0] - adjust[0], correct[0]), (correct[1] - adjust[1], correct[1])


def _bn_act(x: tf.Tensor, act: str) -> tf.Tensor:
    x = layers.BatchNormalization(epsilon=1e-3, momentum=0.999)(x)
    return layers.ReLU(6.0)(x) if act == "relu6" else layers.Activation("swish")(x)


def _expanded_depthwise(x: tf.Tensor, stride: int, expansion: int, act: str) -> tf.Tensor:
    """The blocks' shared start: 1x1 expansion, then (an explicit ZeroPadding2D and) a depthwise
    3x3, as Keras pads before its strided depthwise convs: the Pads tf2onnx keeps."""
    x = layers.Conv2D(expansion * x.shape[-1], 1, padding="same", use_bias=False)(x)
    x = _bn_act(x, act)
    if stride == 2:
        x = layers.ZeroPadding2D(padding=correct_pad(x.shape[1], 3))(x)
    x = layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid", use_bias=False)(x)
    return _bn_act(x, act)


def mobilenet_v2_block(x: tf.Tensor, filters: int, stride: int, expansion: int = 4) -> tf.Tensor:
    """Keras MobileNetV2 ``_inverted_res_block``: expand, (pad +) depthwise, project, residual."""
    inputs = x
    channels = x.shape[-1]
    x = _expanded_depthwise(x, stride, expansion, "relu6")
    x = layers.Conv2D(filters, 1, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(epsilon=1e-3, momentum=0.999)(x)
    if stride == 1 and channels == filters:
        x = layers.Add()([inputs, x])
    return x


def efficientnet_block(x: tf.Tensor, filters: int, stride: int, expansion: int = 4) -> tf.Tensor:
    """Keras EfficientNet ``block``: expand, (pad +) depthwise, squeeze-and-excite, project."""
    channels = x.shape[-1]
    x = _expanded_depthwise(x, stride, expansion, "swish")
    se = layers.GlobalAveragePooling2D(keepdims=True)(x)
    se = layers.Conv2D(max(1, channels // 4), 1, activation="swish")(se)
    se = layers.Conv2D(x.shape[-1], 1, activation="sigmoid")(se)
    x = layers.Multiply()([x, se])
    x = layers.Conv2D(filters, 1, padding="same", use_bias=False)(x)
    return layers.BatchNormalization(epsilon=1e-3, momentum=0.999)(x)


def build_model() -> keras.Model:
    """64x64x3 -> 32x32 stem -> MobileNetV2 blocks (16x16) -> EfficientNet block (8x8) ->
    stride-2 'same' conv (4x4) -> global pool -> Dense softmax."""
    tf.keras.utils.set_random_seed(SEED)
    inputs = keras.Input(shape=INPUT_SHAPE, batch_size=1, name="input")
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = _bn_act(x, "relu6")
    x = mobilenet_v2_block(x, 8, 1, expansion=1)
    x = mobilenet_v2_block(x, 12, 2)
    x = mobilenet_v2_block(x, 12, 1)
    x = efficientnet_block(x, 16, 2)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = _bn_act(x, "swish")
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(CLASSES, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="keras_padded")
    _randomise_batch_norm(model, np.random.default_rng(SEED))
    return model


def _randomise_batch_norm(model: keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics, as a trained net has (the defaults fold to identity)."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, n).astype(np.float32),  # gamma
                rng.normal(0.0, 0.1, n).astype(np.float32),  # beta
                rng.normal(0.0, 0.1, n).astype(np.float32),  # moving mean
                rng.uniform(0.5, 1.5, n).astype(np.float32),  # moving variance
            ])


def export(model: keras.Model, path: Path, push_transposes: bool = True) -> onnx.ModelProto:
    """tf2onnx through a tf.function: the Keras 3 model is traced like a SavedModel signature.

    tf2onnx wraps every NHWC conv in Transposes, then by default its transpose optimizer pushes
    them out to the input (an NCHW graph inside). ``push_transposes=False`` skips that pass, as
    graphs where the Transposes cannot be cancelled keep them: the NHWC, Transpose-wrapped form.
    """
    spec = (tf.TensorSpec((1, *INPUT_SHAPE), tf.float32, name="input"),)
    function = tf.function(lambda x: model(x, training=False))
    passes = tf2onnx.optimizer._get_optimizers
    if not push_transposes:
        tf2onnx.optimizer._get_optimizers = lambda: {k: v for k, v in passes().items() if k != "optimize_transpose"}
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=OPSET)
    finally:
        tf2onnx.optimizer._get_optimizers = passes
    proto.producer_name, proto.producer_version = "tf2onnx", tf2onnx.__version__
    canonicalise(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return proto


def canonicalise(proto: onnx.ModelProto) -> None:
    """Make the file byte-identical across runs: tf2onnx numbers the names it generates
    (``__123``) and, deduplicating equal constants, keeps one of their names, both in an order
    that changes from run to run. Generated names are renumbered by first use (a generated
    constant's becomes ``const__N``), and initializers sorted by first use."""
    graph = proto.graph
    constants = {tensor.name for tensor in graph.initializer}
    renamed: dict[str, str] = {}

    def rename(name: str) -> str:
        if name and name not in renamed:
            if name in constants and GENERATED.search(name):
                renamed[name] = f"const__{len(renamed)}"
            else:
                renamed[name] = GENERATED.sub(f"__{len(renamed)}", name)
        return renamed.get(name, name)

    for index, node in enumerate(graph.node):
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
        node.name = GENERATED.sub(f"__n{index}", node.name)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = renamed.get(value.name, value.name)
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    order = {name: i for i, name in enumerate(renamed.values())}
    initializers = sorted(graph.initializer, key=lambda t: order.get(t.name, len(order)))
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def report(model: keras.Model, proto: onnx.ModelProto, path: Path) -> None:
    """Print the Pads (refusing a graph without one) and the largest difference from Keras."""
    pads = [node for node in proto.graph.node if node.op_type == "Pad"]
    for node in pads:
        print(f"Pad {node.name}: {node.input[0]} -> {node.output[0]}")
    if not pads:
        raise SystemExit(f"{path}: tf2onnx folded every padding into a Conv: the model has no explicit Pad")
    x = np.random.default_rng(SEED).standard_normal((1, *INPUT_SHAPE)).astype(np.float32)
    try:
        import onnxruntime as ort
    except ImportError:
        print("(onnxruntime not installed: the ONNX output is not compared with Keras)")
    else:
        (ours,) = ort.InferenceSession(str(path)).run(None, {proto.graph.input[0].name: x})
        print(f"max |onnx - keras| = {float(np.abs(ours - model(x).numpy()).max()):.2e}")
    transposes = sum(node.op_type == "Transpose" for node in proto.graph.node)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(proto.graph.node)} nodes, {transposes} Transposes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--output-nhwc", type=Path, default=OUTPUT_NHWC)
    args = parser.parse_args()
    model = build_model()
    for path, push in [(args.output, True), (args.output_nhwc, False)]:
        report(model, export(model, path, push_transposes=push), path)


if __name__ == "__main__":
    main()
