"""The mprpc command's rough edges: enums in describe, field names in
errors as in output, zero values printed, only objects as requests, the
CODE: prefix, --version."""

from __future__ import annotations

import json

import pytest

from examples.protos import friend_pb2
from testbed.protos import echo_pb2
from twisted_rpc import __version__
from twisted_rpc.ops._cli import _messages_used, _no_method, build_parser, describe_enum, report
from twisted_rpc.ops._cli_streams import UserError, parse_request, to_json

FRIENDS = friend_pb2.DESCRIPTOR.services_by_name["FriendService"]


def test_describe_lists_the_enums_its_messages_use():
    messages, enums = _messages_used(FRIENDS, "WatchFriends")
    assert [e.full_name for e in enums] == ["example.FriendEvent.Kind"]
    assert "example.FriendEvent" in [m.full_name for m in messages]
    assert describe_enum(enums[0]) == [
        "enum example.FriendEvent.Kind {",
        "  ADDED = 0;",
        "  SYNCED = 1;",
        "}",
    ]


def test_zero_valued_fields_are_printed():
    assert json.loads(to_json(echo_pb2.EchoReply(call_id=0))) == {
        "payload": "",
        "metadata": {},
        "call_id": 0,
        "pid": 0,
    }


@pytest.mark.parametrize("text", ["[]", "[{}]", "3", '"x"', "null"])
def test_only_a_json_object_is_a_request(text):
    with pytest.raises(UserError, match="is not a mprpc.test.EchoRequest: expected a JSON object"):
        parse_request(text, echo_pb2.EchoRequest)


def test_errors_name_fields_as_output_does_and_both_spellings_are_taken():
    with pytest.raises(UserError) as raised:
        parse_request('{"nope": 1}', echo_pb2.EchoRequest)
    message = str(raised.value)
    assert "'fail_code'" in message and "'failCode'" not in message
    assert "(fields: as named in the .proto, or in lowerCamelCase)" in message
    assert parse_request('{"fail_code": 5}', echo_pb2.EchoRequest).fail_code == 5
    assert parse_request('{"failCode": 5}', echo_pb2.EchoRequest).fail_code == 5


def test_an_unknown_method_has_the_code_prefix(capsys):
    status = report(_no_method("mprpc.test.EchoService", "Nope"))
    assert status == 69
    assert (
        capsys.readouterr().err == "mprpc: NOT_FOUND: mprpc.test.EchoService has no method Nope\n"
    )


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"mprpc {__version__}\n"
