"""The gRPC contract: lint-clean with buf, documented field by field, generated code current."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gap_service.wire import protogen

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"

pytestmark = pytest.mark.timeout(120)


def buf_binary() -> str | None:
    local = Path(sys.executable).parent / "buf"
    return str(local) if local.is_file() else shutil.which("buf")


@pytest.fixture(scope="module")
def buf():
    binary = buf_binary()
    if binary is None:
        pytest.skip("buf is not installed (pip install buf-bin)")
    return binary


def test_buf_lint(buf):
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format(buf):
    result = subprocess.run([buf, "format", "--diff", "--exit-code"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_element_is_documented(tmp_path):
    """Every service, RPC, message, field, enum and enum value has a leading comment."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    files = [str(p.relative_to(PROTOS)) for p in protogen.proto_files()]
    args = ["protoc", f"-I{PROTOS}", f"-I{Path(protoc.__file__).parent / '_proto'}", "--include_source_info",
            f"--descriptor_set_out={out}", *files]
    assert protoc.main(args) == 0
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    missing = []
    for file in descriptors.file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}

        def check(path, name):
            if not comments.get(tuple(path)):
                missing.append(f"{file.name}: {name}")

        def walk_message(message, path, prefix):
            check(path, prefix)
            for i, field in enumerate(message.field):
                check([*path, 2, i], f"{prefix}.{field.name}")
            for i, nested in enumerate(message.nested_type):
                if not nested.options.map_entry:
                    walk_message(nested, [*path, 3, i], f"{prefix}.{nested.name}")

        for i, message in enumerate(file.message_type):
            walk_message(message, [4, i], message.name)
        for i, enum in enumerate(file.enum_type):
            check([5, i], enum.name)
            for j, value in enumerate(enum.value):
                check([5, i, 2, j], f"{enum.name}.{value.name}")
        for i, service in enumerate(file.service):
            check([6, i], service.name)
            for j, method in enumerate(service.method):
                check([6, i, 2, j], f"{service.name}.{method.name}")
    # Request messages with no fields are self-explanatory only if commented too.
    assert not missing, "undocumented: " + ", ".join(missing)


def test_service_contract():
    from gap_service.wire import pb

    service = pb.service.DESCRIPTOR.services_by_name["GapService"]
    assert service.full_name == "gap.v1.GapService"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"ListModels", "GetModel", "Predict", "Explain", "ExplainStream", "Expand", "GetChannel"}
    assert methods["ExplainStream"].server_streaming and not methods["ExplainStream"].client_streaming
    assert not any(m.server_streaming for name, m in methods.items() if name != "ExplainStream")
    assert [f.name for f in pb.tensor.Tensor.DESCRIPTOR.fields] == ["dtype", "shape", "data", "name"]


def test_generated_code_is_current_and_reproducible(tmp_path):
    protogen.ensure_generated()
    assert protogen.is_current()
    out = protogen.generate(tmp_path / "_proto")
    generated = sorted(p.relative_to(out) for p in out.rglob("*.py"))
    assert Path("gap/v1/gap_service_pb2_grpc.py") in generated
    for relative in generated:
        assert (out / relative).read_text() == (protogen.OUT_DIR / relative).read_text(), relative
    text = (out / "gap/v1/gap_service_pb2.py").read_text()
    assert "from gap_service._proto.gap.v1 import" in text and "\nfrom gap.v1 import" not in text


def test_protogen_cli_check():
    result = subprocess.run([sys.executable, "-m", "gap_service.wire.protogen", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_vendored_google_api_protos_are_googleapis_own(tmp_path):
    """protos/google/api/ (for buf, offline) compiles to the descriptors the generated code imports at
    run time from googleapis-common-protos: the two copies say the same thing."""
    from google.api import annotations_pb2, http_pb2
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "google.pb"
    assert protoc.main(["protoc", f"-I{PROTOS}", f"-I{Path(protoc.__file__).parent / '_proto'}",
                        f"--descriptor_set_out={out}", "google/api/annotations.proto", "google/api/http.proto"]) == 0
    compiled = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}

    def without_json_names(file):  # protoc fills json_name in descriptor sets, not in embedded descriptors
        fields = [*file.extension, *(f for m in file.message_type for f in m.field)]
        for field in fields:
            field.ClearField("json_name")
        return file

    for module in (annotations_pb2, http_pb2):
        installed = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(installed)
        assert without_json_names(compiled[installed.name]) == without_json_names(installed), installed.name
    for path in (PROTOS / "google" / "api").glob("*.proto"):
        assert "Licensed under the Apache License, Version 2.0" in path.read_text(), path
    assert protogen.proto_files() == sorted((PROTOS / "gap").rglob("*.proto")), "only gap/ is generated"


def test_every_rpc_has_its_http_route():
    """The routes the explorer page is written against (docs/service.md, "HTTP/JSON")."""
    from google.api import annotations_pb2

    from gap_service.wire import pb

    routes = {}
    for method in pb.service.DESCRIPTOR.services_by_name["GapService"].methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        kind = rule.WhichOneof("pattern")
        routes[method.name] = (kind.upper(), getattr(rule, kind), rule.body)
    assert routes == {
        "ListModels": ("GET", "/v1/models", ""),
        "GetModel": ("GET", "/v1/models/{model}", ""),
        "Predict": ("POST", "/v1/models/{model}:predict", "*"),
        "Explain": ("POST", "/v1/models/{model}:explain", "*"),
        "ExplainStream": ("POST", "/v1/models/{request.model}:explainStream", "*"),
        "Expand": ("POST", "/v1/models/{request.model}:expand", "*"),
        "GetChannel": ("GET", "/v1/models/{model}/channel", ""),
    }
