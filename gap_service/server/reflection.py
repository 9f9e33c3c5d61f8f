"""Server reflection in both protocol versions: grpc.reflection.v1 (asked first by current grpcurl,
Postman and grpc-java, whose v1alpha is deprecated) and grpc.reflection.v1alpha (older tools).

grpcio-reflection (1.85) serves only v1alpha (grpc/grpc#38576). v1 is the same protocol renamed:
identical messages and field numbers, so one servicer answers both paths. The v1 file descriptor
(v1alpha's, renamed) is registered in the default pool so that reflection describes itself in
both versions.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
V1_SERVICE = f"{V1}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICE_NAMES = (reflection.SERVICE_NAME, V1_SERVICE)


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
        return  # a second server in this process
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name, file.package = V1_FILE, V1
    file.ClearField("options")  # v1alpha's say deprecated, with v1alpha's Java/Go packages
    old, new = f".{V1ALPHA}.", f".{V1}."
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # proto2: assigning '' would set it on a scalar
                field.type_name = field.type_name.replace(old, new)
    for method in file.service[0].method:
        method.input_type, method.output_type = method.input_type.replace(old, new), method.output_type.replace(old, new)
    pool.Add(file)


def enable(server: grpc.Server, service_names: Iterable[str]) -> None:
    """Serve reflection (v1 and v1alpha) describing ``service_names`` and itself."""
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    servicer = reflection.ReflectionServicer((*service_names, *SERVICE_NAMES), pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))
