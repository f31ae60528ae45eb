"""Integration: streams against a real ``twistd mprpc`` provider process.

Each test starts its own provider serving ``StreamService`` (and
``EchoService``) on 127.0.0.1 and stops it by PID, whatever happens. The
numbers measured (times, the provider's RSS) are printed: run with ``-s``
to see them. The provider's record of how its tagged ``Count`` generators
ended is read with ``StreamService.Ends``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testbed.echo_service import ECHO, STREAMS
from testbed.processes import Provider
from testbed.protos import echo_pb2
from testbed.raw_peer import (
    CHAT_ROUTE,
    COUNT_ROUTE,
    ECHO_ROUTE,
    SUM_ROUTE,
    PeerClosed,
    RawPeer,
)
from twisted_rpc import Client, RpcError, StatusCode, UnavailableError
from twisted_rpc.core import _codec as wire

pytestmark = pytest.mark.integration

SERVICES = "testbed.echo_service:EchoService testbed.echo_service:StreamService"
PROVIDERS = ("mprpc.test.EchoService", "mprpc.test.StreamService")
MIB = 1024


def rss_kib(pid: int) -> int:
    """The process's resident set (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def report(name: str, **numbers: Any) -> None:
    shown = " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()
    )
    print(f"\n[streams-live] {name}: {shown}")


class LiveBase(TestCase):
    timeout = 120

    def start(self, extra: str = "") -> Provider:
        provider = Provider(Path(tempfile.mkdtemp()), extra, services=SERVICES)
        self.addCleanup(provider.stop)
        return provider

    def client(self, provider: Provider, **settings: Any) -> Client:
        client = Client(reactor, providers={s: [provider.address] for s in PROVIDERS}, **settings)
        self.addCleanup(client.close)
        return client

    async def end_of(self, proxy: Any, tag: str, timeout: float = 5.0) -> str | None:
        """How the provider saw the ``tag`` stream's generator end, waiting up
        to ``timeout`` s for it to end (None: still running)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = await proxy.Ends(echo_pb2.CountRequest(), timeout=5)
            if tag in reply.metadata or time.monotonic() > deadline:
                return reply.metadata.get(tag)
            await sleep(0.05)

    async def good_client(self, provider: Provider) -> dict[str, float]:
        """A well-behaved consumer on a new connection: 50 Echo calls one after
        the other and a 1,000-message stream; raises unless all succeed."""
        client = Client(reactor, providers={s: [provider.address] for s in PROVIDERS})
        try:
            echo, streams = client.proxy(ECHO), client.proxy(STREAMS)
            times = []
            for _ in range(50):
                t = time.monotonic()
                reply = await echo.Echo(echo_pb2.EchoRequest(payload=b"good"), timeout=5)
                times.append(time.monotonic() - t)
                self.assertEqual((reply.payload, reply.pid), (b"good", provider.pid))
            t = time.monotonic()
            got = [r.call_id async for r in streams.Count(echo_pb2.CountRequest(count=1000))]
            stream_s = time.monotonic() - t
            self.assertEqual(got, list(range(1000)))
        finally:
            await client.close()
        times.sort()
        return {
            "echo_p50_ms": times[25] * 1000,
            "echo_max_ms": times[-1] * 1000,
            "count_s": stream_s,
        }


class StreamVolumeTests(LiveBase):
    async def test_hundred_thousand_small_messages_in_order(self) -> None:
        """100,000 messages of 32 B on one server stream: all, in order."""
        provider = self.start()
        streams = self.client(provider).proxy(STREAMS)
        started = time.monotonic()
        expected = 0
        stream = streams.Count(echo_pb2.CountRequest(count=100_000, payload_size=32))
        async for reply in stream:
            self.assertEqual((reply.call_id, len(reply.payload)), (expected, 32))
            expected += 1
        took = time.monotonic() - started
        report("100k x 32 B", messages=expected, seconds=took, per_s=int(expected / took))
        self.assertEqual(expected, 100_000)
        self.assertEqual(stream.code, StatusCode.OK)

    async def test_unread_stream_among_hundred_bounds_provider_memory(self) -> None:
        """100 streams on one connection, one never read: the 99 others end,
        the unread one holds at most its window at the consumer, and the
        provider's RSS stays within a few MiB of where it started."""
        provider = self.start()
        client = self.client(provider)
        streams = client.proxy(STREAMS)
        # Warm up (imports, the first connection, allocator pools) before measuring.
        await gatherResults(
            [Deferred.fromCoroutine(self._drain(streams, 200, 1024, None)) for _ in range(20)]
        )
        before = rss_kib(provider.pid)
        unread = streams.Count(echo_pb2.CountRequest(forever=True, payload_size=1024, tag="unread"))
        connections: set[int] = set()
        samples: list[int] = []

        async def sample() -> None:
            while not done:
                samples.append(rss_kib(provider.pid))
                await sleep(0.05)

        done = False
        sampler = Deferred.fromCoroutine(sample())
        started = time.monotonic()
        counts = await gatherResults(
            [
                Deferred.fromCoroutine(self._drain(streams, 1000, 1024, connections))
                for _ in range(99)
            ]
        )
        others_s = time.monotonic() - started
        await sleep(0.5)  # the unread stream has had time to fill its window
        during = rss_kib(provider.pid)
        done = True
        await sampler
        self.assertEqual(counts, [1000] * 99)
        self.assertEqual(len(connections), 1)  # all on one connection
        self.assertIsNone(unread.code)  # still open, never read
        self.assertIs(await self.end_of(streams, "unread", 0), None)  # its handler waits
        held = sum(cost for _, cost in unread.inbox.messages)
        self.assertLessEqual(held, unread.window + 1024 + wire.HEADER_SIZE + 16)
        self.assertGreater(held, unread.window // 2)  # it did send up to its credit
        unread.cancel()
        self.assertEqual(await self.end_of(streams, "unread"), "closed")
        after = rss_kib(provider.pid)
        peak = max(samples + [during])
        report(
            "99 streams + 1 unread",
            others_s=others_s,
            unread_held_kib=held // 1024,
            rss_before_kib=before,
            rss_peak_during_kib=peak,
            rss_end_during_kib=during,
            rss_after_kib=after,
        )
        self.assertLess(peak - before, 8 * MIB)
        self.assertLess(after - before, 8 * MIB)

    async def test_paused_push_consumer_stops_the_provider(self) -> None:
        """``on_message`` with the stream paused as an IPushProducer: nothing
        is delivered and no credit goes back, so the provider stops at the
        window; resumed, every message arrives in order."""
        provider = self.start()
        streams = self.client(provider, stream_window=64 * 1024).proxy(STREAMS)
        stream = streams.Count(echo_pb2.CountRequest(count=5000, payload_size=1024, tag="push"))
        got: list[int] = []

        def take(reply: echo_pb2.EchoReply) -> None:
            got.append(reply.call_id)
            if len(got) == 100:
                stream.pauseProducing()

        done = stream.on_message(take)
        await sleep(0.5)
        held = sum(cost for _, cost in stream.inbox.messages)
        delivered_while_paused = len(got)
        self.assertIs(await self.end_of(streams, "push", 0), None)  # the handler waits
        stream.resumeProducing()
        await done
        report(
            "paused push consumer", delivered_paused=delivered_while_paused, held_kib=held // 1024
        )
        self.assertEqual(delivered_while_paused, 100)
        self.assertLessEqual(held, 64 * 1024 + 1024 + 64)  # the window, and one message
        self.assertEqual(got, list(range(5000)))
        self.assertEqual(await self.end_of(streams, "push"), "done")

    async def _drain(
        self, streams: Any, count: int, size: int, connections: set[int] | None
    ) -> int:
        got = 0
        stream = streams.Count(echo_pb2.CountRequest(count=count, payload_size=size))
        async for reply in stream:
            if connections is not None and got == 0:
                connections.add(id(stream.connection))
            self.assertEqual(reply.call_id, got)
            got += 1
        return got


class StreamEndsTests(LiveBase):
    async def test_cancel_after_ten_closes_forever_generator(self) -> None:
        provider = self.start()
        streams = self.client(provider).proxy(STREAMS)
        stream = streams.Count(echo_pb2.CountRequest(forever=True, payload_size=8, tag="ten"))
        got = 0
        async for _ in stream:
            got += 1
            if got == 10:
                stream.cancel()
                break
        started = time.monotonic()
        end = await self.end_of(streams, "ten")
        report("cancel after 10", closed_seen_after_s=time.monotonic() - started)
        self.assertEqual(end, "closed")
        self.assertEqual(stream.code, StatusCode.CANCELLED)
        with self.assertRaises(RpcError) as caught:
            await stream.read()
        self.assertEqual(caught.exception.code, StatusCode.CANCELLED)

    async def test_error_status_after_messages(self) -> None:
        provider = self.start()
        streams = self.client(provider).proxy(STREAMS)
        request = echo_pb2.CountRequest(count=5, fail_code=9, fail_message="no more", tag="err")
        stream = streams.Count(request)
        got = []
        with self.assertRaises(RpcError) as caught:
            async for reply in stream:
                got.append(reply.call_id)
        self.assertEqual(got, [0, 1, 2, 3, 4])  # every message before the status
        self.assertEqual(caught.exception.code, StatusCode.FAILED_PRECONDITION)
        self.assertEqual((stream.code, stream.details), (StatusCode.FAILED_PRECONDITION, "no more"))
        self.assertEqual(await self.end_of(streams, "err"), "closed")

    async def test_deadline_mid_stream(self) -> None:
        provider = self.start()
        streams = self.client(provider).proxy(STREAMS)
        request = echo_pb2.CountRequest(forever=True, delay=0.02, tag="deadline")
        stream = streams.Count(request, timeout=0.5)
        got = 0
        started = time.monotonic()
        with self.assertRaises(RpcError) as caught:
            async for _ in stream:
                got += 1
        took = time.monotonic() - started
        report("deadline 0.5 s", messages=got, ended_after_s=took)
        self.assertEqual(caught.exception.code, StatusCode.DEADLINE_EXCEEDED)
        self.assertGreater(got, 3)  # it did end mid-stream
        self.assertLess(took, 3.0)
        self.assertEqual(await self.end_of(streams, "deadline"), "closed")

        def provider_deadline() -> tuple[wire.Frame, int, float]:
            # A consumer that never cancels: the provider's own deadline ends it.
            with RawPeer(provider.port) as peer:
                peer.hello({"streams": "1"})
                started = time.monotonic()
                peer.request(1, COUNT_ROUTE, _count(forever=True, delay=0.02, tag="raw"), 300)
                end = peer.wait_for(lambda f: f.kind == wire.RESPONSE and f.call_id == 1)
                messages = sum(1 for f in peer.frames if f.kind == wire.MESSAGE)
                return end, messages, time.monotonic() - started

        end, messages, took = await deferToThread(provider_deadline)
        report("provider deadline 0.3 s", messages=messages, status=end.status, ended_after_s=took)
        self.assertEqual(end.status, StatusCode.DEADLINE_EXCEEDED)
        self.assertGreater(messages, 3)
        self.assertEqual(await self.end_of(streams, "raw"), "closed")

    async def test_client_stream_of_many_messages(self) -> None:
        provider = self.start()
        streams = self.client(provider).proxy(STREAMS)
        started = time.monotonic()
        call = streams.Sum(echo_pb2.EchoRequest(payload=b"x" * 64) for _ in range(20_000))
        reply = await call
        took = time.monotonic() - started
        report("Sum of 20,000 x 64 B", seconds=took)
        self.assertEqual((reply.payload, reply.call_id), (b"1280000", 20_000))
        self.assertEqual(call.trailing_metadata, {"count": "20000"})
        self.assertEqual(call.code, StatusCode.OK)

    async def test_bidi_thousand_round_trips(self) -> None:
        provider = self.start()
        streams = self.client(provider).proxy(STREAMS)
        chat = streams.Chat(metadata={"hello": "there"})
        self.assertEqual(await chat.initial_metadata, {"hello": "there"})
        started = time.monotonic()
        for i in range(1000):
            await chat.write(echo_pb2.EchoRequest(payload=b"%d" % i))
            reply = await chat.read()
            self.assertEqual(reply.payload, b"%d" % i)
        took = time.monotonic() - started
        await chat.done_writing()
        self.assertIsNone(await chat.read())
        report("Chat 1,000 round trips", seconds=took, per_trip_ms=took)
        self.assertEqual(chat.code, StatusCode.OK)


class ProviderStopTests(LiveBase):
    async def test_sigterm_goaway_finishes_or_ends_typed(self) -> None:
        """SIGTERM: GOAWAY; streams that end within the grace period finish
        OK (server, client and bidi), one that never ends is ended
        UNAVAILABLE by the provider once the grace period is over, a new
        stream is refused, and the process exits."""
        provider = self.start("grace_period = 2")
        client = self.client(provider)
        streams = client.proxy(STREAMS)
        short = streams.Count(echo_pb2.CountRequest(count=20, delay=0.05))
        endless = streams.Count(echo_pb2.CountRequest(forever=True, delay=0.05))
        chat = streams.Chat()
        upload = streams.Sum()
        self.assertIsNotNone(await short.read())
        self.assertIsNotNone(await endless.read())
        await chat.write(echo_pb2.EchoRequest(payload=b"before"))
        self.assertEqual((await chat.read()).payload, b"before")
        await upload.write(echo_pb2.EchoRequest(payload=b"before"))
        provider.signal(15)
        stopped = time.monotonic()
        # The streams already open go on during the grace period, both ways.
        for i in range(20):
            await chat.write(echo_pb2.EchoRequest(payload=b"%d" % i))
            self.assertEqual((await chat.read()).payload, b"%d" % i)
            await upload.write(echo_pb2.EchoRequest(payload=b"after"))
            await sleep(0.02)
        await chat.done_writing()
        self.assertIsNone(await chat.read())
        await upload.done_writing()
        self.assertEqual((await upload).payload, b"%d" % (6 + 20 * 5))
        short_got = 1 + len([r async for r in short])
        short_s = time.monotonic() - stopped
        late = streams.Count(echo_pb2.CountRequest(count=1))
        with self.assertRaises(RpcError) as refused:
            await late.read()
        with self.assertRaises(RpcError) as ended:
            async for _ in endless:
                pass
        endless_s = time.monotonic() - stopped
        exit_code = await deferToThread(provider.wait, 15)
        report(
            "SIGTERM, grace 2 s",
            short_done_s=short_s,
            endless_end_s=endless_s,
            endless_code=int(ended.exception.code),
            late_code=int(refused.exception.code),
            late_details=repr(refused.exception.message),
            endless_details=repr(ended.exception.message),
            exit_code=exit_code,
        )
        self.assertEqual((short_got, short.code), (20, StatusCode.OK))
        self.assertEqual((chat.code, upload.code), (StatusCode.OK, StatusCode.OK))
        self.assertEqual(refused.exception.code, StatusCode.UNAVAILABLE)
        self.assertIn("shutting down", refused.exception.message)  # the GOAWAY's text
        # Past the grace period the provider ends the stream itself, saying why.
        self.assertIsInstance(ended.exception, UnavailableError)
        self.assertEqual(ended.exception.message, "provider is shutting down: grace period over")
        self.assertLess(endless_s, 2 + 5)
        self.assertIsNotNone(exit_code)

    async def test_sigkill_is_unavailable_at_once(self) -> None:
        provider = self.start()
        streams = self.client(provider).proxy(STREAMS)
        stream = streams.Count(echo_pb2.CountRequest(forever=True, delay=0.01))
        for _ in range(5):
            await stream.read()
        provider.signal(9)
        killed = time.monotonic()
        with self.assertRaises(RpcError) as caught:
            async for _ in stream:
                pass
        took = time.monotonic() - killed
        report("SIGKILL", ended_after_s=took)
        self.assertEqual(caught.exception.code, StatusCode.UNAVAILABLE)
        self.assertLess(took, 1.0)


def _count(**fields: Any) -> bytes:
    return echo_pb2.CountRequest(**fields).SerializeToString()


def _echo(payload: bytes = b"x") -> bytes:
    return echo_pb2.EchoRequest(payload=payload).SerializeToString()


def _credit_used(frames: list[wire.Frame], call_id: int) -> int:
    """Bytes of credit the provider spent on ``call_id`` (its MESSAGE frames, headers included)."""
    return sum(
        wire.HEADER_SIZE + len(f.payload)
        for f in frames
        if f.kind == wire.MESSAGE and f.call_id == call_id
    )


class HostileConsumerTests(LiveBase):
    """A consumer on a raw socket that breaks the stream rules: the provider
    answers it or closes its connection with a logged reason, and a good
    consumer (on its own connection) is served before and after alike."""

    async def hostile(
        self, name: str, attack: Any, logged: str | None, extra: str = ""
    ) -> dict[str, Any]:
        provider = self.start(extra)
        before = await self.good_client(provider)
        rss_before = rss_kib(provider.pid)
        started = time.monotonic()
        result: dict[str, Any] = await deferToThread(attack, provider)
        took = time.monotonic() - started
        after = await self.good_client(provider)
        rss_after = rss_kib(provider.pid)
        report(
            name,
            attack_s=took,
            rss_before_kib=rss_before,
            rss_after_kib=rss_after,
            good_before=before,
            good_after=after,
            **{k: v for k, v in result.items() if not k.startswith("_")},
        )
        self.assertIsNone(provider.process.poll())  # still running
        self.assertLess(rss_after - rss_before, 8 * MIB)
        if logged is not None:
            provider.wait_for_output(logged, 5)
        return result

    async def test_messages_without_credit_close_the_connection(self) -> None:
        def attack(provider: Provider) -> dict[str, Any]:
            with RawPeer(provider.port) as peer:
                peer.hello({"streams": "1", "stream_window": "1024"})
                peer.request(1, CHAT_ROUTE)
                body = _echo(b"y" * 100)
                sent = 0
                try:
                    for _ in range(50_000):  # 6 MB, far past the 256 KiB window
                        peer.message(1, body)
                        sent += 1
                except PeerClosed:
                    pass
                closed_after = peer.wait_closed()
                return {
                    "sent": sent,
                    "replies_bytes": _credit_used(peer.frames, 1),
                    "_closed": closed_after,
                }

        result = await self.hostile(
            "MESSAGE without credit", attack, r"closing connection from .*sent without credit"
        )
        self.assertLess(result["sent"], 50_000)  # closed before the attacker was done
        # The provider's own replies kept to the attacker's 1 KiB window.
        self.assertLessEqual(result["replies_bytes"], 1024 + 200)

    async def test_window_overflow_and_zero_close_the_connection(self) -> None:
        def attack(provider: Provider) -> dict[str, Any]:
            closed = []
            for increment in (2**32 - 1, 2**31 - 1, 0):
                with RawPeer(provider.port) as peer:
                    peer.hello({"streams": "1", "stream_window": "65536"})
                    peer.request(1, COUNT_ROUTE, _count(forever=True, delay=0.05))
                    peer.wait_for(lambda f: f.kind == wire.MESSAGE)
                    peer.window(1, increment)
                    closed.append(round(peer.wait_closed(), 3))
            return {"closed_after_s": closed}

        result = await self.hostile(
            "WINDOW overflow / zero",
            attack,
            r"(?s)WINDOW increment 4294967295 takes credit.*"
            r"WINDOW increment 2147483647 takes credit.*WINDOW increment 0 takes credit",
        )
        self.assertEqual(len(result["closed_after_s"]), 3)  # each connection was closed

    async def test_huge_window_never_read_bounds_provider_memory(self) -> None:
        """The largest window there is (2 GiB) on ten 64 KiB-message streams,
        and the socket never read: the provider waits on its write buffer,
        its RSS stays flat, and a good consumer is served meanwhile."""
        provider = self.start()
        before = rss_kib(provider.pid)
        peer = await deferToThread(RawPeer, provider.port)
        self.addCleanup(peer.close)

        def open_streams() -> None:
            peer.hello({"streams": "1", "stream_window": str(2**31 - 1)})
            for call_id in range(1, 11):
                peer.request(call_id, COUNT_ROUTE, _count(forever=True, payload_size=65536))

        await deferToThread(open_streams)
        samples = []
        for _ in range(20):
            await sleep(0.1)
            samples.append(rss_kib(provider.pid))
        during = await self.good_client(provider)
        peer.close()
        await sleep(0.3)
        after = rss_kib(provider.pid)
        report(
            "2 GiB window, never read",
            rss_before_kib=before,
            rss_peak_kib=max(samples),
            rss_after_kib=after,
            good_during=during,
        )
        self.assertLess(max(samples) - before, 8 * MIB)
        self.assertIsNone(provider.process.poll())
        good = await self.good_client(provider)
        self.assertLess(good["count_s"], 5.0)

    async def test_streams_past_the_connection_limit_are_refused(self) -> None:
        def attack(provider: Provider) -> dict[str, Any]:
            with RawPeer(provider.port) as peer:
                settings = peer.hello({"streams": "1", "stream_window": "65536"})
                limit = int(settings["max_streams"])
                opened = limit + 44
                for call_id in range(1, opened + 1):
                    peer.request(call_id, COUNT_ROUTE, _count(forever=True, delay=0.5))
                last = peer.wait_for(lambda f: f.kind == wire.RESPONSE and f.call_id == opened)
                refused = [f for f in peer.frames if f.kind == wire.RESPONSE]
                # One slot freed: a new stream is taken on the same connection.
                peer.cancel(1)
                peer.request(opened + 1, COUNT_ROUTE, _count(count=3))
                peer.wait_for(lambda f: f.kind == wire.RESPONSE and f.call_id == opened + 1)
                return {
                    "limit": limit,
                    "refused": len(refused),
                    "_refused_ids": sorted(f.call_id for f in refused),
                    "_codes": {f.status for f in refused},
                    "_last_message": last.message,
                    "_new_ok": _credit_used(peer.frames, opened + 1) > 0,
                    "_open": peer.is_open(),
                }

        result = await self.hostile(
            "streams past max_streams_per_connection",
            attack,
            r"RESOURCE_EXHAUSTED 256 streams open on this connection",
        )
        limit = result["limit"]
        self.assertEqual(limit, 256)
        self.assertEqual(result["_refused_ids"], list(range(limit + 1, limit + 45)))
        self.assertEqual(result["_codes"], {StatusCode.RESOURCE_EXHAUSTED})
        self.assertIn("max_streams_per_connection", result["_last_message"])
        self.assertTrue(result["_new_ok"])
        self.assertTrue(result["_open"])

    async def test_stream_frames_on_a_unary_call_are_answered_as_unary(self) -> None:
        def attack(provider: Provider) -> dict[str, Any]:
            with RawPeer(provider.port) as peer:
                peer.hello({"streams": "1"})
                # A stream-shaped opening (no payload, then MESSAGEs and
                # END_STREAM) of a unary method: it is a unary call.
                peer.request(1, ECHO_ROUTE)
                for _ in range(100):
                    peer.message(1, _echo())
                peer.end_stream(1)
                peer.window(1, 1 << 20)
                answer = peer.wait_for(lambda f: f.kind == wire.RESPONSE and f.call_id == 1)
                # Stream frames for ids never opened.
                peer.message(77, _echo())
                peer.window(78, 0)
                peer.end_stream(79)
                return {"_status": answer.status, "_open": peer.is_open()}

        result = await self.hostile("stream frames on a unary call", attack, None)
        self.assertEqual(result["_status"], StatusCode.OK)
        self.assertTrue(result["_open"])

    async def test_unary_shaped_requests_to_streaming_methods(self) -> None:
        def attack(provider: Provider) -> dict[str, Any]:
            outcomes = {}
            for name, route, frames in (
                ("sum_with_payload", SUM_ROUTE, []),
                ("chat_with_payload", CHAT_ROUTE, []),
                ("count_given_a_message", COUNT_ROUTE, ["message"]),
            ):
                with RawPeer(provider.port) as peer:
                    peer.hello({"streams": "1"})
                    payload = _count(count=1000, delay=0.1) if route == COUNT_ROUTE else _echo()
                    peer.request(1, route, payload)
                    if frames:
                        peer.message(1, _echo())
                    outcomes[name] = round(peer.wait_closed(), 3)
            return {"closed_after_s": outcomes}

        await self.hostile(
            "unary-shaped requests to streaming methods",
            attack,
            r"(?s)REQUEST opening client stream 1 has a payload.*"
            r"MESSAGE on stream 1, which takes no request messages",
        )


class KnownGapTests(LiveBase):
    """What the streaming core does not bound or say yet (see docs/reliability.md)."""

    async def test_large_messages_on_blocked_streams_bound_provider_memory(self) -> None:
        """Eight Chat streams whose handlers wait on the consumer's 1 KiB
        window, then one 16 MiB message on each: the provider should not hold
        128 MiB for one connection whose streams have a 256 KiB window each."""
        provider = self.start()

        def attack() -> dict[str, Any]:
            with RawPeer(provider.port, 30) as peer:
                peer.hello({"streams": "1", "stream_window": "1024"})
                small = _echo(b"s" * 100)
                big = _echo(b"B" * (16 << 20))
                for call_id in range(1, 9):
                    peer.request(call_id, CHAT_ROUTE)
                    for _ in range(20):  # the replies use up the 1 KiB window
                        peer.message(call_id, small)
                time.sleep(0.3)
                before = rss_kib(provider.pid)
                try:
                    for call_id in range(1, 9):
                        peer.message(call_id, big)
                except PeerClosed:
                    pass
                time.sleep(0.5)
                return {"before": before, "held": rss_kib(provider.pid), "open": peer.is_open()}

        result = await deferToThread(attack)
        await sleep(0.5)
        report(
            "16 MiB messages on 8 blocked streams",
            rss_before_kib=result["before"],
            rss_held_kib=result["held"],
            rss_closed_kib=rss_kib(provider.pid),
            connection_open=result["open"],
        )
        self.assertLess(result["held"] - result["before"], 48 * MIB)
