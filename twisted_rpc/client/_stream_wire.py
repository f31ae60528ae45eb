"""The streaming half of a consumer connection: :class:`StreamWire`, mixed
into :class:`twisted_rpc.client.ClientConnection`. It starts streams,
routes their MESSAGE, HEADERS and WINDOW frames (the RESPONSE ending one
comes through the connection's answer handler) and sends their CANCELs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from twisted.internet.interfaces import IReactorTime

from twisted_rpc.client._options import ClientOptions
from twisted_rpc.client._states import ConnectionState
from twisted_rpc.client._streams import StreamCall
from twisted_rpc.core import _codec as wire
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.core._flow import UNANNOUNCED_WINDOW, peer_setting
from twisted_rpc.core._service import MethodInfo
from twisted_rpc.core._status import InvalidArgumentError, RpcError, UnimplementedError


class StreamWire:
    """Streams on a consumer connection (they share the calls' ids)."""

    streams: dict[int, StreamCall[Any, Any]]
    options: ClientOptions
    # What ClientConnection (and RpcConnection) provide.
    peer_settings: dict[str, str] | None
    _settings_sent: bool
    state: ConnectionState
    clock: IReactorTime
    connected: int
    goaway_reason: GoawayReason | None
    peer: str
    _next_id: int
    _wrapped: bool

    if TYPE_CHECKING:

        def send(self, header: bytes, payload: bytes = b"") -> None: ...
        def squeeze_for(
            self, method: MethodInfo | None, header: bytes, payload: bytes
        ) -> tuple[bytes, bytes, int]: ...
        def encodings_setting(self) -> dict[str, str]: ...

        compress_min: int

        def _not_open(self) -> RpcError: ...
        def _new_call_id(self) -> int: ...
        def _close_if_done(self) -> None: ...

    def local_settings(self) -> dict[str, str]:
        return {
            "streams": "1",
            "stream_window": str(self.options.stream_window),
            **self.encodings_setting(),
        }

    # ----------------------------------------------------------------- streams

    @property
    def streams_supported(self) -> bool | None:
        """Whether the provider said it speaks streams (None: not known yet)."""
        settings = self.peer_settings
        if settings is None:
            return None if not self._settings_sent else False
        return settings.get("streams") == "1"

    def open_stream(self, stream: StreamCall[Any, Any], request: Message | None) -> RpcError | None:
        """Start ``stream`` here: a REQUEST (with ``request`` for a
        server-streaming method). Returns why it could not start (a
        NotSentError may go elsewhere), or None."""
        if self.state is not ConnectionState.OPEN:
            return self._not_open()
        if not self.streams_supported:
            return UnimplementedError(
                message=f"{self.peer} does not speak streams (an older provider?): "
                f"cannot call {stream.method.full_name}"
            )
        payload = b""
        if request is not None:
            try:
                payload = request.SerializeToString()
            except Exception as e:
                return InvalidArgumentError(message=f"cannot serialize request: {e}")
        timeout_ms = 0
        if stream.timeout:
            left = stream.timeout - (self.clock.seconds() - stream.created)
            timeout_ms = max(1, int(left * 1000))
        call_id = self._new_call_id()
        try:
            header = wire.encode_request(
                call_id, stream.method.route, len(payload), timeout_ms, stream.metadata
            )
        except Exception as e:
            return InvalidArgumentError(message=f"cannot encode the call: {e}")
        self.streams[call_id] = stream
        if len(payload) >= self.compress_min:
            header, payload, _ = self.squeeze_for(stream.method, header, payload)
        self.send(header, payload)
        assert self.peer_settings is not None
        window = peer_setting(self.peer_settings, "stream_window", UNANNOUNCED_WINDOW)
        stream.max_message = peer_setting(self.peer_settings, "max_message_size", 2**31 - 1)
        stream.attached(
            self,  # type: ignore[arg-type]
            call_id,
            window,
        )
        return None

    def send_stream_message(self, call_id: int, payload: bytes) -> None:
        """A stream's request (the window was checked by the stream)."""
        header = wire.encode_message(call_id, len(payload))
        if len(payload) >= self.compress_min:
            stream = self.streams.get(call_id)
            method = None if stream is None else stream.method
            header, payload, _ = self.squeeze_for(method, header, payload)
        self.send(header, payload)

    def send_end_stream(self, call_id: int) -> None:
        """A stream's requests are over."""
        self.send(wire.encode_end_stream(call_id))

    def send_window(self, call_id: int, increment: int) -> None:
        """Credit back to the provider: the application took replies."""
        self.send(wire.encode_window(call_id, increment))

    def stream_cancelled(self, stream: StreamCall[Any, Any]) -> None:
        """The caller ended ``stream`` (cancel, deadline): tell the provider."""
        if self.streams.get(stream.call_id) is stream:
            del self.streams[stream.call_id]
            if self.connected:
                self.send(wire.encode_cancel(stream.call_id))
            if self.goaway_reason is not None:
                self._close_if_done()

    def _stream_message(
        self,
        call_id: int,
        status: int,
        timeout_ms: int,
        route: bytes,
        metadata: Any,
        message: str,
        payload: bytes | memoryview,
    ) -> None:
        stream = self.streams.get(call_id)
        if stream is not None:
            stream.message_received(payload)

    def _stream_headers(self, call_id: int, *fields: Any) -> None:
        stream = self.streams.get(call_id)
        if stream is not None:
            stream.headers_received(fields[3])

    def _stream_window(self, call_id: int, status: int, increment: int, *_: Any) -> None:
        stream = self.streams.get(call_id)
        if stream is not None and stream.credit is not None:
            stream.credit.add(increment)
