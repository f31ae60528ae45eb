"""Where twistd plugin files installed before the subpackage layout look for
``twistd mprpc``: the tap is :mod:`twisted_rpc.provider._tap` now.

An installed ``twisted/plugins/mprpc_plugin.py`` is only replaced when the
package is installed again (``make`` does it when setup.cfg changes); until
then it names this module, and twistd prefers it to the checkout's copy of the
same file. Remove this module once no such install is left.
"""

from twisted_rpc.provider._tap import Options, makeService

__all__ = ["Options", "makeService"]
