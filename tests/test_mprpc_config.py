"""C++ mprpc key=value config files, the [mprpc] section, and twistd's --mprpc-config."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactor

from twisted_rpc import tap
from twisted_rpc.config import ConfigError, load_mprpc_conf, load_provider_config
from twisted_rpc.registry import ProviderAddress
from twisted_rpc.zkregistry import ZooKeeperRegistry

CPP_CONF = """# rpc node
rpcserverip=127.0.0.1
rpcserverport = 8000
a line the C++ reader skips
zookeeperip=10.0.0.9
zookeeperport=2181
"""


def test_cpp_conf_read_as_the_original_does(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF)
    conf = load_mprpc_conf(str(path))
    assert (conf.ip, conf.port, conf.zookeeper) == ("127.0.0.1", 8000, "10.0.0.9:2181")
    listener = conf.listener()
    assert listener.listen == "tcp:8000:interface=127.0.0.1"
    assert listener.advertise == ProviderAddress("127.0.0.1", 8000)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rpcserverip=1.2.3.4\nrpcserverport=eighty\n", "is not a port number"),
        ("rpcserverip=1.2.3.4\nrpcserverport=8000\nzookeeperip=h\n", "go together"),
        ("zookeeperip=h\nzookeeperport=2181\n", "rpcserverip and rpcserverport are required"),
    ],
)
def test_cpp_conf_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "bad.conf"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_mprpc_conf(str(path)).listener()


def test_missing_cpp_conf(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_mprpc_conf(str(tmp_path / "none.conf"))


def test_mprpc_section_with_registry_hosts(tmp_path):
    path = tmp_path / "p.ini"
    path.write_text(
        "[provider]\nlisten = tcp:0\nservices = a:B\n"
        "[registry]\nkind = zookeeper\nhosts = zk1:2181\n"
        "[mprpc]\nlisten = tcp:0:interface=127.0.0.1\nadvertise = 10.1.1.1:9000\nzookeeper = yes\n"
    )
    mprpc = load_provider_config(str(path)).mprpc
    assert mprpc.listen == "tcp:0:interface=127.0.0.1"
    assert mprpc.advertise == ProviderAddress("10.1.1.1", 9000)
    assert mprpc.zookeeper == "zk1:2181"


def test_mprpc_section_pointing_at_a_cpp_conf(tmp_path):
    (tmp_path / "test.conf").write_text(CPP_CONF)
    path = tmp_path / "p.ini"
    path.write_text("[provider]\nlisten = tcp:0\nservices = a:B\n[mprpc]\nconfig = test.conf\n")
    mprpc = load_provider_config(str(path)).mprpc
    assert (mprpc.listen, mprpc.zookeeper) == ("tcp:8000:interface=127.0.0.1", "10.0.0.9:2181")


@pytest.mark.parametrize(
    "section, message",
    [
        ("[mprpc]\nzookeeper = yes\n", "[mprpc] listen is required"),
        ("[mprpc]\nlisten = nonsense:1\n", "is not a valid endpoint"),
        ("[mprpc]\nlisten = tcp:0\nzookeeper = maybe\n", "expected yes or no"),
        ("[mprpc]\nport = 1\n", "unknown key 'port'"),
    ],
)
def test_mprpc_section_errors(tmp_path, section, message):
    path = tmp_path / "p.ini"
    path.write_text("[provider]\nlisten = tcp:0\nservices = a:B\n" + section)
    with pytest.raises(ConfigError) as raised:
        load_provider_config(str(path))
    assert message in str(raised.value)


def test_twistd_with_only_the_cpp_conf(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF)
    options = tap.Options()
    options.parseOptions(
        [
            "--mprpc-config",
            str(path),
            "--service",
            "examples.mprpc_compat.callee:UserServiceRpc",
        ]
    )
    provider = tap.makeService(options, MemoryReactor())
    assert provider.factory is not None and provider.mprpc_factory is not None
    assert len(provider.listeners) == 1  # no native listener configured
    assert isinstance(provider.mprpc_registry, ZooKeeperRegistry)
    assert provider.mprpc_registry.zk.hosts == "10.0.0.9:2181"
    assert provider.mprpc_registry in list(provider)


def test_twistd_cpp_conf_needs_a_service(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF)
    with pytest.raises(SystemExit, match="no services to serve"):
        tap.Options().parseOptions(["--mprpc-config", str(path)])


def test_twistd_bad_service_spec(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF)
    with pytest.raises(SystemExit, match="--service: 'nope' is not module:Class"):
        tap.Options().parseOptions(["--mprpc-config", str(path), "--service", "nope"])
