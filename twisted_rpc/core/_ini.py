"""What every ini loader shares: the typed reader and the ``[registry]`` section.

Every problem is a :class:`ConfigError` whose message is one line naming the
file, the section and key, and what is wrong. ``docs/config.md`` lists the
keys; the loaders are ``twisted_rpc.provider.load_provider_config`` and
``twisted_rpc.client.load_consumer_config``.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, overload

from twisted.internet.endpoints import _parseServer

__all__ = [
    "REGISTRY_KEYS",
    "REGISTRY_KINDS",
    "ConfigError",
    "Reader",
    "RegistryConfig",
    "check_endpoint",
]

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file is missing, malformed or names something unusable."""


REGISTRY_KINDS = ("static", "zookeeper")


@dataclass
class RegistryConfig:
    """The ``[registry]`` section, consumers' and providers' alike."""

    kind: str = "static"
    hosts: str = "127.0.0.1:2181"
    root: str = "/mprpc"
    session_timeout: float = 10.0
    weight: int = 100
    auth: str = ""


REGISTRY_KEYS = {"kind", "hosts", "root", "session_timeout", "weight", "auth"}


class Reader:
    """Typed, one-line-error access to an ini file's values."""

    def __init__(self, path: str, sections: dict[str, set[str] | None]) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such config file")
        parser = configparser.ConfigParser(
            inline_comment_prefixes=("#", ";"), interpolation=None, strict=True
        )
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except (configparser.Error, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None
        for section in parser.sections():
            if section not in sections:
                raise ConfigError(
                    f"{path}: unknown section [{section}] (known: {', '.join(sorted(sections))})"
                )
            known = sections[section]
            if known is None:
                continue
            for key in parser[section]:
                if key not in known:
                    raise ConfigError(
                        f"{path}: unknown key {key!r} in [{section}] "
                        f"(known: {', '.join(sorted(known))})"
                    )
        self.parser = parser

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        if self.parser.has_option(section, key):
            value = self.parser.get(section, key).strip()
            return value if value else default
        return default

    def require(self, section: str, key: str) -> str:
        value = self.get(section, key)
        if value is None:
            raise ConfigError(f"{self.path}: [{section}] {key} is required")
        return value

    @overload
    def number(
        self, section: str, key: str, default: int, kind: type[int], minimum: float = ...
    ) -> int: ...

    @overload
    def number(
        self, section: str, key: str, default: float, kind: type[float] = ..., minimum: float = ...
    ) -> float: ...

    def number(
        self, section: str, key: str, default: float, kind: type[float] = float, minimum: float = 0
    ) -> float:
        """The number at ``[section] key`` (``default`` if unset) as ``kind``
        (float or int), finite and at least ``minimum``."""
        raw = self.get(section, key)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{self.path}: [{section}] {key} = {raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{self.path}: [{section}] {key} = {raw!r} is not a finite number")
        if value < minimum:
            raise ConfigError(f"{self.path}: [{section}] {key} must be at least {minimum}")
        return value

    def flag(self, section: str, key: str, default: bool) -> bool:
        raw = (self.get(section, key, "") or "").lower()
        if not raw:
            return default
        if raw not in ("yes", "no", "true", "false", "on", "off"):
            raise ConfigError(f"{self.path}: [{section}] {key} = {raw!r} (expected yes or no)")
        return raw in ("yes", "true", "on")

    def parsed(self, section: str, key: str, raw: str, parse: Callable[[str], T]) -> T:
        """``parse(raw)``, its ValueError made a ConfigError naming the key."""
        try:
            return parse(raw)
        except ValueError as e:
            raise ConfigError(f"{self.path}: [{section}] {key}: {e}") from None

    def registry(self) -> RegistryConfig:
        s = "registry"
        kind = self.get(s, "kind", "static")
        if kind not in REGISTRY_KINDS:
            raise ConfigError(
                f"{self.path}: [registry] kind = {kind!r} (expected one of: "
                f"{', '.join(REGISTRY_KINDS)})"
            )
        reg = RegistryConfig(kind=kind)
        reg.hosts = self.get(s, "hosts", reg.hosts) or reg.hosts
        reg.root = self.get(s, "root", reg.root) or reg.root
        if not reg.root.startswith("/"):
            raise ConfigError(f"{self.path}: [registry] root must start with '/'")
        reg.session_timeout = self.number(s, "session_timeout", reg.session_timeout, minimum=1)
        reg.weight = self.number(s, "weight", reg.weight, int, minimum=0)
        reg.auth = self.get(s, "auth", "") or ""
        if reg.auth and not reg.auth.startswith("digest:"):
            raise ConfigError(f"{self.path}: [registry] auth must look like digest:user:password")
        return reg


def check_endpoint(where: str, listen: str) -> None:
    """Twisted's own endpoint-string parse (built-in types and installed
    plugins), no endpoint built; see ``twisted_rpc.provider._options``."""
    try:
        _parseServer(listen, None)
    except Exception as e:
        raise ConfigError(f"{where} = {listen!r} is not a valid endpoint: {e}") from None
