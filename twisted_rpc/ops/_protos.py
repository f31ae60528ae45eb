"""Message and service descriptors of the built-in Health and Reflection services.

Written as ``FileDescriptorProto`` text and added to the default descriptor
pool at import, so the package needs no generated code (whose runtime-version
checks would tie it to one protobuf release). The ``.proto`` equivalent is in
``docs/operations.md``.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message_factory import GetMessageClass

__all__ = [
    "HEALTH",
    "HealthCheckRequest",
    "HealthCheckResponse",
    "HealthWatchRequest",
    "REFLECTION",
    "FileDescriptorsRequest",
    "FileDescriptorsResponse",
    "ListServicesRequest",
    "ListServicesResponse",
]


def _field(
    name: str, number: int, kind: str, label: str = "LABEL_OPTIONAL", extra: str = ""
) -> str:
    camel = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
    return (
        f'field {{ name: "{name}" number: {number} type: {kind} label: {label} '
        f'json_name: "{camel}" {extra} }}'
    )


_HEALTH = f"""
name: "twisted_rpc/health.proto"
package: "mprpc.health.v1"
syntax: "proto3"
message_type {{
  name: "HealthCheckRequest"
  {_field("service", 1, "TYPE_STRING")}
}}
message_type {{
  name: "HealthWatchRequest"
  {_field("service", 1, "TYPE_STRING")}
  {_field("last_status", 2, "TYPE_ENUM", extra='type_name: ".mprpc.health.v1.ServingStatus"')}
  {_field("max_wait", 3, "TYPE_DOUBLE")}
}}
message_type {{
  name: "HealthCheckResponse"
  {_field("status", 1, "TYPE_ENUM", extra='type_name: ".mprpc.health.v1.ServingStatus"')}
}}
enum_type {{
  name: "ServingStatus"
  value {{ name: "UNKNOWN" number: 0 }}
  value {{ name: "SERVING" number: 1 }}
  value {{ name: "NOT_SERVING" number: 2 }}
  value {{ name: "SERVICE_UNKNOWN" number: 3 }}
}}
service {{
  name: "Health"
  method {{ name: "Check" input_type: ".mprpc.health.v1.HealthCheckRequest"
           output_type: ".mprpc.health.v1.HealthCheckResponse" }}
  method {{ name: "Watch" input_type: ".mprpc.health.v1.HealthWatchRequest"
           output_type: ".mprpc.health.v1.HealthCheckResponse" }}
  method {{ name: "WatchStream" input_type: ".mprpc.health.v1.HealthCheckRequest"
           output_type: ".mprpc.health.v1.HealthCheckResponse" server_streaming: true }}
}}
"""

_REFLECTION = f"""
name: "twisted_rpc/reflection.proto"
package: "mprpc.reflection.v1"
syntax: "proto3"
message_type {{ name: "ListServicesRequest" }}
message_type {{
  name: "ListServicesResponse"
  {_field("services", 1, "TYPE_STRING", "LABEL_REPEATED")}
}}
message_type {{
  name: "FileDescriptorsRequest"
  {_field("symbol", 1, "TYPE_STRING")}
}}
message_type {{
  name: "FileDescriptorsResponse"
  {_field("file_descriptor_proto", 1, "TYPE_BYTES", "LABEL_REPEATED")}
}}
service {{
  name: "Reflection"
  method {{ name: "ListServices" input_type: ".mprpc.reflection.v1.ListServicesRequest"
           output_type: ".mprpc.reflection.v1.ListServicesResponse" }}
  method {{ name: "FileContainingSymbol"
           input_type: ".mprpc.reflection.v1.FileDescriptorsRequest"
           output_type: ".mprpc.reflection.v1.FileDescriptorsResponse" }}
}}
"""


def _add(text: str) -> FileDescriptor:
    proto = text_format.Parse(text, descriptor_pb2.FileDescriptorProto())
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(proto.name)
    except KeyError:
        pool.AddSerializedFile(proto.SerializeToString())
        return pool.FindFileByName(proto.name)


_health_file = _add(_HEALTH)
_reflection_file = _add(_REFLECTION)

HEALTH = _health_file.services_by_name["Health"]
REFLECTION = _reflection_file.services_by_name["Reflection"]

_messages = {**_health_file.message_types_by_name, **_reflection_file.message_types_by_name}
HealthCheckRequest = GetMessageClass(_messages["HealthCheckRequest"])
HealthWatchRequest = GetMessageClass(_messages["HealthWatchRequest"])
HealthCheckResponse = GetMessageClass(_messages["HealthCheckResponse"])
ListServicesRequest = GetMessageClass(_messages["ListServicesRequest"])
ListServicesResponse = GetMessageClass(_messages["ListServicesResponse"])
FileDescriptorsRequest = GetMessageClass(_messages["FileDescriptorsRequest"])
FileDescriptorsResponse = GetMessageClass(_messages["FileDescriptorsResponse"])
ServingStatus = _health_file.enum_types_by_name["ServingStatus"]
