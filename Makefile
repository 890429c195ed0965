# Every target builds the local virtual environment itself when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 50051
DATABASE_URL ?= sqlite+aiosqlite:///tokenstream.db

PROTOS := $(shell find protos -name '*.proto')
GEN_FLAGS = -Iprotos --python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1)

.PHONY: venv run test lint generate check-generated buf-lint pytest clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: serve on $(HOST):$(PORT) with an embedded SQLite file and the built-in token sources
run: $(STAMP)
	$(BIN)/tokenstream serve --host $(HOST) --port $(PORT) --database-url '$(DATABASE_URL)'

## test: lint, generated-code drift check, and the whole test suite
test: lint check-generated pytest

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

## lint: ruff, mypy (strict) and buf lint
lint: $(STAMP) buf-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

buf-lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code protos

## generate: regenerate gen/ from protos/
generate: $(STAMP)
	rm -rf gen/tokenstream
	mkdir -p gen
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc $(call GEN_FLAGS,gen) $(PROTOS)

## check-generated: fail when gen/ differs from what protos/ generate
check-generated: $(STAMP)
	@tmp=$$(mktemp -d) && \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc $(call GEN_FLAGS,$$tmp) $(PROTOS) && \
	if diff -r $$tmp/tokenstream gen/tokenstream -x __pycache__; then echo "generated code is up to date"; rm -rf $$tmp; \
	else echo "gen/ is stale: run 'make generate' and commit the result" >&2; rm -rf $$tmp; exit 1; fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
