"""C++ mprpc key=value config files, the [cpp] section ([mprpc] of old), and twistd's
--cpp-config (--mprpc-config of old)."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from twisted_rpc import ConfigError, ProviderAddress, ZooKeeperRegistry, load_provider_config
from twisted_rpc.cpp import load_cpp_conf
from twisted_rpc.provider import Options, makeService

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
    conf = load_cpp_conf(str(path))
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
        load_cpp_conf(str(path)).listener()


def test_missing_cpp_conf(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_cpp_conf(str(tmp_path / "none.conf"))


@pytest.mark.parametrize("name", ["cpp", "mprpc"])
def test_cpp_section_with_registry_hosts(tmp_path, name):
    path = tmp_path / "p.ini"
    path.write_text(
        "[provider]\nlisten = tcp:0\nservices = a:B\n"
        "[registry]\nkind = zookeeper\nhosts = zk1:2181\n"
        f"[{name}]\nlisten = tcp:0:interface=127.0.0.1\nadvertise = 10.1.1.1:9000\n"
        "zookeeper = yes\n"
    )
    cpp = load_provider_config(str(path)).cpp
    assert cpp.listen == "tcp:0:interface=127.0.0.1"
    assert cpp.advertise == ProviderAddress("10.1.1.1", 9000)
    assert cpp.zookeeper == "zk1:2181"


@pytest.mark.parametrize("name", ["cpp", "mprpc"])
def test_cpp_section_pointing_at_a_cpp_conf(tmp_path, name):
    (tmp_path / "test.conf").write_text(CPP_CONF)
    path = tmp_path / "p.ini"
    path.write_text(f"[provider]\nlisten = tcp:0\nservices = a:B\n[{name}]\nconfig = test.conf\n")
    cpp = load_provider_config(str(path)).cpp
    assert (cpp.listen, cpp.zookeeper) == ("tcp:8000:interface=127.0.0.1", "10.0.0.9:2181")


def test_cpp_and_mprpc_sections_together_are_refused(tmp_path):
    path = tmp_path / "p.ini"
    path.write_text(
        "[provider]\nlisten = tcp:0\nservices = a:B\n"
        "[cpp]\nlisten = tcp:1\n[mprpc]\nlisten = tcp:2\n"
    )
    with pytest.raises(ConfigError, match=r"\[cpp\] and \[mprpc\] are one section"):
        load_provider_config(str(path))


@pytest.mark.parametrize("name", ["cpp", "mprpc"])
@pytest.mark.parametrize(
    "section, message",
    [
        ("zookeeper = yes\n", "[{name}] listen is required"),
        ("listen = nonsense:1\n", "is not a valid endpoint"),
        (
            "listen = tcp:0\nzookeeper = maybe\n",
            "[{name}] zookeeper = 'maybe' (expected yes or no)",
        ),
        ("port = 1\n", "unknown key 'port' in [{name}]"),
    ],
)
def test_cpp_section_errors(tmp_path, name, section, message):
    path = tmp_path / "p.ini"
    path.write_text(f"[provider]\nlisten = tcp:0\nservices = a:B\n[{name}]\n" + section)
    with pytest.raises(ConfigError) as raised:
        load_provider_config(str(path))
    assert message.format(name=name) in str(raised.value)


@pytest.mark.parametrize("option", ["--cpp-config", "--mprpc-config"])
def test_twistd_with_only_the_cpp_conf(tmp_path, option):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF)
    options = Options()
    options.parseOptions(
        [
            option,
            str(path),
            "--service",
            "examples.mprpc_compat.callee:UserServiceRpc",
        ]
    )
    provider = makeService(options, MemoryReactor())
    assert provider.factory is not None and provider.cpp_factory is not None
    assert len(provider.listeners) == 1  # no native listener configured
    assert isinstance(provider.cpp_registry, ZooKeeperRegistry)
    assert provider.cpp_registry.zk.hosts == "10.0.0.9:2181"
    assert provider.cpp_registry in list(provider)


def test_twistd_cpp_config_and_mprpc_config_together_are_refused(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF)
    with pytest.raises(usage.UsageError, match="--cpp-config and --mprpc-config are one option"):
        Options().parseOptions(["--cpp-config", str(path), "--mprpc-config", str(path)])


def test_twistd_cpp_conf_needs_a_service(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF)
    with pytest.raises(SystemExit, match="no services to serve"):
        Options().parseOptions(["--cpp-config", str(path)])


def test_twistd_bad_service_spec(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF)
    with pytest.raises(SystemExit, match="--service: 'nope' is not module:Class"):
        Options().parseOptions(["--mprpc-config", str(path), "--service", "nope"])


# ---------------------------------------------------------------- read as the C++ reader reads it


def warnings_in(logged) -> list[str]:
    from twisted.logger import LogLevel, formatEvent

    return [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]


def test_a_duplicate_key_keeps_its_first_value_with_a_warning(tmp_path, logged):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF + "rpcserverport=9000\nzookeeperip=10.0.0.99\nrpcserverip=127.0.0.1\n")
    conf = load_cpp_conf(str(path))
    # std::unordered_map::insert ignores a second insert of a key: the first value wins.
    assert (conf.port, conf.zookeeper) == (8000, "10.0.0.9:2181")
    warnings = warnings_in(logged)
    assert len(warnings) == 2  # the same value again is no news
    assert "rpcserverport given again ('9000')" in warnings[0]
    assert "('8000', line 3) is kept" in warnings[0] and ":7:" in warnings[0]
    assert "zookeeperip given again ('10.0.0.99')" in warnings[1]


@pytest.mark.parametrize(
    "ip, port, connect",
    [
        # zookeeper_init takes everything from the first "/" as the chroot.
        ("10.0.0.9", "2181/chroot", "10.0.0.9:2181/chroot"),
        ("10.0.0.9", "2181/a/b", "10.0.0.9:2181/a/b"),
        ("10.0.0.9", "2181/", "10.0.0.9:2181"),  # "/" alone: no chroot
        ("zk1:2181,zk2", "2182/staging", "zk1:2181,zk2:2182/staging"),
    ],
)
def test_zookeeper_connect_string_is_what_the_cpp_client_gets(tmp_path, ip, port, connect):
    path = tmp_path / "test.conf"
    path.write_text(
        f"rpcserverip=127.0.0.1\nrpcserverport=8000\nzookeeperip={ip}\nzookeeperport={port}\n"
    )
    conf = load_cpp_conf(str(path))
    assert conf.zookeeper == connect
    assert conf.listener().zookeeper == connect


def test_rpcserverport_is_read_as_atoi_reads_it(tmp_path, logged):
    path = tmp_path / "test.conf"
    path.write_text("rpcserverip=127.0.0.1\nrpcserverport=8000 # the rpc port\n")
    assert load_cpp_conf(str(path)).port == 8000
    assert "read as 8000, as the C++ atoi reads it" in warnings_in(logged)[0]


@pytest.mark.parametrize(
    "lines, message",
    [
        # zookeeper_init refuses these (no port, a port with text after it, a bad chroot).
        (
            "zookeeperip=10.0.0.9\nzookeeperport=2181 # zk\n",
            "'10.0.0.9:2181 # zk' is not host:port",
        ),
        ("zookeeperip=zk1,zk2\nzookeeperport=2181\n", "'zk1' is not host:port"),
        ("zookeeperip=10.0.0.9/x\nzookeeperport=2181\n", "'10.0.0.9' is not host:port"),
        ("zookeeperip=10.0.0.9\nzookeeperport=2181/a/\n", "'/a/' is not a ZooKeeper path"),
        ("zookeeperip=10.0.0.9\nzookeeperport=2181/a//b\n", "is not a ZooKeeper path"),
        ("zookeeperip=10.0.0.9\nzookeeperport=2181/a/../b\n", "is not a ZooKeeper path"),
        ("zookeeperip=10.0.0.9\nzookeeperport=/chroot\n", "is not host:port"),
        ("zookeeperip=10.0.0.9\nzookeeperport=70000\n", "is not host:port"),
        ("rpcserverport=70000\n", "is not a port number"),
        ("rpcserverport=-8000\n", "is not a port number"),
        ("rpcserverport=" + "9" * 5000 + "\n", "is not a port number"),
        ("rpcserverport=\u00b2\n", "is not a port number"),
    ],
)
def test_cpp_conf_values_the_cpp_code_cannot_use_are_errors(tmp_path, lines, message):
    path = tmp_path / "bad.conf"
    path.write_text("rpcserverip=127.0.0.1\n" + lines)
    with pytest.raises(ConfigError) as raised:
        load_cpp_conf(str(path))
    assert message in str(raised.value)


def test_twistd_cpp_conf_with_a_chroot_in_the_port(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(CPP_CONF.replace("zookeeperport=2181", "zookeeperport=2181/staging"))
    options = Options()
    options.parseOptions(
        ["--mprpc-config", str(path), "--service", "examples.mprpc_compat.callee:UserServiceRpc"]
    )
    provider = makeService(options, MemoryReactor())
    assert provider.cpp_registry.zk.hosts == "10.0.0.9:2181/staging"
