"""``python -m twisted_rpc.protoc ARGS``: see :mod:`twisted_rpc.protoc`."""

import sys

from twisted_rpc.protoc import main

sys.exit(main())
