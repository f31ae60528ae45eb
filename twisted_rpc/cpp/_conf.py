"""The C++ mprpc ``key=value`` config file, and a provider's ``[cpp]`` section.

``[cpp]`` (``[mprpc]``, its old name, is read the same) configures the
listener that serves C++ callers; it may point at a C++ config file, which
``twistd mprpc --cpp-config`` (``--mprpc-config``) reads alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from twisted.logger import Logger

from twisted_rpc.core._ini import ConfigError, Reader, RegistryConfig, check_endpoint
from twisted_rpc.discovery._types import ProviderAddress, parse_address

__all__ = [
    "CPP_KEYS",
    "CPP_SECTIONS",
    "CppConf",
    "CppListenerConfig",
    "load_cpp_conf",
    "read_cpp_section",
]

log = Logger(namespace="twisted_rpc.cpp")


@dataclass
class CppListenerConfig:
    """The listener of a provider for C++ mprpc callers (``[cpp]``)."""

    listen: str
    advertise: ProviderAddress | None = None
    zookeeper: str | None = None
    """Connect string of the ZooKeeper to register ``/<Service>/<Method>`` in (None: don't)."""


@dataclass
class CppConf:
    """A C++ mprpc ``key=value`` config file (``rpcserverip``, ``rpcserverport``,
    ``zookeeperip``, ``zookeeperport``)."""

    path: str
    ip: str | None
    port: int | None
    zookeeper: str | None

    def listener(self) -> CppListenerConfig:
        if self.ip is None or self.port is None:
            raise ConfigError(f"{self.path}: rpcserverip and rpcserverport are required")
        return CppListenerConfig(
            listen=f"tcp:{self.port}:interface={self.ip}",
            advertise=ProviderAddress(self.ip, self.port),
            zookeeper=self.zookeeper,
        )


CPP_KEYS = {"listen", "advertise", "zookeeper", "config"}


CPP_SECTIONS = ("cpp", "mprpc")
"""The provider ini section of the C++ listener: ``[cpp]``, or ``[mprpc]``
(its old name, still read for the files that use it)."""


def read_cpp_section(r: Reader, registry: RegistryConfig) -> CppListenerConfig | None:
    """The ``[cpp]`` (or ``[mprpc]``) section of a provider ini file, if any."""
    present = [name for name in CPP_SECTIONS if r.parser.has_section(name)]
    if not present:
        return None
    if len(present) > 1:
        raise ConfigError(
            f"{r.path}: [cpp] and [mprpc] are one section ([mprpc] is its old name): give one"
        )
    s = present[0]
    conf_path = r.get(s, "config")
    if conf_path:
        if not os.path.isabs(conf_path):
            conf_path = os.path.join(os.path.dirname(r.path), conf_path)
        listener = load_cpp_conf(conf_path).listener()
    else:
        listener = CppListenerConfig(r.require(s, "listen"))
    if r.get(s, "listen"):
        listener.listen = r.require(s, "listen")
    check_endpoint(f"{r.path}: [{s}] listen", listener.listen)
    raw_advertise = r.get(s, "advertise")
    if raw_advertise:
        listener.advertise = r.parsed(s, "advertise", raw_advertise, parse_address)
    flag = (r.get(s, "zookeeper", "") or "").lower()
    if flag not in ("", "yes", "no", "true", "false"):
        raise ConfigError(f"{r.path}: [{s}] zookeeper = {flag!r} (expected yes or no)")
    if flag in ("no", "false"):
        listener.zookeeper = None
    elif flag in ("yes", "true") and listener.zookeeper is None:
        listener.zookeeper = registry.hosts
    return listener


def load_cpp_conf(path: str) -> CppConf:
    """Read a C++ mprpc config file as the original (``MprpcConfig::LoadConfigFile``)
    and its users read it.

    - ``key=value`` lines, split at the first ``=``, key and value trimmed; lines
      starting with ``#``, blank lines and lines without ``=`` are skipped, and
      unknown keys ignored. (The original trims spaces only; tabs and ``\\r`` are
      trimmed here too.)
    - A key given twice keeps its FIRST value (the original inserts into a
      ``std::unordered_map``, which ignores a second insert), with a warning.
    - ``rpcserverport`` is read as ``atoi`` reads it: its leading digits
      (``8000 # rpc`` is 8000, with a warning); no digits, or a number that is
      not a port, is an error.
    - ZooKeeper is ``zookeeperip + ":" + zookeeperport``, passed whole to the
      client as the original passes it to ``zookeeper_init``, which takes
      everything from the first ``/`` as a chroot: ``zookeeperport=2181/chroot``
      connects to port 2181 with the chroot ``/chroot``, in C++ and here. A
      connect string ``zookeeper_init`` would refuse (a host without a numeric
      port, a malformed chroot) is an error here.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    values: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key in values:
            if value != values[key]:
                log.warn(
                    "{path}:{line}: {key} given again ({value!r}); the first value "
                    "({first!r}, line {first_line}) is kept, as the C++ reader keeps it",
                    path=path,
                    line=number,
                    key=key,
                    value=value,
                    first=values[key],
                    first_line=first_line[key],
                )
            continue
        values[key] = value
        first_line[key] = number

    def is_port(text: str) -> bool:
        return text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536

    def port(key: str) -> int | None:
        raw = values.get(key)
        if raw is None:
            return None
        digits = re.match(r"\+?([0-9]+)", raw)
        if digits is None or not is_port(digits.group(1)):
            raise ConfigError(f"{path}: {key}={raw!r} is not a port number")
        if digits.end() != len(raw):
            log.warn(
                "{path}: {key}={raw!r} read as {port}, as the C++ atoi reads it",
                path=path,
                key=key,
                raw=raw,
                port=int(digits.group(1)),
            )
        return int(digits.group(1))

    def zookeeper(connect: str) -> str:
        """``zookeeperip:zookeeperport`` checked as ``zookeeper_init`` checks it: the
        chroot starts at the first ``/`` (``/`` alone is none), then every
        comma-separated host needs ``:port``."""
        hosts, slash, chroot = connect.partition("/")
        where = f"{path}: zookeeperip:zookeeperport = {connect!r}"
        for host in hosts.split(","):
            name, colon, number = host.strip().rpartition(":")
            if not colon or not name or not is_port(number):
                raise ConfigError(f"{where}: {host.strip()!r} is not host:port")
        chroot = slash + chroot
        if chroot == "/":
            chroot = ""
        segments = chroot.split("/")[1:]
        if chroot and any(s in ("", ".", "..") for s in segments):
            raise ConfigError(f"{where}: {chroot!r} is not a ZooKeeper path for a chroot")
        return hosts + chroot

    zk_ip, zk_port = values.get("zookeeperip"), values.get("zookeeperport")
    if (zk_ip is None) != (zk_port is None):
        raise ConfigError(f"{path}: zookeeperip and zookeeperport go together")
    return CppConf(
        path=path,
        ip=values.get("rpcserverip") or None,
        port=port("rpcserverport"),
        zookeeper=zookeeper(f"{zk_ip}:{zk_port}") if zk_ip else None,
    )
