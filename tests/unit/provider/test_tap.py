"""twistd mprpc options and service tree, without starting anything."""

from __future__ import annotations

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from twisted_rpc import ConfigError, ProviderService, load_consumer_config, load_provider_config
from twisted_rpc.provider import Options, makeService


def write(tmp_path, text):
    path = tmp_path / "p.ini"
    path.write_text(text)
    return str(path)


def test_options_and_service_tree(tmp_path):
    path = write(
        tmp_path,
        "[provider]\nlisten = tcp:0:interface=127.0.0.1  # inline comment\n"
        "advertise = 10.0.0.5:8000\n"
        "services = testbed.echo_service:EchoService examples.user.callee:UserService\n"
        "grace_period = 2.5\n",
    )
    options = Options()
    options.parseOptions(["-c", path])
    service = makeService(options, MemoryReactor())
    assert isinstance(service, ProviderService)
    assert sorted(service.dispatcher.services) == [
        "example.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "mprpc.health.v1.Health",
        "mprpc.reflection.v1.Reflection",
        "mprpc.test.EchoService",
    ]
    assert service.grace_period == 2.5
    assert str(service.advertise) == "10.0.0.5:8000"
    (listener,) = [s for s in service if isinstance(s, StreamServerEndpointService)]
    assert listener.factory is service.factory


def test_config_is_required():
    with pytest.raises(usage.UsageError, match="--config or --cpp-config is required"):
        Options().parseOptions([])


def test_bad_config_exits_with_one_line(tmp_path):
    path = write(tmp_path, "[provider]\nlisten = tcp:0\nservices = nope\n")
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--config", path])
    assert str(exited.value) == (
        f"twistd mprpc: config error: {path}: [provider] services: 'nope' is not module:Class"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("[other]\n", "unknown section [other]"),
        ("[registry]\nkind = static\n", "missing section [provider]"),
        ("[provider]\nservices = a:B\n", "[provider] listen is required"),
        ("[provider]\nlisten = tcp:0\nservices = a:B\ngrace_period = soon\n", "is not a number"),
        ("[provider]\nlisten = tcp:0\nservices = a:B\nadvertise = nohost\n", "expected host:port"),
        (
            "[provider]\nlisten = tcp:0\nservices = a:B\n[registry]\nroot = mprpc\n",
            "root must start",
        ),
        ("[provider]\nlisten = tcp:0\nservices = a:B\n[registry]\nauth = me\n", "digest:user"),
    ],
)
def test_provider_config_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as raised:
        load_provider_config(write(tmp_path, text))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_consumer_config(tmp_path):
    path = write(
        tmp_path,
        "[consumer]\ntimeout = 2\n[providers]\nexample.UserService = 127.0.0.1:1, 127.0.0.1:2\n",
    )
    config = load_consumer_config(path)
    assert config.timeout == 2
    assert [str(a) for a in config.providers["example.UserService"]] == [
        "127.0.0.1:1",
        "127.0.0.1:2",
    ]


def test_consumer_max_write_buffer_reaches_the_connections(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from twisted_rpc import Client
    from twisted_rpc.client._channel import _ConnectionFactory
    from twisted_rpc.client._connection import DEFAULT_MAX_WRITE_BUFFER

    assert load_consumer_config(write(tmp_path, "")).max_write_buffer == DEFAULT_MAX_WRITE_BUFFER
    path = write(
        tmp_path,
        "[consumer]\nmax_write_buffer = 1048576\n[providers]\nexample.UserService = 127.0.0.1:1\n",
    )
    client = Client.from_config(path, MemoryReactorClock())
    client.proxy("example.UserService")
    (channel,) = client.channels.values()
    connection = _ConnectionFactory(channel).buildProtocol(None)
    assert connection.max_write_buffer == 1048576
    with pytest.raises(ConfigError, match="max_write_buffer = 'lots' is not a number"):
        load_consumer_config(write(tmp_path, "[consumer]\nmax_write_buffer = lots\n"))


def test_shipped_configs_load():
    assert load_provider_config("etc/provider.ini").listen == "tcp:8000:interface=127.0.0.1"
    assert set(load_consumer_config("etc/consumer.ini").providers) == {
        "example.UserService",
        "example.FriendService",
        "example.ChatService",
    }


def test_operability_keys(tmp_path):
    path = write(
        tmp_path,
        "[provider]\nlisten = tcp:0\nservices = testbed.echo_service:EchoService\n"
        "health = no\nreflection = no\nslow_call_threshold = 0.5\nlog_format = json\n"
        "[admin]\nlisten = tcp:0:interface=127.0.0.1\n",
    )
    options = Options()
    options.parseOptions(["-c", path])
    service = makeService(options, MemoryReactor())
    assert sorted(service.dispatcher.services) == ["mprpc.test.EchoService"]  # no built-ins
    assert service.factory.slow_call_threshold == 0.5
    assert service.metrics is not None and service.factory.observer is service.metrics
    assert service.log_observer is not None


@pytest.mark.parametrize(
    "extra, message",
    [
        ("health = maybe\n", "[provider] health = 'maybe' (expected yes or no)"),
        ("log_format = xml\n", "expected text or json"),
        ("[admin]\nport = 1\n", "unknown key 'port' in [admin]"),
        ("[admin]\nlisten = bogus:1\n", "[admin] listen = 'bogus:1' is not a valid endpoint"),
    ],
)
def test_operability_key_errors(tmp_path, extra, message):
    path = write(tmp_path, "[provider]\nlisten = tcp:0\nservices = a:B\n" + extra)
    with pytest.raises(ConfigError) as raised:
        load_provider_config(path)
    assert message in str(raised.value)


def test_the_plugin_and_what_it_imports_leave_the_reactor_alone():
    # twistd chooses the reactor (--reactor) after loading plugins: nothing the
    # plugin imports may install the global one first.
    import subprocess
    import sys

    code = (
        "import sys, runpy; runpy.run_path('twisted/plugins/mprpc_plugin.py');"
        "import twisted_rpc.provider._tap, twisted_rpc.provider._service, twisted_rpc.ops._admin;"
        "sys.exit('twisted.internet.reactor' in sys.modules)"
    )
    from testbed.processes import ROOT, environment

    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment(), timeout=60)
    assert done.returncode == 0


def test_hardening_limits_reach_both_listeners(tmp_path):
    path = write(
        tmp_path,
        "[provider]\nlisten = tcp:0:interface=127.0.0.1\n"
        "services = testbed.echo_service:EchoService\n"
        "max_long_lived_calls_per_connection = 7\nmax_long_lived_calls = 70\n"
        "max_metadata_size = 4096\nmax_metadata_entries = 16\nframe_timeout = 12.5\n"
        "max_connections_per_peer = 9\nmax_buffered_bytes = 1048576\n"
        "[mprpc]\nlisten = tcp:0:interface=127.0.0.1\n",
    )
    options = Options()
    options.parseOptions(["-c", path])
    service = makeService(options, MemoryReactor())
    limits = service.factory.limits
    assert (
        limits.max_long_lived_calls_per_connection,
        limits.max_long_lived_calls,
        limits.max_metadata_size,
        limits.max_metadata_entries,
        limits.frame_timeout,
        limits.max_connections_per_peer,
        limits.max_buffered_bytes,
    ) == (7, 70, 4096, 16, 12.5, 9, 1048576)
    assert service.cpp_factory.limits is limits
    connection = service.factory.buildProtocol(None)
    assert (connection.decoder.max_ext_size, connection.decoder.max_ext_entries) == (4096, 16)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("frame_timeout = inf", "frame_timeout = 'inf' is not a finite number"),
        ("frame_timeout = nan", "frame_timeout = 'nan' is not a finite number"),
        ("frame_timeout = -1", "frame_timeout must be at least 0"),
        ("max_metadata_size = 0", "max_metadata_size must be at least 1"),
        ("max_connections_per_peer = many", "max_connections_per_peer = 'many' is not a number"),
    ],
)
def test_hardening_limit_errors(tmp_path, extra, message):
    path = write(
        tmp_path,
        f"[provider]\nlisten = tcp:0\nservices = testbed.echo_service:EchoService\n{extra}\n",
    )
    with pytest.raises(ConfigError, match=message):
        load_provider_config(path)


@pytest.mark.parametrize(
    "field, value",
    [("max_calls", 0), ("max_metadata_size", 1.5), ("frame_timeout", float("nan"))],
)
def test_server_limits_are_validated(field, value):
    from twisted_rpc import ServerLimits

    with pytest.raises(ValueError, match=field):
        ServerLimits(**{field: value})


# --------------------------------------------------------------------------- stream settings


def test_stream_limits_load_and_reach_both_listeners(tmp_path):
    path = write(
        tmp_path,
        "[provider]\nlisten = tcp:0:interface=127.0.0.1\n"
        "services = testbed.echo_service:StreamService\n"
        "max_streams_per_connection = 8\nmax_streams = 80\n"
        "stream_window = 4096\nstream_idle_timeout = 2.5\nmax_message_size = 5000\n"
        "[mprpc]\nlisten = tcp:0:interface=127.0.0.1\n",
    )
    options = Options()
    options.parseOptions(["-c", path])
    service = makeService(options, MemoryReactor())
    limits = service.factory.limits
    assert (
        limits.max_streams_per_connection,
        limits.max_streams,
        limits.stream_window,
        limits.stream_idle_timeout,
        limits.max_message_size,
    ) == (8, 80, 4096, 2.5, 5000)
    assert service.cpp_factory.limits is limits
    # What the provider tells each consumer in its settings.
    settings = service.factory.buildProtocol(None).local_settings()
    assert (settings["stream_window"], settings["max_streams"]) == ("4096", "8")
    assert settings["max_message_size"] == "5000"


def test_stream_limits_default_to_server_limits(tmp_path):
    from twisted_rpc import ServerLimits

    path = write(tmp_path, "[provider]\nlisten = tcp:0\nservices = a:B\n")
    limits = load_provider_config(path).limits
    d = ServerLimits()
    assert (
        limits.max_streams_per_connection,
        limits.max_streams,
        limits.stream_window,
        limits.stream_idle_timeout,
    ) == (d.max_streams_per_connection, d.max_streams, d.stream_window, d.stream_idle_timeout)
    assert (d.max_streams_per_connection, d.max_streams, d.stream_window) == (256, 10000, 262144)
    assert d.stream_idle_timeout == 0


WINDOW_RANGE = "expected a whole number of bytes from 1024 to 2147483647"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("stream_window = 1023", f"[provider] stream_window: {WINDOW_RANGE}, got 1023"),
        ("stream_window = 0", f"[provider] stream_window: {WINDOW_RANGE}, got 0"),
        ("stream_window = -5", f"[provider] stream_window: {WINDOW_RANGE}, got -5"),
        ("stream_window = 2147483648", f"{WINDOW_RANGE}, got 2147483648"),
        ("stream_window = 256k", "[provider] stream_window = '256k' is not a number"),
        ("stream_window = 1.5", "[provider] stream_window = '1.5' is not a number"),
        ("max_streams = 0", "[provider] max_streams must be at least 1"),
        ("max_streams_per_connection = -1", "max_streams_per_connection must be at least 1"),
        ("max_streams_per_connection = some", "max_streams_per_connection = 'some' is not a"),
        ("stream_idle_timeout = -1", "[provider] stream_idle_timeout must be at least 0"),
        ("stream_idle_timeout = nan", "stream_idle_timeout = 'nan' is not a finite number"),
        ("stream_idle_timeout = soon", "stream_idle_timeout = 'soon' is not a number"),
        ("stream_windows = 4096", "unknown key 'stream_windows' in [provider]"),
    ],
)
def test_stream_limit_errors(tmp_path, extra, message):
    path = write(tmp_path, f"[provider]\nlisten = tcp:0\nservices = a:B\n{extra}\n")
    with pytest.raises(ConfigError) as raised:
        load_provider_config(path)
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"{path}: ")
    assert "\n" not in str(raised.value)


def test_consumer_stream_window_loads_and_reaches_streams(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from testbed.protos import echo_pb2
    from twisted_rpc import Client, ClientOptions

    assert load_consumer_config(write(tmp_path, "")).stream_window == (
        ClientOptions().stream_window
    )
    assert ClientOptions().stream_window == 1024 * 1024
    path = write(
        tmp_path,
        "[consumer]\nstream_window = 65536\n[providers]\nmprpc.test.StreamService = 127.0.0.1:1\n",
    )
    assert load_consumer_config(path).options.stream_window == 65536
    client = Client.from_config(path, MemoryReactorClock())
    stream = client.proxy("mprpc.test.StreamService").Count(echo_pb2.CountRequest(count=1))
    assert (stream.window, stream.inbox.window) == (65536, 65536)
    stream.cancel()


@pytest.mark.parametrize(
    "value, message",
    [
        ("100", f"[consumer] stream_window: {WINDOW_RANGE}, got 100"),
        ("-1", f"[consumer] stream_window: {WINDOW_RANGE}, got -1"),
        ("4294967296", f"{WINDOW_RANGE}, got 4294967296"),
        ("1MiB", "[consumer] stream_window = '1MiB' is not a number"),
    ],
)
def test_consumer_stream_window_errors(tmp_path, value, message):
    path = write(tmp_path, f"[consumer]\nstream_window = {value}\n")
    with pytest.raises(ConfigError) as raised:
        load_consumer_config(path)
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"{path}: ")
    assert "\n" not in str(raised.value)
