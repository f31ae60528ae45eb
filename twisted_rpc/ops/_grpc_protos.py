"""Descriptors of gRPC's standard services: ``grpc.health.v1.Health`` and
``grpc.reflection.v1alpha`` / ``grpc.reflection.v1`` ``ServerReflection``.

Written as ``FileDescriptorProto`` text (as :mod:`twisted_rpc.ops._protos`
does for our own built-ins) under gRPC's own file names
(``grpc/health/v1/health.proto``...), and added to a **private** descriptor
pool, :data:`POOL`, not the default one: grpcio's ``grpc_health`` and
``grpc_reflection`` packages put the same symbols into the default pool
(under other file names), and a pool refuses a symbol defined twice, so a
process may import both. Generated ``_pb2`` modules would have had the same
clash, and tie the package to one protobuf release. The messages and fields
are gRPC's (same names, numbers and types), so any gRPC client reads them.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf.descriptor import FileDescriptor

from twisted_rpc.ops._protos import _field

__all__ = [
    "GRPC_HEALTH",
    "POOL",
    "REFLECTION_V1",
    "REFLECTION_V1ALPHA",
]

POOL = descriptor_pool.DescriptorPool()
"""The pool of gRPC's standard services' files (see the module's docstring)."""

_H = ".grpc.health.v1."

_HEALTH = f"""
name: "grpc/health/v1/health.proto"
package: "grpc.health.v1"
syntax: "proto3"
message_type {{
  name: "HealthCheckRequest"
  {_field("service", 1, "TYPE_STRING")}
}}
message_type {{
  name: "HealthCheckResponse"
  {_field("status", 1, "TYPE_ENUM", extra=f'type_name: "{_H}HealthCheckResponse.ServingStatus"')}
  enum_type {{
    name: "ServingStatus"
    value {{ name: "UNKNOWN" number: 0 }}
    value {{ name: "SERVING" number: 1 }}
    value {{ name: "NOT_SERVING" number: 2 }}
    value {{ name: "SERVICE_UNKNOWN" number: 3 }}
  }}
}}
message_type {{ name: "HealthListRequest" }}
message_type {{
  name: "HealthListResponse"
  {
    _field(
        "statuses",
        1,
        "TYPE_MESSAGE",
        "LABEL_REPEATED",
        f'type_name: "{_H}HealthListResponse.StatusesEntry"',
    )
}
  nested_type {{
    name: "StatusesEntry"
    {_field("key", 1, "TYPE_STRING")}
    {_field("value", 2, "TYPE_MESSAGE", extra=f'type_name: "{_H}HealthCheckResponse"')}
    options {{ map_entry: true }}
  }}
}}
service {{
  name: "Health"
  method {{ name: "Check" input_type: "{_H}HealthCheckRequest"
           output_type: "{_H}HealthCheckResponse" }}
  method {{ name: "List" input_type: "{_H}HealthListRequest"
           output_type: "{_H}HealthListResponse" }}
  method {{ name: "Watch" input_type: "{_H}HealthCheckRequest"
           output_type: "{_H}HealthCheckResponse" server_streaming: true }}
}}
options {{
  java_package: "io.grpc.health.v1"
  java_outer_classname: "HealthProto"
  java_multiple_files: true
  go_package: "google.golang.org/grpc/health/grpc_health_v1"
  objc_class_prefix: "GrpcHealthV1"
  csharp_namespace: "Grpc.Health.V1"
}}
"""


def _reflection(version: str, options: str) -> str:
    p = f".grpc.reflection.{version}."
    return f"""
name: "grpc/reflection/{version}/reflection.proto"
package: "grpc.reflection.{version}"
syntax: "proto3"
message_type {{
  name: "ServerReflectionRequest"
  {_field("host", 1, "TYPE_STRING")}
  {_field("file_by_filename", 3, "TYPE_STRING", extra="oneof_index: 0")}
  {_field("file_containing_symbol", 4, "TYPE_STRING", extra="oneof_index: 0")}
  {
        _field(
            "file_containing_extension",
            5,
            "TYPE_MESSAGE",
            extra=f'type_name: "{p}ExtensionRequest" oneof_index: 0',
        )
    }
  {_field("all_extension_numbers_of_type", 6, "TYPE_STRING", extra="oneof_index: 0")}
  {_field("list_services", 7, "TYPE_STRING", extra="oneof_index: 0")}
  oneof_decl {{ name: "message_request" }}
}}
message_type {{
  name: "ExtensionRequest"
  {_field("containing_type", 1, "TYPE_STRING")}
  {_field("extension_number", 2, "TYPE_INT32")}
}}
message_type {{
  name: "ServerReflectionResponse"
  {_field("valid_host", 1, "TYPE_STRING")}
  {_field("original_request", 2, "TYPE_MESSAGE", extra=f'type_name: "{p}ServerReflectionRequest"')}
  {
        _field(
            "file_descriptor_response",
            4,
            "TYPE_MESSAGE",
            extra=f'type_name: "{p}FileDescriptorResponse" oneof_index: 0',
        )
    }
  {
        _field(
            "all_extension_numbers_response",
            5,
            "TYPE_MESSAGE",
            extra=f'type_name: "{p}ExtensionNumberResponse" oneof_index: 0',
        )
    }
  {
        _field(
            "list_services_response",
            6,
            "TYPE_MESSAGE",
            extra=f'type_name: "{p}ListServiceResponse" oneof_index: 0',
        )
    }
  {
        _field(
            "error_response",
            7,
            "TYPE_MESSAGE",
            extra=f'type_name: "{p}ErrorResponse" oneof_index: 0',
        )
    }
  oneof_decl {{ name: "message_response" }}
}}
message_type {{
  name: "FileDescriptorResponse"
  {_field("file_descriptor_proto", 1, "TYPE_BYTES", "LABEL_REPEATED")}
}}
message_type {{
  name: "ExtensionNumberResponse"
  {_field("base_type_name", 1, "TYPE_STRING")}
  {_field("extension_number", 2, "TYPE_INT32", "LABEL_REPEATED")}
}}
message_type {{
  name: "ListServiceResponse"
  {_field("service", 1, "TYPE_MESSAGE", "LABEL_REPEATED", f'type_name: "{p}ServiceResponse"')}
}}
message_type {{
  name: "ServiceResponse"
  {_field("name", 1, "TYPE_STRING")}
}}
message_type {{
  name: "ErrorResponse"
  {_field("error_code", 1, "TYPE_INT32")}
  {_field("error_message", 2, "TYPE_STRING")}
}}
service {{
  name: "ServerReflection"
  method {{ name: "ServerReflectionInfo" input_type: "{p}ServerReflectionRequest"
           output_type: "{p}ServerReflectionResponse"
           client_streaming: true server_streaming: true }}
}}
options {{ {options} }}
"""


def _add(text: str) -> FileDescriptor:
    proto = text_format.Parse(text, descriptor_pb2.FileDescriptorProto())
    POOL.AddSerializedFile(proto.SerializeToString())
    return POOL.FindFileByName(proto.name)


_health_file = _add(_HEALTH)
_v1alpha_file = _add(
    _reflection(
        "v1alpha",
        'java_package: "io.grpc.reflection.v1alpha" java_outer_classname: "ServerReflectionProto"'
        " java_multiple_files: true deprecated: true"
        ' go_package: "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"',
    )
)
_v1_file = _add(
    _reflection(
        "v1",
        'java_package: "io.grpc.reflection.v1" java_outer_classname: "ServerReflectionProto"'
        " java_multiple_files: true"
        ' go_package: "google.golang.org/grpc/reflection/grpc_reflection_v1"',
    )
)

GRPC_HEALTH = _health_file.services_by_name["Health"]
REFLECTION_V1ALPHA = _v1alpha_file.services_by_name["ServerReflection"]
REFLECTION_V1 = _v1_file.services_by_name["ServerReflection"]
