"""ClientOptions: every client setting and its default in one place, checked
when built; Client's keywords, the consumer ini file and code all build one."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet.testing import MemoryReactorClock

from examples.protos import user_pb2  # noqa: F401 (registers example.UserService)
from twisted_rpc import Client, ClientOptions, ClientTLS, ConfigError, load_consumer_config
from twisted_rpc.client import LeastOutstanding, backoff_policy
from twisted_rpc.client._channel import _ConnectionFactory
from twisted_rpc.discovery import ProviderAddress


def test_defaults_in_one_place() -> None:
    options = ClientOptions()
    assert (options.timeout, options.connect_timeout, options.retire_grace) == (None, 5.0, 60.0)
    assert (options.keepalive_interval, options.keepalive_timeout) == (10.0, 20.0)
    assert options.keepalive_without_calls is False
    assert (options.max_concurrent_dials, options.max_dials_per_second) == (32, 500.0)
    assert options.max_write_buffer == 256 * 1024 * 1024 and options.tls is None
    assert ClientOptions() == ClientOptions()  # one default backoff policy
    assert ClientOptions(backoff=None) == ClientOptions()  # None: the default, as before
    assert 0.08 <= options.backoff(1) <= 0.12 and 4.0 <= options.backoff(50) <= 6.0


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClientOptions().timeout = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"timeout": "2"}, ValueError, "timeout"),
        ({"balancer": "fastest"}, ValueError, "fastest"),
        ({"balancer": 3}, TypeError, "balancer"),
        ({"max_frame_size": 63}, ValueError, "max_frame_size"),
        ({"max_frame_size": 1.5e6}, TypeError, "max_frame_size"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout"),
        ({"connect_timeout": float("inf")}, ValueError, "connect_timeout"),
        ({"retire_grace": -1}, ValueError, "retire_grace"),
        ({"keepalive_interval": -0.5}, ValueError, "keepalive_interval"),
        ({"keepalive_timeout": 0}, ValueError, "keepalive_timeout"),
        ({"tls": "yes"}, TypeError, "tls"),
        ({"max_write_buffer": -1}, ValueError, "max_write_buffer"),
        ({"max_concurrent_dials": 0}, ValueError, "max_concurrent_dials"),
        ({"max_concurrent_dials": True}, TypeError, "max_concurrent_dials"),
        ({"max_dials_per_second": 0}, ValueError, "max_dials_per_second"),
        ({"max_dials_per_second": float("inf")}, ValueError, "max_dials_per_second"),
        ({"backoff": 0.1}, TypeError, "backoff"),
    ],
)
def test_bad_values_are_refused_by_options_replace_and_client(changes, error, match) -> None:
    with pytest.raises(error, match=match):
        ClientOptions(**changes)
    with pytest.raises(error, match=match):
        ClientOptions().replace(**changes)
    with pytest.raises(error, match=match):
        Client(MemoryReactorClock(), **changes)


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(TypeError, match="conect_timeout"):
        ClientOptions().replace(conect_timeout=1)
    with pytest.raises(TypeError, match="conect_timeout"):
        Client(MemoryReactorClock(), conect_timeout=1)


def test_client_keywords_build_the_options_and_reach_the_connections() -> None:
    policy = backoff_policy(initial=1.0)
    client = Client(
        MemoryReactorClock(),
        providers={"example.UserService": ["127.0.0.1:1"]},
        timeout=2,
        balancer=LeastOutstanding,
        max_write_buffer=4096,
        keepalive_interval=3,
        backoff=policy,
    )
    assert client.options == ClientOptions(
        timeout=2,
        balancer=LeastOutstanding,
        max_write_buffer=4096,
        keepalive_interval=3,
        backoff=policy,
    )
    client.proxy("example.UserService")
    (channel,) = client.channels.values()
    assert channel.options is client.options and channel.backoff is policy
    connection = _ConnectionFactory(channel).buildProtocol(None)
    assert connection.options is client.options
    assert (connection.max_write_buffer, connection.keepalive_interval) == (4096, 3)


def test_options_object_and_keywords_over_it() -> None:
    base = ClientOptions(timeout=2, connect_timeout=1)
    assert Client(MemoryReactorClock(), base).options is base
    assert Client(MemoryReactorClock(), base, timeout=3).options == base.replace(timeout=3)
    with pytest.raises(TypeError, match="ClientOptions"):
        Client(MemoryReactorClock(), {"timeout": 2})  # type: ignore[arg-type]


def test_a_channel_for_a_tls_upgrade_gets_its_own_options() -> None:
    client = Client(MemoryReactorClock(), timeout=2)
    channel = client._channel(ProviderAddress("127.0.0.1", 1, data={"tls": True}))
    assert isinstance(channel.options.tls, ClientTLS) and client.options.tls is None
    assert channel.options.replace(tls=None) == client.options


def test_the_consumer_ini_builds_client_options(tmp_path) -> None:
    path = tmp_path / "consumer.ini"
    path.write_text(
        "[consumer]\ntimeout = 2\nbalancer = least_outstanding\nconnect_timeout = 1\n"
        "keepalive_interval = 5\nmax_concurrent_dials = 4\n"
        "[providers]\nexample.UserService = 127.0.0.1:1\n"
    )
    config = load_consumer_config(str(path))
    assert config.options == ClientOptions(
        timeout=2,
        balancer="least_outstanding",
        connect_timeout=1,
        keepalive_interval=5,
        max_concurrent_dials=4,
    )
    assert config.timeout == 2 and config.max_concurrent_dials == 4  # read through
    client = Client.from_config(str(path), MemoryReactorClock(), retire_grace=5)
    assert client.options == config.options.replace(retire_grace=5)
    with pytest.raises(AttributeError):
        config.nothing  # noqa: B018


def test_a_bad_ini_value_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "consumer.ini"
    path.write_text("[consumer]\nmax_dials_per_second = inf\n")
    with pytest.raises(ConfigError, match="max_dials_per_second"):
        load_consumer_config(str(path))
