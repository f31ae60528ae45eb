"""twistd plugin: ``twistd mprpc --config etc/provider.ini``."""

from twisted.application.service import ServiceMaker

mprpc = ServiceMaker(
    "twisted_rpc provider",
    "twisted_rpc.provider._tap",
    "Serve protobuf RPC services configured in an ini file",
    "mprpc",
)
