# Quick start: `make demo` (a provider plus the example callers) and `make test`.
# Both create .venv and install everything they need on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard examples/*/*.proto testbed/protos/*.proto)
GENERATED := $(PROTOS:.proto=_pb2.py)

# The checkout comes first on the import path: twistd finds twisted/plugins/
# here, and `services = examples...` in etc/*.ini import from here.
export PYTHONPATH := $(CURDIR)

.PHONY: demo test lint docs protos zookeeper browser bench clean

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

# The API reference, by pydoctor (Twisted's documentation tool), in
# build/apidocs/ (open index.html): each name on the page of the package users
# import it from (twisted_rpc.Client; docs/pydoctor_facade.py), private modules
# behind "Show Private API". Docstrings are reStructuredText; a reference that
# does not resolve fails the build (-W). No intersphinx: no network needed.
APIDOCS := build/apidocs
DOC_SOURCES := $(shell find twisted_rpc -name '*.py') docs/pydoctor_facade.py

docs: $(APIDOCS)/index.html

$(APIDOCS)/index.html: $(DOC_SOURCES) $(STAMP)
	rm -rf $(APIDOCS).tmp
	PYTHONPATH=$(CURDIR)/docs $(PY) -m pydoctor --quiet --warnings-as-errors \
		--system-class=pydoctor_facade.FacadeSystem --docformat=restructuredtext \
		--project-name=twisted_rpc --html-output=$(APIDOCS).tmp twisted_rpc
	rm -rf $(APIDOCS) && mv $(APIDOCS).tmp $(APIDOCS)

test: protos lint docs zookeeper browser
	$(PY) -m pytest

# The peer benchmark's whole matrix (docs/benchmarks.md), this framework beside
# gRPC and the raw-Twisted floor: 3 rounds, about 20 minutes; not part of `make test`.
PEERS ?= ../shared/bench/peers
BENCH_OUT ?= peers.json
BENCH_REPEAT ?= 3
bench: protos
	@test -f $(PEERS)/run_all.py || { echo "no peer harness at $(PEERS): make bench PEERS=/path/to/bench/peers"; exit 2; }
	$(PY) $(PEERS)/run_all.py --payloads 32,65536,1048576 --concurrency 1,16,128 --repeat $(BENCH_REPEAT) \
	    --system twisted_rpc "$(PY) -m benchmarks.peer server" "$(PY) -m benchmarks.peer client" \
	    --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) $(GENERATED) $(GENERATED:.py=.pyi) $(GENERATED:_pb2.py=_rpc.py) twisted/plugins/dropin.cache
