"""The provider checks its services' handlers at start: an RPC with no
handler is a warning; a public method that looks like its misspelt handler
is a startup error (or, with strict_handlers = no, a warning)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from testbed.echo_service import ECHO
from testbed.protos import echo_pb2
from twisted_rpc import ConfigError, Service, load_provider_config
from twisted_rpc.core._service import _one_edit, check_handlers
from twisted_rpc.provider import Options, load_services


class LowerCase(Service, descriptor=ECHO):
    def stock(self) -> None: ...  # not an RPC: fine, but see below

    def echo(self, request: Any, context: Any) -> Any:  # Echo, but for case
        return echo_pb2.EchoReply()


class OneEditAway(Service, descriptor=ECHO):
    def Echo(self, request: Any, context: Any) -> Any:
        return echo_pb2.EchoReply()

    def AsyncEco(self, request: Any, context: Any) -> Any:  # AsyncEcho, one deletion
        return echo_pb2.EchoReply()

    def NotImplemented(self, request: Any, context: Any) -> Any:
        return echo_pb2.EchoReply()


class Complete(Service, descriptor=ECHO):
    def Echo(self, request: Any, context: Any) -> Any: ...
    def AsyncEcho(self, request: Any, context: Any) -> Any: ...
    def NotImplemented(self, request: Any, context: Any) -> Any: ...
    def helper(self) -> None: ...  # public, far from every RPC name: fine


class Partial(Service, descriptor=ECHO):
    def Echo(self, request: Any, context: Any) -> Any: ...
    def _AsyncEcho(self) -> None: ...  # private: never taken for a handler


def test_one_edit():
    assert _one_edit("reserv", "reserve") and _one_edit("stok", "stock")
    assert _one_edit("stack", "stock") and _one_edit("xstock", "stock")
    assert not _one_edit("stock", "stock") and not _one_edit("sotck", "stock")
    assert not _one_edit("st", "stock")


def test_a_handler_named_but_for_case_is_an_error_naming_the_rpc():
    warnings, errors = check_handlers(LowerCase())
    where = f"{__name__}.LowerCase"
    assert errors == [
        f"{where}.echo is not the handler of mprpc.test.EchoService/Echo "
        "(no method is named Echo): rename it Echo"
    ]
    assert f"{where} has no handler for mprpc.test.EchoService/Echo: it answers UNIMPLEMENTED" in (
        warnings
    )
    assert len(warnings) == 3


def test_one_edit_away_is_an_error_too():
    warnings, errors = check_handlers(OneEditAway())
    assert len(errors) == 1 and "OneEditAway.AsyncEco is not the handler of" in errors[0]
    assert "rename it AsyncEcho" in errors[0]
    assert warnings == [
        f"{__name__}.OneEditAway has no handler for mprpc.test.EchoService/AsyncEcho: "
        "it answers UNIMPLEMENTED"
    ]


def test_complete_and_partial_services():
    assert check_handlers(Complete()) == ([], [])
    warnings, errors = check_handlers(Partial())
    assert errors == [] and len(warnings) == 2


@pytest.fixture
def logged():
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_load_services_fails_strictly_and_warns_otherwise(logged):
    spec = [f"{__name__}:LowerCase"]
    with pytest.raises(ConfigError, match=r"LowerCase\.echo is not the handler .* rename it Echo"):
        load_services(spec)
    assert len(load_services(spec, strict_handlers=False)) == 1
    texts = [formatEvent(e) for e in logged if e.get("log_namespace") == "twisted_rpc.provider"]
    assert any("rename it Echo" in t for t in texts)
    assert any("no handler for mprpc.test.EchoService/AsyncEcho" in t for t in texts)


def test_twistd_mprpc_exits_with_one_line_and_the_setting(tmp_path):
    path = tmp_path / "p.ini"
    text = f"[provider]\nlisten = tcp:0:interface=127.0.0.1\nservices = {__name__}:LowerCase\n"
    path.write_text(text)
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--config", str(path)])
    message = str(exited.value)
    assert message.startswith(f"twistd mprpc: config error: {path}: services: {__name__}.")
    assert "rename it Echo" in message and "\n" not in message
    path.write_text(text + "strict_handlers = no\n")
    assert load_provider_config(str(path)).strict_handlers is False
    options = Options()
    options.parseOptions(["--config", str(path)])
    assert len(options["service_instances"]) == 1
