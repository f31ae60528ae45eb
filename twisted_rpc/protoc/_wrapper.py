"""``python -m twisted_rpc.protoc``: grpcio-tools' protoc with this package's plugin.

The arguments are protoc's (``-I. --python_out=. --pyi_out=.
--twisted_rpc_out=. myapp/protos/x.proto``); the plugin is the installed
``protoc-gen-twisted_rpc`` script when it sits beside this Python, otherwise
a small shell shim running it with this Python; the
well-known types (``google/protobuf/*.proto``) are on the include path, as
with ``python -m grpc_tools.protoc``.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

__all__ = ["main"]

PLUGIN = "protoc-gen-twisted_rpc"
RUN = "import sys; from twisted_rpc.protoc import plugin_main; sys.exit(plugin_main())"
MISSING = (
    "python -m twisted_rpc.protoc needs grpcio-tools: pip install 'twisted_rpc[protoc]'"
    " (or run your own protoc with --plugin=protoc-gen-twisted_rpc=PATH)\n"
)


def _shim(directory: Path) -> Path:
    """An executable that runs the plugin with this Python and this package."""
    root = Path(__file__).resolve().parents[2]
    path = directory / PLUGIN
    path.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}} "
        f"exec {shlex.quote(sys.executable)} -c {shlex.quote(RUN)}\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run protoc with ``argv`` (default ``sys.argv[1:]``); protoc's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        sys.stderr.write(MISSING)
        return 2
    include = str(resources.files("grpc_tools") / "_proto")
    installed = Path(sys.executable).parent / PLUGIN
    with tempfile.TemporaryDirectory(prefix="twisted_rpc-protoc-") as tmp:
        plugin = installed if os.access(installed, os.X_OK) else _shim(Path(tmp))
        command = ["protoc", f"--plugin={PLUGIN}={plugin}", *args, f"-I{include}"]
        return int(protoc.main(command))
