"""scripts/netns-cluster: a ZooKeeper ensemble, providers and a consumer host, each host
a network namespace on this machine (root needed; testbed/netns.py does the work).

    scripts/netns-cluster up [--prefix P]        # namespaces P-zk1..3, P-p1..3, P-c1, P-br
    scripts/netns-cluster status [--prefix P]    # processes, ZooKeeper modes, links
    scripts/netns-cluster exec HOST CMD...       # run CMD in HOST's namespace (c1, p2...)
    scripts/netns-cluster cut|join HOST          # HOST's link to the bridge down / up
    scripts/netns-cluster netem HOST SPEC...     # e.g. netem c1 delay 50ms; netem c1 clear
    scripts/netns-cluster delayed-host [MS]      # add c2: every frame to/from it MS (50) late
    scripts/netns-cluster down [--prefix P]      # stop every process by PID, delete it all
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from testbed.netns import (
    HOST_NUMBERS,
    PROVIDER_HOSTS,
    ZK_HOSTS,
    Cluster,
    state_file,
    unavailable_reason,
)

DEFAULT_PREFIX = "mprpcnet"


def _status(cluster: Cluster) -> int:
    if not cluster.namespaces():
        print(f"no cluster with prefix {cluster.prefix!r}")
        return 1
    print(f"namespaces: {' '.join(cluster.namespaces())}")
    for name, pid in cluster.pids.items():
        try:
            os.kill(pid, 0)
            alive = "running"
        except ProcessLookupError:
            alive = "GONE"
        where = (
            cluster.provider_address(name)
            if name in PROVIDER_HOSTS
            else cluster.ip(name)
            if name in HOST_NUMBERS
            else "(user-space delayed link)"
        )
        mode = f" {cluster.zk_mode(name) or 'not serving'}" if name in ZK_HOSTS else ""
        print(f"{name:4} pid {pid:7} {alive:8} {where}{mode}")
    links = subprocess.run(
        ["ip", "-n", cluster.bridge_ns, "-br", "link"], capture_output=True, text=True
    )
    print(links.stdout, end="")
    print(f"logs and configs: {cluster.dir}")
    return 0


def _usage(cluster: Cluster) -> str:
    exe = "scripts/netns-cluster" + (
        f" --prefix {cluster.prefix}" if cluster.prefix != DEFAULT_PREFIX else ""
    )
    return (
        f"cluster {cluster.prefix!r} is up: ZooKeeper {cluster.zk_hosts}, providers "
        + ", ".join(cluster.provider_address(h) for h in PROVIDER_HOSTS)
        + f"\nrun the example callers from the consumer host c1:\n"
        f"  {exe} exec c1 .venv/bin/python -m examples.user.caller"
        f" --config {cluster.dir / 'consumer.ini'}\n"
        f"look around: {exe} status; {exe} exec p1 ss -tnp\n"
        f"faults: {exe} cut p1 / join p1; {exe} netem c1 delay 50ms / netem c1 clear\n"
        f"end: {exe} down"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/netns-cluster", description=__doc__)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix")
    parser.add_argument(
        "command",
        choices=["up", "down", "status", "exec", "cut", "join", "netem", "delayed-host"],
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"netns-cluster: {reason}", file=sys.stderr)
        return 2
    if args.command == "up":
        if state_file(args.prefix).exists():
            print(f"a cluster {args.prefix!r} is up already (down it, or use --prefix)")
            return 1
        cluster = Cluster(args.prefix).up()
        print(_usage(cluster))
        return 0
    cluster = Cluster.load(args.prefix)
    if args.command == "down":
        cluster.down()
        state_file(args.prefix).unlink(missing_ok=True)
        print(f"cluster {args.prefix!r} down: processes stopped, namespaces deleted")
        return 0
    if args.command == "status":
        return _status(cluster)
    if args.command == "delayed-host":
        cluster.add_delayed_host("c2", float(args.rest[0] if args.rest else 50) / 1000)
        cluster.save()
        print(f"c2 ({cluster.ip('c2')}) is up behind a delayed link: exec c2 CMD...")
        return 0
    if not args.rest or args.rest[0] not in cluster.hosts:
        parser.error(f"name a host: {' '.join(cluster.hosts)}")
    host, rest = args.rest[0], args.rest[1:]
    if args.command == "exec":
        return subprocess.call(["ip", "netns", "exec", cluster.ns(host), *rest])
    if args.command in ("cut", "join"):
        cluster.set_link(host, up=args.command == "join")
    elif rest == ["clear"]:
        cluster.clear_netem(host)
    else:
        cluster.netem(host, " ".join(rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
