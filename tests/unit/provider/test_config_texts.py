"""Config mistakes a new user made, each answered by a clear error."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from twisted_rpc import Client, ConfigError, load_provider_config
from twisted_rpc.provider import Options, load_services


def ini(tmp_path, services: str) -> str:
    path = tmp_path / "p.ini"
    path.write_text(f"[provider]\nlisten = tcp:0:interface=127.0.0.1\nservices = {services}\n")
    return str(path)


def test_commas_separate_services_too(tmp_path):
    path = ini(tmp_path, "testbed.echo_service:EchoService, examples.user.callee:UserService")
    assert load_provider_config(path).services == [
        "testbed.echo_service:EchoService",
        "examples.user.callee:UserService",
    ]


def test_a_service_listed_twice_is_named(tmp_path):
    path = ini(tmp_path, "testbed.echo_service:EchoService, testbed.echo_service:EchoService")
    with pytest.raises(ConfigError) as raised:
        load_provider_config(path)
    assert str(raised.value) == (
        f"{path}: [provider] services: testbed.echo_service:EchoService is listed twice"
    )


def test_a_service_listed_twice_across_ini_and_command_line(tmp_path):
    path = ini(tmp_path, "testbed.echo_service:EchoService")
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["-c", path, "--service", "testbed.echo_service:EchoService"])
    assert str(exited.value).endswith("services: testbed.echo_service:EchoService is listed twice")


def test_two_classes_serving_one_service_are_named():
    with pytest.raises(ConfigError) as raised:
        load_services(
            ["testbed.echo_service:EchoService", "testbed.chaos_service:ChaosEchoService"]
        )
    assert str(raised.value) == (
        "services: testbed.echo_service:EchoService and testbed.chaos_service:ChaosEchoService "
        "both serve mprpc.test.EchoService"
    )


@pytest.mark.parametrize("spec", ["a:X;", "a:", ":X", "a b:X", "a:X.1"])
def test_specs_that_are_not_module_class(spec):
    with pytest.raises(ConfigError, match="is not module:Class"):
        load_services([spec])


def test_one_address_given_as_a_string_is_a_list_of_one():
    client = Client(MemoryReactorClock(), providers={ECHO.full_name: "127.0.0.1:7100"})
    client.proxy(ECHO).Echo(echo_pb2.EchoRequest(), timeout=1)
    assert list(client.channels) == ["127.0.0.1:7100"]
