# Quick start: `make demo` (a provider plus the example callers) and `make test`.
# Both create .venv and install everything they need on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/*.proto examples/*/*.proto)
GENERATED := $(PROTOS:.proto=_pb2.py)

# The checkout comes first on the import path: twistd finds twisted/plugins/
# here, and `services = examples...` in etc/*.ini import from here.
export PYTHONPATH := $(CURDIR)

.PHONY: demo test lint protos zookeeper browser bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet ".[dev]"
	touch $@

# protoc's message modules and stubs, and (for a file with services) our typed
# stubs, x_rpc.py (docs/stubs.md).
%_pb2.py: %.proto $(STAMP)
	$(PY) -m twisted_rpc.protoc -I. --python_out=. --pyi_out=. --twisted_rpc_out=. $<

protos: $(GENERATED)

demo: protos
	PY=$(PY) scripts/demo

# A real ZooKeeper server for the integration tests (Debian's package and a JRE).
zookeeper: $(STAMP)
	PY=$(PY) scripts/zookeeper install

# Debian's Chromium + ChromeDriver, for the status page's browser test.
browser:
	scripts/install-browser

# ruff, then mypy --strict over the package (settings: pyproject.toml's [tool.mypy]).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: protos lint zookeeper browser
	$(PY) -m pytest

# The peer benchmark's whole matrix (docs/benchmarks.md), this framework beside
# gRPC and the raw-Twisted floor: 3 rounds, about 20 minutes; not part of `make test`.
PEERS ?= ../shared/bench/peers
BENCH_OUT ?= peers.json
BENCH_REPEAT ?= 3
bench: protos
	$(PY) $(PEERS)/run_all.py --payloads 32,65536,1048576 --concurrency 1,16,128 --repeat $(BENCH_REPEAT) \
	    --system twisted_rpc "$(PY) -m benchmarks.peer server" "$(PY) -m benchmarks.peer client" \
	    --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) $(GENERATED) $(GENERATED:.py=.pyi) $(GENERATED:_pb2.py=_rpc.py) twisted/plugins/dropin.cache
