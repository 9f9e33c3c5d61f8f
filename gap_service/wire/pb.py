"""The generated protobuf and gRPC modules of gap.v1, generated on first import when missing."""

from __future__ import annotations

from .protogen import ensure_generated

ensure_generated()

from gap_service._proto.gap.v1 import explanation_pb2 as explanation  # noqa: E402
from gap_service._proto.gap.v1 import gap_service_pb2 as service  # noqa: E402
from gap_service._proto.gap.v1 import gap_service_pb2_grpc as service_grpc  # noqa: E402
from gap_service._proto.gap.v1 import model_pb2 as model  # noqa: E402
from gap_service._proto.gap.v1 import tensor_pb2 as tensor  # noqa: E402

SERVICE_NAME = "gap.v1.GapService"

__all__ = ["explanation", "service", "service_grpc", "model", "tensor", "SERVICE_NAME"]
