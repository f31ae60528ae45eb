"""``protoc-gen-twisted_rpc``: protoc's plugin protocol around :mod:`twisted_rpc.protoc._render`.

protoc writes a ``CodeGeneratorRequest`` to the plugin's stdin and reads a
``CodeGeneratorResponse`` from its stdout (grpclib's ``grpclib.plugin.main``
and mypy-protobuf work the same way). Each file to generate that declares a
service becomes ``x_rpc.py`` beside protoc's ``x_pb2.py``; a file without
services gets nothing.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

from google.protobuf.compiler.plugin_pb2 import CodeGeneratorRequest, CodeGeneratorResponse

from twisted_rpc.protoc._render import GenerationError, output_name, render, type_index

__all__ = ["generate", "plugin_main"]


def generate(request: CodeGeneratorRequest) -> CodeGeneratorResponse:
    """The response to ``request``: one ``x_rpc.py`` per file with services,
    or the error protoc shows (a name Python cannot take, a type not found)."""
    response = CodeGeneratorResponse()
    response.supported_features = CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    files = {proto.name: proto for proto in request.proto_file}
    types = type_index(request.proto_file)
    try:
        for name in request.file_to_generate:
            proto = files[name]
            if not proto.service:
                continue
            out = response.file.add()
            out.name = output_name(name)
            out.content = render(proto, types)
    except GenerationError as e:
        del response.file[:]
        response.error = str(e)
    return response


def plugin_main(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """The console script: a request on stdin, the response on stdout."""
    source = stdin if stdin is not None else sys.stdin.buffer
    sink = stdout if stdout is not None else sys.stdout.buffer
    request = CodeGeneratorRequest.FromString(source.read())
    sink.write(generate(request).SerializeToString())
    sink.flush()
    return 0
