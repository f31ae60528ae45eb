"""Status codes and the typed exceptions a failed call raises.

The numeric values are gRPC's, so users who know one know the other. Every
failure a caller sees is an :class:`RpcError` subclass chosen by its code;
a code this version does not know arrives as :class:`UnknownRemoteError`.
"""

from __future__ import annotations

from enum import IntEnum


class StatusCode(IntEnum):
    """The fixed set of call outcomes carried on the wire (uint16)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_name(code: int) -> str:
    """``"NOT_FOUND"`` for 5; the number itself for a code not in the table."""
    try:
        return StatusCode(code).name
    except ValueError:
        return str(code)


class RpcError(Exception):
    """A call ended with a status other than OK.

    Raise it from a handler to send ``code`` and ``message`` to the caller;
    a caller's Deferred fails with the subclass that matches the code.
    """

    code: int = StatusCode.UNKNOWN

    def __init__(self, code: int | None = None, message: str = "") -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(code, message)

    def __str__(self) -> str:
        name = code_name(self.code)
        return f"{name}: {self.message}" if self.message else name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"

    @staticmethod
    def from_status(code: int, message: str = "") -> RpcError:
        """The typed exception for ``code`` (``UnknownRemoteError`` if unknown)."""
        cls = _BY_CODE.get(code, UnknownRemoteError)
        return cls(code, message)


class CancelledError(RpcError):
    code = StatusCode.CANCELLED


class UnknownError(RpcError):
    code = StatusCode.UNKNOWN


class InvalidArgumentError(RpcError):
    code = StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(RpcError):
    code = StatusCode.DEADLINE_EXCEEDED


class NotFoundError(RpcError):
    code = StatusCode.NOT_FOUND


class AlreadyExistsError(RpcError):
    code = StatusCode.ALREADY_EXISTS


class PermissionDeniedError(RpcError):
    code = StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(RpcError):
    code = StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(RpcError):
    code = StatusCode.FAILED_PRECONDITION


class AbortedError(RpcError):
    code = StatusCode.ABORTED


class OutOfRangeError(RpcError):
    code = StatusCode.OUT_OF_RANGE


class UnimplementedError(RpcError):
    code = StatusCode.UNIMPLEMENTED


class InternalError(RpcError):
    code = StatusCode.INTERNAL


class UnavailableError(RpcError):
    code = StatusCode.UNAVAILABLE


class DataLossError(RpcError):
    code = StatusCode.DATA_LOSS


class UnauthenticatedError(RpcError):
    code = StatusCode.UNAUTHENTICATED


class UnknownRemoteError(RpcError):
    """The provider sent a status code this version does not know."""


_BY_CODE: dict[int, type[RpcError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}
