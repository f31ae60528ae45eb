"""The service config in gRPC's JSON shape: parsing, validation (one line
naming the JSON path), gRPC's name precedence, and the per-method timeout
through a real client (MemoryProvider) and the consumer ini file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.echo_service import ECHO, STREAMS, EchoService, StreamService
from testbed.protos import echo_pb2
from tests.helpers import failure_of, result
from twisted_rpc import (
    Client,
    ClientOptions,
    ConfigError,
    DeadlineExceededError,
    ServiceConfig,
    ServiceConfigError,
    StatusCode,
    load_consumer_config,
)
from twisted_rpc.client import HedgingPolicy, MethodName, RetryPolicy, RetryThrottling
from twisted_rpc.client._service_config import parse_duration
from twisted_rpc.core import describe
from twisted_rpc.testing import MemoryProvider

RETRY = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", 4],
}
FULL = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "mprpc.test.EchoService", "method": "AsyncEcho"}],
            "timeout": "0.5s",
            "waitForReady": True,
            "retryPolicy": RETRY,
        },
        {
            "name": [{"service": "mprpc.test.EchoService"}],
            "timeout": "2s",
            "hedgingPolicy": {"maxAttempts": 9, "hedgingDelay": "0.05s"},
        },
        {"name": [{}], "timeout": "30s"},
    ],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}


def test_a_full_config_parses_into_frozen_typed_policies() -> None:
    config = ServiceConfig.parse(FULL)
    assert ServiceConfig.parse(json.dumps(FULL)) == config  # JSON text: the same
    assert ServiceConfig.parse(config) is config
    method = config.policy_for("mprpc.test.EchoService", "AsyncEcho")
    assert method is not None
    assert (method.timeout, method.wait_for_ready, method.hedging_policy) == (0.5, True, None)
    assert method.retry_policy == RetryPolicy(
        3, 0.1, 1.0, 2.0, frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED})
    )
    service = config.policy_for("mprpc.test.EchoService", "Echo")
    assert service is not None and service.timeout == 2.0
    assert service.hedging_policy == HedgingPolicy(5, 0.05, frozenset())  # 9 capped at 5
    assert config.retry_throttling == RetryThrottling(10, 0.1)
    with pytest.raises(AttributeError):
        config.retry_throttling = None  # type: ignore[misc]


def test_names_follow_grpc_precedence_method_then_service_then_default() -> None:
    config = ServiceConfig.parse(FULL)
    entries = config.method_configs
    assert config.policy_for("mprpc.test.EchoService", "AsyncEcho") is entries[0]
    assert config.policy_for("mprpc.test.EchoService", "Echo") is entries[1]
    assert config.policy_for("other.Service", "Echo") is entries[2]
    assert entries[2].names == (MethodName("", ""),)
    no_default = ServiceConfig.parse({"methodConfig": FULL["methodConfig"][:2]})
    assert no_default.policy_for("other.Service", "Echo") is None
    assert ServiceConfig.parse({}).policy_for("a.B", "C") is None
    assert ServiceConfig.parse("{}") == ServiceConfig()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0s", 0.0), ("1s", 1.0), ("0.1s", 0.1), ("2.5s", 2.5), ("0.000000001s", 1e-9)],
)
def test_durations_as_grpc_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["1", "1.s", ".5s", "-1s", "1.0000000001s", "1ms", "1 s", "1e3s", "s", "", 1, None],
)
def test_other_durations_are_refused(text: object) -> None:
    with pytest.raises(ServiceConfigError, match=r"^service_config: t: expected a duration"):
        parse_duration(text, "t")


def _method(**fields: Any) -> dict[str, Any]:
    return {"methodConfig": [{"name": [{"service": "a.B"}], **fields}]}


def _error(config: object) -> str:
    with pytest.raises(ServiceConfigError) as caught:
        ServiceConfig.parse(config)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and message.startswith("service_config: ")
    return message.removeprefix("service_config: ")


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ("{", "not JSON: "),
        ("[]", "expected an object, got a list"),
        ({"methodconfig": []}, "methodconfig: unknown key (known: "),
        ({"methodConfig": {}}, "methodConfig: expected a list, got an object"),
        ({"methodConfig": [1]}, "methodConfig[0]: expected an object, got 1"),
        ({"methodConfig": [{}]}, "methodConfig[0].name: expected a list, got null"),
        ({"methodConfig": [{"name": []}]}, "methodConfig[0].name: expected a non-empty list"),
        ({"methodConfig": [{"name": ["a.B"]}]}, 'name[0]: expected an object, got "a.B"'),
        ({"methodConfig": [{"name": [{"service": 1}]}]}, "name[0].service: expected a string"),
        ({"methodConfig": [{"name": [{"method": "C"}]}]}, "name[0].service: expected a service"),
        ({"methodConfig": [{"name": [{"x": "C"}]}]}, "name[0].x: unknown key"),
        (_method(timeout="1"), "methodConfig[0].timeout: expected a duration"),
        (_method(timeout="0s"), "timeout: expected a duration from more than 0s to 4.29497e+06s"),
        (_method(timeout="5000000s"), "timeout: expected a duration from more than 0s"),
        (_method(waitForReady="yes"), 'waitForReady: expected true or false, got "yes"'),
        (_method(maxRequestMessageBytes=-1), "maxRequestMessageBytes: expected an integer >= 0"),
        (_method(retries=1), "methodConfig[0].retries: unknown key"),
        (
            _method(retryPolicy=RETRY, hedgingPolicy={"maxAttempts": 2}),
            "methodConfig[0]: retryPolicy and hedgingPolicy are exclusive",
        ),
        (
            _method(retryPolicy={**RETRY, "maxAttempts": 1}),
            "methodConfig[0].retryPolicy.maxAttempts: expected an integer >= 2, got 1",
        ),
        (_method(retryPolicy={**RETRY, "maxAttempts": 2.0}), "maxAttempts: expected an integer"),
        (_method(retryPolicy={**RETRY, "maxAttempts": True}), "maxAttempts: expected an integer"),
        (_method(retryPolicy={**RETRY, "initialBackoff": "0s"}), "initialBackoff: expected a du"),
        (_method(retryPolicy={**RETRY, "maxBackoff": 1}), "maxBackoff: expected a duration"),
        (_method(retryPolicy={**RETRY, "backoffMultiplier": 0}), "Multiplier: expected a number"),
        (_method(retryPolicy={**RETRY, "backoffMultiplier": "2"}), "Multiplier: expected a num"),
        (_method(retryPolicy={**RETRY, "retryableStatusCodes": []}), "Codes: expected a non-empty"),
        (
            _method(retryPolicy={**RETRY, "retryableStatusCodes": ["UNAVAILABLE", "NOPE"]}),
            'retryableStatusCodes[1]: expected a status code other than OK ("UNAVAILABLE" or 14)',
        ),
        (_method(retryPolicy={**RETRY, "retryableStatusCodes": [17]}), "Codes[0]: expected a st"),
        (_method(retryPolicy={**RETRY, "retryableStatusCodes": ["OK"]}), "Codes[0]: expected a s"),
        (_method(retryPolicy={**RETRY, "jitter": 1}), "retryPolicy.jitter: unknown key"),
        (
            _method(retryPolicy={k: v for k, v in RETRY.items() if k != "maxBackoff"}),
            "methodConfig[0].retryPolicy.maxBackoff: required",
        ),
        (_method(retryPolicy=[]), "methodConfig[0].retryPolicy: expected an object, got a list"),
        (_method(hedgingPolicy={}), "methodConfig[0].hedgingPolicy.maxAttempts: required"),
        (_method(hedgingPolicy={"maxAttempts": 1}), "hedgingPolicy.maxAttempts: expected an int"),
        (
            _method(hedgingPolicy={"maxAttempts": 2, "hedgingDelay": "-1s"}),
            "hedgingPolicy.hedgingDelay: expected a duration",
        ),
        (
            _method(hedgingPolicy={"maxAttempts": 2, "nonFatalStatusCodes": "UNAVAILABLE"}),
            "hedgingPolicy.nonFatalStatusCodes: expected a list",
        ),
        ({"retryThrottling": {"maxTokens": 10}}, "retryThrottling.tokenRatio: required"),
        (
            {"retryThrottling": {"maxTokens": 0, "tokenRatio": 1}},
            "retryThrottling.maxTokens: expected an integer >= 1, got 0",
        ),
        (
            {"retryThrottling": {"maxTokens": 1001, "tokenRatio": 1}},
            "retryThrottling.maxTokens: expected an integer from 1 to 1000, got 1001",
        ),
        (
            {"retryThrottling": {"maxTokens": 1, "tokenRatio": -0.5}},
            "retryThrottling.tokenRatio: expected a number > 0, got -0.5",
        ),
        ({"retryThrottling": {"maxTokens": 1, "tokenRatio": 1, "x": 1}}, "Throttling.x: unknown"),
        (
            {"methodConfig": [{"name": [{"service": "a.B"}]}, {"name": [{"service": "a.B"}]}]},
            "methodConfig[1].name[0]: expected the same name as methodConfig[0]",
        ),
    ],
)
def test_every_bad_value_is_one_line_naming_its_json_path(config: object, error: str) -> None:
    assert error in _error(config)


def test_a_long_bad_value_is_cut_short_in_the_error_line() -> None:
    message = _error(_method(timeout="9" * 500))
    assert message.endswith("...")
    assert len(message) < 200


def test_good_values_at_the_edges() -> None:
    codes = ["unavailable", 1, 16, "DATA_LOSS"]
    config = ServiceConfig.parse(
        _method(
            timeout="4294967.295s",
            waitForReady=False,
            maxRequestMessageBytes=0,
            retryPolicy={**RETRY, "maxAttempts": 2, "retryableStatusCodes": codes},
        )
        | {"retryThrottling": {"maxTokens": 1000, "tokenRatio": 1e-3}}
    )
    method = config.method_configs[0]
    assert method.timeout == 4294967.295 and method.wait_for_ready is False
    assert method.retry_policy is not None and method.retry_policy.max_attempts == 2
    assert method.retry_policy.retryable_status_codes == {
        StatusCode.UNAVAILABLE,
        StatusCode.CANCELLED,
        StatusCode.UNAUTHENTICATED,
        StatusCode.DATA_LOSS,
    }
    hedged = ServiceConfig.parse(_method(hedgingPolicy={"maxAttempts": 5, "hedgingDelay": "0s"}))
    assert hedged.method_configs[0].hedging_policy == HedgingPolicy(5)


def test_a_bad_config_is_refused_when_the_client_is_built() -> None:
    with pytest.raises(ServiceConfigError, match=r"methodConfig\[0\].timeout"):
        Client(providers={}, service_config=_method(timeout="soon"))
    with pytest.raises(ValueError, match="longer than"):
        ClientOptions(service_config=" " * (1024 * 1024 + 1))


# ---------------------------------------------------------------- timeouts through a client

ASYNC = describe(ECHO).methods["AsyncEcho"]
TIMEOUTS = {
    "methodConfig": [
        {"name": [{"service": "mprpc.test.EchoService", "method": "AsyncEcho"}], "timeout": "1s"},
        {"name": [{"service": "mprpc.test.StreamService"}], "timeout": "2s"},
    ]
}


def _slow(memory: MemoryProvider, delay: float, advance: float, **kw: Any) -> Any:
    d = memory.proxy(ECHO).AsyncEcho(echo_pb2.EchoRequest(delay=delay), **kw)
    memory.flush()
    memory.advance(advance)
    memory.flush()
    return d


def test_the_method_timeout_beats_the_client_timeout_and_the_call_beats_both() -> None:
    options = ClientOptions(timeout=0.2, service_config=TIMEOUTS)
    memory = MemoryProvider([EchoService()], client_options=options)
    assert result(_slow(memory, 0.5, 0.6))  # 1 s from the config, not the client's 0.2 s
    late = _slow(memory, 5, 1.1)
    assert isinstance(failure_of(late), DeadlineExceededError)
    assert result(_slow(memory, 1.5, 1.6, timeout=3))  # the call's own timeout wins
    early = _slow(memory, 0.5, 0.2, timeout=0.1)
    assert isinstance(failure_of(early), DeadlineExceededError)
    # Echo has no config entry: the client's timeout stays its default.
    assert memory.client.service_config is not None
    assert memory.client.service_config.timeout_for(describe(ECHO).methods["Echo"], 0.2) == 0.2


def test_the_method_timeout_applies_through_interceptors_and_direct_calls() -> None:
    seen: list[float | None] = []

    class Record:
        def intercept(self, call: Any, request: Any, proceed: Any) -> Any:
            seen.append(call.timeout)
            return proceed(call, request)

    memory = MemoryProvider(
        [EchoService()],
        client_options=ClientOptions(service_config=json.dumps(TIMEOUTS)),
        client_interceptors=[Record()],
    )
    d = memory.client.call(ASYNC, echo_pb2.EchoRequest(delay=2))
    memory.flush()
    memory.advance(1.1)
    assert isinstance(failure_of(d), DeadlineExceededError)
    assert seen == [1.0]


def test_a_stream_not_given_a_timeout_gets_its_methods_config_timeout() -> None:
    memory = MemoryProvider([StreamService()], client_options=ClientOptions(timeout=0.1))
    assert memory.proxy(STREAMS).Count(echo_pb2.CountRequest(forever=True)).timeout is None
    memory = MemoryProvider(
        [StreamService()], client_options=ClientOptions(timeout=0.1, service_config=TIMEOUTS)
    )
    count = memory.proxy(STREAMS).Count
    assert count(echo_pb2.CountRequest(forever=True)).timeout == 2.0
    assert count(echo_pb2.CountRequest(forever=True), timeout=7).timeout == 7
    stream = count(echo_pb2.CountRequest(forever=True, delay=10))
    memory.flush()
    read = stream.read()
    memory.advance(2.1)
    memory.flush()
    assert isinstance(failure_of(read), DeadlineExceededError)


def test_without_a_config_the_client_timeout_applies_as_before() -> None:
    memory = MemoryProvider([EchoService()], client_options=ClientOptions(timeout=0.2))
    assert memory.client.service_config is None
    assert isinstance(failure_of(_slow(memory, 0.5, 0.3)), DeadlineExceededError)


# ---------------------------------------------------------------- the consumer ini file


def test_the_ini_key_names_a_json_file_relative_to_the_ini_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "service.json").write_text(json.dumps(TIMEOUTS))
    ini = tmp_path / "consumer.ini"
    ini.write_text("[consumer]\ntimeout = 0.2\nservice_config = conf/service.json\n")
    config = load_consumer_config(str(ini))
    assert config.service_config == ServiceConfig.parse(TIMEOUTS)
    assert config.timeout == 0.2
    assert load_consumer_config(str(_ini(tmp_path, ""))).service_config is None


def _ini(tmp_path: Path, line: str) -> Path:
    ini = tmp_path / "other.ini"
    ini.write_text(f"[consumer]\n{line}\n")
    return ini


def test_a_bad_or_missing_json_file_is_one_config_error_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"service_config = nope.json: cannot read it: "):
        load_consumer_config(str(_ini(tmp_path, "service_config = nope.json")))
    (tmp_path / "bad.json").write_text(json.dumps(_method(timeout="1")))
    with pytest.raises(ConfigError) as caught:
        load_consumer_config(str(_ini(tmp_path, "service_config = bad.json")))
    assert str(caught.value) == (
        f"{tmp_path}/other.ini: [consumer] service_config = bad.json: service_config: "
        'methodConfig[0].timeout: expected a duration like "0.5s" (seconds, up to 9 decimals), '
        'got "1"'
    )


# ---------------------------------------------------------------- compression (our extension)


def test_an_entry_may_name_its_calls_compression() -> None:
    config = ServiceConfig.parse(
        {
            "methodConfig": [
                {
                    "name": [{"service": "mprpc.test.EchoService", "method": "Echo"}],
                    "compression": "zlib",
                },
                {"name": [{"service": "mprpc.test.EchoService"}], "compression": "identity"},
                {"name": [{}], "timeout": "1s"},
            ]
        }
    )
    methods = describe(ECHO).methods
    assert config.compression_for(methods["Echo"], None) == "zlib"
    assert config.compression_for(methods["AsyncEcho"], "zlib") is None  # identity: none
    other = describe(STREAMS).methods["Count"]
    assert config.compression_for(other, "zlib") == "zlib"  # unnamed: the client's
    assert config.compression_for(other, None) is None


@pytest.mark.parametrize("value", ["gzip", 1, None, ""])
def test_an_unknown_compression_is_one_line(value: object) -> None:
    error = _error({"methodConfig": [{"name": [{}], "compression": value}]})
    assert error.startswith(
        'methodConfig[0].compression: expected one of "zlib", "zstd", "identity"'
    )


def test_zstd_without_its_package_is_refused_up_front() -> None:
    from twisted_rpc.core._compress import available_encodings

    config = {"methodConfig": [{"name": [{}], "compression": "zstd"}]}
    if "zstd" in available_encodings():
        assert ServiceConfig.parse(config).method_configs[0].compression == "zstd"
    else:
        assert "needs the zstandard package" in _error(config)


def test_the_consumer_ini_sets_compression_and_its_threshold(tmp_path: Path) -> None:
    ini = tmp_path / "c.ini"
    ini.write_text("[consumer]\ncompression = zlib\ncompression_threshold = 64\n")
    options = load_consumer_config(str(ini)).options
    assert (options.compression, options.compression_threshold) == ("zlib", 64)
    with pytest.raises(ConfigError, match=r"\[consumer\] compression must be one of zlib, zstd"):
        load_consumer_config(str(_ini(tmp_path, "compression = gzip")))
    with pytest.raises(ConfigError, match=r"compression_threshold"):
        load_consumer_config(str(_ini(tmp_path, "compression_threshold = -1")))
