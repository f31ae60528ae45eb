"""Listeners handed over by systemd (socket activation, ``docs/cluster.md``).

``listen = systemd:domain=INET:index=0`` (or ``name=`` with the socket unit's
``FileDescriptorName=``) adopts a listening socket the process inherited:
systemd (or any launcher speaking its protocol) passes descriptors from 3 on
and says how many in ``LISTEN_FDS``, for the process whose pid is
``LISTEN_PID``, and their names in ``LISTEN_FDNAMES``. The socket stays open
in systemd across a restart of the provider, so connection attempts made
meanwhile wait in its backlog for the next process.

Twisted's ``systemd`` endpoint reads those variables once, when
``twisted.internet.endpoints`` is imported (and removes them from the
environment); the checks here look at what it read, so that a descriptor that
is not there is one clear error at start instead of an ``IndexError``.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.endpoints import _parse, _SystemdParser, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.systemd import ListenFDs

__all__ = [
    "check_distinct_descriptors",
    "check_systemd_arguments",
    "inherited_descriptor",
    "server_endpoint",
]

DOMAINS = ("INET", "INET6", "UNIX")
"""The address families a ``systemd:`` endpoint may name (``AF_`` left off)."""


def inherited() -> ListenFDs:
    """The descriptors this process inherited, as Twisted's endpoint sees them."""
    fds: ListenFDs = _SystemdParser._sddaemon
    return fds


def check_systemd_arguments(args: list[str], kwargs: dict[str, str]) -> None:
    """Raise ValueError unless ``systemd:`` was given ``domain=`` (INET, INET6 or
    UNIX) and exactly one of ``index=`` (a number) or ``name=``, nothing else."""
    unknown = sorted(set(kwargs) - {"domain", "index", "name"})
    if args or unknown:
        extra = ", ".join([*args, *unknown])
        raise ValueError(f"a systemd endpoint takes only domain=, index= and name= (not {extra})")
    domain = kwargs.get("domain")
    if domain not in DOMAINS:
        raise ValueError(f"systemd domain= must be one of {', '.join(DOMAINS)}, not {domain!r}")
    index, name = kwargs.get("index"), kwargs.get("name")
    if (index is None) == (name is None):
        raise ValueError("a systemd endpoint needs exactly one of index= and name=")
    if index is not None and not (index.isascii() and index.isdigit()):
        raise ValueError(f"systemd index= must be a number >= 0, not {index!r}")
    if name is not None and not name:
        raise ValueError("systemd name= must not be empty")


def inherited_descriptor(description: str, fds: ListenFDs | None = None) -> int | None:
    """None unless ``description`` is a ``systemd:`` endpoint; else the
    descriptor it adopts, after checking that it was inherited (``fds``,
    default: what this process inherited) and is a listening stream socket of
    the domain it names. ValueError saying what is wrong otherwise."""
    args, kwargs = _parse(description)
    if not args or args[0].lower() != "systemd":
        return None
    check_systemd_arguments(args[1:], kwargs)
    if fds is None:
        fds = inherited()
    descriptors = fds.inheritedDescriptors()
    where = (
        f"this process (pid {os.getpid()}) inherited {len(descriptors)} listening "
        "descriptors (LISTEN_FDS with LISTEN_FDNAMES, for LISTEN_PID; run it from a "
        "systemd socket unit with twistd -n, see docs/cluster.md)"
    )
    if "index" in kwargs:
        index = int(kwargs["index"])
        if index >= len(descriptors):
            raise ValueError(f"{description!r}: no descriptor at index={index}: {where}")
        fd = descriptors[index]
    else:
        named = fds.inheritedNamedDescriptors()
        if kwargs["name"] not in named:
            names = ", ".join(sorted(named)) or "none"
            raise ValueError(
                f"{description!r}: no descriptor named {kwargs['name']!r} "
                f"(LISTEN_FDNAMES: {names}): {where}"
            )
        fd = named[kwargs["name"]]
    _check_socket(description, fd, getattr(socket, "AF_" + kwargs["domain"]))
    return fd


def check_distinct_descriptors(
    listeners: dict[str, str | None], fds: ListenFDs | None = None
) -> None:
    """ValueError if two of ``listeners`` (``{where: endpoint}``) adopt the same
    inherited descriptor (each is adopted, then closed, once)."""
    seen: dict[int, str] = {}
    for where, description in listeners.items():
        fd = None if description is None else inherited_descriptor(description, fds)
        if fd is None:
            continue
        if fd in seen:
            raise ValueError(f"{where} and {seen[fd]} both name inherited descriptor {fd}")
        seen[fd] = where


def _check_socket(description: str, fd: int, family: socket.AddressFamily) -> None:
    """ValueError unless ``fd`` is a listening stream socket of ``family``
    (looked at through a duplicate: ``fd`` itself is left as it is)."""
    try:
        copy = os.dup(fd)
    except OSError as e:
        raise ValueError(f"{description!r}: descriptor {fd} is not open: {e.strerror}") from None
    try:
        sock = socket.socket(fileno=copy)
    except OSError as e:
        os.close(copy)
        raise ValueError(
            f"{description!r}: descriptor {fd} is not a socket: {e.strerror}"
        ) from None
    with sock:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != family or sock.type != socket.SOCK_STREAM or not listening:
            raise ValueError(
                f"{description!r}: descriptor {fd} is not a listening {family.name} stream "
                f"socket ({sock.family.name}, {sock.type.name}, "
                f"{'listening' if listening else 'not listening'})"
            )


def server_endpoint(reactor: object, description: str) -> IStreamServerEndpoint:
    """``serverFromString(reactor, description)``, with an inherited
    descriptor checked first (:func:`inherited_descriptor`)."""
    inherited_descriptor(description)
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    return endpoint
