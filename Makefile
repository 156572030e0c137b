# The two commands of the quick start: `make demo` and `make test`.
# Both create the virtual environment and install everything on first use.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo test lint bench image-check

# bench: the benchmark's peers, which mypy checks with the rest (`make lint`).
# otel: tracing's extra, which the tests export spans of in memory.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench,otel]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/postback demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# tests/prerequisites.py: a Chromium for the ops page tests and docker-compose, found or
# obtained (apt-get as root, Playwright's installer), or one line saying how to get them.
test: lint
	$(BIN)/python -m tests.prerequisites
	$(BIN)/pytest

# The benchmark suite (bench/README.md): real Redis and Postgres, the relay against its peers
# (an arq floor job, a Celery script with a delivery log), about 14 minutes on 2 cores.
bench: install
	$(BIN)/python -m bench

# The image built and run with podman, docker-compose.yml with podman-compose (README:
# "Checked here with podman"). As root; a few minutes the first time, under one after.
image-check: install
	$(BIN)/python -m imagecheck
