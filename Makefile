# The two commands of the README: `make demo` and `make test`. Both install into .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean container-lint container-test

# The lock: requirements/*.txt (pyproject.toml reads them; the container images install from them too).
LOCK := requirements/torch.txt requirements/runtime.txt requirements/test.txt requirements/lint.txt

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# hadolint on every Dockerfile and every version written in them checked against the lock (tests/containers too).
DOCKERFILES := $(wildcard containers/Dockerfile*)

container-lint: $(STAMP)
	$(BIN)/hadolint --config containers/hadolint.yaml $(DOCKERFILES)
	$(BIN)/python containers/check_pins.py $(DOCKERFILES)

# Builds the CPU image (podman, or a running Docker engine) and runs the smoke tests and the reduced demo in it
# with --network none. See containers/README.md.
container-test: container-lint
	bash containers/container_test.sh

clean:
	rm -rf $(VENV) .pytest_cache
