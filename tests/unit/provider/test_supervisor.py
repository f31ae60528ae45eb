"""``workers = N``: the supervisor's logic with a fake spawner and a Clock,
the worker's control pipe and socket adoption, and the settings."""

from __future__ import annotations

import json
import os
import socket

import pytest
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from twisted_rpc import ConfigError, ProviderService, load_provider_config
from twisted_rpc.core._codec import GoawayReason
from twisted_rpc.ops import NOT_SERVING, SERVING, HealthState
from twisted_rpc.provider import Options, makeService
from twisted_rpc.provider._supervisor import KILL_MARGIN, SPARE, BindingReactor, WorkerSet
from twisted_rpc.provider._worker import AdoptingReactor, ControlProtocol, worker_settings
from twisted_rpc.server import ServerFactory


class FakeProcess:
    """What WorkerSet uses of an IProcessTransport."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[dict] = []
        self.signals: list[str] = []
        self.exited = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.written += [json.loads(line) for line in data.splitlines()]

    def signalProcess(self, sig: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(sig)


class Spawner:
    def __init__(self) -> None:
        self.spawned: list[tuple] = []
        self.envs: list[dict] = []
        self.next_pid = 100

    def __call__(self, protocol, executable, args, env, path, childFDs):
        self.next_pid += 1
        process = FakeProcess(self.next_pid)
        self.envs.append(env)
        protocol.makeConnection(process)
        self.spawned.append((protocol, process, childFDs))
        return process

    def worker(self, pid):
        return next(p for p, proc, _ in self.spawned if proc.pid == pid)

    def process(self, pid):
        return next(proc for _, proc, _ in self.spawned if proc.pid == pid)


def ready(worker) -> None:
    worker.childDataReceived(1, json.dumps({"ready": worker.pid}).encode() + b"\n")


def end(worker, reason=None) -> None:
    worker.transport.exited = True
    worker.processEnded(Failure(reason or ProcessDone(0)))


def loaded(worker) -> None:
    worker.childDataReceived(1, json.dumps({"loaded": worker.pid}).encode() + b"\n")


def make(count=2, grace=5.0, spare=False):
    spawner, clock, health = Spawner(), Clock(), HealthState()
    workers = WorkerSet(
        spawner,
        clock,
        count,
        ["python", "-m", "w"],
        lambda: [7, 8],
        health,
        grace,
        backoff=lambda n: 0.5 * 2**n,
        spare=spare,
    )
    workers.startService()
    return workers, spawner, clock, health


def test_start_spawns_the_workers_with_the_sockets_and_a_control_pipe():
    workers, spawner, _, _ = make()
    assert [p.pid for p, _, _ in spawner.spawned] == [101, 102]
    for _, _, fds in spawner.spawned:
        assert fds == {0: "w", 1: "r", 2: "r", 3: 7, 4: 8}
    assert sorted(w.pid for w in workers.current.values()) == [101, 102]


def test_a_ready_worker_is_told_the_health_and_changes_reach_every_worker():
    workers, spawner, _, health = make()
    ready(spawner.worker(101))
    assert spawner.process(101).written == [{"health": {"": SERVING}}]
    health.set_all(NOT_SERVING)
    for pid in (101, 102):
        assert spawner.process(pid).written[-1] == {"health": {"": NOT_SERVING}}


def test_a_dead_worker_is_respawned_with_backoff_reset_once_ready():
    workers, spawner, clock, _ = make()
    end(spawner.worker(101), ProcessTerminated(signal=9))
    clock.advance(0.49)
    assert len(spawner.spawned) == 2
    clock.advance(0.01)
    assert spawner.spawned[-1][0].pid == 103 and workers.current[0].pid == 103
    end(spawner.worker(103), ProcessTerminated(exitCode=1))  # died again before ready
    clock.advance(0.99)
    assert len(spawner.spawned) == 3
    clock.advance(0.01)
    assert workers.current[0].pid == 104
    ready(spawner.worker(104))
    end(spawner.worker(104), ProcessTerminated(signal=9))
    clock.advance(0.5)  # the backoff starts over
    assert workers.current[0].pid == 105
    assert [w.pid for w in workers.live] == [102, 105]


def test_workers_get_the_extra_environment_and_exits_are_told_and_counted():
    spawner, clock, health = Spawner(), Clock(), HealthState()
    workers = WorkerSet(spawner, clock, 2, ["w"], lambda: [7], health, 5.0, lambda n: 0.5, False)
    workers.env["PROMETHEUS_MULTIPROC_DIR"] = "/tmp/x"
    ended: list[int] = []
    workers.ended_hooks.append(ended.append)
    clock.advance(3.0)
    workers.startService()
    assert [env["PROMETHEUS_MULTIPROC_DIR"] for env in spawner.envs] == ["/tmp/x"] * 2
    assert "PATH" in spawner.envs[0] and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert workers.current[0].started_at == 3.0
    ready(spawner.worker(101))
    end(spawner.worker(101), ProcessTerminated(signal=9))
    clock.advance(0.5)
    assert ended == [101] and workers.respawns == {0: 1}
    assert spawner.envs[-1]["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/x"
    workers.stopService()
    for pid in (102, 103):
        end(spawner.worker(pid))
    assert ended == [101, 102, 103] and workers.respawns == {0: 1}  # (stopped: not respawns)


def test_a_loaded_worker_is_told_to_serve_but_not_the_spare():
    workers, spawner, _, _ = make(spare=True)
    assert [p.pid for p, _, _ in spawner.spawned] == [101, 102, 103]
    assert workers.current[SPARE].pid == 103
    for pid in (101, 102, 103):
        loaded(spawner.worker(pid))
    assert spawner.process(101).written == [{"serve": True}]
    assert spawner.process(103).written == []


def test_the_spare_takes_over_at_once_and_a_new_spare_follows_with_backoff():
    workers, spawner, clock, _ = make(spare=True)
    for pid in (101, 102, 103):
        loaded(spawner.worker(pid))
        if pid != 103:
            ready(spawner.worker(pid))
    end(spawner.worker(101), ProcessTerminated(signal=9))
    assert workers.current[0].pid == 103 and spawner.process(103).written == [{"serve": True}]
    assert SPARE not in workers.current
    clock.advance(0.5)
    assert workers.current[SPARE].pid == 104
    # A death while the new spare is still loading: respawned in place.
    end(spawner.worker(102), ProcessTerminated(signal=9))
    clock.advance(0.5)
    assert workers.current[1].pid == 105
    assert workers.current[SPARE].pid == 104


def test_a_restart_replaces_the_spare_too():
    workers, spawner, _, _ = make(spare=True)
    loaded(spawner.worker(103))
    workers.restart()
    assert spawner.process(103).signals == ["TERM"]
    assert workers.current[SPARE].pid == 106
    end(spawner.worker(103))
    assert workers.current[SPARE].pid == 106


def told_to_restart(spawner, pid) -> bool:
    return {"restart": True} in spawner.process(pid).written


def test_rolling_restart_retires_each_old_worker_once_its_replacement_is_ready():
    workers, spawner, clock, _ = make(grace=5.0)
    for pid in (101, 102):
        ready(spawner.worker(pid))
    workers.restart()
    assert [w.pid for w in workers.current.values()] == [103, 104]
    assert not told_to_restart(spawner, 101) and not told_to_restart(spawner, 102)
    ready(spawner.worker(104))
    assert told_to_restart(spawner, 102) and not told_to_restart(spawner, 101)
    end(spawner.worker(102))
    # A replacement that dies before it is ready: its successor takes over the restart.
    end(spawner.worker(103), ProcessTerminated(exitCode=1))
    clock.advance(0.5)
    assert not told_to_restart(spawner, 101)
    ready(spawner.worker(105))
    assert told_to_restart(spawner, 101)
    # One that does not exit within the grace period and the margin is killed.
    assert spawner.process(101).signals == []
    clock.advance(5.0 + KILL_MARGIN)
    assert spawner.process(101).signals == ["KILL"]
    end(spawner.worker(101), ProcessTerminated(signal=9))
    clock.advance(60)
    assert len(spawner.spawned) == 5  # retired workers are not respawned
    assert sorted(w.pid for w in workers.live) == [104, 105]
    assert spawner.process(102).signals == []  # (it exited in time: no kill)


def test_stop_sends_sigterm_waits_and_kills_after_the_grace_period():
    workers, spawner, clock, _ = make(grace=5.0)
    end(spawner.worker(102), ProcessTerminated(signal=9))  # a respawn pending
    stopped = workers.stopService()
    assert spawner.process(101).signals == ["TERM"]
    assert not stopped.called
    clock.advance(5.0 + KILL_MARGIN - 0.01)
    assert spawner.process(101).signals == ["TERM"]
    clock.advance(0.01)
    assert spawner.process(101).signals == ["TERM", "KILL"]
    end(spawner.worker(101), ProcessTerminated(signal=9))
    assert stopped.called
    clock.advance(60)
    assert len(spawner.spawned) == 2  # no respawn once stopping


def test_stop_ends_as_soon_as_every_worker_has_exited():
    workers, spawner, clock, _ = make()
    stopped = workers.stopService()
    end(spawner.worker(101))
    assert not stopped.called
    end(spawner.worker(102))
    assert stopped.called
    assert not clock.getDelayedCalls()


def test_worker_log_lines_are_logged_and_long_lines_are_cut(capsys):
    from twisted.logger import LogPublisher, globalLogPublisher

    events: list[dict] = []
    assert isinstance(globalLogPublisher, LogPublisher)
    globalLogPublisher.addObserver(events.append)
    try:
        workers, spawner, _, _ = make()
        worker = spawner.worker(101)
        worker.childDataReceived(2, b"[worker 101] hel")
        worker.childDataReceived(2, b"lo\n")
        worker.childDataReceived(1, b"x" * 70000)
        worker.childDataReceived(1, b"not json\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e.get("line") for e in events if "line" in e]
    assert lines[0] == "[worker 101] hello"
    assert len(lines[1]) <= 200 and lines[2] == "not json"


def test_control_protocol_applies_health_and_ignores_bad_lines():
    provider = ProviderService(Clock(), [], listen="tcp:0")
    stops: list[int] = []
    control = ControlProtocol(provider, lambda: stops.append(1))
    control.makeConnection(StringTransport())
    control.dataReceived(b'{"health": {"": 2}}\nnonsense\n{"health": 3}\n')
    assert provider.health.check("") == NOT_SERVING
    control.dataReceived(b"y" * 70000)
    assert control._buffer == b""
    control.connectionLost(Failure(Exception()))
    assert stops == [1]
    served: list[int] = []
    spare = ControlProtocol(provider, lambda: None, lambda: served.append(1))
    spare.makeConnection(StringTransport())
    spare.dataReceived(b'{"serve": true}\n{"serve": true}\n')
    assert served == [1]  # (once)
    replaced = ControlProtocol(provider, lambda: stops.append(2))
    replaced.makeConnection(StringTransport())
    replaced.dataReceived(b'{"restart": true}\n')
    assert stops == [1, 2] and provider.factory.goaway_reason == GoawayReason.IDLE
    replaced.connectionLost(Failure(Exception()))
    assert stops == [1, 2]  # (stopping already)


def test_adopting_reactor_adopts_the_inherited_sockets_in_order():
    reactor = MemoryReactor()
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        s.listen(5)
    ports = [s.getsockname()[1] for s in socks]
    adopting = AdoptingReactor(reactor, [socks[0].fileno(), socks[1].fileno()])
    factory = ServerFactory.__new__(ServerFactory)
    adopting.listenTCP(0, factory, interface="127.0.0.1")
    adopting.listenSSL(ports[1], factory, CertificateOptions())
    (fd0, family0, f0), (fd1, _, f1) = reactor.adoptedPorts
    assert (fd0, fd1) == (socks[0].fileno(), socks[1].fileno())
    assert family0 == socket.AF_INET and f0 is factory
    assert isinstance(f1, TLSMemoryBIOFactory)
    with pytest.raises(RuntimeError):
        adopting.listenTCP(0, factory)
    for s in socks:
        s.detach()  # (closed by listenTCP)


def test_reuseport_the_supervisor_binds_and_each_worker_listens_on_its_own():
    binding = BindingReactor(MemoryReactor(), reuseport=True)
    held = binding.listenTCP(0, object(), interface="127.0.0.1")
    port = held.getHost().port
    reactor = MemoryReactor()
    adopt = reactor.adoptStreamPort
    # As a real reactor's, which keeps a duplicate.
    reactor.adoptStreamPort = lambda fd, family, factory: adopt(os.dup(fd), family, factory)
    adopting = AdoptingReactor(reactor, [os.dup(binding.sockets[0].fileno())], reuseport=True)
    adopting.listenTCP(port, ServerFactory.__new__(ServerFactory), interface="127.0.0.1")
    ((fd, family, _),) = reactor.adoptedPorts
    own = socket.socket(fileno=fd)
    try:
        assert own.getsockname()[1] == port
        assert own.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert binding.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # (the worker's socket takes it: the supervisor's does not listen)
    finally:
        own.close()
        held.stopListening()


def test_binding_reactor_binds_without_accepting():
    binding = BindingReactor(MemoryReactor())
    port = binding.listenTCP(0, object(), interface="127.0.0.1")
    (sock,) = binding.sockets
    assert port.getHost().port == sock.getsockname()[1] > 0
    port.stopListening()
    assert sock.fileno() == -1


def test_workers_setting_and_option(tmp_path):
    ini = tmp_path / "p.ini"
    base = "[provider]\nlisten = tcp:0\nservices = testbed.echo_service:EchoService\n"
    ini.write_text(base)
    assert load_provider_config(str(ini)).workers == 1
    ini.write_text(base + "workers = auto\n")
    assert load_provider_config(str(ini)).workers >= 1
    for bad in ("0", "-1", "two", "1000"):
        ini.write_text(base + f"workers = {bad}\n")
        with pytest.raises(ConfigError, match="workers"):
            load_provider_config(str(ini))
    ini.write_text(base + "worker_sockets = fork\n")
    with pytest.raises(ConfigError, match="worker_sockets"):
        load_provider_config(str(ini))
    ini.write_text(base + "workers = 3\nworker_sockets = shared\n")
    assert load_provider_config(str(ini)).worker_sockets == "shared"
    options = Options()
    options.parseOptions(["-c", str(ini), "--workers", "2"])
    assert options["provider_config"].workers == 2


def test_a_supervisor_tree_registers_once_with_the_worker_count(tmp_path):
    ini = tmp_path / "p.ini"
    ini.write_text(
        "[provider]\nlisten = tcp:0:interface=127.0.0.1\n"
        "services = testbed.echo_service:EchoService\nworkers = 2\n"
        "[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
    )
    options = Options()
    options.parseOptions(["-c", str(ini)])
    service = makeService(options, MemoryReactor())
    assert isinstance(service, ProviderService)
    workers = service.getServiceNamed("workers")
    assert workers.count == 2
    assert service.registration_data["workers"] == 2
    assert service.options.admin_listen is None
    spec = json.loads(workers.args[-1])
    assert spec == {
        "args": ["--config", str(ini)],
        "workers": 2,
        "listeners": 1,
        "reuseport": True,
    }
    plain = makeService({**options, "provider_config": load_provider_config(str(ini))})
    assert isinstance(plain, ProviderService)


def test_worker_settings_reach_the_connection_settings():
    provider = ProviderService(Clock(), [], listen="tcp:0")
    provider.factory.extra_settings = worker_settings(2, 4242)
    settings = provider.factory.buildProtocol(None).local_settings()
    assert settings["workers"] == "2" and settings["worker"] == "4242"


def test_goaway_says_the_factory_reason():
    provider = ProviderService(Clock(), [], listen="tcp:0")
    said: list[tuple] = []
    connection = provider.factory.buildProtocol(None)
    connection.goaway = lambda message, reason: said.append((message, reason))
    provider.factory.connections.add(connection)
    provider.factory.goaway()
    provider.factory.goaway_reason = GoawayReason.IDLE
    provider.factory.goaway("replaced")
    assert said == [
        ("provider is shutting down", GoawayReason.SHUTDOWN),
        ("replaced", GoawayReason.IDLE),
    ]


def test_workers_need_endpoints_they_can_share(tmp_path):
    ini = tmp_path / "p.ini"
    ini.write_text(
        "[provider]\nlisten = unix:/tmp/p.sock\n"
        "services = testbed.echo_service:EchoService\nworkers = 2\n"
    )
    with pytest.raises(SystemExit, match="with workers > 1 a listener must be one of tcp"):
        Options().parseOptions(["-c", str(ini)])
    Options().parseOptions(["-c", str(ini), "--workers", "1"])  # one process: any endpoint


def test_the_supervisor_binds_registers_once_and_spawns_with_the_sockets(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from twisted_rpc import StaticRegistry
    from twisted_rpc.provider._supervisor import supervisor_service

    ini = tmp_path / "p.ini"
    ini.write_text(
        "[provider]\nlisten = tcp:0:interface=127.0.0.1\n"
        "services = testbed.echo_service:EchoService\nworkers = 2\ngrace_period = 1\n"
    )
    options = Options()
    options.parseOptions(["-c", str(ini)])
    reactor = MemoryReactorClock()
    spawner = Spawner()
    reactor.spawnProcess = spawner
    registry = StaticRegistry()
    service = supervisor_service(options, options["provider_config"], reactor, (registry, None))
    service.startService()
    try:
        port = service.advertise.port
        (registration,) = registry.registrations  # once, by the supervisor
        assert registration.data["workers"] == 2 and registration.address.port == port
        assert len(spawner.spawned) == 3  # two workers and the spare
        (held,) = [s for s in service.reactor.sockets]
        for _, _, fds in spawner.spawned:
            assert fds[3] == held.fileno()
        stopping = service.stopService()
        for pid in (101, 102, 103):  # SIGTERM to each, after the withdrawal
            assert spawner.process(pid).signals == ["TERM"]
        assert registry.registrations == []
        for pid in (101, 102, 103):
            end(spawner.worker(pid))
        assert stopping.called
    finally:
        for sock in service.reactor.sockets:
            sock.close()
