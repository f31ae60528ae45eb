"""ProviderOptions: every provider setting in one frozen, checked dataclass,
built from code (options object or keywords) and from the ini file alike."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from testbed.echo_service import EchoService
from testbed.protos import echo_pb2
from twisted_rpc import (
    ConfigError,
    IDrainable,
    ProviderAddress,
    ProviderOptions,
    ProviderService,
    ServerLimits,
)
from twisted_rpc.core._connection import CLOSE_TIMEOUT
from twisted_rpc.cpp import encode_request
from twisted_rpc.provider import load_provider_config
from twisted_rpc.provider._options import check_server_endpoint
from twisted_rpc.provider._service import ListenerService, open_connections

LISTEN = "tcp:0:interface=127.0.0.1"


@pytest.mark.parametrize(
    "endpoint",
    [
        LISTEN,
        "tcp:7000",
        "tcp6:0:interface=\\:\\:1",
        "unix:/tmp/provider.sock",
        "systemd:domain=INET:index=0",
    ],
)
def test_known_endpoint_types_are_accepted(endpoint):
    check_server_endpoint(endpoint)
    assert ProviderOptions(listen=endpoint).listen == endpoint


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("bogus:1", "Unknown endpoint type: 'bogus'"),
        ("tcp:abc", "invalid literal for int()"),
        ("tcp:0:colour=red", "unexpected keyword argument 'colour'"),
        ("", "non-empty string"),
    ],
)
def test_bad_endpoints_are_refused_with_the_reason(endpoint, why):
    with pytest.raises(ValueError, match="ProviderOptions.listen") as e:
        ProviderOptions(listen=endpoint)
    assert why in str(e.value)
    with pytest.raises(ValueError, match="ProviderOptions.admin_listen"):
        ProviderOptions(listen=LISTEN, admin_listen=endpoint)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("grace_period", -1),
        ("grace_period", float("inf")),
        ("grace_period", "10"),
        ("slow_call_threshold", -0.5),
        ("max_frame_size", 63),
        ("max_frame_size", 1.5),
        ("admin_max_connections", 0),
        ("limits", {"max_calls": 1}),
        ("registration_data", ["weight"]),
        ("advertise", "127.0.0.1:7000"),
        ("health", "yes"),
    ],
)
def test_bad_settings_are_refused(setting, value):
    with pytest.raises(ValueError, match=f"ProviderOptions.{setting}"):
        ProviderOptions(listen=LISTEN, **{setting: value})


def test_a_provider_needs_a_listener():
    with pytest.raises(ValueError, match="listen, cpp_listen or both"):
        ProviderOptions()
    assert ProviderOptions(cpp_listen=LISTEN).listen is None


def test_options_are_frozen_with_the_documented_defaults():
    options = ProviderOptions(listen=LISTEN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.grace_period = 1  # type: ignore[misc]
    assert options.grace_period == 10.0
    assert options.limits == ServerLimits()
    assert options.admin_listen is None and options.cpp_listen is None
    assert options.health and options.reflection


def test_the_service_takes_options_or_the_same_settings_as_keywords():
    reactor = MemoryReactorClock()
    options = ProviderOptions(listen=LISTEN, grace_period=3, slow_call_threshold=0.5)
    by_options = ProviderService(reactor, [EchoService()], options)
    by_keywords = ProviderService(
        reactor, [EchoService()], listen=LISTEN, grace_period=3, slow_call_threshold=0.5
    )
    older_form = ProviderService(
        reactor, LISTEN, [EchoService()], grace_period=3, slow_call_threshold=0.5
    )
    assert by_options.options == by_keywords.options == older_form.options == options
    assert by_options.grace_period == 3
    assert by_options.factory.slow_call_threshold == 0.5
    overridden = ProviderService(reactor, [EchoService()], options, grace_period=1)
    assert overridden.options == dataclasses.replace(options, grace_period=1)


def test_the_service_refuses_unknown_settings_and_bad_values():
    reactor = MemoryReactorClock()
    with pytest.raises(TypeError, match="grace"):
        ProviderService(reactor, [EchoService()], listen=LISTEN, grace=1)
    with pytest.raises(ValueError, match="is not a valid endpoint"):
        ProviderService(reactor, [EchoService()], listen="tcp:seven")


def test_the_ini_file_builds_the_same_options(tmp_path):
    ini = tmp_path / "provider.ini"
    ini.write_text(
        textwrap.dedent(
            """\
            [provider]
            listen = tcp:7001:interface=127.0.0.1
            advertise = 10.0.0.5:7001
            services = pkg.mod:Svc
            grace_period = 4
            max_calls = 7
            slow_call_threshold = 0.25
            health = no
            [registry]
            weight = 30
            [admin]
            listen = tcp:9100:interface=127.0.0.1
            max_connections = 5
            """
        )
    )
    options = load_provider_config(str(ini)).options(registration_data={"pid": 1})
    assert options == ProviderOptions(
        listen="tcp:7001:interface=127.0.0.1",
        advertise=ProviderAddress("10.0.0.5", 7001),
        grace_period=4.0,
        limits=ServerLimits(max_calls=7),
        slow_call_threshold=0.25,
        health=False,
        registration_data={"pid": 1},
        admin_listen="tcp:9100:interface=127.0.0.1",
        admin_max_connections=5,
    )
    assert load_provider_config(str(ini)).options().registration_data == {"weight": 30}
    with pytest.raises(ConfigError, match="provider.ini: ProviderOptions.grace_period"):
        load_provider_config(str(ini)).options(grace_period=-1)


def test_config_checks_build_no_test_reactor():
    """Endpoint strings are parsed, not built on a MemoryReactor: loading the
    package and checking a config imports no test double."""
    code = (
        "import sys, twisted_rpc, twisted_rpc.provider;"
        "from twisted_rpc.core._ini import check_endpoint;"
        "check_endpoint('listen', 'tcp:0');"
        "twisted_rpc.ProviderOptions(listen='tcp:0');"
        "print('twisted.internet.testing' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- composition


class _Registry:
    """Records what is registered and withdrawn (a static registry otherwise)."""

    def __init__(self, events):
        self.events = events
        self.registered = []

    def register(self, registration):
        self.registered.append(registration)
        return succeed(None)

    def unregister_all(self):
        self.events.append("unregister")
        return succeed(None)


def test_the_provider_is_composed_of_child_services():
    reactor = MemoryReactorClock()
    plain = ProviderService(reactor, [EchoService()], listen=LISTEN)
    assert [type(s).__name__ for s in plain] == ["RegistrarService", "ListenerService"]
    assert plain.namedServices.keys() == {"registrar"}
    both = ProviderService(
        reactor,
        [EchoService()],
        listen=LISTEN,
        cpp_listen=LISTEN,
        admin_listen="tcp:0:interface=127.0.0.1",
    )
    assert [type(s).__name__ for s in both] == [
        "RegistrarService",
        "ListenerService",
        "ListenerService",
        "StreamServerEndpointService",
    ]
    assert both.getServiceNamed("admin") is list(both)[-1]
    # Each listener's factory is the IDrainable the stop drives, as it is.
    assert [listener.drainable for listener in both.listeners] == [both.factory, both.cpp_factory]
    assert both.metrics is not None and both.factory.observer is both.metrics


def test_the_registrar_registers_when_bound_and_withdraws_first_on_stop():
    reactor = MemoryReactorClock()
    events: list[str] = []
    registry = _Registry(events)
    provider = ProviderService(reactor, [EchoService()], listen=LISTEN, registry=registry)
    provider.startService()
    assert [r.service for r in registry.registered] == ["mprpc.test.EchoService"]
    assert provider.registrar.running
    (listener,) = provider.listeners
    factory = provider.factory
    real = {name: getattr(factory, name) for name in ("goaway", "whenDrained", "closeConnections")}

    def record(name):
        def call(*a, **kw):
            events.append(name)
            return real[name](*a, **kw)

        return call

    for name in real:
        setattr(factory, name, record(name))
    stop_listener = listener.stopService

    def listener_stops():
        events.append("stop listening")
        return stop_listener()

    listener.stopService = listener_stops
    provider.health.set_all = lambda status: events.append(f"health {status}")
    stopped = provider.stopService()
    assert stopped.called
    assert events == [
        "health 2",
        "unregister",
        "stop listening",
        "goaway",
        "whenDrained",
        "closeConnections",
    ]
    assert not provider.registrar.running and not provider.running


@implementer(IDrainable)
class _StuckListener:
    """An IDrainable whose two connections do not close by themselves."""

    def __init__(self):
        self.calls = []
        self.connections = {1, 2}

    def goaway(self):
        self.calls.append("goaway")

    def whenDrained(self):
        self.calls.append("whenDrained")
        return succeed(None)

    def closeConnections(self):
        self.calls.append("closeConnections")
        return Deferred()

    def abortConnections(self):
        self.calls.append("abortConnections")
        self.connections.clear()


def test_the_stop_drives_each_listener_through_idrainable(logged):
    reactor = MemoryReactorClock()
    provider = ProviderService(reactor, [EchoService()], listen=LISTEN)
    stuck = _StuckListener()
    verifyObject(IDrainable, stuck)
    listener = ListenerService(reactor, LISTEN, Factory(), lambda port: None, served=stuck)
    assert listener.drainable is stuck
    listener.setServiceParent(provider)
    provider.listeners.append(listener)
    provider.startService()
    stopped = provider.stopService()
    assert stuck.calls == ["goaway", "whenDrained", "closeConnections"]
    assert not stopped.called
    reactor.advance(CLOSE_TIMEOUT)
    assert stuck.calls[-1] == "abortConnections" and stopped.called
    (warning,) = [e for e in logged if e.get("log_format", "").startswith("aborting")]
    assert warning["left"] == 2


def test_open_connections_counts_what_a_listener_holds():
    reactor = MemoryReactorClock()
    provider = ProviderService(reactor, [EchoService()], listen=LISTEN)
    assert open_connections(provider.factory) == 0
    address = IPv4Address("TCP", "10.0.0.1", 1)
    provider.factory.buildProtocol(address).makeConnection(StringTransport(peerAddress=address))
    assert open_connections(provider.factory) == 1
    assert open_connections(_StuckListener()) == 2


def test_a_listener_factory_must_be_drainable():
    with pytest.raises(TypeError):
        ListenerService(MemoryReactorClock(), LISTEN, Factory(), lambda port: None)


def test_the_cpp_listener_logs_slow_calls_too(logged):
    reactor = MemoryReactorClock()
    provider = ProviderService(reactor, [EchoService()], cpp_listen=LISTEN, slow_call_threshold=0.5)
    assert provider.cpp_factory is not None
    assert provider.cpp_factory.slow_call_threshold == 0.5
    address = IPv4Address("TCP", "10.0.0.1", 1)
    proto = provider.cpp_factory.buildProtocol(address)
    proto.makeConnection(StringTransport(peerAddress=address))
    request = echo_pb2.EchoRequest(payload=b"x", delay=1)
    proto.dataReceived(encode_request("EchoService", "AsyncEcho", request.SerializeToString()))
    reactor.advance(1)
    (event,) = [e for e in logged if e.get("log_format", "").startswith("slow ")]
    assert event["method"] == "mprpc.test.EchoService/AsyncEcho"
    assert event["duration_ms"] == 1000


def test_the_admin_site_is_imported_only_when_configured():
    code = (
        "import sys\n"
        "from twisted.internet.testing import MemoryReactorClock\n"
        "from testbed.echo_service import EchoService\n"
        "import twisted_rpc, twisted_rpc.provider._tap, twisted.plugins.mprpc_plugin\n"
        "from twisted_rpc import ProviderService\n"
        "ProviderService(MemoryReactorClock(), [EchoService()], listen='tcp:0')\n"
        "before = sorted(m for m in sys.modules if m.startswith('twisted.web'))\n"
        "ProviderService(MemoryReactorClock(), [EchoService()], listen='tcp:0',"
        " admin_listen='tcp:0')\n"
        "print(before, 'twisted_rpc.ops._admin' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[] True"


PUBLISH = {
    "methodConfig": [{"name": [{"service": "pkg.Svc"}], "timeout": "2s"}],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}


def _publishing_ini(tmp_path, text):
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf" / "published.json").write_text(text)
    ini = tmp_path / "provider.ini"
    ini.write_text(
        "[provider]\nlisten = tcp:0:interface=127.0.0.1\nservices = pkg.mod:Svc\n"
        "service_config = conf/published.json\n"
    )
    return str(ini)


def test_the_ini_names_a_service_config_to_publish_relative_to_it(tmp_path):
    import json

    config = load_provider_config(_publishing_ini(tmp_path, json.dumps(PUBLISH)))
    published = {"methodConfig": PUBLISH["methodConfig"]}  # retryThrottling is not published
    assert config.options().registration_data == {"weight": 100, "serviceConfig": published}
    # twistd gives its own registration data: the config is still published.
    data = config.options(registration_data={"pid": 1}).registration_data
    assert data == {"pid": 1, "serviceConfig": published}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "not JSON"),
        ('{"methodConfig": [{"name": [{}], "timeout": "1ms"}]}', "methodConfig\\[0\\].timeout"),
        ('{"methodConfig": [{"name": [{}], "timeout": "1s"}]}' + " " * (1 << 20), "longer than"),
        (
            '{"methodConfig": [{"name": [{"service": "%s"}]}]}' % ("s" * 9000),
            "bytes of methodConfig to publish",
        ),
    ],
)
def test_a_bad_service_config_to_publish_is_one_config_error(tmp_path, text, why):
    with pytest.raises(ConfigError, match=f"provider.ini: \\[provider\\] service_config = .*{why}"):
        load_provider_config(_publishing_ini(tmp_path, text))


def test_options_check_a_published_config_given_in_code():
    listen = "tcp:0:interface=127.0.0.1"
    options = ProviderOptions(listen=listen, registration_data={"serviceConfig": PUBLISH})
    assert options.registration_data["serviceConfig"] == {"methodConfig": PUBLISH["methodConfig"]}
    bad = {"serviceConfig": {"methodConfig": [{"name": [{}], "timeout": 3}]}}
    with pytest.raises(ValueError, match="registration_data\\['serviceConfig'\\]: service_config"):
        ProviderOptions(listen=listen, registration_data=bad)
