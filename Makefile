# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all setup demo test lint bench clean

all: test

$(STAMP): pyproject.toml setup.py $(wildcard splice_ext/*.pyx splice_ext/*.pxd splice_ext/*.h)
	./scripts/install-deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	@if [ "$$(id -u)" -eq 0 ]; then $(PY) -m serval.demo_netns; else \
	  echo "make demo: the namespace demo needs root; showing the in-memory protocol trace instead"; \
	  $(PY) -m serval.demo; fi

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy serval splice_ext translator
	$(VENV)/bin/mypy --strict benchmarks/*.py

bench: setup
	for b in relay servald migration chain; do test ! -f benchmarks/$${b}_bench.py || $(PY) benchmarks/$${b}_bench.py || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info splice_ext/*.so splice_ext/*.c
