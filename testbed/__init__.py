"""What tests/, scripts/ and benchmarks/ share: a real ZooKeeper ensemble
(``zkserver``), ``twistd mprpc`` provider processes (``processes``), the echo
service they serve (``echo_service``) and the ZooKeeper run harness (``harness``).
It imports none of them."""
