"""A pytest plugin: a real ZooKeeper for the tests that ask for it.

Enable it in a ``conftest.py`` (it is not loaded otherwise, and the package
does not need pytest)::

    pytest_plugins = ["twisted_rpc.pytest_plugin"]

    def test_registers(local_zookeeper):
        registry = ZooKeeperRegistry(reactor, hosts=local_zookeeper, ...)

``local_zookeeper`` is the ``"127.0.0.1:PORT"`` of one ZooKeeper started
for the session (by :func:`twisted_rpc.testing.local_zookeeper`, stopped by
its PID at the end); tests sharing it keep to their own root paths. Without
ZooKeeper installed, the tests using it error with what to install.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from twisted_rpc import testing


@pytest.fixture(scope="session")
def local_zookeeper() -> Iterator[str]:
    """``"127.0.0.1:PORT"`` of a ZooKeeper running for the session."""
    with testing.local_zookeeper() as hosts:
        yield hosts
