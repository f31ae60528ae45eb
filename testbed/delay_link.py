"""A link with a fixed one-way delay, in user space, for kernels without ``tc netem``.

Two TAP devices, ``--dev-a`` in namespace ``--ns-a`` and ``--dev-b`` in ``--ns-b``
(made with ``ip tuntap add ... mode tap`` beforehand): every frame read from one is
written to the other ``--delay`` seconds later, in order. testbed/netns.py runs it
for a host behind a delayed link (``Cluster.add_delayed_host``); stop it by PID.

    python -m testbed.delay_link --ns-a NS --dev-a eth0 --ns-b NS_BR --dev-b v-c2 --delay 0.05
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import struct
import time
from collections import deque

from testbed.netns import in_namespace

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_QUEUED = 100_000  # frames held per direction; past it frames are dropped


def open_tap(namespace: str, name: str) -> int:
    """A file descriptor of the TAP device ``name`` of ``namespace``."""

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        return fd

    return in_namespace(namespace, attach)


def forward(a: int, b: int, delay: float) -> None:
    queues: dict[int, deque[tuple[float, bytes]]] = {a: deque(), b: deque()}
    other = {a: b, b: a}
    while True:
        now = time.monotonic()
        for src, queue in queues.items():
            while queue and queue[0][0] <= now:
                try:
                    os.write(other[src], queue.popleft()[1])
                except BlockingIOError:
                    pass  # the device is full: the frame is lost, as on a wire
        due = [q[0][0] for q in queues.values() if q]
        wait = max(0.0, min(due) - time.monotonic()) if due else 1.0
        readable, _, _ = select.select([a, b], [], [], wait)
        now = time.monotonic()
        for fd in readable:
            for _ in range(64):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(queues[fd]) < MAX_QUEUED:
                    queues[fd].append((now + delay, frame))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ns-a", required=True)
    parser.add_argument("--dev-a", required=True)
    parser.add_argument("--ns-b", required=True)
    parser.add_argument("--dev-b", required=True)
    parser.add_argument("--delay", type=float, required=True, help="one way, seconds")
    args = parser.parse_args()
    a, b = open_tap(args.ns_a, args.dev_a), open_tap(args.ns_b, args.dev_b)
    print(f"delay link up: {args.delay * 1000:g} ms each way", flush=True)
    forward(a, b, args.delay)


if __name__ == "__main__":
    main()
