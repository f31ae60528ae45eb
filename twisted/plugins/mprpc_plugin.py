"""twistd plugin: ``twistd mprpc --config etc/provider.ini``."""

from twisted.application.service import ServiceMaker

# Twisted's ServiceMaker is not annotated.
mprpc = ServiceMaker(  # type: ignore[no-untyped-call]
    "twisted_rpc provider",
    "twisted_rpc.provider._tap",
    "Serve protobuf RPC services configured in an ini file",
    "mprpc",
)
