"""Benchmarks of twisted_rpc: the peer-harness contract (``python -m benchmarks.peer``),
per-call CPU of the hot path, the ratio tables and the discovery figures
(docs/benchmarks.md)."""
